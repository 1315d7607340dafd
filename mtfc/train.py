"""What gets trained, as tasks for the one engine (:func:`mtfc.engine.fit`).

* :class:`TeacherTask` — the teacher classifier (cross-entropy), for the offline default.
* :class:`BottleneckTask` — stage 1: codec + rate, distilled from the frozen teacher at several stages.
* :class:`HeadTask` — stage 2: one head on the frozen codec's hard-quantized latent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtfc.codec import Codec, save_codec
from mtfc.distill import REDUCTIONS, feature_mse, gradcam, saliency_weights, select_taps
from mtfc.engine import clear_state, fit, seed_everything
from mtfc.head import Distillation, Head, geometry_of
from mtfc.metrics import ClassificationEvaluator
from mtfc.model import MultiTaskModel, save_head
from mtfc.optim import OptimSpec, build_optimizer
from mtfc.teacher import (STAGES, build_teacher, candidate_taps, normalize, run_stages, save_teacher, stage_channels,
                          teacher_taps)


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


def bits_per_pixel(likelihoods: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Estimated rate, −Σ log2 p / (B·H·W): bits per *input pixel*, the unit bitstreams are measured in."""
    B, _, H, W = images.shape
    return sum(-torch.log2(p).sum() for p in likelihoods.values()) / (B * H * W)


def bits_per_pixel_each(likelihoods: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """:func:`bits_per_pixel` of each image (B,)."""
    return sum(-torch.log2(p).flatten(1).sum(1) for p in likelihoods.values()) / images[0, 0].numel()


def mixed_levels(batch: int, levels: int) -> torch.Tensor:
    """The rate level of each image of a batch when a variable-rate codec trains: 0, 1, …, K − 1, 0, …
    (every level in every batch, deterministic, so resuming stays bit-identical)."""
    return torch.arange(batch) % levels


class TeacherTask(nn.Module):
    def __init__(self, teacher: nn.Module, optim: OptimSpec | None = None) -> None:
        super().__init__()
        self.teacher, self.optim = teacher, optim or OptimSpec()

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        labels = torch.as_tensor([t["label"] for t in targets], device=images.device)
        logits = self.teacher(normalize(images))
        return {"loss": F.cross_entropy(logits, labels), "acc": (logits.argmax(1) == labels).float().mean()}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"loss": build_optimizer(self.teacher.parameters(), self.optim)}

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> dict[str, float]:
        ev = ClassificationEvaluator(self.teacher.fc.out_features)
        for images, targets in loader:
            ev.process(targets, list(self.teacher(normalize(images))))
        return ev.evaluate()


