"""Learned image codecs as baselines: CompressAI's zoo architectures, trained here for MSE.

The field's "input compression" baselines for split computing (sc2bench) run CompressAI's learned
image codecs and feed the decoded images to the task models. Their pretrained weights cannot be
downloaded here, so each architecture of :data:`ARCHS` is trained on the same training split as
mtfc's bottleneck with CompressAI's rate–distortion loss (``examples/train.py``)::

    L = λ · 255² · MSE(x, x̂) + bpp

through mtfc's engine (:func:`mtfc.engine.fit`: resumable, curves in ``log.jsonl``). The field's
trick for a sweep on a budget: the highest λ trains from scratch for ``steps``, each lower λ is
fine-tuned from its weights for ``finetune_steps`` (:func:`train_learned_codec` with ``init``); the
entropy bottleneck's density learns at its own rate (``entropy_lr``), as in mtfc's bottleneck. After
training the entropy models' quantiles are settled (:func:`mtfc.train.settle_quantiles`,
:data:`SETTLE_STEPS`) and the CDF tables built (``update()``).

Images are padded (replicating the border) to a multiple of the architecture's total stride
(:data:`ALIGN`) before the encoder and cropped after the decoder; the decoded image is rounded to 8
bits, as every image codec's output is.

The container (:func:`pack`) is the smallest that decodes: ``varint H, varint W`` (the original
size; LEB128, one byte below 128), then the model's entropy-coded strings, each but the last
preceded by its length as a varint (the last one runs to the end). The latent shapes are not sent:
they follow from ``H, W`` and the architecture's strides. Its rate counts exactly ``len(container)``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtfc.bitstream import _read_varint, _varint
from mtfc.checkpoint import LEARNED_CODEC, load_checkpoint, save_checkpoint
from mtfc.engine import clear_state, fit, seed_everything
from mtfc.evaluation.baselines import RoundTrip
from mtfc.optim import OptimSpec, build_optimizer

__all__ = ["ARCHS", "ALIGN", "SETTLE_STEPS", "build_model", "pack", "unpack", "compress", "decompress", "LearnedCodecTask",
           "train_learned_codec", "load_learned_codec", "roundtrip"]

#: zoo name (CompressAI's ``compressai.zoo`` naming) → class in ``compressai.models``
ARCHS: dict[str, str] = {"bmshj2018-factorized": "FactorizedPrior",
                         "bmshj2018-hyperprior": "ScaleHyperprior",
                         "mbt2018-mean": "MeanScaleHyperprior"}
#: the total stride down to each architecture's deepest latent (y: 16; the hyperprior's z: 64)
ALIGN: dict[str, int] = {"bmshj2018-factorized": 16, "bmshj2018-hyperprior": 64, "mbt2018-mean": 64}

#: Adam steps that settle the quantiles after training (mtfc's 2,000 cost up to a minute a model on 2 cores)
SETTLE_STEPS = 500

def build_model(arch: str, N: int, M: int) -> nn.Module:
    """CompressAI's ``arch`` (a key of :data:`ARCHS`) with ``N`` hidden and ``M`` latent channels."""
    import compressai.models

    if arch not in ARCHS:
        raise ValueError(f"unknown learned codec {arch!r}; known: {sorted(ARCHS)}")
    return getattr(compressai.models, ARCHS[arch])(N=N, M=M)


def _pad(images: torch.Tensor, align: int) -> torch.Tensor:
    H, W = images.shape[-2:]
    return F.pad(images, (0, -W % align, 0, -H % align), mode="replicate")


def pack(size: tuple[int, int], strings: Sequence[bytes]) -> bytes:
    """One image's container: ``varint H, varint W``, every string but the last with a varint length
    before it, then the last string (to the end)."""
    out = bytearray(_varint(size[0]) + _varint(size[1]))
    for s in strings[:-1]:
        out += _varint(len(s)) + s
    return bytes(out + strings[-1])


def unpack(data: bytes, num_strings: int) -> tuple[tuple[int, int], list[bytes]]:
    """The original ``(H, W)`` and the ``num_strings`` strings of a :func:`pack` container."""
    H, pos = _read_varint(data, 0)
    W, pos = _read_varint(data, pos)
    strings = []
    for _ in range(num_strings - 1):
        n, pos = _read_varint(data, pos)
        if pos + n > len(data):
            raise ValueError(f"container of {len(data)} bytes ends inside a string of {n} bytes")
        strings.append(data[pos:pos + n])
        pos += n
    return (H, W), strings + [data[pos:]]


@torch.no_grad()
def compress(model: nn.Module, arch: str, images: torch.Tensor) -> list[bytes]:
    """Float (B, 3, H, W) images in [0, 1] → one :func:`pack` container each (``model.update()`` done)."""
    out = model.compress(_pad(images, ALIGN[arch]))
    size = tuple(images.shape[-2:])
    return [pack(size, [s[i] for s in out["strings"]]) for i in range(len(images))]


@torch.no_grad()
def decompress(model: nn.Module, arch: str, containers: Sequence[bytes]) -> torch.Tensor:
    """Containers of images of one size → the decoded (B, 3, H, W) images, rounded to 8 bits, in [0, 1]."""
    num_strings = 1 if ARCHS[arch] == "FactorizedPrior" else 2
    unpacked = [unpack(c, num_strings) for c in containers]
    sizes = {size for size, _ in unpacked}
    if len(sizes) != 1:
        raise ValueError(f"a batch decodes images of one size; got {sorted(sizes)}")
    (H, W), align = sizes.pop(), ALIGN[arch]
    shape = (math.ceil(H / align), math.ceil(W / align))  # the deepest latent's: y (factorized) or z
    strings = [[strings[k] for _, strings in unpacked] for k in range(num_strings)]
    x_hat = model.decompress(strings, shape)["x_hat"][..., :H, :W]
    return x_hat.clamp(0, 1).mul(255).round().div(255)


