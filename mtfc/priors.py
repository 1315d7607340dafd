"""The codec's priors: each is one CompressAI latent codec, the bounds-safe coder of its tables
(:mod:`mtfc.entropy_coding`) and what the container and the input sizes must know about it.

``Codec(kind=...)`` picks one from :data:`PRIORS`; nothing else in mtfc branches on the kind.
Two priors are *variable-rate* (``levels`` > 0): one encoder and one entropy model code the latent at
any of K rate levels, chosen per image (:class:`Step`: a learned quantization step per level over one
shared density; :class:`Gain`: learned per-channel gain and inverse-gain vectors per level, each level
with its own factorized density). Their latent codecs take each image's level.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.entropy_models.entropy_models_vbr import EntropyBottleneckVbr
from compressai.latent_codecs import (EntropyBottleneckLatentCodec, GaussianConditionalLatentCodec,
                                      HyperLatentCodec, HyperpriorLatentCodec, LatentCodec)
from compressai.models.utils import conv, deconv
from torch import nn

from mtfc.entropy_coding import FactorizedCoder, GainCoder, HyperpriorCoder, LatentCoder, StepCoder, by_level


class Prior:
    """A prior of the latent: :meth:`build` its CompressAI latent codec, :attr:`coder` codes it."""

    #: payloads per stream
    num_payloads: ClassVar[int]
    #: the latent's height and width must be multiples of this
    latent_divisibility: ClassVar[int]
    #: the bounds-safe coder of the latent codec's frozen tables
    coder: ClassVar[type[LatentCoder]]
    #: whether the latent codec codes at one of several rate levels (its ``forward`` takes ``levels``)
    variable: ClassVar[bool] = False

    @staticmethod
    def build(latent_channels: int, hidden_channels: int, levels: int = 0) -> LatentCodec:
        raise NotImplementedError


class Factorized(Prior):
    """A fully factorized prior (Ballé et al., ICLR 2018): one ``EntropyBottleneck`` over ŷ; one payload."""

    num_payloads, latent_divisibility, coder = 1, 1, FactorizedCoder

    @staticmethod
    def build(latent_channels: int, hidden_channels: int, levels: int = 0) -> LatentCodec:
        return EntropyBottleneckLatentCodec(channels=latent_channels)


class Hyperprior(Prior):
    """A mean-scale hyperprior (Minnen et al., NeurIPS 2018): a Gaussian conditional on ŷ whose means and
    scales come from ẑ, itself coded with an ``EntropyBottleneck`` at 1/4 of ŷ's size; two payloads."""

    num_payloads, latent_divisibility, coder = 2, 4, HyperpriorCoder

    @staticmethod
    def build(latent_channels: int, hidden_channels: int, levels: int = 0) -> LatentCodec:
        C, N = latent_channels, hidden_channels
        h_a = nn.Sequential(conv(C, N, 3, 1), nn.ReLU(inplace=True), conv(N, N, 5, 2),
                            nn.ReLU(inplace=True), conv(N, N, 5, 2))
        h_s = nn.Sequential(deconv(N, N, 5, 2), nn.ReLU(inplace=True), deconv(N, N * 3 // 2, 5, 2),
                            nn.ReLU(inplace=True), conv(N * 3 // 2, 2 * C, 3, 1))
        return HyperpriorLatentCodec(latent_codec={
            "y": GaussianConditionalLatentCodec(quantizer="ste"),
            "hyper": HyperLatentCodec(EntropyBottleneck(N), h_a, h_s, quantizer="ste"),
        })


def initial_steps(levels: int) -> torch.Tensor:
    """The initial quantization step of each level: geometric from 1/16 (level 0, the highest rate) to 4
    (level K − 1); training moves them. (At high rate the step minimising D + β·R grows as √β, and the
    demo's β span 0.03 … 10 is about 18² wide; but training narrows the span — the finest step grows, the
    coarsest shrinks — and from 1/4 the finest level ended at 0.38 bpp where the per-β codec of β = 0.03
    spends 0.55: from 1/16 it ends at 0.70, README, Variable rate.)"""
    return torch.logspace(math.log10(0.0625), math.log10(4.0), max(levels, 2))[:levels] if levels > 1 else torch.ones(1)


class StepBottleneck(EntropyBottleneckVbr):
    """CompressAI's ``EntropyBottleneckVbr`` whose training pass scores each value by the density's mass
    over its quantization step ``qs``. (compressai 1.2.8's own ``forward`` hands ``qs`` to the likelihood
    as its ``stop_gradient`` argument: the density never trains and the rate ignores the step.)"""

    def forward(self, x: torch.Tensor, qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, h, w = x.shape
        values = x.transpose(0, 1).reshape(C, 1, -1)
        medians = self.quantiles[:, :, 1:2]
        outputs = self.quantize_variable(values, "noise" if self.training else "dequantize", medians, qs)
        likelihood, _, _ = self._likelihood_variable(outputs, qs=qs)
        if self.use_likelihood_bound:
            likelihood = self.likelihood_lower_bound(likelihood)
        back = lambda t: t.reshape(C, B, h, w).transpose(0, 1)  # noqa: E731
        return back(outputs), back(likelihood)


class StepLatentCodec(LatentCodec):
    """One shared factorized density (CompressAI's ``EntropyBottleneckVbr``) coded with a learned
    quantization step per level: ŷ = round((y − median) / Δ_l) · Δ_l + median; the probability of a
    value is the density's mass over its step (Kamisli et al., DCC 2024)."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.entropy_bottleneck = StepBottleneck(channels)
        self.log_steps = nn.Parameter(initial_steps(levels).log())

    def steps(self) -> torch.Tensor:
        return self.log_steps.exp()

    def forward(self, y: torch.Tensor, levels: torch.Tensor) -> dict[str, Any]:
        steps = self.steps()
        y_hat, likelihoods = by_level(y, levels, lambda y_l, l: self.entropy_bottleneck(y_l, qs=steps[l]))
        return {"likelihoods": {"y": likelihoods}, "y_hat": y_hat}


class GainLatentCodec(LatentCodec):
    """Per-level gain and inverse-gain vectors around one factorized density per level: ŷ = Q(y ⊙ g_l) ⊙ g'_l
    (Cui et al., "Asymmetric Gained Deep Image Compression With Continuous Rate Adaptation", CVPR 2021;
    CompressAI's ``GainHyperpriorLatentCodec`` applies the same gains around a hyperprior)."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.entropy_bottleneck = nn.ModuleList(EntropyBottleneck(channels) for _ in range(levels))
        steps = initial_steps(levels).log()[:, None].repeat(1, channels)
        self.log_gain, self.log_inverse_gain = nn.Parameter(-steps), nn.Parameter(steps.clone())

    def gains(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_gain.exp()[:, :, None, None], self.log_inverse_gain.exp()[:, :, None, None]

    def forward(self, y: torch.Tensor, levels: torch.Tensor) -> dict[str, Any]:
        gain, inverse = self.gains()

        def level(y_l: torch.Tensor, l: int) -> tuple[torch.Tensor, torch.Tensor]:
            y_hat, likelihoods = self.entropy_bottleneck[l](y_l * gain[l])
            return y_hat * inverse[l], likelihoods

        y_hat, likelihoods = by_level(y, levels, level)
        return {"likelihoods": {"y": likelihoods}, "y_hat": y_hat}


class Step(Prior):
    """Variable rate by quantization step (:class:`StepLatentCodec`): one density, K steps; one payload."""

    num_payloads, latent_divisibility, coder, variable = 1, 1, StepCoder, True

    @staticmethod
    def build(latent_channels: int, hidden_channels: int, levels: int = 0) -> LatentCodec:
        return StepLatentCodec(latent_channels, levels)


class Gain(Prior):
    """Variable rate by gain units (:class:`GainLatentCodec`): K gain pairs and densities; one payload."""

    num_payloads, latent_divisibility, coder, variable = 1, 1, GainCoder, True

    @staticmethod
    def build(latent_channels: int, hidden_channels: int, levels: int = 0) -> LatentCodec:
        return GainLatentCodec(latent_channels, levels)


#: ``Codec(kind=...)`` → its prior
PRIORS: dict[str, type[Prior]] = {"factorized": Factorized, "hyperprior": Hyperprior, "step": Step, "gain": Gain}
