"""Rate–accuracy results on disk: CSV/JSON tables, one plot per task, BD-rates and a Markdown report.

The rows are those of :func:`mtfc.evaluation.runner.evaluate_method` (one per method, rate point and
task). The report leads with the rate each method needs to stay within one point of the uncompressed
reference (:func:`reference_rate_table`); the BD-rate table compares ``anchor_method`` (mtfc) with
every other method that has a curve, the uncompressed reference excepted; it is drawn as a dashed
horizontal line at its accuracy. A row's ``metric_direction`` (its head's, ``"higher"`` unless the
head says ``"lower"``) decides which points are better everywhere.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure

from matplotlib.ticker import FuncFormatter

from mtfc.evaluation.bdrate import bd_metric, bd_rate, rate_at_metric, upper_envelope
from mtfc.evaluation.curves import Runs, headline, timing_rows, write_curves
from mtfc.evaluation.runner import DIRECTIONS, ROW_FIELDS
from mtfc.gitstate import code_state

__all__ = ["PROVENANCE_KEYS", "collect_provenance", "disk_usage", "bd_rate_table", "reference_rate_table",
           "write_report"]

#: what ``write_report`` needs to know about how the results were produced
PROVENANCE_KEYS = ("command", "config", "seed", "machine", "git", "timestamp")  # and optionally "artifacts", "disk"
BD_FIELDS = ("task", "metric_name", "method", "baseline", "bd_rate_percent", "bd_metric", "note")
REFERENCE_FIELDS = ("task", "metric_name", "metric_direction", "reference_metric", "target_metric", "method", "bpp",
                    "status")


def disk_usage(places: Mapping[str, str | os.PathLike]) -> dict[str, int]:
    """Bytes on disk of each kind of artifact: ``places`` maps a kind (``"teacher"``, ``"codecs"``…) to
    a file or a folder; a folder counts every file under it, a missing place 0."""
    def size(path: Path) -> int:
        if path.is_file():
            return path.stat().st_size
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0

    return {kind: size(Path(place)) for kind, place in places.items()}


def collect_provenance(*, config: Mapping[str, Any] | None, seed: int | None, device: str | torch.device,
                       command: str | None = None, artifacts: Mapping[str, Any] | None = None,
                       disk: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The provenance record of this process: its command line (``sys.argv`` unless given), the config,
    the seed, the machine (platform, Python, CPU count, torch version and threads, device), mtfc's git
    commit and whether its tree was dirty (:func:`~mtfc.gitstate.git_state`), a UTC time, and ``artifacts``:
    the code state each artifact the results used recorded when it was written (path → ``{"commit", "dirty"}``
    or ``None`` for an artifact written before artifacts recorded it), and ``disk``: the run's bytes on disk
    per kind of artifact (:func:`disk_usage`)."""
    return {
        "command": command if command is not None else shlex.join(sys.argv),
        "config": dict(config) if config is not None else None,
        "seed": seed,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device)},
        "git": code_state(),
        "artifacts": dict(artifacts or {}),
        "disk": dict(disk or {}),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _plain(obj: Any) -> Any:
    """JSON/YAML-safe copy: NaN/inf -> None, numpy scalars -> Python, paths and other objects -> str."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Validate the rows and group them by task."""
    if not rows:
        raise ValueError("write_report got no result rows")
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in ROW_FIELDS if k not in ("all_metrics", "metric_direction") and k not in row]
        if missing:
            raise ValueError(f"result row {i} lacks {missing}: {dict(row)}")
        by_task.setdefault(str(row["task"]), []).append(row)
    for task, task_rows in by_task.items():
        names = sorted({str(r["metric_name"]) for r in task_rows})
        if len(names) > 1:
            raise ValueError(f"task {task!r} mixes metrics {names}; one metric per task can be compared")
        directions = sorted({str(r.get("metric_direction", "higher")) for r in task_rows})
        if len(directions) > 1 or directions[0] not in DIRECTIONS:
            raise ValueError(f"task {task!r} has metric_direction {directions}; one of {list(DIRECTIONS)} is needed")
    return by_task


def _higher_is_better(task_rows: Sequence[Mapping[str, Any]]) -> bool:
    """The task's direction (rows of results written before directions existed are higher-is-better)."""
    return task_rows[0].get("metric_direction", "higher") == "higher"


def _curve(rows: Sequence[Mapping[str, Any]], method: str) -> list[Mapping[str, Any]]:
    return sorted((r for r in rows if r["method"] == method), key=lambda r: r["bpp_mean"])


