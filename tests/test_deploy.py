"""The deployed path: ONNX device encoder, edge server (in process and as a real subprocess), client,
latency model and load test — on a tiny codec and tiny heads."""
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mtfc import bitstream
from mtfc.codec import Codec, save_codec
from mtfc.deploy.client import Client, ServerError
from mtfc.deploy.encoder import Encoder
from mtfc.deploy.export import compare_streams, encoder_complexity, export_onnx, synthetic_images
from mtfc.deploy.latency import latency_model, match_baselines
from mtfc.deploy.loadtest import bad_bodies, compare, expected_predictions, free_port, load_test, start_server
from mtfc.deploy.server import ServerConfig, create_app, load_model
from mtfc.deploy.wire import decode_mask
from mtfc.head import HEADS
from mtfc.model import MultiTaskModel, save_head

from conftest import tiny_codec

HEAD_KWARGS = {"classification": {"num_classes": 3}, "segmentation": {"num_classes": 4},
               "detection": {"num_classes": 3, "image_size": 32}}
TOKEN = "s3cret"
SIZES = [(32, 32), (64, 64)]


def _sample(text: str, name: str, label: str = "code", **labels: str) -> dict[str, float]:
    """``{value of label: sample}`` of one metric in Prometheus text."""
    return {s.labels.get(label, ""): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, frozen_codec) -> dict:
    """The tiny frozen codec and one tiny head per built-in task, saved as the pipeline saves them."""
    root = tmp_path_factory.mktemp("deploy")
    codec = frozen_codec
    codec_path = save_codec(codec, root / "codec.pt")
    heads = {}
    for i, (task, kwargs) in enumerate(HEAD_KWARGS.items()):
        torch.manual_seed(i)
        head = HEADS.build(task, latent_channels=codec.latent_channels, arch="resnet18", hidden_channels=16, **kwargs)
        heads[task[:3]] = save_head(head.eval(), root / f"{task}.pt", codec.fingerprint)
    return {"root": root, "codec": codec_path, "heads": heads}


@pytest.fixture(scope="module")
def model(artifacts) -> MultiTaskModel:
    return load_model(artifacts["codec"], artifacts["heads"])


@pytest.fixture(scope="module")
def streams(model) -> list[bytes]:
    """Four 32x32 images and one 64x64 (two image sizes)."""
    return model.codec.encode(synthetic_images(4, 32)) + model.codec.encode(synthetic_images(1, 64, seed=1))


@pytest.mark.parametrize("kind", ["factorized", "hyperprior"])
def test_onnx_encoder_streams_equal_pytorch(kind, tmp_path):
    codec = tiny_codec(kind)
    out = export_onnx(save_codec(codec, tmp_path / "codec.pt"), tmp_path / "export")
    encoder = Encoder(out)
    assert encoder.fingerprint == codec.fingerprint
    images = synthetic_images(100, 32)
    report = compare_streams(encoder, images)
    assert report["max_abs_y_difference"] < 1e-3
    # a stream can differ only where an element of y sits within float noise of a rounding boundary
    assert report["identical_streams"] >= 98, report
    assert report["flipped_latent_elements"] <= 2 * report["differing_streams"], report
    assert encoder.encode(images[:1]) == codec.encode(images[:1]) or report["differing_streams"]
    manifest = json.loads((out / "encoder.json").read_text())
    assert manifest["fingerprint"] == codec.fingerprint and manifest["size_divisibility"] == codec.size_divisibility


def test_encoder_complexity_counts_every_convolution():
    N, C = 16, 8
    codec = Codec(latent_channels=C, hidden_channels=N, encoder="es")  # conv5x5/2, GDN, conv5x5/2, GDN, conv3x3/1
    per_pixel = 3 * N * 25 / 4 + N * (N + 1) / 4 + N * N * 25 / 16 + N * (N + 1) / 16 + N * C * 9 / 16
    got = encoder_complexity(codec)
    assert got["encoder_kmac_per_pixel"] == pytest.approx(per_pixel / 1000)
    assert got["encoder_params"] == sum(p.numel() for p in codec.g_a.parameters())


