"""Image-codec baselines: the reference task models run on images round-tripped through Pillow.

The rate of a baseline is the size of the whole encoded file (headers included), exactly as the
mtfc rate counts the whole bitstream container. Encoder settings are Pillow's defaults apart from
``quality`` (JPEG: 4:2:0 chroma subsampling, baseline; WebP: ``method=4``; AVIF: Pillow's speed).

An evaluation needs every baseline setting on every validation image, for every head and every
rerun: :class:`RoundTripCache` keeps the encoded files on disk (a file is a few percent of its
decoded image, and decoding it again costs a fraction of encoding it), and :class:`RoundTripDataset`
hands out each image with all its round trips, so that the coding runs in the DataLoader's worker
processes, in parallel, once per image for all heads.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import PIL
import torch
from PIL import Image, features
from torch.utils.data import Dataset

from mtfc.evaluation.runner import BatchResult, raw_rgb_bytes

__all__ = ["CODECS", "RoundTrip", "available_codecs", "roundtrip", "codec_method", "uncompressed_method",
           "RoundTripCache", "RoundTripDataset", "CodedBatch", "collate_coded"]

#: codec name → (Pillow format, Pillow feature that must be compiled in)
CODECS: dict[str, tuple[str, str]] = {"jpeg": ("JPEG", "jpg"), "webp": ("WEBP", "webp"), "avif": ("AVIF", "avif")}

#: a reference task model: (images in [0, 1], targets) -> one prediction per image
TaskFn = Callable[[torch.Tensor, list[dict[str, Any]]], list[Any]]


#: a baseline setting: (codec, quality)
Point = tuple[str, int]


class RoundTrip(NamedTuple):
    images: torch.Tensor      # decoded, (B, 3, H, W): float32 in [0, 1] (uint8 in a CodedBatch)
    num_bytes: list[int]      # whole encoded file per image
    encode_s: float           # Pillow encode time for the batch
    decode_s: float           # Pillow decode time for the batch


def available_codecs() -> list[str]:
    """The codecs of :data:`CODECS` that this Pillow build can both encode and decode."""
    return [name for name, (_, feature) in CODECS.items() if features.check(feature)]


def _check(codec: str, quality: Any) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known: {sorted(CODECS)}")
    if codec not in available_codecs():
        raise ValueError(f"codec {codec!r} is not supported by this Pillow build; available: {available_codecs()}")
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 0 <= quality <= 100:
        raise ValueError(f"quality must be an int in [0, 100]; got {quality!r}")


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Float (B, 3, H, W) in [0, 1] → 8-bit (B, H, W, 3), as a codec gets them."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode(pixels: np.ndarray, codec: str, quality: int) -> tuple[bytes, float]:
    """One 8-bit (H, W, 3) image encoded with Pillow: the whole file, and the seconds Pillow took."""
    source = Image.fromarray(pixels)
    buffer = io.BytesIO()
    t0 = time.perf_counter()
    source.save(buffer, format=CODECS[codec][0], quality=int(quality))
    return buffer.getvalue(), time.perf_counter() - t0


def decode(data: bytes) -> tuple[np.ndarray, float]:
    """An encoded file back to 8-bit (H, W, 3) RGB, and the seconds Pillow took."""
    t0 = time.perf_counter()
    with Image.open(io.BytesIO(data)) as encoded:
        out = np.asarray(encoded.convert("RGB"))
    return out, time.perf_counter() - t0


def roundtrip(images: torch.Tensor, codec: str, quality: int) -> RoundTrip:
    """Encode each image with ``codec`` at ``quality`` (0–100) and decode it back.

    ``images``: float (B, 3, H, W) in [0, 1], RGB; they are rounded to 8 bits before encoding.
    Only Pillow's encode and decode calls are timed.
    """
    _check(codec, quality)
    decoded, sizes, enc_s, dec_s = [], [], 0.0, 0.0
    for array in to_pixels(images):
        data, seconds = encode(array, codec, quality)
        enc_s += seconds
        out, seconds = decode(data)
        dec_s += seconds
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
                           raw_rgb_bytes(images, targets), 0.0, 0.0)
    return predict


class RoundTripCache:
    """The encoded files of every baseline setting on one evaluation set, on disk.

    One file per setting, ``<root>/<codec>_q<quality>_<dataset_key>.pt``: each image's encoded file
    and encode time, keyed by the SHA-1 of the image's 8-bit pixels (so an entry is only ever used
    for the very image it encodes), and the Pillow and codec-library versions (a file written by
    other versions is not used). ``dataset_key`` keeps the files of different sets apart.
    """

    FORMAT = 1

    def __init__(self, root: str | os.PathLike, dataset_key: str, points: Sequence[Point]) -> None:
        for codec, quality in points:
            _check(codec, quality)
        self.root, self.points = Path(root), [(str(c), int(q)) for c, q in points]
        self.paths = {p: self.root / f"{p[0]}_q{p[1]}_{dataset_key}.pt" for p in self.points}
        self.entries: dict[Point, dict[str, tuple[bytes, float]]] = {p: self._read(p) for p in self.points}
        self._changed: set[Point] = set()

    def _header(self, point: Point) -> dict[str, Any]:
        codec, quality = point
        return {"format": self.FORMAT, "codec": codec, "quality": quality, "pillow": PIL.__version__,
                "library": features.version(CODECS[codec][1])}

    def _read(self, point: Point) -> dict[str, tuple[bytes, float]]:
        path = self.paths[point]
        if not path.is_file():
            return {}
        try:
            data = torch.load(path, weights_only=True)
        except Exception:  # unreadable (e.g. cut short): recompute it
            return {}
        return data["entries"] if data.get("header") == self._header(point) else {}

    def lookup(self, point: Point, digest: str) -> tuple[bytes, float] | None:
        """The cached ``(file, encode seconds)`` of the image with pixel digest ``digest``, if any."""
        return self.entries[point].get(digest)

    def add(self, new: Iterable[tuple[Point, str, bytes, float]]) -> None:
        """Record ``(point, digest, file, encode seconds)`` entries (a :class:`CodedBatch`'s ``new``)."""
        for point, digest, data, seconds in new:
            self.entries[point][digest] = (data, seconds)
            self._changed.add(point)

    def save(self) -> None:
        """Write the settings that got new entries (atomically: a file is whole or absent)."""
        for point in sorted(self._changed):
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.paths[point]
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({"header": self._header(point), "entries": self.entries[point]}, tmp)
            os.replace(tmp, path)
        self._changed.clear()


def pixel_digest(pixels: np.ndarray) -> str:
    """SHA-1 of an 8-bit image and its shape: the key of its cache entries."""
    return hashlib.sha1(repr(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()


class RoundTripDataset(Dataset):
    """``dataset``'s ``(image, target)`` items with the image's round trip through every setting of
    ``cache``: a cached file is decoded, a missing one encoded (and handed back for the cache).
    Batch it with :func:`collate_coded`; in a DataLoader's workers the images are coded in parallel."""

    def __init__(self, dataset: Any, cache: RoundTripCache) -> None:
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any], str, dict[Point, tuple]]:
        image, target = self.dataset[index]
        pixels = to_pixels(image[None])[0]
        digest = pixel_digest(pixels)
        trips = {}
        for point in self.cache.points:
            hit = self.cache.lookup(point, digest)
            data, enc_s = hit if hit is not None else encode(pixels, *point)
            out, dec_s = decode(data)
            trips[point] = (torch.from_numpy(out.copy()).permute(2, 0, 1), len(data), enc_s, dec_s,
                            None if hit is not None else data)
        return image, target, digest, trips


class CodedBatch(NamedTuple):
    """A batch of a :class:`RoundTripDataset`: images (B, 3, H, W) in [0, 1], targets, per setting the
    decoded 8-bit images with bytes and coding seconds, and ``new`` cache entries for
    :meth:`RoundTripCache.add`."""

    images: torch.Tensor
    targets: list[dict[str, Any]]
    roundtrips: dict[Point, RoundTrip]
    new: list[tuple[Point, str, bytes, float]]


def collate_coded(items: Sequence[tuple[torch.Tensor, dict[str, Any], str, dict[Point, tuple]]]) -> CodedBatch:
    """The DataLoader ``collate_fn`` of a :class:`RoundTripDataset`."""
    from mtfc.data import collate

    images, targets = collate([(image, target) for image, target, _, _ in items])
    roundtrips, new = {}, []
    for point in items[0][3]:
        trips = [trips[point] for _, _, _, trips in items]
        roundtrips[point] = RoundTrip(torch.stack([t[0] for t in trips]), [t[1] for t in trips],
                                      sum(t[2] for t in trips), sum(t[3] for t in trips))
        new += [(point, digest, t[4], t[2]) for (_, _, digest, _), t in zip(items, trips) if t[4] is not None]
    return CodedBatch(images, targets, roundtrips, new)
