"""Teacher networks (torchvision ResNets) and the feature taps used for distillation."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models

from mtfc.checkpoint import TEACHER, CheckpointError, load_checkpoint, save_checkpoint

#: Input normalisation of every teacher and codec (torchvision's ImageNet constants). The codec and
#: the reference models call :func:`normalize`; nothing else touches pixel statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

STAGES = ("layer1", "layer2", "layer3", "layer4")
#: torchvision ResNets; ``resnet10`` is torchvision's ResNet with one BasicBlock per stage (no
#: pretrained weights exist for it) — a teacher small enough to train in minutes on a CPU.
_ARCHS = {"resnet10": partial(models.ResNet, models.resnet.BasicBlock, [1, 1, 1, 1]), "resnet18": models.resnet18,
          "resnet34": models.resnet34, "resnet50": models.resnet50, "resnet101": models.resnet101}


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map RGB images in [0, 1] to the teachers' normalised input."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def stage_channels(arch: str) -> dict[str, int]:
    """Output channels of ``layer1..layer4`` of a torchvision ResNet."""
    _check_arch(arch)
    expansion = 4 if arch in ("resnet50", "resnet101") else 1
    return {s: 64 * 2**i * expansion for i, s in enumerate(STAGES)}


def _check_arch(arch: str) -> None:
    if arch not in _ARCHS:
        raise ValueError(f"unknown teacher arch {arch!r}; choose from {sorted(_ARCHS)}")


def build_teacher(arch: str = "resnet18", num_classes: int = 1000, weights: str | Path | None = None) -> nn.Module:
    """A torchvision ResNet, optionally with weights.

    ``weights``: ``None`` (random init), a torchvision weights name such as ``"DEFAULT"`` or
    ``"IMAGENET1K_V2"`` (needs torchvision's download or its local cache; the classifier is re-initialised
    when ``num_classes != 1000``), or the path of a local checkpoint written by :func:`save_teacher`
    or a plain ``state_dict``.
    """
    _check_arch(arch)
    model = _ARCHS[arch](num_classes=num_classes)
    if weights is None:
        return model
    path = Path(weights)
    if is_local_weights(weights):
        ckpt = load_checkpoint(path, TEACHER, plain_state_dict=True)
        if ckpt.get("arch", arch) != arch:
            raise CheckpointError(f"{path} holds a {ckpt['arch']} teacher, the config asks for {arch}: set "
                                  f"teacher.arch to {ckpt['arch']} or pass a {arch} checkpoint")
        model.load_state_dict(ckpt["state_dict"])
        return model
    entry = pretrained_weights(arch, str(weights))
    try:
        state = entry.get_state_dict(progress=True)
    except Exception as e:  # no network: one line saying how to proceed instead of a socket traceback
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot fetch torchvision weights {arch}/{entry.name} ({reason}): "
                              f"{pretrained_fixes(entry)}") from e
    if num_classes != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model.load_state_dict(state, strict=False)
    else:
        model.load_state_dict(state)
    return model


def is_local_weights(weights: str | Path) -> bool:
    """Whether ``teacher.weights`` names a file (``.pt``/``.pth`` or an existing path), not torchvision weights."""
    return Path(weights).suffix in (".pt", ".pth") or Path(weights).exists()


def pretrained_weights(arch: str, name: str) -> models.WeightsEnum:
    """torchvision's weights ``name`` (or ``"DEFAULT"``) of ``arch``; ``ValueError`` if there are none."""
    if arch not in models.list_models():
        raise ValueError(f"torchvision has no pretrained weights for {arch}; set teacher.weights to a local "
                         "checkpoint or to null (the teacher then trains on `data`)")
    enum = models.get_model_weights(arch)
    try:
        return enum.DEFAULT if name == "DEFAULT" else enum[name]
    except KeyError:
        raise ValueError(f"unknown weights {name!r} for {arch}; torchvision has "
                         f"{[w.name for w in enum]} (or DEFAULT)") from None


def pretrained_cache_file(entry: models.WeightsEnum) -> Path:
    """Where torchvision keeps (and looks for) the file of ``entry``: torch's hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(entry.url).path).name


def pretrained_fixes(entry: models.WeightsEnum) -> str:
    """The ways to a teacher when torchvision cannot fetch ``entry`` (offline)."""
    return (f"download {entry.url} to {pretrained_cache_file(entry)}, set teacher.weights to a local checkpoint, "
            "or set teacher.weights to null (the teacher then trains on `data`)")


def save_teacher(model: nn.Module, arch: str, path: str | Path, **meta) -> None:
    """Write a teacher checkpoint that :func:`build_teacher` loads (see :mod:`mtfc.checkpoint`)."""
    save_checkpoint(path, TEACHER, {"arch": arch, "num_classes": model.fc.out_features,
                                    "state_dict": model.state_dict(), **meta})


def stem(teacher: nn.Module) -> nn.Sequential:
    """The teacher's layers before ``layer1`` (conv1, bn1, relu, maxpool): what the codec replaces."""
    return nn.Sequential(teacher.conv1, teacher.bn1, teacher.relu, teacher.maxpool)


def run_stages(teacher: nn.Module, feat: torch.Tensor, start: str = "layer2") -> dict[str, torch.Tensor]:
    """Run the teacher from the output of the stage before ``start`` to its logits; returns every tap.

    Taps: each stage's output (``"layer2"``), each earlier block of a stage (``"layer2.0"``, …) and ``"logits"``.
    """
    out = {}
    for name in STAGES[STAGES.index(start):]:
        blocks = list(getattr(teacher, name))
        for i, block in enumerate(blocks):
            feat = block(feat)
            out[name if i == len(blocks) - 1 else f"{name}.{i}"] = feat
    out["logits"] = teacher.fc(torch.flatten(teacher.avgpool(feat), 1))
    return out


def teacher_taps(teacher: nn.Module, images: torch.Tensor, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    """Features of every tap after ``layer1`` (see :func:`run_stages`), ``layer1`` and the logits for RGB
    images in [0, 1]. With ``requires_grad`` autograd records the pass (for saliency) even though the
    teacher's weights are frozen."""
    x = normalize(images)
    if requires_grad:
        x = x.detach().requires_grad_(True)
    f1 = teacher.layer1(stem(teacher)(x))
    return {"layer1": f1, **run_stages(teacher, f1)}


def candidate_taps(teacher: nn.Module) -> list[str]:
    """The taps a student can be distilled at, shallow to deep: ``layer1`` (the codec's decoder output),
    then every block of ``layer2..layer4`` (the last block of a stage named by the stage)."""
    taps = ["layer1"]
    for name in STAGES[1:]:
        n = len(getattr(teacher, name))
        taps += [f"{name}.{i}" for i in range(n - 1)] + [name]
    return taps