def test_in_process_server_predicts_what_the_model_predicts(model, streams):
    expected = expected_predictions(model, streams)
    with TestClient(create_app(model, ServerConfig(max_wait_ms=1, image_sizes=SIZES))) as client:
        info = client.get("/info").json()
        assert info["codec"]["fingerprint"] == model.codec.fingerprint and set(info["heads"]) == {"cla", "seg", "det"}
        assert "torch" in info["versions"] and "fastapi" in info["versions"]
        for stream, want in zip(streams, expected):
            r = client.post("/predict", content=stream, headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200, r.text
            assert r.json()["predictions"] == want  # exact: same decode, same heads, batch of one
        seg = r.json()["predictions"]["seg"]
        assert decode_mask(seg).shape == (64, 64) and r.json()["image_size"] == [64, 64]
        assert r.json()["original_size"] == [64, 64]
        only = client.post("/predict?heads=cla", content=streams[0], headers={"Content-Type": "application/octet-stream"})
        assert set(only.json()["predictions"]) == {"cla"}
        # a 512x480 (WxH) photograph resized to 32x30, coded at 32x32: the answer is in the photograph's pixels
        resized = model.codec.encode(synthetic_images(1, 32), original_sizes=[(480, 512)], content_sizes=[(30, 32)])[0]
        r = client.post("/predict", content=resized, headers={"Content-Type": "application/octet-stream"})
        assert {k: r.json()[k] for k in ("image_size", "content_size", "original_size")} == {
            "image_size": [32, 32], "content_size": [30, 32], "original_size": [480, 512]}
        assert r.json()["predictions"] == expected_predictions(model, [resized])[0]
        assert decode_mask(r.json()["predictions"]["seg"]).shape == (480, 512)
        assert r.json()["predictions"]["det"]["image_size"] == [480, 512]
        metrics = client.get("/metrics").text
        assert _sample(metrics, "mtfc_requests_total", path="/predict") == {"200": len(streams) + 2}
        assert _sample(metrics, "mtfc_request_bytes_total") == {"": sum(map(len, streams)) + len(streams[0]) + len(resized)}


def test_mtfc_send_pads_a_photograph_and_sends_its_content_and_original_size(model, tmp_path):
    from PIL import Image

    from mtfc.deploy.client import load_image

    Image.fromarray(np.full((30, 45, 3), 200, np.uint8)).save(tmp_path / "photo.png")
    image, original, content = load_image(tmp_path / "photo.png", model.codec.size_divisibility)
    assert image.shape == (1, 3, 32, 48) and original == content == (30, 45) and not image[..., 30:, :].any()
    (header, _), = [bitstream.unpack(s) for s in model.codec.encode(image, [original], content_sizes=[content])]
    assert (header.image_size, header.original_size, model.codec.coded_size(header)) == ((30, 45), (30, 45), (32, 48))
    image, original, content = load_image(tmp_path / "photo.png", model.codec.size_divisibility, size=32)
    assert image.shape == (1, 3, 32, 32) and (original, content) == ((30, 45), (32, 32))


def test_the_server_parses_each_stream_once(model, streams, monkeypatch):
    """The event loop's container check is the stream's only parse: its header and payloads go to the
    decoder worker, which entropy-decodes them (the worker's process has no other way to parse: it is
    handed (header, payloads), see mtfc.deploy.decoding)."""
    expected = expected_predictions(model, streams[:2])
    parsed = []
    unpack = bitstream.unpack
    monkeypatch.setattr(bitstream, "unpack", lambda *args, **kwargs: parsed.append(args[0]) or unpack(*args, **kwargs))
    with TestClient(create_app(model, ServerConfig(max_wait_ms=1, image_sizes=SIZES))) as client:
        for stream, want in zip(streams[:2], expected):
            r = client.post("/predict", content=stream, headers={"Content-Type": "application/octet-stream"})
            assert r.json()["predictions"] == want
    assert parsed == streams[:2]


def test_every_bad_input_gets_its_4xx_and_the_server_keeps_serving(model, streams):
    config = ServerConfig(max_body_bytes=4096, max_wait_ms=1, image_sizes=SIZES)
    octet = {"Content-Type": "application/octet-stream"}
    with TestClient(create_app(model, config)) as client:
        for kind, (body, statuses) in bad_bodies(streams[0], config.max_body_bytes).items():
            r = client.post("/predict", content=body, headers=octet)
            assert r.status_code in statuses, (kind, r.text)
            assert r.status_code == 200 or r.json()["detail"], kind  # a forged payload may decode to noise
        errors = _sample(client.get("/metrics").text, "mtfc_request_errors_total", label="error")
        assert {"NotAStreamError", "UnsupportedVersionError", "CodecMismatchError", "TruncatedStreamError",
                "CorruptStreamError", "ImageTooLarge", "PayloadTooLarge"} <= set(errors)
        assert client.post("/predict", content=streams[0], headers={"Content-Type": "image/png"}).status_code == 415
        r = client.post("/predict?heads=nope", content=streams[0], headers=octet)
        assert r.status_code == 400 and "nope" in r.json()["detail"]
        assert client.post("/predict", content=streams[0], headers=octet).status_code == 200


def test_a_batched_request_equals_the_same_request_alone(model, streams):
    octet = {"Content-Type": "application/octet-stream"}
    with TestClient(create_app(model, ServerConfig(max_batch=8, max_wait_ms=300, image_sizes=SIZES))) as client:
        alone = [client.post("/predict", content=s, headers=octet).json() for s in streams]
        assert all(a["timing_ms"]["batch_size"] == 1 for a in alone)
        # a bad stream among them must not disturb the others; two image sizes are grouped apart
        bodies = [*streams[:4], b"JUNK", *streams[:4], streams[4]]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: client.post("/predict", content=b, headers=octet), bodies))
        assert answers[4].status_code == 400
        batched = [a.json() for i, a in enumerate(answers) if i != 4]
        assert max(a["timing_ms"]["batch_size"] for a in batched) > 1
        for got, want in zip(batched, alone[:4] * 2 + alone[4:]):
            exact, close = compare(got["predictions"], want["predictions"])
            assert close, (got["predictions"], want["predictions"])


