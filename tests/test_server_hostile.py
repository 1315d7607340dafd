"""The edge server under hostile traffic (issue 20): bounded cost per request, deadlines, load shedding,
a decoder pool that heals, slow clients cut off, every image size the codec takes, Prometheus metrics,
and a device side that does not import the server."""
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from mtfc import bitstream
from mtfc.deploy import decoding
from mtfc.deploy.decoding import DecoderPool
from mtfc.deploy.export import synthetic_images
from mtfc.deploy.loadtest import free_port
from mtfc.deploy.server import ServerConfig, create_app, served_image_sizes, uvicorn_config
from mtfc.head import HEADS, Head
from mtfc.model import MultiTaskModel

from conftest import metric

OCTET = {"Content-Type": "application/octet-stream"}
TOKEN = "s3cret"


class SlowHead(Head):
    """A head that sleeps ``delay`` s per batch once armed, and counts its batches."""

    task, metric = "slow", "none"

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay, self.armed, self.batches = delay, False, 0

    def predict(self, latent, targets=None):
        if self.armed:
            self.batches += 1
            time.sleep(self.delay)
        return [0] * len(latent)


def build_model(codec, **heads) -> MultiTaskModel:
    model = MultiTaskModel(codec)
    for i, (name, (task, kwargs)) in enumerate(heads.items()):
        torch.manual_seed(i)
        model.attach(name, HEADS.build(task, latent_channels=codec.latent_channels, arch="resnet18",
                                       hidden_channels=16, **kwargs))
    return model.eval()


@pytest.fixture(scope="module")
def model(frozen_codec) -> MultiTaskModel:
    return build_model(frozen_codec, cla=("classification", {"num_classes": 3}))


def stream(codec, size=32, seed=0) -> bytes:
    return codec.encode(synthetic_images(1, size, seed=seed))[0]




# -- 2. bounded cost per request ------------------------------------------------------------------------------
def test_served_sizes_default_to_the_training_sizes_and_others_are_refused_at_the_header(frozen_codec):
    model = build_model(frozen_codec, det=("detection", {"num_classes": 3, "image_size": 32}))
    assert served_image_sizes(model, ServerConfig()) == [(32, 32)]
    with pytest.raises(ValueError, match="--image-size"):
        served_image_sizes(build_model(frozen_codec, cla=("classification", {"num_classes": 3})), ServerConfig())
    with pytest.raises(ValueError, match="multiples of 4"):
        served_image_sizes(model, ServerConfig(image_sizes=[(30, 32)]))
    fp = bytes.fromhex(frozen_codec.fingerprint)[: bitstream.FINGERPRINT_BYTES]
    # the 45-byte stream announcing 4096x4096 cost 40 CPU-seconds; now it never reaches a decoder
    forged = bitstream.pack(bitstream.Header(fp, (4096, 4096)), [b"\xff" * 4])
    assert len(forged) < 45
    with TestClient(create_app(model)) as client:
        assert client.get("/info").json()["image_sizes"] == [[32, 32]]
        r = client.post("/predict", content=forged, headers=OCTET)
        assert (r.status_code, r.json()["error"]) == (413, "ImageTooLarge") and "32x32" in r.json()["detail"]
        # a served size is a bound: a smaller image (a keep_aspect one, say) is served, one that does not fit is not
        assert client.post("/predict", content=stream(frozen_codec, 16), headers=OCTET).status_code == 200
        wide = frozen_codec.encode(torch.rand(1, 3, 16, 48, generator=torch.Generator().manual_seed(0)))[0]
        r = client.post("/predict", content=wide, headers=OCTET)
        assert (r.status_code, r.json()["error"]) == (400, "UnsupportedImageSize")
        assert r.json()["detail"] == ("stream announces a 16x48 image; this server serves images up to 32x32: "
                                      "resize the image to fit one of them")
        assert metric(client.get("/metrics").text, "mtfc_decoder_crashes_total") == 0
        assert client.post("/predict", content=stream(frozen_codec), headers=OCTET).status_code == 200


