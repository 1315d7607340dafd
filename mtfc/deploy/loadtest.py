"""Load test: a real ``mtfc serve`` process on 127.0.0.1, N requests at concurrency C from local clients.

A share of the requests carries bad bodies (each class of bad input the server must refuse); every
valid answer is compared with the prediction of the in-process :class:`~mtfc.MultiTaskModel` on the
same stream (batch of one), every bad one with the status it must get. A benchmark tool, not a test.
"""
from __future__ import annotations

import asyncio
import copy
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mtfc import bitstream
from mtfc.deploy.server import ServerConfig, load_model
from mtfc.deploy.wire import STREAM_TYPE, prediction_to_json

HOST = "127.0.0.1"


def bad_bodies(stream: bytes, max_body_bytes: int) -> dict[str, tuple[bytes, tuple[int, ...]]]:
    """Each class of bad input, made from a valid ``stream`` of a served size, with the statuses the
    server may answer."""
    header, payloads = bitstream.unpack(stream)
    other_codec = bytes(b ^ 0xFF for b in header.fingerprint)
    return {
        "empty": (b"", (400,)),
        "wrong-magic": (b"JUNK" + stream[4:], (400,)),
        "unsupported-version": (b"MTFC\x02" + stream[1:], (400,)),
        "other-codec": (bitstream.pack(bitstream.Header(other_codec, header.image_size), payloads), (400,)),
        "truncated": (stream[:4], (400,)),  # cut inside its header (a cut payload fails its checksum)
        "corrupt": (stream[:-4] + bytes([stream[-4] ^ 0xFF]) + stream[-3:], (400,)),
        "forged-huge-image": (bitstream.pack(bitstream.Header(header.fingerprint, (1 << 16, 1 << 16)), payloads),
                              (413,)),
        # valid header and CRC, forged payload: fails decoding or crashes the decoder (400) or decodes to noise (200)
        "forged-payload": (bitstream.pack(header, [b"\xff" * 4 for _ in payloads]), (200, 400)),
        "oversized": (os.urandom(max_body_bytes + 1), (413,)),
    }


def max_size_body(stream: bytes, image_size: tuple[int, int], seed: int = 0) -> bytes:
    """A forged stream (valid header and CRC, random payload) announcing ``image_size`` — the largest
    size a server serves, so the most decoding work a stream can ask for. It decodes to noise (200)
    or fails decoding (400)."""
    header, payloads = bitstream.unpack(stream)
    rng = random.Random(seed)
    H, W = image_size
    forged = bitstream.Header(header.fingerprint, (H, W))
    return bitstream.pack(forged, [bytes(rng.randrange(256) for _ in range(256)) for _ in payloads])


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
    """``python -m mtfc serve`` on 127.0.0.1:``port`` with ``config``; returns once ``/health`` answers."""
    import httpx

    from mtfc.cli import SERVER_OPTIONS

    cmd = [sys.executable, "-m", "mtfc", "serve", str(codec), "--host", HOST, "--port", str(port)]
    for name in SERVER_OPTIONS:
        cmd += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    for H, W in config.image_sizes or ():
        cmd += ["--image-size", f"{H}x{W}"]
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


async def _fire(url: str, plan: list[str], bodies: dict[str, bytes], concurrency: int, token: str | None,
                on_done: Callable[[], None]) -> list[tuple[int, float, Any]]:
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
                    r = await client.post("/predict", content=bodies[plan[i]])
                    answer = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
                    results[i] = (r.status_code, 1000 * (time.perf_counter() - start), answer)
                except httpx.HTTPError as e:
                    results[i] = (0, 1000 * (time.perf_counter() - start), repr(e))
                on_done()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


#: What a slow client sends: a request whose headers (or, for a slow body, whose body) never end.
_SLOW_HEADERS = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + STREAM_TYPE.encode()
                 + b"\r\nContent-Length: 100000\r\n")


