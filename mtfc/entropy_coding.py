"""Bounds-safe entropy coding of CompressAI's frozen priors with constriction's ANS coder.

CompressAI's entropy models stay the source of truth for the probabilities: after ``update()`` an
``EntropyBottleneck`` or ``GaussianConditional`` holds, for each table ``i``, a 16-bit quantized CDF
(``quantized_cdf[i, :cdf_length[i]]``) over the values ``offset[i] … offset[i] + cdf_length[i] − 3`` and
one last slot, the *escape*, for everything outside them. CompressAI codes these tables with its C++
rANS coder, which never checks the end of its input: a forged payload makes it read past its buffer
(crashes, or garbage that depends on whatever was decoded before) and a value ≥ 2²⁸ makes its
encoder loop forever. Here the same tables are coded with the ANS coder of ``constriction``
(Bamler, "Understanding Entropy Coding With Asymmetric Numeral Systems (ANS)", 2022; written in Rust,
memory-safe, every read bounds-checked):

- a value ``v = round(x − mean)`` is clamped to ±:data:`ESCAPE_LIMIT` before coding (by
  :func:`quantize`, which ``Codec.quantize`` uses too), so encoding always ends and no decoded value
  leaves ``mean ± max(ESCAPE_LIMIT, the table's range)``;
- a value outside its table is coded as the escape symbol followed by its distance beyond the table
  and its side, in an Elias-gamma code whose length is bounded by ``ESCAPE_LIMIT`` (CompressAI's is
  unbounded); a decoded escape beyond ±ESCAPE_LIMIT is an error;
- symbols are coded table by table (one ``constriction`` categorical model per table, built once
  from the table's probabilities), then the escaped values, then :data:`END_MARK`; a payload is the
  coder's 32-bit words, little-endian.

A payload is accepted only if decoding ends with the end mark and the coder empty: every word read
and the state back at its initial value. A truncated, padded or altered payload fails that except by
chance (or where the change falls on an escaped value's uniform bits, which only changes that value),
and then decodes, like any payload, to a latent within the bounds above; every failure is a
:class:`~mtfc.bitstream.CorruptStreamError`. Decoding keeps no state between payloads.
"""
from __future__ import annotations

import copy
from functools import cached_property

import constriction
import numpy as np
import torch
from compressai.entropy_models import EntropyModel
from compressai.latent_codecs import EntropyBottleneckLatentCodec, HyperpriorLatentCodec

from mtfc.bitstream import CorruptStreamError

#: The largest |round(x − mean)| coded; larger values are clamped to it (see :func:`quantize`).
ESCAPE_LIMIT = 2**15
#: Every payload's last decoded symbol (uniform over 256 values): without it the empty payload would be
#: a valid one (ANS codes a run of each table's first symbol from its initial state in no words).
END_MARK = 0xA5
_CDF_PRECISION = 16  # CompressAI's quantized CDFs sum to 2**16
_WORD = np.dtype("<u4")


def check_finite(x: torch.Tensor) -> None:
    """Raise ``ValueError`` if the latent ``x`` has NaN or infinite values (a latent that cannot be coded)."""
    bad = int(x.numel() - torch.isfinite(x).sum())
    if bad:
        raise ValueError(f"cannot code a latent with {bad} NaN or infinite values; the input must be finite "
                         "RGB in [0, 1]")