class BottleneckTask(nn.Module):
    """Stage 1: ``Σ_s MSE(student_s, teacher_s) + β · bpp`` plus the entropy model's aux loss.

    A variable-rate codec (``codec.levels`` = K) trains at every level at once: ``beta`` is then the list
    of K rate weights, the images of a batch take the levels in turn (:func:`mixed_levels`) and the
    rate term is the batch mean of ``β_level · bpp`` per image.

    The student is the codec's encoder → entropy model → decoder, followed by the frozen teacher's
    ``layer2..layer4`` and classifier; ``stages`` are the taps distilled (any of
    :func:`~mtfc.teacher.candidate_taps`, or ``"logits"``). With ``saliency`` > 0 each feature tap's
    error is weighted per position by the teacher's Grad-CAM saliency (:mod:`mtfc.distill`;
    FrankenSplit), mixed with uniform weights: ``(1 − saliency) + saliency · map``.

    ``reduction="sum"`` weights each tap's MSE by its elements per image pixel: the loss is then
    sc2bench's Entropic Student loss (``MSELoss(reduction="sum")`` per tap + β · ``BppLoss(reduction="sum")``)
    divided by the batch's pixels, so its β means what theirs does.
    """

    frozen_modules = ("teacher",)

    def __init__(self, codec: Codec, teacher: nn.Module, beta: float | Sequence[float], stages: Sequence[str] = STAGES,
                 optim: OptimSpec | None = None, aux_lr: float = 1e-2, entropy_lr: float | None = None,
                 saliency: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"bottleneck.reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.codec, self.teacher = codec, _frozen(teacher)
        self.beta, self.stages, self.optim, self.aux_lr = beta, tuple(stages), optim or OptimSpec(), aux_lr
        self.entropy_lr, self.saliency, self.reduction = entropy_lr, saliency, reduction
        known = set(candidate_taps(self.teacher)) | {"logits"}
        unknown = [s for s in self.stages if s not in known]
        if unknown or not self.stages:
            raise ValueError(f"unknown distillation taps {unknown or '(none given)'}; choose from {sorted(known)}")
        if codec.levels and len(beta) != codec.levels:
            raise ValueError(f"a codec with {codec.levels} rate levels needs {codec.levels} rate weights, got {beta}")

    def train(self, mode: bool = True) -> BottleneckTask:
        super().train(mode)
        self.teacher.eval()
        return self

    def distill(self, images: torch.Tensor, levels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distillation loss, estimated bpp (of the batch; with ``levels``, of each image) and the
        student's logits for one batch (saliency weighting only while training; validation reports the
        plain loss)."""
        weights: dict[str, torch.Tensor] = {}
        if self.saliency and self.training:
            with torch.enable_grad():
                target = teacher_taps(self.teacher, images, requires_grad=True)
                spatial = [s for s in self.stages if s != "logits"]
                weights = saliency_weights(gradcam(target, target["logits"], spatial), self.saliency)
            target = {k: v.detach() for k, v in target.items()}
        else:
            with torch.no_grad():
                target = teacher_taps(self.teacher, images)
        out = self.codec(images, levels)
        student = {"layer1": out["features"], **run_stages(self.teacher, out["features"])}
        scale = {s: student[s][0].numel() / images[0, 0].numel() if self.reduction == "sum" else 1.0
                 for s in self.stages}
        distill = sum(scale[s] * feature_mse(student[s], target[s], weights.get(s)) for s in self.stages)
        rate = bits_per_pixel(out["likelihoods"], images) if levels is None else bits_per_pixel_each(out["likelihoods"], images)
        return distill, rate, student["logits"]

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        if not self.codec.levels:
            distill, bpp, _ = self.distill(batch[0])
            return {"loss": distill + self.beta * bpp, "aux_loss": self.codec.aux_loss(), "distill": distill, "bpp": bpp}
        levels = mixed_levels(len(batch[0]), self.codec.levels)
        distill, bpp, _ = self.distill(batch[0], levels)
        rate = (bpp.new_tensor(self.beta)[levels] * bpp).mean()
        return {"loss": distill + rate, "aux_loss": self.codec.aux_loss(), "distill": distill, "bpp": bpp.mean()}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Encoder and decoder with ``optim``; the entropy model's density with ``entropy_lr`` (its
        learned prior starts broad, init_scale 10, and must narrow within the budget for the rate to
        follow β); the quantiles with Adam at ``aux_lr``."""
        groups: dict[str, list[nn.Parameter]] = {"main": [], "density": [], "aux": []}
        for name, p in self.codec.named_parameters():
            kind = ("aux" if name.endswith(".quantiles") else "density" if "entropy_bottleneck." in name
                    else "main")
            groups[kind].append(p)
        entropy_lr = self.entropy_lr or self.optim.lr
        main = build_optimizer(groups["main"], self.optim)
        main.add_param_group({"params": groups["density"], "lr": entropy_lr, "weight_decay": 0.0})
        return {"loss": main, "aux_loss": torch.optim.Adam(groups["aux"], self.aux_lr)}

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> dict[str, float]:
        """Estimated bpp, distillation loss and the student's top-1 (noise-free, the codec in eval mode);
        for a variable-rate codec also per level (``bpp_est_L0``, ``student_top1_L0``, …), each image at
        the level :func:`mixed_levels` gives it."""
        K = self.codec.levels
        ev = ClassificationEvaluator(self.teacher.fc.out_features)
        per_level = [ClassificationEvaluator(self.teacher.fc.out_features) for _ in range(K)]
        bpp, level_bits, level_n = 0.0, [0.0] * K, [0] * K
        distill = n = 0.0
        for images, targets in loader:
            levels = mixed_levels(len(images), K) if K else None
            batch_distill, batch_bpp, logits = self.distill(images, levels)
            distill += float(batch_distill) * len(images)
            bpp += float(batch_bpp.sum()) if K else float(batch_bpp) * len(images)
            n += len(images)
            ev.process(targets, list(logits))
            for level in range(K):
                idx = (levels == level).nonzero().squeeze(1).tolist()
                level_bits[level] += float(batch_bpp[idx].sum())
                level_n[level] += len(idx)
                per_level[level].process([targets[i] for i in idx], list(logits[idx]))
        out = {"bpp_est": bpp / n, "distill": distill / n, **{f"student_{k}": v for k, v in ev.evaluate().items()}}
        for level in range(K):
            out[f"bpp_est_L{level}"] = level_bits[level] / max(level_n[level], 1)
            out.update({f"student_{k}_L{level}": v for k, v in per_level[level].evaluate().items()})
        return out


class HeadTask(nn.Module):
    """Stage 2: one head trained on the frozen codec's hard-quantized latent, exactly as the server sees it.

    ``codec=None`` trains a reference head on the images themselves. With a ``teacher`` (a frozen model
    the head distils from: its reference on pixels), the head's :meth:`~mtfc.head.Head.loss` gets a
    :class:`~mtfc.head.Distillation` with the batch's images and the adapters the head asked for.
    """

    frozen_modules = ("codec", "teacher")

    def __init__(self, codec: Codec | None, head: Head, teacher: nn.Module | None = None,
                 optim: OptimSpec | None = None, level: int | None = None) -> None:
        super().__init__()
        self.codec = _frozen(codec) if codec is not None else None
        self.level = level
        self.head = head
        self.teacher = _frozen(teacher) if teacher is not None else None
        self.adapters = head.distill_adapters(self.teacher) if teacher is not None else None
        self.optim = optim or OptimSpec()

    def train(self, mode: bool = True) -> HeadTask:
        super().train(mode)
        for frozen in (self.codec, self.teacher):
            if frozen is not None:
                frozen.eval()
        return self

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the head consumes: ŷ (as decoded on the server), or the images for a reference head. On a
        variable-rate codec the images of a batch take its levels in turn (:func:`mixed_levels`): one
        head learns every rate; or, with ``level``, that level only."""
        if self.codec is None:
            return images
        if self.level is not None or not self.codec.levels:
            return self.codec.quantize(images, self.level)
        return self.codec.quantize(images, mixed_levels(len(images), self.codec.levels))

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        distill = Distillation(self.teacher, images, self.adapters) if self.teacher is not None else None
        losses = self.head.loss(self.inputs(images), targets, distill)
        if not isinstance(losses, dict) or not losses or "loss" in losses:
            raise ValueError(f"{type(self.head).__name__}.loss() must return a non-empty dict of named losses "
                             f"(not 'loss', which is their sum), got {losses if not isinstance(losses, dict) else list(losses)}")
        return {"loss": sum(losses.values()), **losses}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = list(self.head.parameters()) + (list(self.adapters.parameters()) if self.adapters is not None else [])
        return {"loss": build_optimizer(params, self.optim)}

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> dict[str, float]:
        ev = self.head.build_evaluator(loader.dataset)
        ev.reset()
        for images, targets in loader:
            ev.process(targets, self.head.predict(self.inputs(images), geometry_of(targets)))
        return ev.evaluate()


# -- the three training stages as functions --------------------------------------------------------
# Each takes the artifact's ``key`` (``{"sha256", "inputs"}``: what determines it, see
# :meth:`mtfc.pipeline.Pipeline.key`), records it in the artifact and tags the engine's training
# state with it; once the artifact is written the training state is deleted.
def _fit(task: nn.Module, train_set: Dataset, key: dict[str, Any] | None, **kwargs: Any) -> dict[str, Any]:
    from mtfc.data import collate

    tag = key["sha256"] if key is not None else None
    return fit(task, train_set, **{"collate_fn": collate, "tag": tag, **kwargs})  # the schedule: task.optim


def train_teacher(train_set: Dataset, val_set: Dataset | None, *, arch: str, num_classes: int,
                  out_dir: str | Path, weights: str | None = None, optim: OptimSpec | None = None,
                  seed: int = 0, key: dict[str, Any] | None = None, **fit_kwargs: Any) -> Path:
    """Train (or fine-tune from ``weights``) a teacher; returns the path of ``teacher.pt``.

    The random initialisation is drawn after seeding with ``seed``, so a run is reproducible."""
    out = Path(out_dir)
    seed_everything(seed)
    teacher = build_teacher(arch, num_classes, weights)
    history = _fit(TeacherTask(teacher, optim), train_set, key, val_set=val_set, out_dir=out, seed=seed, **fit_kwargs)
    save_teacher(teacher, arch, out / "teacher.pt", history=history, key=key)
    clear_state(out)
    return out / "teacher.pt"


def train_bottleneck(train_set: Dataset, val_set: Dataset | None, teacher: nn.Module, *, arch: str,
                     beta: float | Sequence[float], out_dir: str | Path, codec: dict[str, Any] | None = None, stages: Sequence[str] = STAGES,
                     select: int | None = None, saliency: float = 0.0, optim: OptimSpec | None = None,
                     aux_lr: float = 1e-2, entropy_lr: float | None = None, reduction: str = "mean", seed: int = 0,
                     key: dict[str, Any] | None = None, **fit_kwargs: Any) -> Path:
    """Stage 1 for one β (or, for a variable-rate codec kind, the list of its levels' β): train
    (initialised after seeding with ``seed``), freeze and export ``codec.pt``; returns its path. With
    ``select`` = k the taps are not ``stages`` but the k chosen by :func:`choose_taps`."""
    out = Path(out_dir)
    seed_everything(seed)
    if select:
        stages = choose_taps(teacher, train_set, select)
    variable = not isinstance(beta, (int, float))
    model = Codec(**{"out_channels": stage_channels(arch)["layer1"], **(codec or {}),
                     **({"levels": len(beta)} if variable else {})})
    task = BottleneckTask(model, teacher, beta, stages, optim, aux_lr, entropy_lr, saliency, reduction)
    history = _fit(task, train_set, key, val_set=val_set, out_dir=out, seed=seed, **fit_kwargs)
    aux = settle_quantiles(model)
    model.freeze()
    model.meta = {"beta": list(beta) if variable else beta, "teacher_arch": arch, "stages": list(stages), "saliency": saliency,
                  "history": history, "aux_loss": aux, "key": key,
                  "image_size": list(train_set[0][0].shape[-2:])}  # the size the server serves by default
    path = save_codec(model, out / "codec.pt")
    clear_state(out)
    return path


@torch.no_grad()
def choose_taps(teacher: nn.Module, dataset: Dataset, k: int, images: int = 64) -> list[str]:
    """Clustering-based hint selection (:func:`mtfc.distill.select_taps`) on the teacher's candidate
    taps over the first ``images`` of ``dataset``."""
    from mtfc.data import collate

    batch, _ = collate([dataset[i] for i in range(min(images, len(dataset)))])
    taps = teacher_taps(_frozen(teacher), batch)
    return select_taps({t: taps[t] for t in candidate_taps(teacher)}, k)


def settle_quantiles(codec: Codec, steps: int = 2000, lr: float = 0.5) -> dict[str, float]:
    """Fit the entropy model's quantiles to its final density (its aux loss, everything else fixed).

    During stage 1 the quantiles chase a density that keeps changing; CompressAI's training runs long
    enough for them to catch up, a CPU budget does not. They set the range of the CDF tables and the
    medians the latent is rounded around, so they are settled here before :meth:`Codec.freeze`
    (Adam, cosine-annealed; about 3 s on a CPU). Returns the aux loss before and after.
    """
    quantiles = [p for n, p in codec.named_parameters() if n.endswith(".quantiles")]
    grads = {p: p.requires_grad for p in codec.parameters()}
    codec.requires_grad_(False)
    for q in quantiles:
        q.requires_grad_(True)
    before = float(codec.aux_loss().detach())
    opt = torch.optim.Adam(quantiles, lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        codec.aux_loss().backward()
        opt.step()
        schedule.step()
    for p, g in grads.items():
        p.requires_grad_(g)
    return {"before": before, "after": float(codec.aux_loss().detach())}


def train_head(model: MultiTaskModel, name: str, train_set: Dataset, *, out_dir: str | Path,
               **kwargs: Any) -> dict[str, Any]:
    """Fine-tune the head ``name`` attached to ``model`` on its frozen codec; see :func:`fit_head`."""
    return fit_head(model.heads[name], train_set, codec=model.codec, out_dir=out_dir, **kwargs)


def check_targets(head: Head, dataset: Dataset) -> None:
    """Raise ``ValueError`` before training if ``dataset``'s targets lack a key ``head.required_targets`` names."""
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    provided = dataset[0][1]
    missing = [k for k in head.required_targets if k not in provided]
    if missing:
        raise ValueError(f"{type(head).__name__} ({head.task}) needs targets {missing} that {type(dataset).__name__} "
                         f"does not provide (its targets have {sorted(provided)}); use a dataset with these labels")


def fit_head(head: Head, train_set: Dataset, *, codec: Codec | None, out_dir: str | Path,
             val_set: Dataset | None = None, teacher: nn.Module | None = None, optim: OptimSpec | None = None,
             key: dict[str, Any] | None = None, level: int | None = None, **fit_kwargs: Any) -> dict[str, Any]:
    """Train ``head`` on ``codec``'s hard-quantized latent (``codec=None``: a reference head on pixels;
    ``level``: one level of a variable-rate codec instead of all of them) with the engine; saves
    ``head.pt`` (with the codec's fingerprint) in ``out_dir``.

    Returns the engine's history (per-epoch losses and the head evaluator's metrics).
    """
    out = Path(out_dir)
    check_targets(head, train_set)
    task = HeadTask(codec, head, teacher, optim, level)
    history = _fit(task, train_set, key, val_set=val_set, out_dir=out, **fit_kwargs)
    save_head(head, out / "head.pt", codec.fingerprint if codec is not None else None, history=history, key=key)
    clear_state(out)
    return history
