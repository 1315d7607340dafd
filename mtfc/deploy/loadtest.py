"""Load test: a real ``mtfc serve`` process on 127.0.0.1, N requests at concurrency C from local clients.

A share of the requests carries bad bodies (each class of bad input the server must refuse); every
valid answer is compared with the prediction of the in-process :class:`~mtfc.MultiTaskModel` on the
same stream (batch of one), every bad one with the status it must get. A benchmark tool, not a test.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mtfc import bitstream
from mtfc.deploy.server import STREAM_TYPE, ServerConfig, load_model
from mtfc.deploy.wire import prediction_to_json

HOST = "127.0.0.1"


def bad_bodies(stream: bytes, max_body_bytes: int) -> dict[str, tuple[bytes, int]]:
    """Each class of bad input, made from a valid ``stream``, with the status the server must answer."""
    header, payloads = bitstream.unpack(stream)
    other_codec = bytes(b ^ 0xFF for b in header.fingerprint)
    C = header.latent_shape[0]
    return {
        "empty": (b"", 400),
        "wrong-magic": (b"JUNK" + stream[4:], 400),
        "unsupported-version": (stream[:4] + bytes([9]) + stream[5:], 400),
        "other-codec": (bitstream.pack(bitstream.Header(other_codec, header.image_size, header.latent_shape), payloads), 400),
        "truncated": (stream[: len(stream) // 2], 400),
        "corrupt": (stream[:-6] + bytes([stream[-6] ^ 0xFF]) + stream[-5:], 400),
        "forged-huge-image": (bitstream.pack(bitstream.Header(header.fingerprint, (1 << 16, 1 << 16),
                                                              (C, 1 << 14, 1 << 14)), payloads), 413),
        "decoder-crash": (bitstream.pack(bitstream.Header(header.fingerprint, (1024, 1024), (C, 256, 256)),
                                         [b"\xff" * 4 for _ in payloads]), 400),  # valid CRC, forged payload
        "oversized": (os.urandom(max_body_bytes + 1), 413),
    }


def expected_predictions(model: Any, streams: Sequence[bytes]) -> list[dict[str, Any]]:
    """The in-process :class:`~mtfc.MultiTaskModel` prediction of each stream alone, as the server's JSON."""
    tasks = {name: head.task for name, head in model.heads.items()}
    out = []
    for stream in streams:
        preds = model([stream])
        out.append({name: prediction_to_json(tasks[name], p[0]) for name, p in preds.items()})
    return out