def _unusable(method: str, curve: Sequence[Mapping[str, Any]], higher_is_better: bool) -> str:
    """Why ``curve`` cannot enter a Bjøntegaard delta ("" if it can)."""
    if not curve:
        return f"no {method!r} results"
    try:
        rate, _ = upper_envelope([r["bpp_mean"] for r in curve], [r["metric"] for r in curve], higher_is_better)
    except ValueError as e:
        return f"{method!r}: {e}"
    return "" if rate.size >= 2 else f"{method!r} has {rate.size} point(s) on its rate–accuracy envelope; 2 are needed"


def bd_rate_table(rows: Sequence[Mapping[str, Any]], *, anchor_method: str = "mtfc",
                  reference_method: str = "uncompressed") -> list[dict[str, Any]]:
    """BD-rate (%, negative = ``anchor_method`` needs fewer bits) and BD-metric (+ = ``anchor_method``
    is more accurate) of ``anchor_method`` against each other method, per task, on (bpp, metric)
    curves. A pair that cannot be compared gets ``None`` values and the reason in ``note``."""
    table = []
    for task, task_rows in _check_rows(rows).items():
        higher = _higher_is_better(task_rows)
        ours = _curve(task_rows, anchor_method)
        baselines = sorted({str(r["method"]) for r in task_rows} - {anchor_method, reference_method})
        for baseline in baselines:
            theirs = _curve(task_rows, baseline)
            entry = {"task": task, "metric_name": task_rows[0]["metric_name"], "method": anchor_method,
                     "baseline": baseline, "bd_rate_percent": None, "bd_metric": None,
                     "note": _unusable(anchor_method, ours, higher) or _unusable(baseline, theirs, higher)}
            if not entry["note"]:
                args = ([r["bpp_mean"] for r in theirs], [r["metric"] for r in theirs],
                        [r["bpp_mean"] for r in ours], [r["metric"] for r in ours])
                notes = []
                for key, fn in (("bd_rate_percent", bd_rate), ("bd_metric", bd_metric)):
                    try:
                        entry[key] = fn(*args, higher_is_better=higher)
                    except ValueError as e:  # e.g. curves that share an accuracy range but no rate range
                        notes.append(f"{fn.__name__} (anchor {baseline}, test {anchor_method}): {e}")
                entry["note"] = "; ".join(notes)
            table.append(entry)
    return table


def reference_rate_table(rows: Sequence[Mapping[str, Any]], *, anchor_method: str = "mtfc",
                         reference_method: str = "uncompressed", tolerance: float = 1.0) -> list[dict[str, Any]]:
    """Per task and method: the bpp needed to stay within ``tolerance`` metric points of the
    ``reference_method`` (target = reference − tolerance, or + when lower is better), read off the
    method's curve with :func:`~mtfc.evaluation.bdrate.rate_at_metric` (``status``: interpolated,
    at most, not reached; n/a for a curve without finite points), ``anchor_method`` first. Tasks
    without one finite reference row are left out."""
    table = []
    for task, task_rows in _check_rows(rows).items():
        refs = _curve(task_rows, reference_method)
        if len(refs) != 1 or not math.isfinite(float(refs[0]["metric"])):
            continue
        higher = _higher_is_better(task_rows)
        reference = float(refs[0]["metric"])
        target = reference - tolerance if higher else reference + tolerance
        for method in _method_order({str(r["method"]) for r in task_rows}, anchor_method, reference_method):
            if method == reference_method:
                continue
            curve = _curve(task_rows, method)
            try:
                bpp, status = rate_at_metric([r["bpp_mean"] for r in curve], [r["metric"] for r in curve], target,
                                             higher)
            except ValueError:  # a NaN metric or a zero rate: no curve to read
                bpp, status = None, "n/a"
            table.append({"task": task, "metric_name": task_rows[0]["metric_name"],
                          "metric_direction": "higher" if higher else "lower", "reference_metric": reference,
                          "target_metric": target, "method": method, "bpp": bpp, "status": status})
    return table


def _reference_cell(entry: Mapping[str, Any]) -> str:
    if entry["bpp"] is None:
        return entry["status"]
    return ("≤ " if entry["status"] == "at most" else "") + f"{entry['bpp']:.4g}"


def _method_order(methods: set[str], anchor: str, reference: str) -> list[str]:
    return [m for m in [anchor] if m in methods] + sorted(methods - {anchor, reference}) + \
        [m for m in [reference] if m in methods]


