"""The shared codec: device encoder + CompressAI entropy model + distillation decoder.

Matsubara et al., "Supervised Compression for Resource-Constrained Edge Computing Systems"
(WACV 2022): a small encoder ``g_a`` (strided convolutions + GDN) turns the image into a latent at
stride 4, a learned prior entropy-codes it, and a decoder (convolutions + inverse GDN) maps the
quantized latent to the teacher's ``layer1`` features. The encoder is one of :data:`ENCODERS`
(``encoder`` in the codec config; default ``"light"``, see :func:`build_encoder`). After stage-1 training the codec is frozen
(:meth:`Codec.freeze`) and saved as a standalone artifact; heads then train on its hard-quantized
latent, which is bit-for-bit what :meth:`Codec.decode` returns on the server.
"""
from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path
from typing import Any, Sequence

import torch
from compressai.layers import GDN
from compressai.entropy_models import EntropyBottleneck
from compressai.entropy_models.entropy_models_vbr import EntropyBottleneckVbr
from compressai.models import CompressionModel
from compressai.models.utils import conv
from torch import nn

from mtfc import bitstream
from mtfc.bitstream import padded_size
from mtfc.checkpoint import CODEC, CheckpointError, load_checkpoint, save_checkpoint
from mtfc.entropy_coding import LatentCoder
from mtfc.priors import PRIORS
from mtfc.teacher import normalize

KINDS = tuple(PRIORS)
DEFAULT_KIND = "factorized"
DEFAULT_ENCODER = "light"
LEGACY_ENCODER = "es"  # what a config without the ``encoder`` key (every artifact before it existed) means


def _es(N: int, C: int) -> nn.Sequential:
    """``es`` — the Entropic Student encoder (Matsubara et al., WACV 2022; Ballé et al.'s g_a shape).

    conv5×5/2 3→N, GDN(N), conv5×5/2 N→N, GDN(N), conv3×3/1 N→C. mtfc's encoder before the choice
    existed. Its cost is in the second strided conv (25·N² MACs per stride-4 position) and in the
    first stage, which runs at stride 2 on four times as many positions.
    (sc2bench's ResNet variant, ``FPBasedResNetBottleneck``, is narrower after the first layer —
    N→N/2 — uses the simplified GDN1, has no biases and ends with a 2×2 conv without padding, so its
    latent is 55×55 at 224×224; mtfc's is H/4×W/4.)
    """
    return nn.Sequential(conv(3, N, 5, 2), GDN(N), conv(N, N, 5, 2), GDN(N), conv(N, C, 3, 1))


