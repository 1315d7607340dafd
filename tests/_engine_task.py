"""A tiny task and data set for tests/test_engine.py; also the script its subprocesses run.

``python tests/_engine_task.py OUT [--sleep S]`` trains like the in-process reference run (used to
SIGKILL a run mid-epoch); under ``torchrun`` each rank also saves its final state to ``OUT/rank{r}.pt``.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mtfc.checkpoint import atomic_save
from mtfc.engine import fit

# the settings shared by the reference run, the killed subprocess and the resumed runs
FIT_KWARGS: dict[str, Any] = {"epochs": 2, "batch_size": 2, "ckpt_every": 3, "progress": False}
N_TRAIN = 16


class NoisyDataset(Dataset):
    """Random images with a label; augmentation draws from the global Python, NumPy and torch RNGs."""

    def __init__(self, n: int = N_TRAIN, sleep: float = 0.0, fail_after: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.sleep, self.fail_after, self.calls = sleep, fail_after, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        time.sleep(self.sleep)
        x = self.x[i].flip(-1) if random.random() < 0.5 else self.x[i]
        x = x * float(np.random.uniform(0.8, 1.2)) + 0.05 * torch.randn_like(x)
        return x, {"label": self.y[i], "image_id": i}


def collate(samples: list) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    return torch.stack([s[0] for s in samples]), [s[1] for s in samples]


class TinyTask(nn.Module):
    """Classifier with dropout (RNG in forward) plus a second parameter group trained by ``aux_loss``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.centre = nn.Parameter(torch.zeros(3))
        self.losses: list[float] = []
        self.val_modes: list[tuple[bool, bool]] = []
        self.dtypes: set[torch.dtype] = set()

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        images, targets = batch
        labels = torch.stack([t["label"] for t in targets])
        logits = self.net(images)
        self.dtypes.add(logits.dtype)
        loss = F.cross_entropy(logits, labels)
        self.losses.append(loss.item())
        aux_loss = ((self.centre - logits.detach().mean(0)) ** 2).sum()
        return {"loss": loss, "aux_loss": aux_loss, "acc": (logits.argmax(1) == labels).float().mean()}

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"loss": torch.optim.Adam(self.net.parameters(), lr=1e-2),
                "aux_loss": torch.optim.SGD([self.centre], lr=0.1, momentum=0.9)}

    def validate(self, loader: Any) -> dict[str, float]:
        self.val_modes.append((self.training, torch.is_grad_enabled()))
        correct = n = 0
        for images, targets in loader:
            labels = torch.stack([t["label"] for t in targets])
            correct += int((self.net(images).argmax(1) == labels).sum())
            n += len(labels)
        torch.rand(1)  # validation randomness must not leak into training
        return {"top1": correct / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--epochs", type=int, default=FIT_KWARGS["epochs"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = TinyTask()
    history = fit(task, NoisyDataset(sleep=args.sleep), val_set=NoisyDataset(n=4), collate_fn=collate,
                  out_dir=args.out, **{**FIT_KWARGS, "epochs": args.epochs})
    if "RANK" in os.environ:
        atomic_save({"task": task.state_dict(), "history": history, "calls": len(task.losses)},
                    os.path.join(args.out, f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main()