def compare(a: Any, b: Any, atol: float = 1e-4, rtol: float = 1e-5) -> tuple[bool, bool]:
    """(exactly equal, equal up to float rounding) for two JSON predictions: classes, counts, masks and
    keys must be identical; floats may differ by ``atol + rtol·|b|`` (a batch runs other kernels than one image)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return False, False
        pairs = [compare(a[k], b[k], atol, rtol) for k in a]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return False, False
        pairs = [compare(x, y, atol, rtol) for x, y in zip(a, b)]
    elif isinstance(a, float) or isinstance(b, float):
        return a == b, isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= atol + rtol * abs(b)
    else:
        return a == b, a == b
    return all(p[0] for p in pairs), all(p[1] for p in pairs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(codec: str | Path, heads: dict[str, str | Path], config: ServerConfig, port: int,
                 log: Path, imports: Sequence[str] = (), timeout: float = 180.0) -> subprocess.Popen:
    """``python -m mtfc serve`` on 127.0.0.1:``port``; returns once ``/health`` answers."""
    import httpx

    cmd = [sys.executable, "-m", "mtfc", "serve", str(codec), "--host", HOST, "--port", str(port),
           "--max-batch", str(config.max_batch), "--max-wait-ms", str(config.max_wait_ms),
           "--max-body-bytes", str(config.max_body_bytes), "--max-image-pixels", str(config.max_image_pixels),
           "--decoder-workers", str(config.decoder_workers), "--threads", str(config.threads)]
    for name, path in heads.items():
        cmd += ["--head", f"{name}={path}"]
    for module in imports:
        cmd += ["--import", module]
    env = {**os.environ, "MTFC_TOKEN": config.token or ""}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; its log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise TimeoutError(f"the server did not answer /health within {timeout:.0f} s; see {log}")


async def _fire(url: str, plan: list[tuple[str, int]], bodies: dict[str, bytes], concurrency: int, token: str | None,
                on_done: Callable[[int], None]) -> list[tuple[int, float, Any]]:
    import httpx

    headers = {"Content-Type": STREAM_TYPE, **({"Authorization": f"Bearer {token}"} if token else {})}
    results: list[Any] = [None] * len(plan)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=300) as client:
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(plan):
                i = next_index
                next_index += 1
                start = time.perf_counter()
                try:
                    r = await client.post("/predict", content=bodies[plan[i][0]])
                    answer = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
                    results[i] = (r.status_code, 1000 * (time.perf_counter() - start), answer)
                except httpx.HTTPError as e:
                    results[i] = (0, 1000 * (time.perf_counter() - start), repr(e))
                on_done(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def load_test(codec: str | Path, heads: dict[str, str | Path], images: Sequence[torch.Tensor], *,
              requests: int = 10_000, concurrency: int = 64, bad_fraction: float = 0.1,
              config: ServerConfig | None = None, imports: Sequence[str] = (), seed: int = 0,
              log_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the load test; ``images`` (each (1, 3, H, W), sizes may differ) make the valid requests.

    Returns throughput, latency percentiles (all / valid requests), counts by status and by request
    kind, and the checks: valid answers equal to the in-process prediction, bad ones with their status,
    the server alive and healthy afterwards.
    """
    import httpx

    config = config or ServerConfig()
    log = Path(log_dir or tempfile.mkdtemp(prefix="mtfc-loadtest-")) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(codec, heads, imports)
    torch.set_num_threads(config.threads)  # as in the server: another thread count sums in another order
    streams = [model.codec.encode(x)[0] for x in images]
    bad = bad_bodies(streams[0], config.max_body_bytes)
    expected = expected_predictions(model, streams)
    bodies = {f"valid-{i}": s for i, s in enumerate(streams)} | {k: v[0] for k, v in bad.items()}
    rng = random.Random(seed)
    plan = []
    for _ in range(requests):
        kind = rng.choice(list(bad)) if rng.random() < bad_fraction else f"valid-{rng.randrange(len(streams))}"
        plan.append((kind, bad[kind][1] if kind in bad else 200))

    port = free_port()
    print(f"[loadtest] starting the server on {HOST}:{port} (log: {log})", flush=True)
    proc = start_server(codec, heads, config, port, log, imports)
    done, step = 0, max(1, requests // 10)

    def on_done(_: int) -> None:
        nonlocal done
        done += 1
        if progress and done % step == 0:
            print(f"[loadtest] {done}/{requests} requests", flush=True)

    try:
        url = f"http://{HOST}:{port}"
        t0 = time.perf_counter()
        results = asyncio.run(_fire(url, plan, bodies, concurrency, config.token, on_done))
        wall = time.perf_counter() - t0
        auth = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        server_metrics = httpx.get(f"{url}/metrics", headers=auth, timeout=30).json()
        healthy = httpx.get(f"{url}/health", timeout=30).status_code == 200 and proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    by_status: Counter[int] = Counter()
    by_kind: Counter[str] = Counter()
    wrong_status: Counter[str] = Counter()
    exact = close = mismatched = 0
    latency, valid_latency = [], []
    for (kind, want), (status, ms, answer) in zip(plan, results):
        by_status[status] += 1
        group = "valid" if kind.startswith("valid") else kind
        by_kind[group] += 1
        latency.append(ms)
        if status != want:
            wrong_status[f"{group}: {status}"] += 1
            continue
        if status == 200:
            valid_latency.append(ms)
            same, near = compare(answer["predictions"], expected[int(kind.split("-")[1])])
            exact += same
            close += near
            mismatched += not near

    def pct(values: list[float]) -> dict[str, float]:
        a = np.asarray(values or [math.nan])
        return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}

    return {"requests": requests, "concurrency": concurrency, "bad_fraction": bad_fraction,
            "image_sizes": sorted({tuple(x.shape[-2:]) for x in images}), "heads": list(heads),
            "server_config": {k: v for k, v in asdict(config).items() if k != "token"},
            "wall_s": wall, "throughput_rps": requests / wall, "valid_throughput_rps": len(valid_latency) / wall,
            "latency_ms": pct(latency), "valid_latency_ms": pct(valid_latency),
            "by_status": {str(k): v for k, v in sorted(by_status.items())}, "by_kind": dict(sorted(by_kind.items())),
            "wrong_status": dict(wrong_status), "valid_exact": exact, "valid_equal_up_to_float_rounding": close,
            "valid_mismatched": mismatched, "server_alive_and_healthy": healthy,
            "server_images_per_batch": server_metrics.get("images_per_batch"),
            "server_decoder_crashes": server_metrics.get("decoder_crashes"),
            "server_batch_sizes": server_metrics.get("batch_sizes"), "server_log": str(log)}