def _light(N: int, C: int) -> nn.Sequential:
    """``light`` (the default) — ``es`` with the stride-2 stage at half width.

    conv5×5/2 3→N/2, GDN(N/2), conv5×5/2 N/2→N, GDN(N), conv3×3/1 N→C. Same depth, kernels,
    receptive field (21 px), stride-4 width N and latent shape as ``es``; only the first stage —
    the one that runs on 4× the positions, and whose GDN (N² MACs per position) outweighs its conv
    (75·N) once N > 75 — is halved, which also halves the second conv's input. About half of ``es``'s MACs and time
    (the device side of SC2's trade-off: Matsubara et al., TMLR 2023).
    """
    M = max(1, N // 2)
    return nn.Sequential(conv(3, M, 5, 2), GDN(M), conv(M, N, 5, 2), GDN(N), conv(N, C, 3, 1))


def _light3(N: int, C: int) -> nn.Sequential:
    """``light3`` — ``light`` with a 3×3 second strided conv (receptive field 17 px).

    conv5×5/2 3→N/2, GDN(N/2), conv3×3/2 N/2→N, GDN(N), conv3×3/1 N→C.
    """
    M = max(1, N // 2)
    return nn.Sequential(conv(3, M, 5, 2), GDN(M), conv(M, N, 3, 2), GDN(N), conv(N, C, 3, 1))


def _lightdw(N: int, C: int) -> nn.Sequential:
    """``lightdw`` — ``light`` with a depthwise-separable second strided conv (MobileNet, Howard et al. 2017).

    conv5×5/2 3→N/2, GDN(N/2), depthwise conv5×5/2 on N/2, conv1×1 N/2→N, GDN(N), conv3×3/1 N→C:
    the lightest variant (receptive field 21 px), at the cost of the cross-channel 5×5 mixing.
    """
    M = max(1, N // 2)
    return nn.Sequential(conv(3, M, 5, 2), GDN(M), nn.Conv2d(M, M, 5, 2, 2, groups=M), nn.Conv2d(M, N, 1),
                         GDN(N), conv(N, C, 3, 1))


ENCODERS = {"light": _light, "es": _es, "light3": _light3, "lightdw": _lightdw}


def build_encoder(name: str, hidden_channels: int, latent_channels: int) -> nn.Sequential:
    """The device encoder ``g_a`` named ``name`` (one of :data:`ENCODERS`): image → latent at stride 4.

    Every variant is strided convs + GDN from CompressAI, maps (3, H, W) to (latent_channels, H/4, W/4)
    and ends with a conv (N→C, 3×3); the decoder (:class:`LatentDecoder`) is the same for all.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown codec encoder {name!r}; choose from {tuple(ENCODERS)}")
    return ENCODERS[name](hidden_channels, latent_channels)


class LatentDecoder(nn.Sequential):
    """Latent (stride 4) → features with ``out_channels`` at stride 4 (convs + inverse GDN).

    The codec's distillation decoder, and the decoder every head owns (initialised from the codec's).
    """

    def __init__(self, latent_channels: int, out_channels: int, hidden_channels: int = 96) -> None:
        super().__init__(
            conv(latent_channels, hidden_channels * 2, kernel_size=3, stride=1),
            GDN(hidden_channels * 2, inverse=True),
            conv(hidden_channels * 2, hidden_channels, kernel_size=3, stride=1),
            GDN(hidden_channels, inverse=True),
            conv(hidden_channels, out_channels, kernel_size=3, stride=1),
        )
        self.latent_channels, self.out_channels, self.hidden_channels = latent_channels, out_channels, hidden_channels


class Codec(CompressionModel):
    """Encoder + entropy model (+ the distillation decoder used in stage 1).

    Args:
        kind: the prior, a key of :data:`mtfc.priors.PRIORS`: ``"factorized"`` (EntropyBottleneck) or
            ``"hyperprior"`` (mean-scale Gaussian conditional with a hyper encoder/decoder), each a
            ``compressai.latent_codecs`` latent codec with its bounds-safe coder.
        latent_channels: channels of the transmitted latent.
        hidden_channels: width of the encoder (at stride 4) and decoder.
        out_channels: channels of the teacher's ``layer1`` features the decoder imitates.
        encoder: the device encoder, one of :data:`ENCODERS` (see :func:`build_encoder`).
        levels: the number of rate levels of a variable-rate prior (``"step"``, ``"gain"``; level 0 is the
            highest rate); 0 for the fixed-rate ones.

    ``config`` records ``encoder`` only when it is not ``"es"``: a config without the key is the
    legacy ``"es"`` encoder, so every artifact written before the key existed keeps its config and
    with it its fingerprint. Rebuild a codec from a config with :meth:`from_config` (which applies
    that rule); ``Codec(**config)`` would give a legacy config the new default encoder.
    """

    latent_stride = 4

    def __init__(self, kind: str = DEFAULT_KIND, latent_channels: int = 24, hidden_channels: int = 96,
                 out_channels: int = 64, encoder: str = DEFAULT_ENCODER, levels: int = 0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown codec kind {kind!r}; choose from {KINDS}")
        self.prior = PRIORS[kind]
        if self.prior.variable != (levels > 0):
            raise ValueError(f"codec kind {kind!r} " + ("needs levels > 0 (its number of rate levels)" if self.prior.variable
                                                       else f"has one rate; levels={levels} is for 'step' or 'gain'"))
        self.config = dict(kind=kind, latent_channels=latent_channels, hidden_channels=hidden_channels,
                           out_channels=out_channels)
        if encoder != LEGACY_ENCODER:
            self.config["encoder"] = encoder
        if levels:
            self.config["levels"] = levels
        N, C = hidden_channels, latent_channels
        self.g_a = build_encoder(encoder, N, C)
        self.latent_codec = self.prior.build(C, N, levels)
        self.decoder = LatentDecoder(C, out_channels, N)
        self.meta: dict[str, Any] = {}
        self._fingerprint: str | None = None
        self._coder: tuple[str, LatentCoder] | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Codec:
        """The (untrained) codec a ``config`` describes; no ``encoder`` key means the legacy ``"es"``."""
        return cls(**{"encoder": LEGACY_ENCODER, **config})

    # -- properties ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def encoder(self) -> str:
        """The device encoder's name (:data:`ENCODERS`)."""
        return self.config.get("encoder", LEGACY_ENCODER)

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    @property
    def levels(self) -> int:
        """Rate levels of a variable-rate codec (0: one rate)."""
        return self.config.get("levels", 0)

    def _levels(self, level: int | Sequence[int] | torch.Tensor | None, batch: int) -> list[int] | None:
        """Each image's level (``None`` for a fixed-rate codec); ``level=None`` on a variable-rate codec
        means its middle level."""
        if not self.levels:
            if level is not None:
                raise ValueError("this codec has one rate; level= is for variable-rate codecs (kind 'step' or 'gain')")
            return None
        if level is None or isinstance(level, numbers.Integral):  # the device's case: checked without tensors
            levels = [self.levels // 2 if level is None else int(level)] * batch
        else:
            levels = torch.as_tensor(level, dtype=torch.long).reshape(-1).tolist()
            levels = levels * batch if len(levels) == 1 else levels
        if len(levels) != batch or not all(0 <= v < self.levels for v in levels):
            raise ValueError(f"level must be one of 0..{self.levels - 1} (0: the highest rate), for the batch or "
                             f"per image; got {level!r} for {batch} images")
        return levels

    @property
    def size_divisibility(self) -> int:
        """Input height and width must be multiples of this (4, or 16 with the hyper branch)."""
        return self.size_divisibility_of(self.config)

    @classmethod
    def size_divisibility_of(cls, config: dict[str, Any]) -> int:
        """:attr:`size_divisibility` of the codec a ``config`` describes, without building it (what the
        data layer pads evaluation images to, :data:`mtfc.data.transforms.RESIZE`)."""
        kind = config.get("kind", DEFAULT_KIND)
        if kind not in KINDS:
            raise ValueError(f"unknown codec kind {kind!r}; choose from {KINDS}")
        return cls.latent_stride * PRIORS[kind].latent_divisibility

    @property
    def frozen(self) -> bool:
        return self._fingerprint is not None

    @property
    def fingerprint(self) -> str:
        """Hex SHA-256 (first 16 digits) of the config and the encoder + entropy-model state."""
        if self._fingerprint is None:
            raise RuntimeError("the codec is not frozen yet: call codec.freeze() after training")
        return self._fingerprint

    # -- training (stage 1) ----------------------------------------------------------------------
    def forward(self, images: torch.Tensor, levels: torch.Tensor | None = None) -> dict[str, Any]:
        """Training pass: noisy latent, its likelihoods, and the decoder's features; ``levels``: each
        image's rate level (variable-rate codecs only)."""
        y = self.g_a(normalize(images))
        out = self.latent_codec(y) if levels is None else self.latent_codec(y, levels)
        out["features"] = self.decoder(out["y_hat"])
        return out

    def aux_loss(self) -> torch.Tensor:
        """The entropy models' quantile loss (CompressAI's, counting ``EntropyBottleneckVbr`` too)."""
        return sum(m.loss() for m in self.modules() if isinstance(m, (EntropyBottleneck, EntropyBottleneckVbr)))

    def freeze(self) -> Codec:
        """Build the CDF tables, freeze every parameter and fix the fingerprint."""
        self.update(force=True)
        self.requires_grad_(False)
        self.eval()
        self._fingerprint = self._compute_fingerprint()
        return self

    def train(self, mode: bool = True) -> Codec:
        # A frozen codec stays in eval mode: the server's latent never sees training-time noise.
        return super().train(mode and not self.frozen)

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        state = self.state_dict()
        for key in sorted(k for k in state if k.startswith(("g_a.", "latent_codec."))):
            h.update(key.encode())
            h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- the deployed path -----------------------------------------------------------------------
    @property
    def coder(self) -> LatentCoder:
        """The bounds-safe entropy coder of this codec's CompressAI prior (:mod:`mtfc.entropy_coding`);
        built once per frozen state."""
        if self._coder is None or self._coder[0] != self._fingerprint:
            coder = self.prior.coder(self.latent_codec)
            if not self.frozen:
                return coder
            self._coder = (self._fingerprint, coder)
        return self._coder[1]

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected RGB images as a (B, 3, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
        H, W = images.shape[-2:]
        d = self.size_divisibility
        if H % d or W % d:
            raise ValueError(f"image size {H}x{W} is not a multiple of {d}; resize or pad the input "
                             f"(e.g. to {-(-H // d) * d}x{-(-W // d) * d})")
        if H * W > bitstream.MAX_PIXELS:
            raise ValueError(f"image size {H}x{W} is over the {bitstream.MAX_PIXELS} pixels a stream holds; "
                             "encode it in tiles")
        nan, inf = int(images.isnan().sum()), int(images.isinf().sum())
        if nan or inf:
            raise ValueError(f"images have {nan} NaN and {inf} infinite pixel values; replace them "
                             "(e.g. torch.nan_to_num) before encoding")

    @torch.no_grad()
    def quantize(self, images: torch.Tensor, level: int | Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """The hard-quantized latent ŷ, bit-identical to ``decode(encode(images, level=level))``;
        ``level``: a variable-rate codec's level for the batch or per image."""
        self._check_images(images)
        levels = self._levels(level, len(images))
        return self.coder.quantize(self.g_a(normalize(images)), None if levels is None else torch.tensor(levels))

    @torch.no_grad()
    def compress_latent(self, y: torch.Tensor, level: int | None = None) -> list[bytes]:
        """The entropy-coded payloads of one image's latent ``y`` (1, C, h, w), as :meth:`encode` packs them.

        Raises ``ValueError`` if ``y`` is not finite."""
        return self.coder.compress(y, level)

    @torch.no_grad()
    def pack_latent(self, y: torch.Tensor, image_size: tuple[int, int],
                    original_sizes: Sequence[tuple[int, int]] | None = None,
                    level: int | Sequence[int] | torch.Tensor | None = None,
                    content_sizes: Sequence[tuple[int, int]] | None = None) -> list[bytes]:
        """One self-describing bitstream (see :mod:`mtfc.bitstream`) per latent of the batch ``y``
        (B, C, h, w), computed from images of ``image_size`` (H, W), at rate ``level`` (variable-rate
        codecs: for the batch or per image; default the middle level): what :meth:`encode` returns, and
        what the ONNX device encoder (:class:`mtfc.deploy.Encoder`) sends. Each stream carries its
        image's content size (``content_sizes``, default ``image_size``: the picture at the top-left,
        which ``image_size`` pads only to :attr:`size_divisibility`) and ``original_sizes`` (the size
        before the device resized it; default: the content size)."""
        for name, sizes in (("original", original_sizes), ("content", content_sizes)):
            if sizes is not None and len(sizes) != len(y):
                raise ValueError(f"{len(sizes)} {name} sizes for {len(y)} images")
        contents = ([tuple(int(v) for v in c) for c in content_sizes] if content_sizes is not None
                    else [tuple(image_size)] * len(y))
        d = self.size_divisibility
        for content in contents:
            if padded_size(content, d) != tuple(image_size):
                raise ValueError(f"content size {content[0]}x{content[1]} is coded at "
                                 f"{'x'.join(map(str, padded_size(content, d)))} (padded to multiples of {d}), "
                                 f"not at the input's {image_size[0]}x{image_size[1]}")
        levels = self._levels(level, len(y))
        fp = bytes.fromhex(self.fingerprint)[: bitstream.FINGERPRINT_BYTES]
        streams = []
        for i in range(len(y)):
            lv = None if levels is None else levels[i]
            header = bitstream.Header(fp, contents[i], original_sizes and tuple(original_sizes[i]), lv)
            streams.append(bitstream.pack(header, self.compress_latent(y[i : i + 1], lv)))
        return streams

    @torch.no_grad()
    def encode(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]] | None = None,
               level: int | Sequence[int] | torch.Tensor | None = None,
               content_sizes: Sequence[tuple[int, int]] | None = None) -> list[bytes]:
        """One self-describing bitstream per image (see :mod:`mtfc.bitstream`); ``original_sizes``: each
        image's (H, W) before it was resized, sent for the heads (default: unresized); ``level``: a
        variable-rate codec's rate level (0 … ``levels`` − 1, 0 the highest rate), for the batch or per
        image (default: the middle level); ``content_sizes``: each image's (H, W) before it was padded
        bottom/right to the input's size, which must be the content size rounded up to
        :attr:`size_divisibility` (default: the input's size, nothing padded)."""
        self._check_images(images)
        return self.pack_latent(self.g_a(normalize(images)), tuple(images.shape[-2:]), original_sizes, level,
                                content_sizes)

    @torch.no_grad()
    def decode(self, streams: list[bytes]) -> torch.Tensor:
        """Validate and decode streams of equal size into the batched latent ŷ (B, C, h, w)."""
        return self.decode_with_headers(streams)[0]

    @torch.no_grad()
    def decode_with_headers(self, streams: list[bytes]) -> tuple[torch.Tensor, list[bitstream.Header]]:
        """:meth:`decode`, and each stream's :class:`~mtfc.bitstream.Header` (content and original image size).

        Any byte string either raises a :class:`~mtfc.bitstream.BitstreamError` or decodes to a latent
        within the prior's bounds (:mod:`mtfc.entropy_coding`); decoding keeps no state between streams."""
        if isinstance(streams, (bytes, bytearray)):
            streams = [streams]
        if not streams:
            raise ValueError("decode() needs at least one stream")
        fp = bytes.fromhex(self.fingerprint)
        parsed = [bitstream.unpack(s, fp) for s in streams]
        return self.decode_unpacked(parsed), [header for header, _ in parsed]

    def coded_size(self, header: bitstream.Header) -> tuple[int, int]:
        """The (H, W) this codec coded a stream's image at: its content size padded to :attr:`size_divisibility`."""
        return padded_size(header.image_size, self.size_divisibility)

    @torch.no_grad()
    def decode_unpacked(self, parsed: Sequence[tuple[bitstream.Header, list[bytes]]]) -> torch.Tensor:
        """ŷ (B, C, h, w) of streams :func:`mtfc.bitstream.unpack` already checked against this codec's
        fingerprint (the server parses each stream once, before queueing it); all must be coded at one size."""
        latents = []
        for header, payloads in parsed:
            H, W = self.coded_size(header)
            n_payloads = self.prior.num_payloads
            if len(payloads) != n_payloads:
                raise bitstream.CorruptStreamError(f"header does not match this codec: {len(payloads)} payloads "
                                                   f"(this codec sends {n_payloads})")
            fits = header.level is None if not self.levels else header.level is not None and header.level < self.levels
            if not fits:
                raise bitstream.CorruptStreamError(
                    f"header does not match this codec: rate level {header.level} (this codec "
                    + (f"codes levels 0..{self.levels - 1})" if self.levels else "has one rate and sends no level)"))
            if (H, W) != self.coded_size(parsed[0][0]):
                raise ValueError("streams coded at different image sizes cannot be decoded as one batch; decode them "
                                 "separately")
            latents.append(self.coder.decompress(payloads, (H // self.latent_stride, W // self.latent_stride),
                                                 header.level))
        return torch.cat(latents)


def save_codec(codec: Codec, path: str | Path) -> Path:
    """Write a frozen codec as a standalone artifact (see :mod:`mtfc.checkpoint`)."""
    return save_checkpoint(path, CODEC, {"config": codec.config, "fingerprint": codec.fingerprint, "meta": codec.meta,
                                         "state_dict": codec.state_dict()})


def load_codec(path: str | Path, map_location: str | torch.device = "cpu") -> Codec:
    """Load a frozen codec artifact written by :func:`save_codec`; verifies its fingerprint.

    Raises :class:`~mtfc.checkpoint.CheckpointError` naming the file and the fix."""
    art = load_checkpoint(path, CODEC, map_location=map_location)
    codec = Codec.from_config(art["config"])
    codec.load_state_dict(art["state_dict"])
    codec.meta = dict(art.get("meta", {}))
    codec.requires_grad_(False)
    codec.eval()
    codec._fingerprint = codec._compute_fingerprint()
    if codec._fingerprint != art["fingerprint"]:
        raise CheckpointError(f"{path} is corrupt: its weights do not match its fingerprint {art['fingerprint']}; "
                              "re-create it with `mtfc train-bottleneck CONFIG`")
    return codec
