"""The edge server: one frozen codec, any number of heads, one decode per request for all of them.

Stack: FastAPI (routing, validation, OpenAPI docs at ``/docs``) on uvicorn (ASGI server with its own
TLS options). Every request's stream is validated and decoded on its own, in crash-isolated decoder
processes (:mod:`mtfc.deploy.decoding`), so a bad stream fails only its own request; the decoded
latents then meet in a dynamic batcher that groups them by image size and requested heads and runs
each group as one batch (at most ``max_batch`` images and ``max_batch_pixels`` pixels, after waiting
at most ``max_wait_ms`` for more), so throughput grows with load.

Endpoints:

* ``POST /predict?heads=a,b`` — body: one :mod:`mtfc.bitstream` stream (``application/octet-stream``);
  answer: ``{"predictions": {head: ...}, "image_size", "content_size", "original_size", "level", "bytes",
  "timing_ms"}`` (formats in :mod:`mtfc.deploy.wire`): the predictions are in the coordinates of the
  original image (``original_size``, from the stream's header; boxes in its pixels, label maps of its
  size), ``content_size`` is the resized image the device coded and ``image_size`` the size it was
  coded at (padded to the codec's divisibility). Errors: 400 bad stream (the ``BitstreamError``'s class and message), an
  image size the server does not serve, or an unknown head; 401 missing/wrong bearer token; 408 body
  not received in time; 413 body or image too large; 415 wrong content type; 503 queue full; 504 the
  request's deadline passed (its decode and head work is cancelled).
* ``GET /health`` (never needs the token): ``ok``, ``degraded`` while decoder workers are missing, or
  ``unavailable`` (503) with none; ``GET /info`` (codec fingerprint, heads, image sizes, versions,
  limits); ``GET /metrics`` (Prometheus text format: requests by path and status, errors by kind,
  latency and batch-size histograms, bytes in, decoder workers and crashes, pixels in flight).

Hostile traffic. The cost of a request is bounded by what the server serves, not by what a client
announces: only images that fit within one of the sizes in :attr:`ServerConfig.image_sizes` (default:
the training sizes the codec and the heads record) get past the header, so an image kept at its aspect
ratio (``resize: keep_aspect``) is served whatever its shape; admitted requests hold at most
``max_pixels_in_flight`` pixels, ``max_queue`` more wait, and the rest get 503 at once; a request's
decode, queueing and heads must finish within ``request_timeout_s`` or it gets 504 (a decode is
cancelled by killing its worker process, a queued request leaves its batch). Slow clients are cut off
before any authentication or decoding work: headers within ``header_timeout_s`` (or the connection
is closed), the body within ``body_timeout_s`` (408), idle keep-alive connections after
``keep_alive_s``; at most ``max_connections`` connections and requests are served (uvicorn answers
503 beyond that).

Worst case of one request under the defaults (measured on the demo's architectures, untrained weights,
1 thread, in a fresh process, 2-core CPU machine): a forged stream of the largest
served size that decodes to noise costs under 2 ms of decoding and 0.07 CPU-s in the three heads at
64×64 (the demo's training size, so its default), 0.14 CPU-s at 96×96, with +5 MB of memory; riding in a
full batch of 16 at 64×64 the batch costs 0.45 CPU-s and +43 MB. The largest image the default batch
budget admits at all (512×512, if served) costs 0.96 CPU-s and +130 MB. The stream the issue measured
(45 bytes announcing 4096×4096: 40 CPU-s, 11.3 GB) is refused at the header with 413. Besides the
heads' one running batch, requests in flight hold only their latents (``max_pixels_in_flight`` pixels
in all, C·H·W/16 floats each). Every request is answered within ``request_timeout_s`` of its body; what
is left of its work then is cancelled, except a head batch already running, which finishes (one batch,
at most ``max_batch_pixels``).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import importlib
import importlib.metadata
import logging
import platform
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import ClientDisconnect

from mtfc import bitstream
from mtfc.codec import Codec
from mtfc.deploy.decoding import DecoderPool
from mtfc.deploy.wire import STREAM_TYPE, prediction_to_json
from mtfc.head import geometry
from mtfc.model import MultiTaskModel

__all__ = ["STREAM_TYPE", "ServerConfig", "create_app", "load_model", "serve", "served_image_sizes",
           "uvicorn_config"]
log = logging.getLogger("mtfc.server")
#: The paths ``/metrics`` labels by name; any other path is counted as ``other``.
PATHS = ("/predict", "/health", "/info", "/metrics", "/docs", "/openapi.json")
#: The status ``/metrics`` counts for a client that went away before its answer (nginx's convention).
CLIENT_CLOSED = 499


@dataclass
class ServerConfig:
    """Batching, limits, timeouts and authentication of the server.

    Args:
        max_batch: most images run through the heads as one batch.
        max_batch_pixels: most image pixels in one batch (a batch of large images holds fewer images).
        max_wait_ms: how long the first request of a batch waits for others to join it.
        max_body_bytes: larger bodies get 413 (their bytes are read and dropped, so the client sees the answer).
        image_sizes: the largest (H, W) image sizes served: a stream is served if its coded size fits
            within one of them (height and width each at most its); another gets 400 (413 if it has more
            pixels than all of them) before any decoding. ``None``: the training sizes the codec and the
            heads record (``image_size`` in their configs).
        max_pixels_in_flight: most image pixels of requests being decoded, queued for or in the heads.
        max_queue: requests waiting for room within ``max_pixels_in_flight``; more get 503.
        request_timeout_s: longest time from the received body to the answer (decode, queue, heads);
            past it the request gets 504 and its work is cancelled.
        header_timeout_s: a connection must send a request's headers within this time after it opens
            or after its previous answer; otherwise it is closed.
        body_timeout_s: the body must arrive within this time after the headers (else 408).
        keep_alive_s: idle keep-alive connections are closed after this time.
        max_connections: most open connections and requests in progress; uvicorn answers 503 beyond.
        token: if set, every endpoint but ``/health`` needs ``Authorization: Bearer <token>``.
        decoder_workers: entropy-decoding processes (a stream that crashes one only loses its own request).
        threads: PyTorch intra-op threads of the server process and of each decoder.
    """

    max_batch: int = 16
    max_batch_pixels: int = 1 << 18
    max_wait_ms: float = 5.0
    max_body_bytes: int = 1 << 20
    image_sizes: Sequence[Sequence[int]] | None = None
    max_pixels_in_flight: int = 1 << 19
    max_queue: int = 64
    request_timeout_s: float = 10.0
    header_timeout_s: float = 5.0
    body_timeout_s: float = 5.0
    keep_alive_s: float = 5.0
    max_connections: int = 512
    token: str | None = None
    decoder_workers: int = 2
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_batch_pixels", "max_body_bytes", "max_pixels_in_flight", "max_connections",
                     "decoder_workers", "threads", "request_timeout_s", "header_timeout_s", "body_timeout_s",
                     "keep_alive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_queue < 0 or self.max_wait_ms < 0:
            raise ValueError("ServerConfig.max_queue and max_wait_ms must be >= 0")
        if self.image_sizes is not None:
            self.image_sizes = [(int(h), int(w)) for h, w in self.image_sizes]


class RequestError(Exception):
    """A client error: answered with ``status`` and ``{"error": kind, "detail": message}``."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 408: {"Connection": "close"}, 503: {"Retry-After": "1"}}


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": exc.kind, "detail": exc.detail}, status_code=exc.status,
                        headers=_HEADERS.get(exc.status))


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (what ``GET /metrics`` exposes)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mtfc_requests", "HTTP requests answered, by path and status (499: the client "
                                "went away first; 500: a server fault)", ["path", "code"], registry=r)
        self.errors = Counter("mtfc_request_errors", "error answers by kind", ["error"], registry=r)
        self.latency = Histogram("mtfc_request_duration_seconds", "time from the request's headers to its answer",
                                 ["path"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.bytes_in = Counter("mtfc_request_bytes", "bytes of /predict bodies received", registry=r)
        self.streams = Counter("mtfc_streams", "streams answered, by rate level ('fixed': a fixed-rate codec)",
                               ["level"], registry=r)
        self.stream_bytes = Counter("mtfc_stream_bytes", "bytes of the streams answered, by rate level", ["level"],
                                    registry=r)
        self.batch_images = Histogram("mtfc_batch_images", "images per head batch", registry=r,
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.slow_clients = Counter("mtfc_slow_connections_closed", "connections closed for not sending their "
                                    "headers within header_timeout_s", registry=r)
        self.pixels_in_flight = Gauge("mtfc_pixels_in_flight", "image pixels of admitted requests", registry=r)
        self.waiting = Gauge("mtfc_requests_waiting", "requests waiting for admission", registry=r)

    def watch_decoders(self, pool: Callable[[], DecoderPool | None]) -> None:
        """Export the decoder pool's state, read from it when scraped."""
        self.registry.register(_DecoderCollector(pool))


class _DecoderCollector:
    """A Prometheus collector of the decoder pool's workers, crashes and failed starts."""

    def __init__(self, pool: Callable[[], DecoderPool | None]) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        pool = self.pool()
        if pool is None:
            return
        yield GaugeMetricFamily("mtfc_decoder_workers", "decoder worker processes alive", value=pool.alive)
        yield GaugeMetricFamily("mtfc_decoder_workers_wanted", "decoder worker processes configured", value=pool.size)
        yield CounterMetricFamily("mtfc_decoder_crashes", "streams that crashed a decoder worker", value=pool.crashes)
        yield CounterMetricFamily("mtfc_decoder_start_failures", "decoder workers that failed to start",
                                  value=pool.start_failures)


class Admission:
    """Admits requests while their image pixels fit ``budget``; up to ``max_queue`` wait (first come,
    first served) and any more get 503 at once."""

    def __init__(self, budget: int, max_queue: int, metrics: Metrics) -> None:
        self.budget, self.max_queue, self.metrics = budget, max_queue, metrics
        self.in_flight = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @contextlib.asynccontextmanager
    async def admit(self, pixels: int) -> AsyncIterator[None]:
        if self._waiting or self.in_flight + pixels > self.budget:
            if len(self._waiting) >= self.max_queue:
                raise RequestError(503, "Overloaded", f"the server is busy ({len(self._waiting)} requests waiting); "
                                                      "retry later")
            entry = (pixels, asyncio.get_running_loop().create_future())
            self._waiting.append(entry)
            self.metrics.waiting.set(len(self._waiting))
            try:
                await entry[1]
            except asyncio.CancelledError:
                if entry[1].done() and not entry[1].cancelled():  # admitted just as it was cancelled
                    self._release(pixels)
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self.metrics.waiting.set(len(self._waiting))
                raise
        else:
            self._take(pixels)
        try:
            yield
        finally:
            self._release(pixels)

    def _take(self, pixels: int) -> None:
        self.in_flight += pixels
        self.metrics.pixels_in_flight.set(self.in_flight)

    def _release(self, pixels: int) -> None:
        self._take(-pixels)
        while self._waiting and self.in_flight + self._waiting[0][0] <= self.budget:
            pixels, future = self._waiting.popleft()
            if not future.done():
                self._take(pixels)
                future.set_result(None)
        self.metrics.waiting.set(len(self._waiting))


class Batcher:
    """Dynamic batching of decoded latents; one worker thread runs the heads.

    Requests with the same image size and heads are run together: the group of the oldest waiting
    request runs as soon as it holds ``max_batch`` requests (fewer for large images: at most
    ``max_batch_pixels`` pixels) or that request has waited ``max_wait_ms``. Requests cancelled while
    waiting (deadline, client gone) leave their group before it runs. A batch that fails is re-run one
    request at a time, so only the request that caused it gets the error.
    """

    def __init__(self, model: MultiTaskModel, max_batch: int, max_batch_pixels: int, max_wait_ms: float,
                 metrics: Metrics) -> None:
        self.model, self.max_batch, self.max_batch_pixels = model, max_batch, max_batch_pixels
        self.max_wait, self.metrics = max_wait_ms / 1000, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mtfc-heads")

    async def submit(self, latent: torch.Tensor, heads: tuple[str, ...],
                     record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """Predictions of ``heads`` for one decoded latent (1, C, h, w) of the image its geometry ``record``
        (from the stream's header, :func:`mtfc.head.geometry`) describes, and the batch's timing."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(((tuple(record["image_size"]), heads), (latent, record), future, time.perf_counter()))
        return await future

    def _limit(self, image_size: tuple[int, int]) -> int:
        return max(1, min(self.max_batch, self.max_batch_pixels // (image_size[0] * image_size[1])))

    async def run(self) -> None:
        pending: dict[Any, list] = {}  # (image size, heads) -> requests waiting, oldest first

        def take(item: tuple) -> None:
            pending.setdefault(item[0], []).append(item)

        while True:
            if not pending:
                take(await self.queue.get())
            key = min(pending, key=lambda k: pending[k][0][3])  # the oldest request's group runs next
            limit, deadline = self._limit(key[0]), pending[key][0][3] + self.max_wait
            while len(pending[key]) < limit:
                while self.queue.qsize():
                    take(self.queue.get_nowait())
                timeout = deadline - time.perf_counter()
                if len(pending[key]) >= limit or timeout <= 0:
                    break
                try:
                    take(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            group, pending[key] = pending[key][:limit], pending[key][limit:]
            if not pending[key]:
                del pending[key]
            await self._run_group(*key, group)

    async def _run_group(self, image_size: tuple[int, int], heads: tuple[str, ...], group: list) -> None:
        group = [item for item in group if not item[2].done()]  # drop requests cancelled while they waited
        if not group:
            return
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self.executor, self._predict, heads, [g[1] for g in group])
        except Exception as e:
            if len(group) > 1:  # isolate the culprit: every other request still gets its answer
                for item in group:
                    await self._run_group(image_size, heads, [item])
                return
            log.exception("a head failed on a %dx%d image (heads %s)", *image_size, ",".join(heads))
            if not group[0][2].done():
                group[0][2].set_exception(RequestError(500, "HeadError", f"a head failed on this input: "
                                                                         f"{type(e).__name__}: {e}"))
            return
        heads_ms = 1000 * (time.perf_counter() - start)
        self.metrics.batch_images.observe(len(group))
        for (_, _, future, queued), out in zip(group, outputs):
            if not future.done():  # the request may have been cancelled meanwhile
                future.set_result((out, {"queue": 1000 * (start - queued), "heads": heads_ms,
                                         "batch_size": len(group)}))

    @torch.no_grad()
    def _predict(self, heads: tuple[str, ...], items: list[tuple[torch.Tensor, dict[str, Any]]]) -> list[dict[str, Any]]:
        latents, records = zip(*items)
        preds = self.model.run_heads(torch.cat(latents), list(records), heads)
        tasks = {name: self.model.heads[name].task for name in heads}
        return [{name: prediction_to_json(tasks[name], preds[name][i]) for name in heads} for i in range(len(items))]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("mtfc", "torch", "compressai", "fastapi", "uvicorn", "onnxruntime", "prometheus_client"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def served_image_sizes(model: MultiTaskModel, config: ServerConfig) -> list[tuple[int, int]]:
    """The (H, W) sizes the server serves: ``config.image_sizes``, else the training sizes recorded by
    the codec (``meta["image_size"]``) and the heads (``image_size`` in their configs), checked
    against the codec's ``size_divisibility`` and the batch's pixel budget."""
    if config.image_sizes is not None:
        sizes = list(config.image_sizes)
    else:
        recorded = [model.codec.meta.get("image_size"),
                    *((getattr(h, "_mtfc_spec", None) or {}).get("kwargs", {}).get("image_size")
                      for h in model.heads.values())]
        sizes = [(s, s) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in recorded if s]
        if not sizes:
            raise ValueError("neither the codec nor the heads record the image size they were trained on: "
                             "name the sizes to serve (--image-size HxW, or ServerConfig(image_sizes=...))")
    sizes = sorted(set(sizes))
    d = model.codec.size_divisibility
    for H, W in sizes:
        if H <= 0 or W <= 0 or H % d or W % d:
            raise ValueError(f"image size {H}x{W}: this codec takes sizes whose height and width are multiples "
                             f"of {d}; fix --image-size")
        if H * W > min(config.max_batch_pixels, config.max_pixels_in_flight):
            raise ValueError(f"image size {H}x{W} ({H * W} pixels) exceeds max_batch_pixels "
                             f"({config.max_batch_pixels}) or max_pixels_in_flight ({config.max_pixels_in_flight}); "
                             "raise them or serve smaller images")
    return sizes


@torch.no_grad()
def _check_heads(model: MultiTaskModel, sizes: list[tuple[int, int]]) -> None:
    """Run every head once on each served size and on the smallest image the codec takes (zero latent),
    so a size a head cannot take fails at start-up with its message, not later as a 500."""
    s, C, d = model.codec.latent_stride, model.codec.latent_channels, model.codec.size_divisibility
    for H, W in [*sizes, (d, d)]:
        latent = torch.zeros(1, C, H // s, W // s)
        for name, head in model.heads.items():
            try:
                prediction_to_json(head.task, model.run_heads(latent, [geometry((H, W))], (name,))[name][0])
            except Exception as e:
                raise ValueError(f"head {name!r} fails on {H}x{W} images, which this server would serve: "
                                 f"{type(e).__name__}: {e}; serve other sizes (--image-size)") from e


def model_info(model: MultiTaskModel, config: ServerConfig, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """What ``GET /info`` returns."""
    codec = model.codec
    heads = {name: {"task": h.task, "metric": h.metric, "type": (getattr(h, "_mtfc_spec", None) or {}).get("type"),
                    "class": f"{type(h).__module__}.{type(h).__qualname__}"} for name, h in model.heads.items()}
    limits = {k: v for k, v in asdict(config).items() if k not in ("token", "image_sizes")}
    return {"codec": {"fingerprint": codec.fingerprint, **codec.config, "size_divisibility": codec.size_divisibility,
                      "latent_stride": codec.latent_stride, "beta": codec.meta.get("beta")},
            "heads": heads, "image_sizes": [list(s) for s in sizes], "versions": _versions(),
            "config": {**limits, "auth": config.token is not None}}


class _Gate:
    """The outermost ASGI layer: the bearer-token check (before anything reads the body) and, for every
    HTTP answer, the Prometheus count by path and status, including unhandled 500s and 499s."""

    def __init__(self, app: Any, token: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {token}".encode() if token is not None else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in PATHS else "other"
        status = CLIENT_CLOSED
        start = time.perf_counter()

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and scope["path"] != "/health" and not hmac.compare_digest(
                    dict(scope["headers"]).get(b"authorization", b""), self.expected):
                error = RequestError(401, "Unauthorized", "missing or wrong bearer token")
                self.metrics.errors.labels(error.kind).inc()
                client = scope.get("client") or ("?",)
                log.info("%s %s from %s: 401 %s", scope["method"], scope["path"], client[0], error.detail)
                await _error_response(error)(scope, receive, send_and_watch)
            else:
                await self.app(scope, receive, send_and_watch)
        except Exception:
            status = 500  # uvicorn logs the traceback: a server fault
            raise
        finally:
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def create_app(model: MultiTaskModel, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``model`` (frozen codec + attached heads).

    Raises ``ValueError`` if the served image sizes cannot be determined or a head fails on one of them.
    """
    config = config or ServerConfig()
    model.eval()
    torch.set_num_threads(config.threads)
    sizes = served_image_sizes(model, config)
    _check_heads(model, sizes)
    metrics = Metrics()
    fingerprint = bytes.fromhex(model.codec.fingerprint)
    state: dict[str, Any] = {}
    metrics.watch_decoders(lambda: state.get("decoders"))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        decoders = state["decoders"] = app.state.decoders = DecoderPool(model.codec, config.decoder_workers,
                                                                         config.threads)
        batcher = state["batcher"] = Batcher(model, config.max_batch, config.max_batch_pixels, config.max_wait_ms,
                                             metrics)
        state["admission"] = Admission(config.max_pixels_in_flight, config.max_queue, metrics)
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.close()
        decoders.close()

    app = FastAPI(title="mtfc edge server", version=_versions().get("mtfc", "?"), lifespan=lifespan,
                  description="One decode of the device's bitstream feeds every task head.")
    app.state.metrics = metrics
    app.add_middleware(_Gate, token=config.token, metrics=metrics)
    info = model_info(model, config, sizes)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        metrics.errors.labels(exc.kind).inc()
        client = request.client.host if request.client else "?"
        log.info("%s %s from %s: %d %s: %s", request.method, request.url.path, client, exc.status, exc.kind, exc.detail)
        return _error_response(exc)

    @app.get("/health")
    async def health() -> JSONResponse:
        decoders: DecoderPool = state["decoders"]
        alive = decoders.alive
        status = "ok" if alive == decoders.size else "degraded" if alive else "unavailable"
        return JSONResponse({"status": status, "codec": model.codec.fingerprint, "decoder_workers": alive,
                             "decoder_workers_wanted": decoders.size}, status_code=200 if alive else 503)

    @app.get("/info")
    async def model_info_endpoint() -> dict[str, Any]:
        return info

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def answer(body: bytes, names: tuple[str, ...], parsed: tuple[bitstream.Header, list[bytes]],
                     start: float) -> JSONResponse:
        record = model.geometry(parsed[0])
        image_size = record["image_size"]
        async with state["admission"].admit(image_size[0] * image_size[1]):
            t0 = time.perf_counter()
            try:
                latent = await state["decoders"].decode(parsed)
            except bitstream.BitstreamError as e:
                raise RequestError(400, type(e).__name__, str(e)) from None
            decode_ms = 1000 * (time.perf_counter() - t0)
            predictions, timing = await state["batcher"].submit(latent, names, record)
        total_ms = 1000 * (time.perf_counter() - start)
        level = "fixed" if parsed[0].level is None else str(parsed[0].level)
        metrics.streams.labels(level).inc()
        metrics.stream_bytes.labels(level).inc(len(body))
        return JSONResponse({"predictions": predictions, **{k: list(v) for k, v in record.items()},
                             "level": parsed[0].level, "bytes": len(body),
                             "timing_ms": {"decode": decode_ms, **timing, "total": total_ms}})

    @app.post("/predict")
    async def predict(request: Request, heads: str | None = None) -> Response:
        """Predictions of every head (or of ``heads``, comma-separated) from one stream."""
        start = time.perf_counter()
        body = await _read_body(request, config.max_body_bytes, config.body_timeout_s)
        metrics.bytes_in.inc(len(body))
        names = _select_heads(heads, list(model.heads))
        parsed = _check_header(body, model.codec, fingerprint, sizes)
        work = asyncio.ensure_future(answer(body, names, parsed, start))
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=config.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # deadline, client gone, or this handler cancelled: stop decode and heads
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work in done:
            return work.result()
        if gone in done:
            raise RequestError(CLIENT_CLOSED, "ClientDisconnected", "the client went away before its answer")
        raise RequestError(504, "DeadlineExceeded", f"no answer within the server's request deadline of "
                                                    f"{config.request_timeout_s:g} s; the request was cancelled")

    return app


async def _disconnect(request: Request) -> None:
    """Returns when the client closes the connection (after its body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    if request.headers.get("content-type", "").split(";")[0].strip() != STREAM_TYPE:
        raise RequestError(415, "UnsupportedMediaType", f"send the bitstream as {STREAM_TYPE}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():  # read to the end even when too large, so the client gets the 413
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, "RequestTimeout", f"the body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise RequestError(CLIENT_CLOSED, "ClientDisconnected", f"the client went away after {size} body bytes") from None
    if size > limit:
        raise RequestError(413, "PayloadTooLarge", f"body of {size} bytes exceeds the server's limit of {limit}")
    return b"".join(chunks)


def _select_heads(query: str | None, available: list[str]) -> tuple[str, ...]:
    if not query:
        return tuple(available)
    names = tuple(dict.fromkeys(n.strip() for n in query.split(",") if n.strip()))
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise RequestError(400, "UnknownHead", f"unknown head(s) {unknown}; this server has {available}")
    return names


def _check_header(body: bytes, codec: Codec, fingerprint: bytes,
                  sizes: list[tuple[int, int]]) -> tuple[bitstream.Header, list[bytes]]:
    """Container checks (format, codec, length, checksum) and the served sizes (the size the image was
    coded at), before any decoding: the stream's only parse, whose header and payloads go on to the
    decoder (:class:`~mtfc.deploy.decoding.DecoderPool`)."""
    try:
        header, payloads = bitstream.unpack(body, fingerprint)
    except bitstream.ImageTooLargeError as e:
        raise RequestError(413, "ImageTooLarge", str(e)) from None
    except bitstream.BitstreamError as e:
        raise RequestError(400, type(e).__name__, str(e)) from None
    H, W = codec.coded_size(header)
    if not any(H <= h and W <= w for h, w in sizes):
        served = ", ".join(f"{h}x{w}" for h, w in sizes)
        if H * W > max(h * w for h, w in sizes):
            raise RequestError(413, "ImageTooLarge", f"stream announces a {H}x{W} image; this server serves images "
                                                     f"up to {served}")
        raise RequestError(400, "UnsupportedImageSize", f"stream announces a {H}x{W} image; this server serves "
                                                         f"images up to {served}: resize the image to fit one of them")
    return header, payloads


def load_model(codec: str | Path, heads: dict[str, str | Path], imports: Sequence[str] = ()) -> MultiTaskModel:
    """A :class:`MultiTaskModel` from a codec artifact and ``{name: head checkpoint}``; ``imports`` are
    modules to import first (user heads register themselves in :data:`mtfc.HEADS` on import)."""
    from mtfc.codec import load_codec

    for module in imports:
        importlib.import_module(module)
    model = MultiTaskModel(load_codec(codec))
    for name, path in heads.items():
        model.load_head(name, path)
    return model.eval()


def _slow_client_protocol(header_timeout: float, on_close: Callable[[], None]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection that has not sent a request's headers within
    ``header_timeout`` seconds of opening or of its previous answer (uvicorn has no such timeout:
    its keep-alive timer restarts on every byte, so a client trickling headers is held forever)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class SlowClientProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _headers_timer: asyncio.TimerHandle | None = None
        _cycle_before: Any = None

        def _arm(self) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
            self._cycle_before = self.cycle  # uvicorn starts a new cycle once a request's headers are in
            self._headers_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            if self.cycle is self._cycle_before and not self.transport.is_closing():
                on_close()
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._headers_timer is not None:
                self._headers_timer.cancel()
            super().connection_lost(exc)

    return SlowClientProtocol


def uvicorn_config(app: FastAPI, config: ServerConfig, **kwargs: Any) -> Any:
    """The ``uvicorn.Config`` serving ``app`` with ``config``'s connection limits and timeouts
    (``kwargs``: host, port, TLS, log level, ...)."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    logging_config = copy.deepcopy(LOGGING_CONFIG)
    logging_config["loggers"]["mtfc"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    metrics: Metrics = app.state.metrics
    return uvicorn.Config(app, http=_slow_client_protocol(config.header_timeout_s, metrics.slow_clients.inc),
                          timeout_keep_alive=config.keep_alive_s, limit_concurrency=config.max_connections,
                          access_log=False, log_config=logging_config, **kwargs)


def serve(codec: str | Path, heads: dict[str, str | Path], *, host: str = "127.0.0.1", port: int = 8000,
          config: ServerConfig | None = None, imports: Sequence[str] = (), ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None, log_level: str = "info") -> None:
    """Load the model and serve it with uvicorn until interrupted (TLS when a certificate is given)."""
    import uvicorn

    config = config or ServerConfig()
    app = create_app(load_model(codec, heads, imports), config)
    uvicorn.Server(uvicorn_config(app, config, host=host, port=port, ssl_certfile=ssl_certfile,
                                  ssl_keyfile=ssl_keyfile, log_level=log_level)).run()
