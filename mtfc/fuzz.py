"""Fuzzing :meth:`Codec.decode` with forged streams that pass every container check but the payload's.

Each forged stream has this codec's magic, version and fingerprint and a recomputed CRC, so only the
header's consistency checks and the entropy decoder (:mod:`mtfc.entropy_coding`) stand between it and
the heads. Four kinds (:data:`KINDS`):

- ``random``: a legit header, payloads of random bytes and random lengths;
- ``truncated``: a legit stream with one payload cut short;
- ``oversized``: a legit stream whose header announces a larger image (2× to 1024× per side);
- ``bitflip``: a legit stream with 1–8 bits of its payloads flipped.

:func:`fuzz_decoder` decodes every forged stream twice, the second time in reverse order, so that
each stream is decoded after different ones: the two answers must be the same.
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from mtfc import bitstream
from mtfc.codec import Codec

KINDS = ("random", "truncated", "oversized", "bitflip", "level")


def small_codec(kind: str = "factorized", seed: int = 0, levels: int = 0) -> Codec:
    """A small frozen codec to fuzz without an artifact: untrained (8 latent, 16 hidden channels; ``levels``
    rate levels for a variable-rate kind), its encoder's last layer scaled ×20 so that the rounded latent
    spans several values, as a trained one does."""
    torch.manual_seed(seed)
    codec = Codec(kind=kind, latent_channels=8, hidden_channels=16, out_channels=64, levels=levels)
    with torch.no_grad():
        codec.g_a[-1].weight.mul_(20)
    return codec.freeze()


def forge(legit: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """One forged stream of ``kind`` (:data:`KINDS`) made from the legit stream ``legit``, with a valid CRC."""
    header, payloads = bitstream.unpack(legit)
    payloads = list(payloads)
    if kind == "random":
        payloads = [rng.bytes(int(rng.integers(0, 2 * len(p) + 8))) if rng.random() < 0.5
                    else rng.bytes(4 * int(rng.integers(0, len(p) // 2 + 3))) for p in payloads]
    elif kind == "truncated":
        i = int(rng.integers(len(payloads)))
        payloads[i] = payloads[i][: int(rng.integers(len(payloads[i])))]  # never empty: see entropy_coding.END_MARK
    elif kind == "oversized":
        factor = int(rng.choice([2, 4, 8, 1024]))
        H, W = header.image_size
        header = bitstream.Header(header.fingerprint, (H * factor, W * factor), level=header.level)
    elif kind == "level":  # another rate level than the payload's (maybe one the codec lacks), or none
        levels = [None, *range(2 * (header.level or 0) + 4)]
        levels.remove(header.level)
        header = bitstream.Header(header.fingerprint, header.image_size, header.original_size,
                                  levels[int(rng.integers(len(levels)))])
    elif kind == "bitflip":
        joined = bytearray(b"".join(payloads))
        for bit in rng.choice(8 * len(joined), size=min(int(rng.integers(1, 9)), 8 * len(joined)), replace=False):
            joined[bit // 8] ^= 1 << (bit % 8)
        lengths = np.cumsum([0, *map(len, payloads)])
        payloads = [bytes(joined[a:b]) for a, b in zip(lengths[:-1], lengths[1:])]
    else:
        raise ValueError(f"unknown forgery {kind!r}; choose from {KINDS}")
    return bitstream.pack(header, payloads)


def _answer(codec: Codec, stream: bytes) -> tuple[str, str, float]:
    """(outcome, what was returned, ms): ``"ok"`` and a digest of the latent, or the error's class and message."""
    t0 = time.perf_counter()
    try:
        latent = codec.decode([stream])
    except bitstream.BitstreamError as e:
        return type(e).__name__, str(e), 1000 * (time.perf_counter() - t0)
    ms = 1000 * (time.perf_counter() - t0)
    if not torch.isfinite(latent).all():
        return "non-finite", "", ms
    return "ok", f"{float(latent.abs().max())} {hashlib.sha256(latent.numpy().tobytes()).hexdigest()}", ms


@torch.no_grad()
def fuzz_decoder(codec: Codec, n: int, seed: int = 0, image_size: tuple[int, int] = (32, 48)) -> dict[str, Any]:
    """Decode ``n`` forged streams (the kinds in turn) made from 4 random images of ``image_size``.

    Returns counts of each outcome per kind (``ok`` or the :class:`~mtfc.bitstream.BitstreamError`
    subclass; anything else raised propagates), ``non_finite`` (latents with NaN or inf: must be 0),
    ``max_abs_latent`` over the ``ok`` ones, ``inconsistent`` (streams whose second decode, after
    other streams, answered differently: must be 0), ``max_decode_ms`` and the total ``seconds``.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    levels = rng.integers(codec.levels, size=4).tolist() if codec.levels else None
    legit = codec.encode(torch.rand(4, 3, *image_size, generator=torch.Generator().manual_seed(seed)), level=levels)
    forged = [(KINDS[i % len(KINDS)], forge(legit[int(rng.integers(len(legit)))], KINDS[i % len(KINDS)], rng))
              for i in range(n)]
    counts: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    answers, max_abs, max_ms = [], 0.0, 0.0
    for kind, stream in forged:
        outcome, detail, ms = _answer(codec, stream)
        counts[kind][outcome] += 1
        answers.append((outcome, detail))
        max_ms = max(max_ms, ms)
        if outcome == "ok":
            max_abs = max(max_abs, float(detail.split()[0]))
    inconsistent = 0
    for (_, stream), first in zip(reversed(forged), reversed(answers)):
        outcome, detail, ms = _answer(codec, stream)
        inconsistent += (outcome, detail) != first
        max_ms = max(max_ms, ms)
    return {"streams": n, "outcomes": {kind: dict(c) for kind, c in counts.items()},
            "non_finite": sum(c["non-finite"] for c in counts.values()), "max_abs_latent": max_abs,
            "inconsistent": inconsistent, "max_decode_ms": max_ms, "seconds": time.perf_counter() - t0}
