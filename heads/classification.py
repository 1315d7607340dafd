"""Image classification on the shared latent, distilled from the teacher (Entropic Student, stage 2)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtfc.head import HEADS, Distillation, Head, HeadContext, ImageGeometry, LatentResNet, Targets, trunk_kwargs
from mtfc.metrics import ClassificationEvaluator


@HEADS.register("classification")
class ClassificationHead(Head):
    """Decoder → the teacher's ``layer2..layer4`` → pooled linear classifier.

    Trained with cross-entropy on the labels plus, when distilling (from its reference: the teacher
    as a classification head on pixels), Hinton's KL distillation at ``temperature`` (weight ``alpha``).
    :meth:`predict` returns one logits vector per image.
    """

    task = "classification"
    metric = "top1"
    required_targets = ("label",)

    @classmethod
    def from_config(cls, kwargs: dict[str, Any], ctx: HeadContext) -> dict[str, Any]:
        """See :func:`~mtfc.head.trunk_kwargs`."""
        return trunk_kwargs(kwargs, ctx)

    def __init__(self, latent_channels: int | None, num_classes: int, arch: str = "resnet18",
                 hidden_channels: int = 96, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        self.num_classes, self.temperature, self.alpha = num_classes, temperature, alpha
        self.trunk = LatentResNet(latent_channels, arch, hidden_channels)
        self.fc = nn.Linear(self.trunk.channels["layer4"], num_classes)

    def init_from_teacher(self, teacher: nn.Module) -> None:
        super().init_from_teacher(teacher)
        if teacher.fc.out_features == self.num_classes:
            self.fc.load_state_dict(teacher.fc.state_dict())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.trunk(x)["layer4"], 1), 1))

    def predict(self, latent: torch.Tensor, images: Sequence[ImageGeometry] | None = None) -> list[torch.Tensor]:
        return list(self.logits(latent))

    def loss(self, latent: torch.Tensor, targets: Targets, distill: Distillation | None = None) -> dict[str, torch.Tensor]:
        logits = self.logits(latent)
        labels = torch.as_tensor([int(t["label"]) for t in targets], device=logits.device)
        if distill is None:
            return {"loss_ce": F.cross_entropy(logits, labels)}
        with torch.no_grad():
            teacher = distill.model.logits(distill.images)
        T = self.temperature
        kl = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(teacher / T, 1), reduction="batchmean",
                      log_target=True)
        return {"loss_ce": (1 - self.alpha) * F.cross_entropy(logits, labels), "loss_kd": self.alpha * T * T * kl}

    def build_evaluator(self, dataset: Any = None) -> ClassificationEvaluator:
        return ClassificationEvaluator(self.num_classes)