def quantize(x: torch.Tensor, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, x̂)``: the integers ``v = clamp(round(x − means), ±ESCAPE_LIMIT)`` that are coded, and
    ``x̂ = v + means``, what decoding returns. Raises ``ValueError`` if ``x`` is not finite."""
    check_finite(x)
    values = torch.round(x - means).clamp_(-ESCAPE_LIMIT, ESCAPE_LIMIT)
    return values, values + means


class TableCoder:
    """Codes integers with the frozen CDF tables of one CompressAI entropy model, each value with
    the table its index names.

    Args:
        model: an ``EntropyBottleneck`` or ``GaussianConditional`` after ``update()``.
    """

    def __init__(self, model: EntropyModel) -> None:
        cdf, lengths = model.quantized_cdf.cpu().numpy(), model.cdf_length.cpu().numpy().astype(np.int64)
        if cdf.size == 0:
            raise ValueError("the entropy model has no CDF tables yet: call update() (Codec.freeze() does)")
        self.low = model.offset.cpu().numpy().astype(np.int64)
        self.escape = lengths - 2  # symbol of each table's escape slot = the number of values it covers
        self.models = [constriction.stream.model.Categorical(np.diff(cdf[i, : lengths[i]]) / 2**_CDF_PRECISION,
                                                             perfect=False)
                       for i in range(len(lengths))]
        # An escaped value v is coded as u ≥ 0 — 2·(low − 1 − v) below the table, 2·(v − high − 1) + 1
        # above it — Elias-gamma style: k = ⌊log2(u + 1)⌋, uniform over 0…max_k, then u + 1 − 2**k,
        # uniform over 2**k.
        extent = int(np.abs(np.concatenate([self.low, self.low + self.escape])).max())
        self.max_k = (2 * (ESCAPE_LIMIT + extent) + 2).bit_length() - 1
        if self.max_k > 23:  # constriction's uniform model holds fewer than 2**24 values
            raise ValueError(f"the entropy model's tables reach ±{extent}, too far to escape-code (±2**22 at most)")
        uniform = constriction.stream.model.Uniform
        self.k_model, self.rest_model, self.mark_model = uniform(self.max_k + 1), uniform(), uniform(256)

    def _groups(self, indexes: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """The positions sorted by table, and ``(table, start, end)`` of each table's run in that order."""
        counts = np.bincount(indexes, minlength=len(self.models))
        ends = np.cumsum(counts)
        return np.argsort(indexes, kind="stable"), [(int(t), int(ends[t] - counts[t]), int(ends[t]))
                                                    for t in np.flatnonzero(counts)]

    def encode(self, values: np.ndarray, indexes: np.ndarray) -> bytes:
        """The payload of ``values`` (integers within ±ESCAPE_LIMIT), each coded with table ``indexes[i]``."""
        values, indexes = values.reshape(-1).astype(np.int64), indexes.reshape(-1).astype(np.int64)
        symbols = values - self.low[indexes]
        escape = self.escape[indexes]
        escaped = (symbols < 0) | (symbols >= escape)
        symbols[escaped] = escape[escaped]
        coder = constriction.stream.stack.AnsCoder()
        # A stack: what is decoded last is encoded first, each run reversed (encode_reverse).
        coder.encode_reverse(np.array([END_MARK], dtype=np.int32), self.mark_model)
        if escaped.any():
            v, low, high = values[escaped], self.low[indexes[escaped]], (self.low[indexes] + escape - 1)[escaped]
            u = np.where(v < low, 2 * (low - 1 - v), 2 * (v - high - 1) + 1)
            k = np.frexp(u + 1)[1].astype(np.int64) - 1  # ⌊log2(u + 1)⌋, exactly
            rest = k > 0
            coder.encode_reverse((u + 1 - (1 << k))[rest].astype(np.int32), self.rest_model,
                                 (1 << k[rest]).astype(np.int32))
            coder.encode_reverse(k.astype(np.int32), self.k_model)
        order, groups = self._groups(indexes)
        ordered = symbols[order].astype(np.int32)
        for table, start, end in reversed(groups):
            coder.encode_reverse(ordered[start:end], self.models[table])
        return coder.get_compressed().astype(_WORD).tobytes()

    def decode(self, payload: bytes, indexes: np.ndarray) -> np.ndarray:
        """The integers :meth:`encode` coded into ``payload`` (int64, shaped like ``indexes``).

        Raises :class:`~mtfc.bitstream.CorruptStreamError` unless ``payload`` decodes to exactly these
        values with nothing left over."""
        if len(payload) % _WORD.itemsize:
            raise CorruptStreamError(f"entropy-coded payload of {len(payload)} bytes is not a whole number of "
                                     f"{_WORD.itemsize}-byte words")
        flat = indexes.reshape(-1).astype(np.int64)
        try:
            coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype=_WORD).astype(np.uint32))
        except ValueError as e:  # the last word is zero: no ANS coder writes that
            raise CorruptStreamError(f"invalid entropy-coded payload: {e}") from e
        order, groups = self._groups(flat)
        ordered = np.empty(len(flat), dtype=np.int64)
        for table, start, end in groups:
            ordered[start:end] = coder.decode(self.models[table], end - start)
        symbols = np.empty_like(ordered)
        symbols[order] = ordered
        values = symbols + self.low[flat]
        escaped = symbols == self.escape[flat]
        if escaped.any():
            k = coder.decode(self.k_model, int(escaped.sum())).astype(np.int64)
            u = (1 << k) - 1
            rest = k > 0
            u[rest] += coder.decode(self.rest_model, (1 << k[rest]).astype(np.int32))
            low, high = self.low[flat][escaped], (self.low + self.escape - 1)[flat][escaped]
            values[escaped] = np.where(u % 2 == 0, low - 1 - u // 2, high + 1 + u // 2)
            if np.abs(values[escaped]).max() > ESCAPE_LIMIT:
                raise CorruptStreamError(f"entropy-coded payload escapes to a value beyond ±{ESCAPE_LIMIT}")
        if coder.decode(self.mark_model, 1)[0] != END_MARK or not coder.is_empty():
            raise CorruptStreamError("entropy-coded payload does not end where its last value does "
                                     "(truncated, padded or altered)")
        return values.reshape(indexes.shape)


class LatentCoder:
    """What a CompressAI latent codec does at inference, with :class:`TableCoder` as its coder:
    :meth:`quantize` (the latent the decoder gets), :meth:`compress` and :meth:`decompress`.
    Each prior of :data:`mtfc.priors.PRIORS` names its coder. A variable-rate coder takes each image's
    rate level (``levels``: one per image of the batch; ``level``: the one image's); a fixed-rate coder
    gets ``None``."""

    def quantize(self, y: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        """ŷ of a batch of latents ``y`` (B, C, h, w): bit-identical to ``decompress(compress(y))``."""
        raise NotImplementedError

    def compress(self, y: torch.Tensor, level: int | None = None) -> list[bytes]:
        """The payloads of one image's latent ``y`` (1, C, h, w)."""
        raise NotImplementedError

    def decompress(self, payloads: list[bytes], shape: tuple[int, int], level: int | None = None) -> torch.Tensor:
        """ŷ (1, C, h, w) from the payloads :meth:`compress` wrote for a latent of spatial size ``shape``."""
        raise NotImplementedError


def by_level(y: torch.Tensor, levels: torch.Tensor, fn) -> tuple[torch.Tensor, ...]:
    """``fn(y_l, level)`` → tensors shaped like ``y_l``, run on each level's images of the batch ``y`` and
    put back in batch order."""
    out: list[torch.Tensor] = []
    for level in torch.unique(levels).tolist():
        idx = (levels == level).nonzero().squeeze(1)
        parts = fn(y[idx], level)
        out = out or [torch.empty_like(y) for _ in parts]
        for o, part in zip(out, parts):
            o[idx] = part
    return tuple(out)


def _channel_indexes(shape: tuple[int, ...]) -> np.ndarray:
    """Each element's table: its channel's (an ``EntropyBottleneck`` has one table per channel)."""
    return np.broadcast_to(np.arange(shape[1]).reshape(1, -1, 1, 1), shape)


class _Bottleneck:
    """An ``EntropyBottleneck``: one table per channel, values around the channel's median."""

    def __init__(self, entropy_bottleneck: EntropyModel) -> None:
        self.model = entropy_bottleneck
        self.medians = entropy_bottleneck.quantiles[:, 0, 1].detach().reshape(1, -1, 1, 1)

    @cached_property
    def tables(self) -> TableCoder:
        return TableCoder(self.model)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize(x, self.medians)

    def encode(self, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        values, x_hat = self.quantize(x)
        return self.tables.encode(values.numpy(), _channel_indexes(tuple(x.shape))), x_hat

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        values = self.tables.decode(payload, _channel_indexes(shape))
        return torch.from_numpy(values).to(self.medians.dtype) + self.medians


class FactorizedCoder(LatentCoder):
    """``EntropyBottleneckLatentCodec``: one payload, ŷ."""

    def __init__(self, latent_codec: EntropyBottleneckLatentCodec) -> None:
        self.bottleneck = _Bottleneck(latent_codec.entropy_bottleneck)

    def quantize(self, y: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        return self.bottleneck.quantize(y)[1]

    def compress(self, y: torch.Tensor, level: int | None = None) -> list[bytes]:
        return [self.bottleneck.encode(y)[0]]

    def decompress(self, payloads: list[bytes], shape: tuple[int, int], level: int | None = None) -> torch.Tensor:
        (payload,) = payloads
        return self.bottleneck.decode(payload, (1, len(self.bottleneck.medians[0]), *shape))


class HyperpriorCoder(LatentCoder):
    """``HyperpriorLatentCodec`` (mean-scale): two payloads, ŷ then ẑ; ẑ gives ŷ's Gaussian per element."""

    def __init__(self, latent_codec: HyperpriorLatentCodec) -> None:
        self.hyper, self.y = latent_codec.latent_codec["hyper"], latent_codec.latent_codec["y"]
        self.bottleneck = _Bottleneck(self.hyper.entropy_bottleneck)
        self.conditional = self.y.gaussian_conditional

    @cached_property
    def tables(self) -> TableCoder:
        return TableCoder(self.conditional)

    def _prior(self, z_hat: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """ŷ's table indexes (from the scales) and means, from ẑ."""
        scales, means = self.y.entropy_parameters(self.hyper.h_s(z_hat)).chunk(2, 1)
        return self.conditional.build_indexes(scales).numpy(), means

    def quantize(self, y: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        check_finite(y)  # before ẑ, which it would make non-finite too
        # Image by image: the hyper-synthesis runs on exactly the tensors decompress() gives it.
        out = []
        for i in range(len(y)):
            _, z_hat = self.bottleneck.quantize(self.hyper.h_a(y[i : i + 1]))
            out.append(quantize(y[i : i + 1], self._prior(z_hat)[1])[1])
        return torch.cat(out)

    def compress(self, y: torch.Tensor, level: int | None = None) -> list[bytes]:
        check_finite(y)
        z_payload, z_hat = self.bottleneck.encode(self.hyper.h_a(y))
        indexes, means = self._prior(z_hat)
        values, _ = quantize(y, means)
        return [self.tables.encode(values.numpy(), indexes), z_payload]

    def decompress(self, payloads: list[bytes], shape: tuple[int, int], level: int | None = None) -> torch.Tensor:
        y_payload, z_payload = payloads
        h, w = shape
        z_hat = self.bottleneck.decode(z_payload, (1, len(self.bottleneck.medians[0]), h // 4, w // 4))
        indexes, means = self._prior(z_hat)
        return torch.from_numpy(self.tables.decode(y_payload, indexes)).to(means.dtype) + means


class StepCoder(LatentCoder):
    """:class:`~mtfc.priors.StepLatentCodec`: one payload; level ``l`` codes ``round((y − median) / Δ_l)``
    with the tables CompressAI's ``EntropyBottleneckVbr.update_variable(qs=Δ_l)`` builds (each level's
    built once, on a copy: the codec's own buffers, and with them its fingerprint, stay as frozen)."""

    def __init__(self, latent_codec) -> None:
        self.model = latent_codec.entropy_bottleneck
        self.steps = latent_codec.steps().detach()
        self.medians = self.model.quantiles[:, 0, 1].detach().reshape(1, -1, 1, 1)
        self._tables: dict[int, TableCoder] = {}

    def tables(self, level: int) -> TableCoder:
        if level not in self._tables:
            model = copy.deepcopy(self.model)
            model.update_variable(force=True, qs=self.steps[level])
            self._tables[level] = TableCoder(model)
        return self._tables[level]

    def _values(self, y: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        check_finite(y)
        return torch.round((y - self.medians) / steps).clamp_(-ESCAPE_LIMIT, ESCAPE_LIMIT)

    def quantize(self, y: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        steps = self.steps[levels].reshape(-1, 1, 1, 1)
        return self._values(y, steps) * steps + self.medians

    def compress(self, y: torch.Tensor, level: int | None = None) -> list[bytes]:
        values = self._values(y, self.steps[level])
        return [self.tables(level).encode(values.numpy(), _channel_indexes(tuple(y.shape)))]

    def decompress(self, payloads: list[bytes], shape: tuple[int, int], level: int | None = None) -> torch.Tensor:
        (payload,) = payloads
        indexes = _channel_indexes((1, self.medians.shape[1], *shape))
        values = torch.from_numpy(self.tables(level).decode(payload, indexes)).to(self.medians.dtype)
        return values * self.steps[level] + self.medians


class GainCoder(LatentCoder):
    """:class:`~mtfc.priors.GainLatentCodec`: one payload; level ``l`` codes ``y ⊙ g_l`` with level ``l``'s
    ``EntropyBottleneck`` tables and returns the decoded values ⊙ ``g'_l``."""

    def __init__(self, latent_codec) -> None:
        gain, inverse = latent_codec.gains()
        self.gain, self.inverse = gain.detach(), inverse.detach()
        self.bottlenecks = [_Bottleneck(eb) for eb in latent_codec.entropy_bottleneck]

    def quantize(self, y: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
        check_finite(y)
        return by_level(y, levels,
                        lambda y_l, l: (self.bottlenecks[l].quantize(y_l * self.gain[l])[1] * self.inverse[l],))[0]

    def compress(self, y: torch.Tensor, level: int | None = None) -> list[bytes]:
        check_finite(y)
        return [self.bottlenecks[level].encode(y * self.gain[level])[0]]

    def decompress(self, payloads: list[bytes], shape: tuple[int, int], level: int | None = None) -> torch.Tensor:
        (payload,) = payloads
        bottleneck = self.bottlenecks[level]
        return bottleneck.decode(payload, (1, len(bottleneck.medians[0]), *shape)) * self.inverse[level]
