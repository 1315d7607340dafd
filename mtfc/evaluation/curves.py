"""Training curves of every stage of a run: per-step training scalars from each run's TensorBoard
events, validation metrics and timings from its ``log.jsonl`` (both written by the engine). Plots
(one figure per stage, one line per run of it) and a table of time and throughput per run."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

#: A stage's runs: run name → the engine's ``out_dir`` of that run.
Runs = Mapping[str, Path]
Series = tuple[list[int], list[float]]


def headline(metrics: Sequence[str]) -> list[str]:
    """The summary metrics among an evaluator's keys, without per-class ones (``AP-circle``, ``IoU.star``)."""
    return [k for k in metrics if "-" not in k and "." not in k]


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of one training run (``log.jsonl``); empty if it has none."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_series(run_dir: str | Path) -> dict[tuple[str, str], Series]:
    """``(split, key) → (global steps, values)``: every training step's scalars from TensorBoard
    (epoch means from ``log.jsonl`` where there are no events) and every validation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[tuple[str, str], Series] = {}
    records = read_log(run_dir)
    tb = Path(run_dir) / "tb"
    if tb.is_dir():
        events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            split, _, key = tag.partition("/")
            if split == "train":
                points = {e.step: e.value for e in events.Scalars(tag)}  # a resumed run rewrites steps
                series[("train", key)] = (sorted(points), [points[s] for s in sorted(points)])
    if not any(split == "train" for split, _ in series):
        for key in records[0]["train"] if records else []:
            series[("train", key)] = ([r["global_step"] for r in records], [r["train"][key] for r in records])
    for r in records:
        for key, value in r.get("val", {}).items():
            steps, values = series.setdefault(("val", key), ([], []))
            steps.append(r["global_step"])
            values.append(value)
    return series


def _smooth(values: list[float]) -> np.ndarray:
    """A centred moving average over ~2 % of the points (per-step losses are noisy)."""
    v = np.asarray(values, dtype=float)
    k = max(1, len(v) // 50) | 1
    if k == 1:
        return v
    padded = np.pad(v, k // 2, mode="edge")
    return np.convolve(padded, np.ones(k) / k, mode="valid")


def plot_stage(stage: str, runs: Mapping[str, dict[tuple[str, str], Series]], keys: Sequence[tuple[str, str]],
               path: Path) -> bool:
    """One panel per ``(split, key)``, one line per run; returns whether anything was plotted."""
    keys = [k for k in keys if any(k in s for s in runs.values())]
    if not keys:
        return False
    fig = Figure(figsize=(3.3 * len(keys), 2.9), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for name, series in runs.items():
            if key in series:
                x, y = series[key]
                ax.plot(x, _smooth(y) if key[0] == "train" else y, marker="o" if key[0] == "val" else None,
                        markersize=3, label=name)
        values = [v for s in runs.values() if key in s for v in s[key][1]]
        if key[0] == "train" and values and min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")
        ax.set_title(f"{key[0]} {key[1]}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(stage, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def timing_rows(stages: Mapping[str, Runs]) -> list[dict[str, Any]]:
    """Per run: epochs, steps, seconds, images/s and the last train loss / validation values."""
    rows = []
    for stage, runs in stages.items():
        for name, run_dir in runs.items():
            records = read_log(run_dir)
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


def write_curves(stages: Mapping[str, tuple[Runs, Sequence[tuple[str, str]]]], out_dir: str | Path) -> dict[str, Path]:
    """Plot every stage into ``out_dir/training/<stage>.png``; returns stage → plot path."""
    paths = {}
    for stage, (runs, keys) in stages.items():
        path = Path(out_dir) / "training" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stage)}.png"
        series = {name: s for name, run_dir in runs.items() if (s := read_series(run_dir))}
        if plot_stage(stage, series, keys, path):
            paths[stage] = path
    return paths