class LearnedCodecTask(nn.Module):
    """CompressAI's training objective for :func:`mtfc.engine.fit`: ``λ·255²·MSE + bpp`` (bpp over the
    original pixels) and the entropy bottleneck's aux loss on its quantiles (Adam at ``aux_lr``).

    The entropy bottleneck's density starts broad (CompressAI's ``init_scale`` 10): on a budget of a few
    hundred steps it learns at ``entropy_lr`` (default: ``optim.lr``), as mtfc's own bottleneck does."""

    def __init__(self, model: nn.Module, arch: str, lmbda: float, optim: OptimSpec | None = None,
                 aux_lr: float = 1e-3, entropy_lr: float | None = None) -> None:
        super().__init__()
        self.model, self.arch, self.lmbda, self.optim, self.aux_lr = model, arch, lmbda, optim or OptimSpec(), aux_lr
        self.entropy_lr = entropy_lr

    def rd(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(MSE, estimated bpp) of one batch."""
        B, _, H, W = images.shape
        out = self.model(_pad(images, ALIGN[self.arch]))
        bpp = sum(-torch.log2(p).sum() for p in out["likelihoods"].values()) / (B * H * W)
        return F.mse_loss(out["x_hat"][..., :H, :W], images), bpp

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        mse, bpp = self.rd(batch[0])
        return {"loss": self.lmbda * 255 ** 2 * mse + bpp, "aux_loss": self.model.aux_loss(), "bpp": bpp,
                "psnr": -10 * torch.log10(mse.detach())}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        groups: dict[str, list[nn.Parameter]] = {"main": [], "density": [], "aux": []}
        for name, p in self.model.named_parameters():
            groups["aux" if name.endswith(".quantiles") else "density" if name.startswith("entropy_bottleneck.")
                   else "main"].append(p)
        main = build_optimizer(groups["main"], self.optim)
        main.add_param_group({"params": groups["density"], "lr": self.entropy_lr or self.optim.lr, "weight_decay": 0.0})
        return {"loss": main, "aux_loss": torch.optim.Adam(groups["aux"], self.aux_lr)}

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> dict[str, float]:
        """PSNR (of the mean MSE, dB) and estimated bpp of the model in eval mode (rounded latent)."""
        mse = bpp = n = 0.0
        for images, _ in loader:
            batch_mse, batch_bpp = self.rd(images)
            mse, bpp, n = mse + float(batch_mse) * len(images), bpp + float(batch_bpp) * len(images), n + len(images)
        return {"psnr": -10 * math.log10(mse / n), "bpp_est": bpp / n}


def train_learned_codec(arch: str, train_set: Dataset, val_set: Dataset | None, *, lmbda: float, N: int, M: int,
                        steps: int, batch_size: int, out_dir: str | Path, optim: OptimSpec | None = None,
                        aux_lr: float = 1e-3, entropy_lr: float | None = None, init: str | Path | None = None,
                        seed: int = 0,
                        key: dict[str, Any] | None = None, device: str | torch.device | None = None,
                        **fit_kwargs: Any) -> Path:
    """Train ``arch`` at ``lmbda`` for ``steps`` (from the weights of the artifact ``init`` if given, else
    from scratch after seeding with ``seed``); settle its quantiles, build its CDF tables and save
    ``out_dir/codec.pt`` (a ``mtfc-learned-codec`` checkpoint recording ``key``); returns its path."""
    from mtfc.data import collate
    from mtfc.train import settle_quantiles

    out = Path(out_dir)
    seed_everything(seed)
    model = build_model(arch, N, M)
    if init is not None:
        model.load_state_dict(load_checkpoint(init, LEARNED_CODEC)["state_dict"])
    task = LearnedCodecTask(model, arch, lmbda, optim, aux_lr, entropy_lr)
    epochs = math.ceil(steps / math.ceil(len(train_set) / batch_size))
    history = fit(task, train_set, out_dir=out, epochs=epochs, max_steps=steps, batch_size=batch_size, val_set=val_set,
                  val_every=epochs, collate_fn=collate, seed=seed, amp=False, device=device,
                  tag=key["sha256"] if key else None, **fit_kwargs)
    model.cpu()
    aux = settle_quantiles(model, steps=SETTLE_STEPS)
    model.update(force=True)
    path = save_checkpoint(out / "codec.pt", LEARNED_CODEC, {
        "arch": arch, "N": N, "M": M, "lambda": lmbda, "state_dict": model.state_dict(), "key": key,
        "history": history, "aux_loss": aux, "init": str(init) if init is not None else None})
    clear_state(out)
    return path


def load_learned_codec(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained learned codec (eval mode, CDF tables loaded) and its checkpoint's other entries."""
    ckpt = load_checkpoint(path, LEARNED_CODEC)
    model = build_model(ckpt["arch"], ckpt["N"], ckpt["M"])
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.eval(), ckpt


def roundtrip(model: nn.Module, arch: str, images: torch.Tensor) -> RoundTrip:
    """``images`` compressed with the model's entropy coders and decompressed, as a Pillow baseline's
    :class:`~mtfc.evaluation.baselines.RoundTrip` (decoded images on ``images``' device, the containers'
    lengths, the coding times). Coding runs on the CPU (CompressAI's range coder does)."""
    t0 = time.perf_counter()
    containers = compress(model, arch, images.cpu())
    t1 = time.perf_counter()
    decoded = decompress(model, arch, containers).to(images.device)
    return RoundTrip(decoded, [len(c) for c in containers], t1 - t0, time.perf_counter() - t1)
