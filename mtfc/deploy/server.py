"""The edge server: one frozen codec, any number of heads, one decode per request for all of them.

Stack: FastAPI (routing, validation, OpenAPI docs at ``/docs``) on uvicorn (ASGI server with its own
TLS options). Every request's stream is validated and decoded on its own, in crash-isolated decoder
processes (:mod:`mtfc.deploy.decoding`), so a bad stream fails only its own request; the decoded
latents then meet in a dynamic batcher that groups them by latent shape
(image size) and requested heads and runs each group as one batch (at most ``max_batch`` images,
after waiting at most ``max_wait_ms`` for more), so throughput grows with load.

Endpoints:

* ``POST /predict?heads=a,b`` — body: one :mod:`mtfc.bitstream` stream (``application/octet-stream``);
  answer: ``{"predictions": {head: ...}, "image_size", "bytes", "timing_ms"}`` (formats in
  :mod:`mtfc.deploy.wire`). Errors: 400 bad stream (the ``BitstreamError``'s class and message) or
  unknown head, 401 missing/wrong bearer token, 413 body or image too large, 415 wrong content type.
* ``GET /health`` (never needs the token), ``GET /info`` (codec fingerprint, heads, versions, limits),
  ``GET /metrics`` (requests by status, latency percentiles, bytes in, batch sizes).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import platform
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mtfc import bitstream
from mtfc.deploy.decoding import DecoderPool
from mtfc.deploy.wire import prediction_to_json
from mtfc.model import MultiTaskModel

STREAM_TYPE = "application/octet-stream"


@dataclass
class ServerConfig:
    """Batching, limits and authentication of the server.

    Args:
        max_batch: most images run through the heads as one batch.
        max_wait_ms: how long the first request of a batch waits for others to join it.
        max_body_bytes: larger bodies get 413 (their bytes are read and dropped, so the client sees the answer).
        max_image_pixels: streams announcing a larger image get 413 before any entropy decoding.
        token: if set, every endpoint but ``/health`` needs ``Authorization: Bearer <token>``.
        decoder_workers: entropy-decoding processes (a stream that crashes one only loses its own request).
        threads: PyTorch intra-op threads of the server process and of each decoder.
    """

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_body_bytes: int = 1 << 20
    max_image_pixels: int = 4096 * 4096
    token: str | None = None
    decoder_workers: int = 2
    threads: int = 1


class RequestError(Exception):
    """A client error: answered with ``status`` and ``{"error": kind, "detail": message}``."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class Metrics:
    """Request counters and a window of recent latencies (what ``GET /metrics`` returns)."""

    def __init__(self, window: int = 10_000) -> None:
        self.started = time.time()
        self.by_status: Counter[int] = Counter()
        self.by_error: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.latency_ms: deque[float] = deque(maxlen=window)
        self.bytes_in = 0

    def record(self, status: int, latency_ms: float, bytes_in: int, error: str | None = None) -> None:
        self.by_status[status] += 1
        self.latency_ms.append(latency_ms)
        self.bytes_in += bytes_in
        if error:
            self.by_error[error] += 1

    def snapshot(self) -> dict[str, Any]:
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
        batches = sum(self.batch_sizes.values())
        return {"uptime_s": time.time() - self.started, "requests": sum(self.by_status.values()),
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())}, "errors": dict(self.by_error),
                "bytes_in": self.bytes_in,
                "latency_ms": {"window": len(self.latency_ms), "mean": float(lat.mean()),
                               **{f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)}},
                "batches": batches, "images_per_batch": (sum(k * v for k, v in self.batch_sizes.items()) / batches
                                                         if batches else 0.0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class Batcher:
    """Dynamic batching of decoded latents; one worker thread runs the heads.

    Requests with the same latent shape and heads are run together: the group of the oldest waiting
    request runs as soon as it holds ``max_batch`` requests or that request has waited ``max_wait_ms``.
    A batch that fails is re-run one request at a time, so only the request that caused it gets the error.
    """

    def __init__(self, model: MultiTaskModel, max_batch: int, max_wait_ms: float, metrics: Metrics) -> None:
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mtfc-heads")

    async def submit(self, latent: torch.Tensor, heads: tuple[str, ...],
                     image_size: tuple[int, int]) -> tuple[dict[str, Any], dict[str, float]]:
        """Predictions of ``heads`` for one decoded latent (1, C, h, w) of an image of ``image_size``
        (from the stream's header), and the batch's timing."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(((tuple(image_size), heads), latent, future, time.perf_counter()))
        return await future

    async def run(self) -> None:
        pending: dict[Any, list] = {}  # (image size, heads) -> requests waiting, oldest first

        def take(item: tuple) -> None:
            pending.setdefault(item[0], []).append(item)

        while True:
            if not pending:
                take(await self.queue.get())
            key = min(pending, key=lambda k: pending[k][0][3])  # the oldest request's group runs next
            deadline = pending[key][0][3] + self.max_wait
            while len(pending[key]) < self.max_batch:
                while self.queue.qsize():
                    take(self.queue.get_nowait())
                timeout = deadline - time.perf_counter()
                if len(pending[key]) >= self.max_batch or timeout <= 0:
                    break
                try:
                    take(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            group, pending[key] = pending[key][: self.max_batch], pending[key][self.max_batch :]
            if not pending[key]:
                del pending[key]
            await self._run_group(*key, group)

    async def _run_group(self, image_size: tuple[int, int], heads: tuple[str, ...], group: list) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self.executor, self._predict, heads, [g[1] for g in group],
                                                 image_size)
        except Exception:
            if len(group) > 1:  # isolate the culprit: every other request still gets its answer
                for item in group:
                    await self._run_group(image_size, heads, [item])
                return
            group[0][2].set_exception(RequestError(500, "HeadError", "a head failed on this input"))
            return
        heads_ms = 1000 * (time.perf_counter() - start)
        self.metrics.batch_sizes[len(group)] += 1
        for (_, _, future, queued), out in zip(group, outputs):
            if not future.done():  # the client may have gone away
                future.set_result((out, {"queue": 1000 * (start - queued), "heads": heads_ms,
                                         "batch_size": len(group)}))

    @torch.no_grad()
    def _predict(self, heads: tuple[str, ...], latents: list[torch.Tensor],
                 image_size: tuple[int, int]) -> list[dict[str, Any]]:
        latent = torch.cat(latents)
        meta = [{"image_size": image_size}] * len(latents)
        preds = {name: self.model.heads[name].predict(latent, meta) for name in heads}
        tasks = {name: self.model.heads[name].task for name in heads}
        return [{name: prediction_to_json(tasks[name], preds[name][i]) for name in heads} for i in range(len(latents))]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("mtfc", "torch", "compressai", "fastapi", "uvicorn", "onnxruntime"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def model_info(model: MultiTaskModel, config: ServerConfig) -> dict[str, Any]:
    """What ``GET /info`` returns."""
    codec = model.codec
    heads = {name: {"task": h.task, "metric": h.metric, "type": (getattr(h, "_mtfc_spec", None) or {}).get("type"),
                    "class": f"{type(h).__module__}.{type(h).__qualname__}"} for name, h in model.heads.items()}
    limits = {k: v for k, v in asdict(config).items() if k != "token"}
    return {"codec": {"fingerprint": codec.fingerprint, **codec.config, "size_divisibility": codec.size_divisibility,
                      "latent_stride": codec.latent_stride, "beta": codec.meta.get("beta")},
            "heads": heads, "versions": _versions(), "config": {**limits, "auth": config.token is not None}}


def create_app(model: MultiTaskModel, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``model`` (frozen codec + attached heads)."""
    config = config or ServerConfig()
    model.eval()
    torch.set_num_threads(config.threads)
    metrics = Metrics()
    fingerprint = bytes.fromhex(model.codec.fingerprint)
    batcher: Batcher | None = None
    decoders: DecoderPool | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal batcher, decoders
        decoders = DecoderPool(model.codec, config.decoder_workers, config.threads)
        batcher = Batcher(model, config.max_batch, config.max_wait_ms, metrics)
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.close()
        decoders.close()

    app = FastAPI(title="mtfc edge server", version=_versions().get("mtfc", "?"), lifespan=lifespan,
                  description="One decode of the device's bitstream feeds every task head.")
    info = model_info(model, config)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.kind, "detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        if config.token is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.token}".encode()):
                return await _request_error(request, RequestError(401, "Unauthorized", "missing or wrong bearer token"))
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "codec": model.codec.fingerprint}

    @app.get("/info")
    async def model_info_endpoint() -> dict[str, Any]:
        return info

    @app.get("/metrics")
    async def metrics_endpoint() -> dict[str, Any]:
        return {**metrics.snapshot(), "decoder_crashes": decoders.crashes}

    @app.post("/predict")
    async def predict(request: Request, heads: str | None = None) -> JSONResponse:
        """Predictions of every head (or of ``heads``, comma-separated) from one stream."""
        start, size = time.perf_counter(), 0
        try:
            body = await _read_body(request, config.max_body_bytes)
            size = len(body)
            names = _select_heads(heads, list(model.heads))
            image_size = _check_header(body, fingerprint, config.max_image_pixels)
            t0 = time.perf_counter()
            try:
                latent = await decoders.decode(body)
            except bitstream.BitstreamError as e:
                raise RequestError(400, type(e).__name__, str(e)) from None
            decode_ms = 1000 * (time.perf_counter() - t0)
            predictions, timing = await batcher.submit(latent, names, image_size)
        except RequestError as e:
            metrics.record(e.status, 1000 * (time.perf_counter() - start), size, e.kind)
            raise
        total_ms = 1000 * (time.perf_counter() - start)
        metrics.record(200, total_ms, size)
        return JSONResponse({"predictions": predictions, "image_size": image_size,
                             "bytes": size, "timing_ms": {"decode": decode_ms, **timing, "total": total_ms}})

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    if request.headers.get("content-type", "").split(";")[0].strip() != STREAM_TYPE:
        raise RequestError(415, "UnsupportedMediaType", f"send the bitstream as {STREAM_TYPE}")
    chunks, size = [], 0
    async for chunk in request.stream():  # read to the end even when too large, so the client gets the 413
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
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


def _check_header(body: bytes, fingerprint: bytes, max_pixels: int) -> list[int]:
    """Container checks (magic, version, codec, length, checksum) and the size limit, before any decoding."""
    try:
        header, _ = bitstream.unpack(body, fingerprint)
    except bitstream.BitstreamError as e:
        raise RequestError(400, type(e).__name__, str(e)) from None
    H, W = header.image_size
    if H * W > max_pixels:
        raise RequestError(413, "ImageTooLarge", f"stream announces a {H}x{W} image; this server decodes at most "
                                                  f"{max_pixels} pixels")
    return [H, W]


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


def serve(codec: str | Path, heads: dict[str, str | Path], *, host: str = "127.0.0.1", port: int = 8000,
          config: ServerConfig | None = None, imports: Sequence[str] = (), ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None, log_level: str = "info") -> None:
    """Load the model and serve it with uvicorn until interrupted (TLS when a certificate is given)."""
    import uvicorn

    app = create_app(load_model(codec, heads, imports), config)
    uvicorn.run(app, host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, log_level=log_level,
                access_log=False)