def test_bearer_token(model, streams):
    with TestClient(create_app(model, ServerConfig(token=TOKEN, image_sizes=SIZES))) as client:
        assert client.get("/health").status_code == 200  # liveness probes need no token
        r = client.get("/info")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert client.get("/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    """A real ``mtfc serve`` subprocess on 127.0.0.1 (ephemeral port), with a bearer token."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # the classification head only: the server process starts without importing Detectron2 and MMSeg
    proc = start_server(artifacts["codec"], {"cla": artifacts["heads"]["cla"]},
                        ServerConfig(token=TOKEN, image_sizes=SIZES), port, log)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_client_round_trip_through_a_real_server(server, artifacts, model, tmp_path):
    encoder = Encoder(export_onnx(artifacts["codec"], tmp_path / "export"))
    images = synthetic_images(3, 32, seed=5)
    want = expected_predictions(model, encoder.encode(images))
    with Client(server, encoder, token=TOKEN) as client:
        assert client.info()["codec"]["fingerprint"] == model.codec.fingerprint
        results = client.predict(images)
        for got, expected in zip(results, want):
            assert got.predictions == {"cla": expected["cla"]}
            assert got.bytes_sent > 0 and got.timing_ms["encode"] > 0 and got.timing_ms["network"] >= 0
        with pytest.raises(ServerError, match="CorruptStreamError"):
            client.send(encoder.encode(images[:1])[0][:-1] + b"\x00")
    with Client(server, encoder) as no_token, pytest.raises(ServerError) as e:
        no_token.predict(images[:1])
    assert e.value.status == 401


def test_load_test_against_a_real_server(artifacts):
    images = [synthetic_images(1, 32, seed=i) for i in range(4)] + [synthetic_images(1, 64, seed=9)]
    report = load_test(artifacts["codec"], {"cla": artifacts["heads"]["cla"]}, images, requests=48, concurrency=8,
                       bad_fraction=0.3, max_size_fraction=0.1, slow_connections=2, slow_interval_s=0.2,
                       baseline_requests=8, config=ServerConfig(max_body_bytes=8192, header_timeout_s=0.5),
                       progress=False)
    assert report["valid_mismatched"] == 0 and not report["wrong_status"], report
    assert report["server_alive_and_healthy"] and report["image_sizes"] == [[32, 32], [64, 64]]
    assert set(report["by_status"]) <= {"200", "400", "413"} and "200" in report["by_status"]
    # the server counted what the clients saw (and the baseline's 8); slow bodies got 408 or left (499), nothing 500
    assert report["server_by_status"]["200"] == report["by_status"]["200"] + 8
    assert set(report["server_by_status"]) <= {"200", "400", "408", "413", "499"}
    assert report["baseline"]["requests"] == 8 and report["server_peak_rss_mb"] > 0
    assert report["slow_clients"]["opened"] >= 2


def _row(method, point, task, metric, nbytes):
    return {"method": method, "rate_point": point, "task": task, "metric": metric, "bytes_mean": nbytes,
            "bpp_mean": 8 * nbytes / 32 / 32}


def test_latency_model_matches_accuracy_and_adds_up(tmp_path, artifacts):
    rows = [_row("mtfc", 1.0, "a", 50, 100), _row("mtfc", 1.0, "b", 30, 100),
            *[_row("jpeg", q, t, m, n) for q, n, ma, mb in [(10, 300, 49, 40), (20, 400, 51, 31), (50, 900, 60, 35)]
              for t, m in (("a", ma), ("b", mb))],
            _row("webp", 90, "a", 45, 500), _row("webp", 90, "b", 20, 500)]
    target, chosen = match_baselines(rows, 1.0)
    assert target == {"a": 50, "b": 30}
    assert chosen["jpeg"]["rate_point"] == 20 and chosen["jpeg"]["matched"]  # cheapest quality reaching both
    assert not chosen["webp"]["matched"]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": rows, "provenance": {"config": {
        "out_dir": str(tmp_path / "missing-run"), "teacher": {"arch": "resnet18"}, "data": {},
        "bottleneck": {"betas": [1.0]}, "heads": {}}}}))
    report = latency_model(results, codec=artifacts["codec"], bandwidths=[1.0, 10.0], rtt_ms=5, device_factor=3)
    m = report["methods"]["jpeg"]
    want = 3 * m["device_encode_ms"] + 8 * 400 / 1e3 + 5 + m["server_decode_ms"] + m["server_heads_ms"]
    assert report["table"][0]["jpeg"] == pytest.approx(want)
    assert (tmp_path / "latency.png").stat().st_size > 0 and "| 10 |" in (tmp_path / "latency.md").read_text()


def test_latency_matching_follows_metric_direction():
    """For an error (lower is better), a baseline point matches mtfc when its error is at most mtfc's."""
    rows = [{**_row("mtfc", 1.0, "count", 0.5, 100), "metric_direction": "lower"},
            *[{**_row("jpeg", q, "count", m, n), "metric_direction": "lower"}
              for q, m, n in [(10, 0.9, 300), (20, 0.5, 400), (50, 0.2, 900)]]]
    target, chosen = match_baselines(rows, 1.0)
    assert target == {"count": 0.5}
    assert chosen["jpeg"]["rate_point"] == 20 and chosen["jpeg"]["matched"]