def test_a_batch_holds_at_most_max_batch_pixels(model, frozen_codec):
    config = ServerConfig(image_sizes=[(32, 32)], max_batch=8, max_batch_pixels=2 * 32 * 32, max_wait_ms=300)
    with TestClient(create_app(model, config)) as client:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: client.post("/predict", content=stream(frozen_codec, seed=i),
                                                          headers=OCTET), range(6)))
        assert [a.status_code for a in answers] == [200] * 6
        assert max(a.json()["timing_ms"]["batch_size"] for a in answers) == 2


def test_the_deadline_answers_504_and_cancels_the_heads_work(model, frozen_codec):
    slow = SlowHead(delay=1.0)
    model = MultiTaskModel(model.codec)
    model.attach("slow", slow)
    config = ServerConfig(image_sizes=[(32, 32)], request_timeout_s=0.3, max_batch=1, max_wait_ms=0)
    with TestClient(create_app(model, config)) as client:
        slow.armed = True
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: client.post("/predict", content=stream(frozen_codec), headers=OCTET),
                                    range(2)))
        assert time.perf_counter() - start < 0.9  # both answered at their deadline, not after the 1 s batch
        assert [(a.status_code, a.json()["error"]) for a in answers] == [(504, "DeadlineExceeded")] * 2
        time.sleep(1.2)  # the batch already running finishes; the queued request's batch never runs
        assert slow.batches == 1
        assert metric(client.get("/metrics").text, "mtfc_requests_total", path="/predict", code="504") == 2


def test_a_full_queue_sheds_load_with_503(model, frozen_codec):
    slow = SlowHead(delay=0.5)
    model = MultiTaskModel(model.codec)
    model.attach("slow", slow)
    # room for one request in flight and one waiting: the third is refused at once
    config = ServerConfig(image_sizes=[(32, 32)], max_pixels_in_flight=32 * 32, max_queue=1, max_wait_ms=0)
    with TestClient(create_app(model, config)) as client:
        slow.armed = True

        def post(delay: float):
            time.sleep(delay)
            return client.post("/predict", content=stream(frozen_codec), headers=OCTET)

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(post, [0, 0.1, 0.2]))
        assert [a.status_code for a in answers] == [200, 200, 503]
        assert answers[2].json()["error"] == "Overloaded" and answers[2].headers["retry-after"] == "1"
        assert metric(client.get("/metrics").text, "mtfc_requests_total", path="/predict", code="503") == 1


def test_cancelling_a_decode_kills_its_worker_and_the_pool_replaces_it(frozen_codec):
    big = stream(frozen_codec, 1024)  # a slow decode

    async def run() -> None:
        pool = DecoderPool(frozen_codec, workers=1)
        try:
            (worker,) = pool._workers
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pool.decode(bitstream.unpack(big)), 0.01)
            assert pool.alive == 0
            assert _exits(worker.process.pid)  # no work outlives its request
            small = stream(frozen_codec)
            assert torch.equal(await pool.decode(bitstream.unpack(small)), frozen_codec.decode([small]))
            assert pool.alive == 1 and pool.crashes == 0
        finally:
            pool.close()

    asyncio.run(run())


def _exits(pid: int, within: float = 5.0) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_a_stream_that_kills_its_worker_gets_decoder_crashed_and_a_new_worker(frozen_codec):
    big = stream(frozen_codec, 1024)

    async def run() -> None:
        pool = DecoderPool(frozen_codec, workers=1)
        try:
            (worker,) = pool._workers
            os.kill(worker.process.pid, signal.SIGSTOP)  # the worker is mid-decode when it dies, however fast decoding is
            decode = asyncio.ensure_future(pool.decode(bitstream.unpack(big)))
            await asyncio.sleep(0.05)
            worker.kill()  # what a crash in the decoder (or a deadline's kill) does
            with pytest.raises(decoding.DecoderCrashed, match="crashed the decoder"):
                await decode
            assert pool.crashes == 1 and worker not in pool._workers
            small = stream(frozen_codec)
            assert torch.equal(await pool.decode(bitstream.unpack(small)), frozen_codec.decode([small]))
            assert pool.alive == 1
        finally:
            pool.close()

    asyncio.run(run())


