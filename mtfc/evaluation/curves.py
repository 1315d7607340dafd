"""Training curves of every stage of a run, read from the engine's ``log.jsonl`` files: plots (one
figure per stage, one line per run of it) and a table of time and throughput per run."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure

#: A stage's curves: run name → the engine's per-epoch records (see :func:`mtfc.engine.fit`).
Histories = Mapping[str, Sequence[Mapping[str, Any]]]


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of one training run (``log.jsonl`` written by the engine)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _series(records: Sequence[Mapping[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"] + 1, r[split][key]) for r in records if key in r.get(split, {})]
    return [p[0] for p in points], [p[1] for p in points]


def plot_stage(stage: str, runs: Histories, keys: Sequence[tuple[str, str]], path: Path) -> None:
    """One panel per ``(split, key)`` (``split``: ``"train"`` epoch means or ``"val"``), one line per run."""
    keys = [k for k in keys if any(_series(h, *k)[0] for h in runs.values())]
    if not keys:
        return
    fig = Figure(figsize=(3.2 * len(keys), 2.8), layout="constrained")
    for i, (split, key) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for name, records in runs.items():
            x, y = _series(records, split, key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 4 else None, markersize=3, label=name)
        ax.set_title(f"{split} {key}", fontsize=9)
        ax.set_xlabel("epoch")
        if key.startswith(("loss", "aux_loss", "distill")) or key in ("bpp", "bpp_est"):
            if all(v > 0 for h in runs.values() for v in _series(h, split, key)[1]):
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(stage, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def timing_rows(stages: Mapping[str, Histories]) -> list[dict[str, Any]]:
    """Per run: epochs, steps, seconds, images/s and the last train loss / validation values."""
    rows = []
    for stage, runs in stages.items():
        for name, records in runs.items():
            if not records:
                continue
            seconds = sum(r.get("seconds", 0.0) for r in records)
            images = sum(r.get("images_per_s", 0.0) * r.get("seconds", 0.0) for r in records)
            last_val = next((r["val"] for r in reversed(records) if r.get("val")), {})
            rows.append({"stage": stage, "run": name, "epochs": records[-1]["epoch"] + 1,
                         "steps": records[-1]["global_step"], "seconds": seconds,
                         "images_per_s": images / seconds if seconds else float("nan"),
                         "train_loss": records[-1]["train"].get("loss", float("nan")), "val": last_val})
    return rows


def write_curves(stages: Mapping[str, tuple[Histories, Sequence[tuple[str, str]]]], out_dir: str | Path) -> dict[str, Path]:
    """Plot every stage into ``out_dir/training/<stage>.png``; returns stage → plot path."""
    paths = {}
    for stage, (runs, keys) in stages.items():
        path = Path(out_dir) / "training" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stage)}.png"
        plot_stage(stage, runs, keys, path)
        if path.is_file():
            paths[stage] = path
    return paths
