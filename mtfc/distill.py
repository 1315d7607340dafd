"""The distillation losses of the field, in one place (see the README, "Training methods").

Stage 1 (the shared bottleneck):

* :func:`feature_mse` with :func:`gradcam` weights — saliency-guided distillation (FrankenSplit,
  Furutanpey et al., IEEE TMC 2024): the per-position feature error is weighted by the teacher's
  class-activation saliency, so the rate is spent where the task looks.
* :func:`select_taps` — clustering-based hint selection: the teacher layers distilled are chosen by
  clustering the candidate layers on simple activation statistics, one representative per cluster.

Stage 2 (the heads):

* :func:`nfd_loss` — normalized feature distillation (NFD, Liu et al., "Normalized Feature
  Distillation for Semantic Segmentation", 2022): the student (through an adaptation layer) imitates
  the teacher's features standardised per channel, which removes the teacher's response magnitude.
* :func:`weighted_soft_ce`, :func:`bounded_regression` and :func:`hint_loss` — the detection
  distillation of Chen et al., "Learning Efficient Object Detection Models with Knowledge
  Distillation" (NeurIPS 2017): class-weighted cross-entropy on the teacher's soft labels (a larger
  weight on background), a regression loss bounded by the teacher's own error, and hint learning
  through adaptation layers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: How stage 1 sums its taps' errors: ``mean`` (each tap's MSE) or ``sum`` (sc2bench's, see
#: :class:`mtfc.train.BottleneckTask`).
REDUCTIONS = ("mean", "sum")


def feature_mse(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of (B, C, h, w) features; ``weight`` (B, h, w), mean 1 per image, weights positions.

    Without ``weight`` (or with a map of ones) this is ``F.mse_loss(student, teacher)``.
    """
    if weight is None:
        return F.mse_loss(student, teacher)
    if weight.shape != (student.shape[0], *student.shape[2:]):
        raise ValueError(f"weight of shape {tuple(weight.shape)} for features of shape {tuple(student.shape)}")
    return ((student - teacher) ** 2 * weight[:, None]).mean()


def gradcam(features: dict[str, torch.Tensor], logits: torch.Tensor, taps: Sequence[str]) -> dict[str, torch.Tensor]:
    """Grad-CAM (Selvaraju et al., ICCV 2017) of the predicted class at each tap, normalised to mean 1.

    ``features`` and ``logits`` must come from one forward pass with autograd recording (the teacher's
    weights may be frozen; its input must require grad). For each tap: channel weights = the spatial
    mean of d(top logit)/d(feature), map = ReLU(Σ_c weight_c · feature_c), divided by its mean per image
    (an all-zero map becomes uniform). Returns detached (B, h, w) maps.
    """
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    grads = torch.autograd.grad(score, [features[t] for t in taps], retain_graph=False)
    maps = {}
    for tap, grad in zip(taps, grads):
        cam = F.relu((grad.mean((2, 3), keepdim=True) * features[tap]).sum(1)).detach()
        mean = cam.mean((1, 2), keepdim=True)
        maps[tap] = torch.where(mean > 0, cam / mean.clamp_min(1e-12), torch.ones_like(cam))
    return maps


def saliency_weights(maps: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    """``(1 − strength) + strength · map``: 0 is the plain loss, 1 weights by saliency alone (mean 1 either way)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"saliency strength must be in [0, 1], got {strength}")
    return {tap: (1.0 - strength) + strength * m for tap, m in maps.items()}


def tap_statistics(features: dict[str, torch.Tensor]) -> np.ndarray:
    """Per tap: mean, std, fraction of positive activations, and the spatial entropy of the mean
    channel energy (how spread out the response is), over a batch. Rows follow ``features``' order."""
    rows = []
    for f in features.values():
        f = f.detach().float()
        energy = (f**2).mean(1).flatten(1)
        p = energy / energy.sum(1, keepdim=True).clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1).mean() / np.log(p.shape[1]) if p.shape[1] > 1 else 0.0
        rows.append([float(f.mean()), float(f.std()), float((f > 0).float().mean()), float(entropy)])
    return np.asarray(rows, dtype=np.float64)


def select_taps(features: dict[str, torch.Tensor], k: int) -> list[str]:
    """Choose ``k`` of the candidate taps (ordered shallow to deep): Ward clustering of the taps on
    :func:`tap_statistics` (standardised) into ``k`` clusters, and per cluster the member closest to
    its centroid. Deterministic; returns the chosen taps in depth order."""
    from scipy.cluster.hierarchy import fcluster, linkage

    names = list(features)
    if not 1 <= k <= len(names):
        raise ValueError(f"cannot select {k} taps out of {len(names)} candidates ({names})")
    if k == len(names):
        return names
    stats = tap_statistics(features)
    z = (stats - stats.mean(0)) / np.where(stats.std(0) > 0, stats.std(0), 1.0)
    labels = fcluster(linkage(z, method="ward"), t=k, criterion="maxclust")
    chosen = []
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels == label)
        centroid = z[members].mean(0)
        chosen.append(int(members[np.argmin(((z[members] - centroid) ** 2).sum(1))]))
    return [names[i] for i in sorted(chosen)]


def standardize(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each channel of each image to zero mean and unit variance over its positions."""
    mean = features.mean((2, 3), keepdim=True)
    var = features.var((2, 3), keepdim=True, unbiased=False)
    return (features - mean) / (var + eps).sqrt()


def nfd_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], adapters: nn.ModuleList) -> torch.Tensor:
    """NFD: mean over stages of MSE(adapter(student), standardize(teacher)); invariant to the teacher's scale."""
    if not len(student) == len(teacher) == len(adapters):
        raise ValueError(f"{len(student)} student, {len(teacher)} teacher features and {len(adapters)} adapters")
    return sum(F.mse_loss(a(s), standardize(t.detach())) for s, t, a in zip(student, teacher, adapters)) / len(student)


def hint_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], adapters: nn.ModuleList) -> torch.Tensor:
    """Hint learning (FitNets; Chen et al. 2017): mean over levels of MSE(adapter(student), teacher)."""
    if not len(student) == len(teacher) == len(adapters):
        raise ValueError(f"{len(student)} student, {len(teacher)} teacher features and {len(adapters)} adapters")
    return sum(F.mse_loss(a(s), t.detach()) for s, t, a in zip(student, teacher, adapters)) / len(student)


def weighted_soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, class_weights: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """−Σ_c w_c · p_t,c · log p_s,c averaged over rows, both softmaxes at ``temperature`` (Chen et al. 2017, eq. 2)."""
    p_t = F.softmax(teacher_logits.detach() / temperature, 1)
    log_p_s = F.log_softmax(student_logits / temperature, 1)
    return -(class_weights * p_t * log_p_s).sum(1).mean()


def bounded_regression(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                       margin: float = 0.0) -> torch.Tensor:
    """Teacher-bounded L2 regression (Chen et al. 2017, eq. 4): per row, ‖s − y‖² where it exceeds the
    teacher's ‖t − y‖² − ``margin``, else 0; averaged over rows (0 for no rows)."""
    if len(student) == 0:
        return student.sum() * 0.0
    err_s = ((student - target) ** 2).sum(1)
    err_t = ((teacher.detach() - target) ** 2).sum(1)
    return torch.where(err_s + margin > err_t, err_s, torch.zeros_like(err_s)).mean()
