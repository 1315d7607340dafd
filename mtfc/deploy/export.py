"""Device encoder export (ONNX) and what characterises it: parameters, MACs, speed, exactness.

``mtfc export CODEC --format onnx`` writes an export directory (see :mod:`mtfc.deploy.encoder`):
the encoder network as ONNX, the codec artifact whose entropy model the device codes with, and a
manifest. MACs are counted the way CompressAI-Vision reports encoder complexity (kMAC per input pixel):
multiply–accumulates of every convolution, GDN's 1×1 normalisation convolution included.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtfc.benchmark import encoder_complexity as benchmark_complexity
from mtfc.codec import Codec, load_codec
from mtfc.deploy.encoder import CODEC_FILE, INPUT_NAME, MANIFEST_FILE, ONNX_FILE, OUTPUT_NAME, Encoder
from mtfc.teacher import normalize

FORMATS = ("onnx",)


class DeviceEncoderNet(nn.Module):
    """What runs on the device before entropy coding: ``g_a(normalize(images))``."""

    def __init__(self, codec: Codec) -> None:
        super().__init__()
        self.g_a = codec.g_a

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.g_a(normalize(images))


def export_onnx(codec_path: str | Path, out_dir: str | Path, opset: int = 17) -> Path:
    """Write ``encoder.onnx`` (dynamic batch and image size), a copy of the codec artifact and
    ``encoder.json`` into ``out_dir``; returns ``out_dir``."""
    codec_path, out = Path(codec_path), Path(out_dir)
    codec = load_codec(codec_path)
    out.mkdir(parents=True, exist_ok=True)
    d = codec.size_divisibility
    example = torch.rand(1, 3, 4 * d, 4 * d)
    onnx_path = out / ONNX_FILE
    torch.onnx.export(DeviceEncoderNet(codec).eval(), (example,), str(onnx_path), dynamo=False, opset_version=opset,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                                    OUTPUT_NAME: {0: "batch", 2: "latent_height", 3: "latent_width"}})
    if codec_path.resolve() != (out / CODEC_FILE).resolve():
        shutil.copyfile(codec_path, out / CODEC_FILE)
    manifest = {"format": "mtfc-device-encoder", "fingerprint": codec.fingerprint, "codec": codec.config,
                "size_divisibility": d, "latent_stride": codec.latent_stride, "opset": opset,
                "input": f"{INPUT_NAME}: float32 (B, 3, H, W) RGB in [0, 1]", "output": f"{OUTPUT_NAME}: float32 latent",
                "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(), "source": str(codec_path),
                **encoder_complexity(codec)}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def encoder_complexity(codec: Codec, size: int = 224) -> dict[str, float]:
    """Parameters of the device encoder and its MACs per input pixel (at ``size``×``size``), counted by
    :func:`mtfc.benchmark.encoder_complexity`, under the manifest's key names."""
    counts = benchmark_complexity(codec.g_a, size)
    return {"encoder_params": counts["params"], "encoder_kmac_per_pixel": counts["kmac_per_pixel"]}


def median_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock milliseconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.no_grad()
def benchmark_encoder(encoder: Encoder, sizes: tuple[int, ...] = (224, 64), repeats: int = 30) -> dict[str, Any]:
    """Median ms per image (batch 1) of the device encoder: network in PyTorch vs ONNX Runtime, and
    entropy coding; with the thread count the encoder was built with (PyTorch is set to match)."""
    threads = encoder.session.get_session_options().intra_op_num_threads
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    codec, net = encoder.codec, DeviceEncoderNet(encoder.codec).eval()
    results: dict[str, Any] = {"threads": threads, "batch": 1, "sizes": {}}
    try:
        for size in sizes:
            image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
            image = F.avg_pool2d(image, 5, 1, 2)  # smoother than white noise, closer to a photo's rate
            y = net(image)
            results["sizes"][str(size)] = {
                "pytorch_network_ms": median_ms(lambda: net(image), repeats),
                "onnxruntime_network_ms": median_ms(lambda: encoder.latent(image), repeats),
                "entropy_coding_ms": median_ms(lambda: codec.compress_latent(y), repeats),
                "pytorch_encode_ms": median_ms(lambda: codec.encode(image), repeats),
                "onnxruntime_encode_ms": median_ms(lambda: encoder.encode(image), repeats),
            }
    finally:
        torch.set_num_threads(previous)
    return results


