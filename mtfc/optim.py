"""Optimizer, learning-rate schedule, weight decay and gradient clipping of one training stage.

Every stage's config has an ``optim`` section that :meth:`OptimSpec.from_dict` checks (unknown keys
are errors with a did-you-mean). The task builds its optimizers with :func:`build_optimizer`; the
engine applies the schedule (:func:`lr_factor`, per step, warm-up then cosine or one-cycle) and the
clipping, and records the spec in ``log.jsonl``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle", "multistep")
#: Field metadata of a setting added after artifacts existed: at its default it is left out of artifact
#: keys and of the engine's resume record (:func:`mtfc.config.key_form`), so upgrading mtfc neither makes
#: finished artifacts stale nor stops an interrupted run from resuming.
OMIT_AT_DEFAULT = {"omit_at_default": True}


@dataclass(frozen=True)
class OptimSpec:
    """``name``: adam | adamw | sgd (Nesterov momentum 0.9). ``lr``: peak learning rate.
    ``schedule``: constant | cosine (linear warm-up over ``warmup`` of the steps, then cosine to
    ``final_lr`` × lr) | onecycle (warm-up from lr/25 along a cosine, then cosine down, as
    ``torch.optim.lr_scheduler.OneCycleLR``) | multistep (warm-up, then the rate times ``gamma`` at each
    of ``milestones``, fractions of the steps, as ``torch.optim.lr_scheduler.MultiStepLR``).
    ``clip_grad``: max global L2 norm of the gradients (``None``: no clipping). ``nesterov``: SGD's
    momentum is Nesterov's (``false``: PyTorch's plain momentum)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup: float = 0.05
    final_lr: float = 0.01
    clip_grad: float | None = None
    milestones: tuple[float, ...] = field(default=(), metadata=OMIT_AT_DEFAULT)
    gamma: float = field(default=0.1, metadata=OMIT_AT_DEFAULT)
    nesterov: bool = field(default=True, metadata=OMIT_AT_DEFAULT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name {self.name!r} is not one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule {self.schedule!r} is not one of {SCHEDULES}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.warmup < 1 or not 0 <= self.final_lr <= 1:
            raise ValueError(f"optim values out of range: lr > 0, weight_decay >= 0, 0 <= warmup < 1, "
                             f"0 <= final_lr <= 1; got {self}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"optim.clip_grad must be positive or null, got {self.clip_grad}")
        m = self.milestones
        if (self.schedule == "multistep") != bool(m) or list(m) != sorted(set(m)) or any(not 0 < x < 1 for x in m):
            raise ValueError(f"optim.milestones must be increasing fractions in (0, 1) of the steps, given with "
                             f"schedule: multistep and only with it; got schedule {self.schedule!r}, milestones {list(m)}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"optim.gamma must be in (0, 1], got {self.gamma}")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None, where: str = "optim") -> OptimSpec:
        """Build from a config section; a misspelled key is an error naming the closest valid one."""
        from mtfc.config import check_keys

        cfg = dict(cfg or {})
        check_keys(cfg, [f.name for f in fields(cls)], where)
        return cls(**cfg)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, as an artifact key sees it (:func:`mtfc.config.key_form`)."""
        from mtfc.config import key_form

        return key_form(self)


def build_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimSpec) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` over ``params``; biases and norm weights (1-d) get no weight decay."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=0.9, nesterov=spec.nesterov)
    return (torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam)(groups, lr=spec.lr)


def lr_factor(spec: OptimSpec, step: int, total_steps: int) -> float:
    """The multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``."""
    if spec.schedule == "constant" or total_steps <= 1:
        return 1.0
    warm = int(spec.warmup * total_steps)
    if spec.schedule == "onecycle":
        warm = max(warm, 1)
        start = 1 / 25
        if step < warm:
            return start + (1 - start) * (1 - math.cos(math.pi * step / warm)) / 2
    elif step < warm:
        return (step + 1) / (warm + 1)
    if spec.schedule == "multistep":
        return spec.gamma ** sum(step >= round(m * total_steps) for m in spec.milestones)
    t = min(1.0, (step - warm) / max(1, total_steps - warm - 1))
    return spec.final_lr + (1 - spec.final_lr) * (1 + math.cos(math.pi * t)) / 2
