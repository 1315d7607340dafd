"""Image-codec baselines: the reference task models run on images round-tripped through Pillow.

The rate of a baseline is the size of the whole encoded file (headers included), exactly as the
mtfc rate counts the whole bitstream container. Encoder settings are Pillow's defaults apart from
``quality`` (JPEG: 4:2:0 chroma subsampling, baseline; WebP: ``method=4``; AVIF: Pillow's speed).
"""
from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, features

from mtfc.evaluation.runner import BatchResult, raw_rgb_bytes

__all__ = ["CODECS", "RoundTrip", "available_codecs", "roundtrip", "codec_method", "uncompressed_method"]

#: codec name → (Pillow format, Pillow feature that must be compiled in)
CODECS: dict[str, tuple[str, str]] = {"jpeg": ("JPEG", "jpg"), "webp": ("WEBP", "webp"), "avif": ("AVIF", "avif")}

#: a reference task model: (images in [0, 1], targets) -> one prediction per image
TaskFn = Callable[[torch.Tensor, list[dict[str, Any]]], list[Any]]


class RoundTrip(NamedTuple):
    images: torch.Tensor      # decoded, (B, 3, H, W) float32 in [0, 1]
    num_bytes: list[int]      # whole encoded file per image
    encode_s: float           # Pillow encode time for the batch
    decode_s: float           # Pillow decode time for the batch


def available_codecs() -> list[str]:
    """The codecs of :data:`CODECS` that this Pillow build can both encode and decode."""
    return [name for name, (_, feature) in CODECS.items() if features.check(feature)]


def roundtrip(images: torch.Tensor, codec: str, quality: int) -> RoundTrip:
    """Encode each image with ``codec`` at ``quality`` (0–100) and decode it back.

    ``images``: float (B, 3, H, W) in [0, 1], RGB; they are rounded to 8 bits before encoding.
    Only Pillow's encode and decode calls are timed.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {sorted(CODECS)}")
    if codec not in available_codecs():
        raise ValueError(f"codec {codec!r} is not supported by this Pillow build; available: {available_codecs()}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 0 <= quality <= 100:
        raise ValueError(f"quality must be an int in [0, 100]; got {quality!r}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
    fmt = CODECS[codec][0]
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded, sizes, enc_s, dec_s = [], [], 0.0, 0.0
    for array in pixels:
        source = Image.fromarray(array)
        buffer = io.BytesIO()
        t0 = time.perf_counter()
        source.save(buffer, format=fmt, quality=int(quality))
        enc_s += time.perf_counter() - t0
        data = buffer.getvalue()
        t0 = time.perf_counter()
        with Image.open(io.BytesIO(data)) as encoded:
            out = np.asarray(encoded.convert("RGB"))
        dec_s += time.perf_counter() - t0
        sizes.append(len(data))
        decoded.append(torch.from_numpy(out.copy()))
    batch = torch.stack(decoded).permute(0, 3, 1, 2).float().div_(255).to(images.device)
    return RoundTrip(batch, sizes, enc_s, dec_s)


def codec_method(codec: str, quality: int, models: Mapping[str, TaskFn]) -> Callable[..., BatchResult]:
    """A ``predict_fn`` for :func:`mtfc.evaluation.runner.evaluate_method`: round-trip the batch
    through ``codec`` at ``quality`` once, then run every task's reference model on the decoded images."""
    def predict(images: torch.Tensor, targets: list[dict[str, Any]]) -> BatchResult:
        rt = roundtrip(images, codec, quality)
        return BatchResult({task: fn(rt.images, targets) for task, fn in models.items()},
                           rt.num_bytes, rt.encode_s, rt.decode_s)
    return predict


def uncompressed_method(models: Mapping[str, TaskFn]) -> Callable[..., BatchResult]:
    """A ``predict_fn`` for the uncompressed reference: raw 8-bit RGB (3 bytes a pixel), no coding time."""
    def predict(images: torch.Tensor, targets: list[dict[str, Any]]) -> BatchResult:
        return BatchResult({task: fn(images, targets) for task, fn in models.items()},
                           raw_rgb_bytes(images), 0.0, 0.0)
    return predict