# -- 3. a pool that heals ---------------------------------------------------------------------------------------
def test_a_dead_worker_never_returns_and_its_replacement_retries(model, frozen_codec, monkeypatch):
    failures = {"left": 0}
    real_worker = decoding._Worker

    def flaky_worker(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(24, "Too many open files")
        return real_worker(*args, **kwargs)

    monkeypatch.setattr(decoding, "_Worker", flaky_worker)
    with TestClient(create_app(model, ServerConfig(image_sizes=[(32, 32)], decoder_workers=1))) as client:
        pool = client.app.state.decoders
        failures["left"] = 3  # the replacement fails three times (back-off 0.05 + 0.1 + 0.2 s), then starts
        (worker,) = pool._workers
        worker.kill()
        worker.process.join(5)
        with ThreadPoolExecutor(1) as ex:
            answer = ex.submit(client.post, "/predict", content=stream(frozen_codec), headers=OCTET)
            time.sleep(0.1)
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "unavailable" and health.json()["decoder_workers"] == 0
            assert answer.result().status_code == 200  # it waited for the replacement
        assert client.get("/health").json()["status"] == "ok"
        assert worker not in pool._workers and pool.alive == 1
        text = client.get("/metrics").text
        assert metric(text, "mtfc_decoder_start_failures_total") == 3
        assert metric(text, "mtfc_decoder_workers") == 1


def test_health_is_degraded_while_the_pool_is_short(model, frozen_codec, monkeypatch):
    monkeypatch.setattr(DecoderPool, "alive", property(lambda self: self.size - 1))
    with TestClient(create_app(model, ServerConfig(image_sizes=[(32, 32)], decoder_workers=2))) as client:
        r = client.get("/health")
        assert r.status_code == 200
        assert r.json() == {"status": "degraded", "codec": model.codec.fingerprint, "decoder_workers": 1,
                            "decoder_workers_wanted": 2}


# -- 4. slow clients, on a real uvicorn server ----------------------------------------------------------------
@pytest.fixture(scope="module")
def live(model):
    """The app on a real uvicorn server (in a thread) with short timeouts, a token and 6 connections at most."""
    config = ServerConfig(image_sizes=[(32, 32)], header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=0.5,
                          max_connections=6, token=TOKEN)
    app = create_app(model, config)
    port = free_port()
    server = __import__("uvicorn").Server(uvicorn_config(app, config, host="127.0.0.1", port=port,
                                                         log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(30)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when (s after the call)."""
    start, data = time.perf_counter(), b""
    while chunk := s.recv(4096):
        data += chunk
    return data, time.perf_counter() - start


def _headers(length: int, token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n{auth}"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_a_connection_that_never_sends_its_headers_is_closed(live):
    with _connect(live) as idle:
        assert _read_until_closed(idle)[1] < 2
    with _connect(live) as slow:
        start = time.perf_counter()
        with pytest.raises(OSError):  # trickling one byte every 0.1 s: closed after 0.5 s, whatever it sends
            for byte in _headers(10):
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
        assert time.perf_counter() - start < 2


def test_a_slow_body_gets_408_and_the_connection_closes(live):
    with _connect(live) as s:
        s.sendall(_headers(1000) + b"x" * 10)
        data, elapsed = _read_until_closed(s)
        assert data.startswith(b"HTTP/1.1 408") and b"RequestTimeout" in data and elapsed < 2


def test_an_unauthenticated_slow_body_is_refused_before_it_is_read(live):
    with _connect(live) as s:
        s.sendall(_headers(1000, token=None) + b"x" * 10)
        data, elapsed = _read_until_closed(s)
        assert data.startswith(b"HTTP/1.1 401") and elapsed < 2


def test_an_idle_keep_alive_connection_is_closed(live):
    with _connect(live) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data, elapsed = _read_until_closed(s)
        assert data.startswith(b"HTTP/1.1 200") and elapsed < 2


def test_connections_beyond_the_cap_get_503(live):
    held = [_connect(live) for _ in range(6)]
    try:
        time.sleep(0.05)
        with _connect(live) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 503")
    finally:
        for s in held:
            s.close()


def test_a_client_leaving_mid_body_is_one_log_line_and_a_499(live):
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"http://127.0.0.1:{live}/metrics"
    before = metric(httpx.get(url, headers=headers).text, "mtfc_requests_total", path="/predict", code="499")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("mtfc", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with _connect(live) as s:
            s.sendall(_headers(1000) + b"x" * 10)
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert metric(httpx.get(url, headers=headers).text, "mtfc_requests_total", path="/predict", code="499") == before + 1
    assert [r.getMessage() for r in records] == ["POST /predict from 127.0.0.1: 499 ClientDisconnected: "
                                                 "the client went away after 10 body bytes"]
    assert not records[0].exc_info


# -- 7. every head takes every size the codec takes --------------------------------------------------------------
def test_every_head_answers_on_a_size_off_the_fpn_grid(frozen_codec):
    model = build_model(frozen_codec, cla=("classification", {"num_classes": 3}),
                        seg=("segmentation", {"num_classes": 4}), det=("detection", {"num_classes": 3, "image_size": 48}))
    with TestClient(create_app(model, ServerConfig(image_sizes=[(48, 48)]))) as client:
        r = client.post("/predict", content=stream(frozen_codec, 48), headers=OCTET)
        assert r.status_code == 200, r.text
        det = r.json()["predictions"]["det"]
        assert det["image_size"] == [48, 48]
        assert all(0 <= v <= 48 for inst in det["instances"] for v in inst["box"])
        assert r.json()["predictions"]["seg"]["size"] == [48, 48]


# -- 8. Prometheus metrics, every status counted ------------------------------------------------------------------
def test_metrics_are_prometheus_text_and_count_every_status(model, frozen_codec, monkeypatch):
    with TestClient(create_app(model, ServerConfig(image_sizes=[(32, 32)])), raise_server_exceptions=False) as client:
        assert client.post("/predict", content=stream(frozen_codec), headers=OCTET).status_code == 200
        assert client.post("/predict", content=b"JUNK", headers=OCTET).status_code == 400
        assert client.post("/predict", content=b"JUNK", headers={"Content-Type": "image/png"}).status_code == 415
        monkeypatch.setattr("mtfc.deploy.server.Batcher.submit", lambda *a: 1 / 0)  # a server fault
        assert client.post("/predict", content=stream(frozen_codec), headers=OCTET).status_code == 500
        r = client.get("/metrics")
    assert r.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"  # Prometheus text format
    counts = {code: metric(r.text, "mtfc_requests_total", path="/predict", code=code) for code in ("200", "400", "415", "500")}
    assert counts == {"200": 1, "400": 1, "415": 1, "500": 1}
    assert metric(r.text, "mtfc_request_errors_total", error="NotAStreamError") == 1
    assert metric(r.text, "mtfc_batch_images_count") == 1 and metric(r.text, "mtfc_decoder_workers") == 2
    assert metric(r.text, "mtfc_request_bytes_total") == 2 * len(stream(frozen_codec)) + 4
    assert metric(r.text, "mtfc_streams_total", level="fixed") == 1  # the one answered; the fault's is not counted


# -- 9. the device side imports no server, the server no training code ------------------------------------------
def test_the_device_side_does_not_import_the_server_nor_the_server_the_trainers():
    code = ("import sys, mtfc.deploy.client, mtfc.deploy.encoder; device = set(sys.modules); "
            "import mtfc.deploy.server, mtfc.deploy.decoding, mtfc.deploy.loadtest; "
            "print(sorted(m for m in device if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn'))); "
            "print(sorted(m for m in sys.modules if m in ('mtfc.pipeline', 'mtfc.train', 'mtfc.engine', "
            "'mtfc.optim', 'mtfc.distill', 'mtfc.data', 'mtfc.evaluation')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "[]"]