def plot_task(task: str, task_rows: Sequence[Mapping[str, Any]], path: Path, anchor: str, reference: str) -> None:
    """One task's rate–accuracy curves, a curve per method (``anchor``'s drawn bold), ``reference`` as lines."""
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    markers = "osD^vP*Xh<>"
    curves = [m for m in _method_order({str(r["method"]) for r in task_rows}, anchor, reference) if m != reference]
    for i, method in enumerate(curves):
        pts = _curve(task_rows, method)
        ax.plot([r["bpp_mean"] for r in pts], [r["metric"] for r in pts], marker=markers[i % len(markers)],
                label=method, linewidth=2.2 if method == anchor else 1.4)
    for r in _curve(task_rows, reference):
        ax.axhline(r["metric"], linestyle="--", color="0.35", label=f"{reference} ({r['bpp_mean']:.3g} bpp)")
    values = [float(r["metric"]) for r in task_rows if math.isfinite(float(r["metric"]))]
    if values:  # keep the reference line off the frame
        pad = 0.08 * (max(values) - min(values)) or 0.05 * abs(max(values)) or 0.05
        ax.set_ylim(min(values) - pad, max(values) + pad)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("rate [bits per pixel]")
    ax.set_ylabel(f"{task_rows[0]['metric_name']} ({'higher' if _higher_is_better(task_rows) else 'lower'} is better)")
    ax.set_title(task)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path, dpi=120)


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float, np.number)) else str(value)


def _machine(machine: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in machine.items()) if isinstance(machine, Mapping) else str(machine)


def _artifacts(artifacts: Mapping[str, Any], now: Any) -> str:
    """Whether every artifact was written by the code that wrote this report, else which were not."""
    if not artifacts:
        return "none recorded"
    other = sorted(p for p, state in artifacts.items() if state != now)
    if not other:
        return f"all {len(artifacts)} were written by this code ({_git(now)})"
    return (f"{len(other)} of {len(artifacts)} were written by other code than this report's: "
            + "; ".join(f"{p} ({_git(artifacts[p]) if artifacts[p] else 'code not recorded'})" for p in other))


def _disk(disk: Mapping[str, int]) -> str:
    """``teacher 44.7 MB, codecs 1.2 MB, …; total 45.9 MB`` (MB = 10⁶ bytes)."""
    parts = [f"{kind} {size / 1e6:.1f} MB" for kind, size in disk.items()]
    return f"{', '.join(parts)}; total {sum(disk.values()) / 1e6:.1f} MB"


def _git(state: Any) -> str:
    if not isinstance(state, Mapping):
        return "not a git checkout"
    return f"{state['commit']}" + (" (dirty: uncommitted changes to tracked files)" if state["dirty"] else " (clean)")


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]


