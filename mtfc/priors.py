"""The codec's priors: each is one CompressAI latent codec, the bounds-safe coder of its tables
(:mod:`mtfc.entropy_coding`) and what the container and the input sizes must know about it.

``Codec(kind=...)`` picks one from :data:`PRIORS`; nothing else in mtfc branches on the kind.
"""
from __future__ import annotations

from typing import ClassVar

from compressai.entropy_models import EntropyBottleneck
from compressai.latent_codecs import (EntropyBottleneckLatentCodec, GaussianConditionalLatentCodec,
                                      HyperLatentCodec, HyperpriorLatentCodec, LatentCodec)
from compressai.models.utils import conv, deconv
from torch import nn

from mtfc.entropy_coding import FactorizedCoder, HyperpriorCoder, LatentCoder


class Prior:
    """A prior of the latent: :meth:`build` its CompressAI latent codec, :attr:`coder` codes it."""

    #: payloads per stream
    num_payloads: ClassVar[int]
    #: the latent's height and width must be multiples of this
    latent_divisibility: ClassVar[int]
    #: the bounds-safe coder of the latent codec's frozen tables
    coder: ClassVar[type[LatentCoder]]

    @staticmethod
    def build(latent_channels: int, hidden_channels: int) -> LatentCodec:
        raise NotImplementedError


class Factorized(Prior):
    """A fully factorized prior (Ballé et al., ICLR 2018): one ``EntropyBottleneck`` over ŷ; one payload."""

    num_payloads, latent_divisibility, coder = 1, 1, FactorizedCoder

    @staticmethod
    def build(latent_channels: int, hidden_channels: int) -> LatentCodec:
        return EntropyBottleneckLatentCodec(channels=latent_channels)


class Hyperprior(Prior):
    """A mean-scale hyperprior (Minnen et al., NeurIPS 2018): a Gaussian conditional on ŷ whose means and
    scales come from ẑ, itself coded with an ``EntropyBottleneck`` at 1/4 of ŷ's size; two payloads."""

    num_payloads, latent_divisibility, coder = 2, 4, HyperpriorCoder

    @staticmethod
    def build(latent_channels: int, hidden_channels: int) -> LatentCodec:
        C, N = latent_channels, hidden_channels
        h_a = nn.Sequential(conv(C, N, 3, 1), nn.ReLU(inplace=True), conv(N, N, 5, 2),
                            nn.ReLU(inplace=True), conv(N, N, 5, 2))
        h_s = nn.Sequential(deconv(N, N, 5, 2), nn.ReLU(inplace=True), deconv(N, N * 3 // 2, 5, 2),
                            nn.ReLU(inplace=True), conv(N * 3 // 2, 2 * C, 3, 1))
        return HyperpriorLatentCodec(latent_codec={
            "y": GaussianConditionalLatentCodec(quantizer="ste"),
            "hyper": HyperLatentCodec(EntropyBottleneck(N), h_a, h_s, quantizer="ste"),
        })


#: ``Codec(kind=...)`` → its prior
PRIORS: dict[str, type[Prior]] = {"factorized": Factorized, "hyperprior": Hyperprior}