async def _slow_clients(port: int, n: int, interval: float, stop: asyncio.Event) -> dict[str, int]:
    """``n`` connections held open by trickling one byte every ``interval`` s: even ones never finish their
    headers, odd ones their body. A connection the server closes is reopened; all stop with ``stop``."""
    stats = {"opened": 0, "closed_by_server": 0}

    async def hold(slow_body: bool) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(interval)
                continue
            stats["opened"] += 1
            message = _SLOW_HEADERS + b"\r\n" + bytes(100_000) if slow_body else _SLOW_HEADERS * 1000
            if slow_body:  # the headers at once, then the body byte by byte
                writer.write(message[: len(_SLOW_HEADERS) + 2])
                message = message[len(_SLOW_HEADERS) + 2 :]
            try:
                for i in range(len(message)):
                    if stop.is_set():
                        break
                    writer.write(message[i : i + 1])
                    await writer.drain()
                    try:
                        await asyncio.wait_for(reader.read(4096), interval)
                    except asyncio.TimeoutError:
                        continue
                    stats["closed_by_server"] += 1  # end of file, or the 408 the server sends before closing
                    break
            except OSError:
                stats["closed_by_server"] += 1
            finally:
                writer.close()

    await asyncio.gather(*(hold(i % 2 == 1) for i in range(n)))
    return stats


class _PeakRSS:
    """The peak resident memory of a process and all its descendants (sampled from /proc, Linux)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak_mb = pid, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree_mb(self) -> float:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
                rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        total, todo = 0, [self.pid]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo += children.get(pid, [])
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak_mb = max(self.peak_mb, self._tree_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def _server_metrics(text: str) -> dict[str, Any]:
    """The load test's figures from the server's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    by_code: Counter[str] = Counter()
    for (name, labels), value in samples.items():
        if name == "mtfc_requests_total" and dict(labels)["path"] == "/predict":
            by_code[dict(labels)["code"]] += int(value)
    batches = samples.get(("mtfc_batch_images_count", ()), 0)
    return {"by_status": dict(sorted(by_code.items())),
            "images_per_batch": samples.get(("mtfc_batch_images_sum", ()), 0) / batches if batches else 0.0,
            "decoder_crashes": int(samples.get(("mtfc_decoder_crashes_total", ()), 0)),
            "decoder_start_failures": int(samples.get(("mtfc_decoder_start_failures_total", ()), 0)),
            "slow_connections_closed": int(samples.get(("mtfc_slow_connections_closed_total", ()), 0))}


