"""Codec benchmark: real bytes against the entropy model's estimate, and where encode/decode time goes."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mtfc import bitstream
from mtfc.codec import Codec
from mtfc.teacher import normalize


def _median_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), out


@torch.no_grad()
def rate_overhead(codec: Codec, images: torch.Tensor) -> dict[str, float]:
    """Actual stream bits vs the model's estimate −Σ log2 p(ŷ) on the same hard-quantized latent.

    Returns totals over ``images``: ``payload/estimate`` (range-coder efficiency) and
    ``stream/estimate`` (with the container header), plus the mean header size in bytes.
    """
    codec.eval()
    est = payload = total = 0.0
    for i in range(len(images)):
        x = images[i : i + 1]
        out = codec.latent_codec(codec.g_a(normalize(x)))  # eval mode: likelihoods of the quantized latent
        est += float(sum(-torch.log2(p).sum() for p in out["likelihoods"].values()))
        stream = codec.encode(x)[0]
        _, payloads = bitstream.unpack(stream)
        payload += 8 * sum(map(len, payloads))
        total += 8 * len(stream)
    return {"estimated_bits": est, "payload_bits": payload, "stream_bits": total,
            "payload/estimate": payload / est, "stream/estimate": total / est,
            "header_bytes_mean": (total - payload) / 8 / len(images),
            "bpp": total / (len(images) * images.shape[-2] * images.shape[-1])}


@torch.no_grad()
def latency(codec: Codec, image: torch.Tensor, repeats: int = 20) -> dict[str, float]:
    """Median milliseconds at batch 1, split into network (encoder / decoder convs) and entropy coding."""
    codec.eval()
    y_ms, y = _median_ms(lambda: codec.g_a(normalize(image)), repeats)
    c_ms, comp = _median_ms(lambda: codec.latent_codec.compress(y), repeats)
    shape = comp["shape"]
    d_ms, dec = _median_ms(lambda: codec.latent_codec.decompress(comp["strings"], shape), repeats)
    n_ms, _ = _median_ms(lambda: codec.decoder(dec["y_hat"]), repeats)
    return {"encode_network_ms": y_ms, "encode_entropy_ms": c_ms, "decode_entropy_ms": d_ms,
            "decode_network_ms": n_ms, "encode_total_ms": y_ms + c_ms, "decode_total_ms": d_ms + n_ms}


def benchmark(codec: Codec, images: torch.Tensor, size: int = 224, threads: int = 1, repeats: int = 20) -> dict[str, Any]:
    """Both measurements; latency on one ``size``×``size`` image with ``threads`` CPU threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big = F.interpolate(images[:1], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        return {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                           f"{threads} thread(s)", "images": len(images), "image_size": list(images.shape[-2:]),
                "rate": rate_overhead(codec, images), "latency_size": size, "latency": latency(codec, big, repeats)}
    finally:
        torch.set_num_threads(previous)


def encoder_complexity(g_a: torch.nn.Module, size: int = 224) -> dict[str, float]:
    """Parameters of a device encoder and its MACs per input pixel at ``size``×``size``.

    Counted with forward hooks: a conv costs out·in/groups·k² MACs per output position (biases not
    counted), a GDN over C channels C·(C+1) (its 1×1 conv on x², then x · norm) — the convention of
    :func:`mtfc.deploy.export.encoder_complexity`.
    """
    from compressai.layers import GDN

    macs = 0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        positions = output.shape[0] * output.shape[2] * output.shape[3]
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs += positions * module.out_channels * module.in_channels // module.groups * k
        elif isinstance(module, GDN):
            macs += positions * output.shape[1] * (output.shape[1] + 1)

    hooks = [m.register_forward_hook(count) for m in g_a.modules() if isinstance(m, (torch.nn.Conv2d, GDN))]
    try:
        with torch.no_grad():
            g_a(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return {"params": sum(p.numel() for p in g_a.parameters()), "kmac_per_pixel": macs / (size * size) / 1000}