def write_report(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *, provenance: Mapping[str, Any],
                 anchor_method: str = "mtfc", reference_method: str = "uncompressed",
                 training: Mapping[str, tuple[Runs, Sequence[tuple[str, str]]]] | None = None) -> dict[str, Path]:
    """Write ``results.csv``, ``results.json``, ``within_reference.csv`` (:func:`reference_rate_table`),
    ``bd_rate.csv``, ``plots/<task>.png`` and ``report.md`` into ``out_dir``; return their paths (keys
    ``csv``, ``json``, ``within_reference``, ``bd_rate``, ``markdown``, ``plot/<task>``).

    ``training`` (stage → (run name → the engine's ``out_dir`` of that run, the ``(split, key)`` curves
    to plot)) adds a section with each stage's training curves (``training/<stage>.png``, per step)
    and each run's time and images/s.

    ``provenance`` needs the keys of :data:`PROVENANCE_KEYS` (see :func:`collect_provenance`).
    """
    missing = [k for k in PROVENANCE_KEYS if k not in provenance]
    if missing:
        raise ValueError(f"provenance lacks {missing}; build it with mtfc.evaluation.collect_provenance(...)")
    by_task = _check_rows(rows)
    rows = [{**r, "metric_direction": r.get("metric_direction", "higher")} for r in rows]
    bd_rows = bd_rate_table(rows, anchor_method=anchor_method, reference_method=reference_method)
    near = reference_rate_table(rows, anchor_method=anchor_method, reference_method=reference_method)
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "within_reference": out / "within_reference.csv",
             "bd_rate": out / "bd_rate.csv", "markdown": out / "report.md"}

    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row[k] for k in ROW_FIELDS if k != "all_metrics"},
                             "all_metrics": json.dumps(_plain(row.get("all_metrics", {})))})
    for key, fields, table in (("bd_rate", BD_FIELDS, bd_rows), ("within_reference", REFERENCE_FIELDS, near)):
        with open(paths[key], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(_plain({"provenance": provenance, "rows": list(rows), "within_reference": near, "bd_rate": bd_rows}),
                  f, indent=2, allow_nan=False)

    md = ["# Rate–accuracy report", "",
          f"Rate is bits per pixel of the whole transmitted file or bitstream (8 × bytes / (H × W) of the original "
          f"image file, before any resizing or padding). BD-rate: bits {anchor_method} needs relative to the baseline at equal accuracy "
          f"(negative = fewer); BD-metric: its metric difference at equal rate (Bjøntegaard, PCHIP on the "
          f"upper envelope of each curve).", "", f"## Bits per pixel to stay within 1 point of {reference_method}", "",
          "Read off each method's curve (PCHIP of log-rate on its upper envelope, as BD-rate) at the reference's "
          "metric less one point (plus one where lower is better); ≤: the cheapest rate measured already gets there.", ""]
    if near:
        methods = list(dict.fromkeys(e["method"] for e in near))
        cells = {(e["task"], e["method"]): _reference_cell(e) for e in near}
        tasks = list(dict.fromkeys(e["task"] for e in near))
        first = {e["task"]: e for e in reversed(near)}
        md += _table(["task", "metric", reference_method, "target", *methods],
                     [[t, f"{first[t]['metric_name']} ({first[t]['metric_direction']} is better)",
                       _fmt(first[t]["reference_metric"]), _fmt(first[t]["target_metric"]),
                       *(cells.get((t, m), "n/a") for m in methods)] for t in tasks])
    else:
        md.append(f"No {reference_method} rows to compare with.")
    md += ["", "## BD-rate", ""]
    if bd_rows:
        md += _table(["task", "metric", "baseline", f"BD-rate of {anchor_method} (%)", "BD-metric", "note"],
                     [[b["task"], str(b["metric_name"]), b["baseline"], _fmt(b["bd_rate_percent"], "+.2f"),
                       _fmt(b["bd_metric"], "+.4f"), b["note"]] for b in bd_rows])
    else:
        md.append("No baseline to compare with.")
    for task, task_rows in by_task.items():
        metric_name = str(task_rows[0]["metric_name"])
        better = "higher" if _higher_is_better(task_rows) else "lower"
        plot = out / "plots" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}.png"
        plot_task(task, task_rows, plot, anchor_method, reference_method)
        paths[f"plot/{task}"] = plot
        methods = _method_order({str(r["method"]) for r in task_rows}, anchor_method, reference_method)
        md += ["", f"## {task} ({metric_name}, {better} is better)", ""]
        md += _table(["method", "rate point", "bpp (mean ± std)", "bytes", metric_name, "encode ms/img",
                      "decode ms/img", "images"],
                     [[str(r["method"]), _fmt(r["rate_point"]), f"{_fmt(r['bpp_mean'])} ± {_fmt(r['bpp_std'], '.2g')}",
                       _fmt(r["bytes_mean"], ".1f"), _fmt(r["metric"]), _fmt(r["encode_ms"], ".2f"),
                       _fmt(r["decode_ms"], ".2f"), str(r["n_images"])] for m in methods for r in _curve(task_rows, m)])
        md += ["", f"![{task}: rate vs {metric_name}]({plot.relative_to(out).as_posix()})"]

    if training:
        md += ["", "## Training", "", "Every stage's curves (training scalars per step, smoothed over ~2 % of the "
               "steps; validation metrics where it ran) and each run's cost on this machine.", ""]
        timing = timing_rows({stage: runs for stage, (runs, _) in training.items()})
        md += _table(["stage", "run", "epochs", "steps", "time (s)", "images/s", "last train loss", "last validation"],
                     [[t["stage"], t["run"], str(t["epochs"]), str(t["steps"]), _fmt(t["seconds"], ".1f"),
                       _fmt(t["images_per_s"], ".1f"), _fmt(t["train_loss"]),
                       ", ".join(f"{k} {_fmt(t['val'][k])}" for k in headline(t["val"]))]
                      for t in timing])
        for stage, plot in write_curves(training, out).items():
            paths[f"training/{stage}"] = plot
            md += ["", f"![{stage} training]({plot.relative_to(out).as_posix()})"]

    config = yaml.safe_dump(_plain(provenance["config"]), sort_keys=False, allow_unicode=True).rstrip()
    md += ["", "## Provenance", "", f"- command: `{provenance['command']}`", f"- seed: {provenance['seed']}",
           f"- timestamp: {provenance['timestamp']}", f"- machine: {_machine(provenance['machine'])}",
           f"- git: {_git(provenance['git'])}",
           f"- artifacts: {_artifacts(provenance.get('artifacts') or {}, provenance['git'])}",
           *([f"- disk: {_disk(provenance['disk'])}"] if provenance.get("disk") else []), "",
           "Config:", "", "```yaml", config, "```", ""]
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    return paths