@torch.no_grad()
def compare_streams(encoder: Encoder, images: torch.Tensor, batch_size: int = 32) -> dict[str, Any]:
    """Streams of the ONNX :class:`Encoder` vs :meth:`Codec.encode` on the same images.

    A mismatch has one cause: ONNX Runtime's float kernels differ from PyTorch's in the last bits, and
    an element of ``y`` within that distance of a rounding boundary (``x.5`` after the prior's offset)
    rounds the other way. Reports how many images differ, how many latent elements flipped, and the
    largest |y_ORT − y_PyTorch|.
    """
    codec = encoder.codec
    same = flipped = 0
    max_diff = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        ours, theirs = encoder.encode(x), codec.encode(x)
        same += sum(a == b for a, b in zip(ours, theirs))
        flipped += int((codec.decode(ours) != codec.decode(theirs)).sum())
        max_diff = max(max_diff, float((encoder.latent(x) - codec.g_a(normalize(x))).abs().max()))
    return {"images": len(images), "identical_streams": same, "differing_streams": len(images) - same,
            "flipped_latent_elements": flipped, "max_abs_y_difference": max_diff}


def synthetic_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` smooth random RGB images (blurred noise with a colour gradient) for checks without a dataset."""
    g = torch.Generator().manual_seed(seed)
    noise = F.avg_pool2d(torch.rand(n, 3, size, size, generator=g), 7, 1, 3)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size) * torch.rand(n, 3, 1, 1, generator=g)
    return (0.6 * noise + 0.4 * ramp).clamp(0, 1)


def export_report(codec_path: str | Path, out_dir: str | Path, *, fmt: str = "onnx", images: torch.Tensor | None = None,
                  benchmark: bool = False, threads: int = 1) -> dict[str, Any]:
    """``mtfc export``: export, then check streams against PyTorch and (optionally) time both."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; supported: {FORMATS}")
    out = export_onnx(codec_path, out_dir)
    encoder = Encoder(out, threads=threads)
    report: dict[str, Any] = {"export_dir": str(out), **json.loads((out / MANIFEST_FILE).read_text())}
    if images is not None:
        report["exactness"] = compare_streams(encoder, images)
    if benchmark:
        report["speed"] = benchmark_encoder(encoder)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The lines ``mtfc export`` prints: complexity, exactness, speed, where the files are."""
    lines = [f"encoder: {report['encoder_params']} parameters, {report['encoder_kmac_per_pixel']:.1f} kMAC/pixel"]
    if "exactness" in report:
        e = report["exactness"]
        lines.append(f"streams identical to PyTorch's: {e['identical_streams']}/{e['images']} ({e['flipped_latent_elements']} "
                     f"latent elements rounded differently; max |Δy| {e['max_abs_y_difference']:.2e})")
    speed = report.get("speed", {})
    for size, t in speed.get("sizes", {}).items():
        lines.append(f"{size}x{size}, batch 1, {speed['threads']} thread(s): network PyTorch {t['pytorch_network_ms']:.2f} ms, "
                     f"ONNX Runtime {t['onnxruntime_network_ms']:.2f} ms; entropy coding {t['entropy_coding_ms']:.2f} ms; "
                     f"whole encode {t['pytorch_encode_ms']:.2f} vs {t['onnxruntime_encode_ms']:.2f} ms")
    lines.append(f"written to {report['export_dir']} (report.json has every number)")
    return "\n".join(lines)
