"""Top-k accuracy, the classification metric (Detectron2 and MMSeg bring their own evaluators)."""
from __future__ import annotations

from typing import Any

import torch


class ClassificationEvaluator:
    """Top-1 (and top-5 when there are more than 5 classes; with 5 it is always 100) accuracy in percent.

    ``process(targets, predictions)``: each prediction is a logits vector, each target has ``"label"``.
    """

    def __init__(self, num_classes: int) -> None:
        self.ks = (1, 5) if num_classes > 5 else (1,)
        self.reset()

    def reset(self) -> None:
        self.correct = dict.fromkeys(self.ks, 0)
        self.count = 0

    def process(self, targets: list[dict[str, Any]], predictions: list[torch.Tensor]) -> None:
        logits = torch.stack([p.detach().float().cpu() for p in predictions])
        labels = torch.as_tensor([int(t["label"]) for t in targets])
        top = logits.topk(max(self.ks), dim=1).indices
        for k in self.ks:
            self.correct[k] += (top[:, :k] == labels[:, None]).any(1).sum().item()
        self.count += len(labels)

    def evaluate(self) -> dict[str, float]:
        if not self.count:
            raise RuntimeError("ClassificationEvaluator.evaluate() called before any process()")
        return {f"top{k}": 100.0 * self.correct[k] / self.count for k in self.ks}