def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values or [math.nan])
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def load_test(codec: str | Path, heads: dict[str, str | Path], images: Sequence[torch.Tensor], *,
              requests: int = 10_000, concurrency: int = 64, bad_fraction: float = 0.1,
              max_size_fraction: float = 0.0, slow_connections: int = 0, slow_interval_s: float = 1.0,
              baseline_requests: int = 0, config: ServerConfig | None = None, imports: Sequence[str] = (),
              seed: int = 0, log_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the load test; ``images`` (each (1, 3, H, W), sizes may differ) make the valid requests.

    First ``baseline_requests`` valid requests alone (the unloaded reference), then ``requests`` of which
    ``bad_fraction`` carry bad bodies (:func:`bad_bodies`) and ``max_size_fraction`` forged streams of
    the largest served size (:func:`max_size_body`), while ``slow_connections`` connections trickle
    bytes (:func:`_slow_clients`). The server serves the images' sizes unless ``config.image_sizes``
    says otherwise. Returns throughput, latency percentiles (all / valid requests, and the baseline's),
    counts by status and by request kind, the server's peak resident memory (its process tree), and the
    checks: valid answers equal to the in-process prediction, bad ones with their status, no 500, the
    server alive and healthy afterwards.
    """
    import httpx

    config = copy.copy(config or ServerConfig())
    if config.image_sizes is None:
        config.image_sizes = sorted({tuple(x.shape[-2:]) for x in images})
    log = Path(log_dir or tempfile.mkdtemp(prefix="mtfc-loadtest-")) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(codec, heads, imports)
    torch.set_num_threads(config.threads)  # as in the server: another thread count sums in another order
    streams = [model.codec.encode(x)[0] for x in images]
    expected = expected_predictions(model, streams)
    allowed = {f"valid-{i}": (200,) for i in range(len(streams))} | {"max-size": (200, 400)}
    bodies = {f"valid-{i}": s for i, s in enumerate(streams)}
    bodies["max-size"] = max_size_body(streams[0], max(config.image_sizes, key=lambda s: s[0] * s[1]), seed)
    for kind, (body, statuses) in bad_bodies(streams[0], config.max_body_bytes).items():
        bodies[kind], allowed[kind] = body, statuses
    bad = [k for k in bodies if not k.startswith("valid") and k != "max-size"]
    rng = random.Random(seed)

    def valid() -> str:
        return f"valid-{rng.randrange(len(streams))}"

    baseline_plan = [valid() for _ in range(baseline_requests)]
    plan = []
    for _ in range(requests):
        u = rng.random()
        plan.append(rng.choice(bad) if u < bad_fraction else "max-size" if u < bad_fraction + max_size_fraction
                    else valid())

    port = free_port()
    print(f"[loadtest] starting the server on {HOST}:{port} (log: {log})", flush=True)
    proc = start_server(codec, heads, config, port, log, imports)
    rss = _PeakRSS(proc.pid)
    url = f"http://{HOST}:{port}"
    done = 0

    def counter(total: int, phase: str) -> Callable[[], None]:
        step = max(1, total // 10)

        def on_done() -> None:
            nonlocal done
            done += 1
            if progress and done % step == 0:
                print(f"[loadtest] {phase}: {done}/{total} requests", flush=True)
        return on_done

    async def mixed() -> list[tuple[int, float, Any]]:
        stop = asyncio.Event()
        slow = asyncio.ensure_future(_slow_clients(port, slow_connections, slow_interval_s, stop))
        await asyncio.sleep(min(1.0, slow_interval_s) if slow_connections else 0)  # let them connect first
        try:
            return await _fire(url, plan, bodies, concurrency, config.token, counter(len(plan), "mixed"))
        finally:
            stop.set()
            slow_stats.update(await slow)

    slow_stats: dict[str, int] = {}
    try:
        base_results, base_wall = [], math.nan
        if baseline_plan:
            t0 = time.perf_counter()
            base_results = asyncio.run(_fire(url, baseline_plan, bodies, concurrency, config.token,
                                             counter(len(baseline_plan), "baseline")))
            base_wall = time.perf_counter() - t0
            done = 0
        t0 = time.perf_counter()
        results = asyncio.run(mixed())
        wall = time.perf_counter() - t0
        auth = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        server_metrics = _server_metrics(httpx.get(f"{url}/metrics", headers=auth, timeout=30).text)
        healthy = httpx.get(f"{url}/health", timeout=30).json().get("status") == "ok" and proc.poll() is None
    finally:
        peak_rss_mb = rss.stop()
        proc.terminate()
        proc.wait(timeout=30)

    by_status: Counter[int] = Counter()
    by_kind: Counter[str] = Counter()
    wrong_status: Counter[str] = Counter()
    exact = close = mismatched = 0
    latency, valid_latency = [], []
    for phase, phase_plan, phase_results in (("baseline", baseline_plan, base_results), ("mixed", plan, results)):
        for kind, (status, ms, answer) in zip(phase_plan, phase_results):
            group = "valid" if kind.startswith("valid") else kind
            if status not in allowed[kind]:
                wrong_status[f"{group}: {status}"] += 1
            if status == 200 and kind.startswith("valid"):
                same, near = compare(answer["predictions"], expected[int(kind.split("-")[1])])
                mismatched += not near
                if phase == "mixed":
                    exact += same
                    close += near
                    valid_latency.append(ms)
            if phase == "mixed":
                by_status[status] += 1
                by_kind[group] += 1
                latency.append(ms)
    base_valid = [ms for status, ms, _ in base_results if status == 200]
    report = {"requests": requests, "concurrency": concurrency, "bad_fraction": bad_fraction,
              "max_size_fraction": max_size_fraction, "slow_connections": slow_connections,
              "image_sizes": [list(s) for s in config.image_sizes], "heads": list(heads),
              "server_config": {k: v for k, v in asdict(config).items() if k != "token"},
              "wall_s": wall, "throughput_rps": requests / wall, "valid_throughput_rps": len(valid_latency) / wall,
              "latency_ms": _pct(latency), "valid_latency_ms": _pct(valid_latency),
              "by_status": {str(k): v for k, v in sorted(by_status.items())}, "by_kind": dict(sorted(by_kind.items())),
              "wrong_status": dict(wrong_status), "valid_exact": exact, "valid_equal_up_to_float_rounding": close,
              "valid_mismatched": mismatched, "server_alive_and_healthy": healthy, "server_peak_rss_mb": peak_rss_mb,
              "slow_clients": slow_stats, **{f"server_{k}": v for k, v in server_metrics.items()},
              "server_log": str(log)}
    if baseline_plan:
        base_rps = len(base_valid) / base_wall
        report["baseline"] = {"requests": len(baseline_plan), "wall_s": base_wall, "valid_throughput_rps": base_rps,
                              "valid_latency_ms": _pct(base_valid)}
        report["valid_throughput_vs_baseline"] = report["valid_throughput_rps"] / base_rps
        report["valid_p99_vs_baseline"] = report["valid_latency_ms"]["p99"] / _pct(base_valid)["p99"]
    return report
