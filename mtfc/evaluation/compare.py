"""Two training recipes side by side: BD-rate and BD-metric per task of one run's mtfc curve against another's.

``mtfc compare ANCHOR/results.json TEST/results.json`` reads two reports written by ``mtfc run`` (the
plain recipe and a method, e.g. saliency-guided distillation) and compares their ``mtfc`` rows with
:func:`~mtfc.evaluation.report.bd_rate_table`, the same Bjøntegaard deltas the report uses for codecs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtfc.evaluation.report import bd_rate_table


def read_rows(path: str | Path, method: str = "mtfc") -> list[dict[str, Any]]:
    """The ``method`` rows of a ``results.json``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (written by `mtfc run` / `mtfc evaluate` in <out_dir>/report)")
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not an mtfc results.json: {e}") from None
    rows = [r for r in rows if r.get("method") == method]
    if not rows:
        raise ValueError(f"{path} has no {method!r} rows")
    return rows


def compare(anchor: list[dict[str, Any]], test: list[dict[str, Any]], anchor_name: str = "plain",
            test_name: str = "method") -> list[dict[str, Any]]:
    """Per task: BD-rate (%, negative = ``test`` needs fewer bits) and BD-metric (+ = ``test`` is more
    accurate at equal rate) of ``test``'s rows against ``anchor``'s, plus each curve's points. Only the
    rate points (β) both runs have are compared, so a run at fewer β is compared on equal terms."""
    common = {r["rate_point"] for r in anchor} & {r["rate_point"] for r in test}
    anchor, test = ([r for r in rows if r["rate_point"] in common] for rows in (anchor, test))
    rows = [{**r, "method": anchor_name} for r in anchor] + [{**r, "method": test_name} for r in test]
    table = bd_rate_table(rows, anchor_method=test_name, reference_method="")
    for entry in table:
        for name in (anchor_name, test_name):
            entry[f"points_{name}"] = [(round(r["bpp_mean"], 4), round(r["metric"], 2)) for r in
                                       sorted(rows, key=lambda r: r["bpp_mean"])
                                       if r["method"] == name and r["task"] == entry["task"]]
    return table


def format_table(table: list[dict[str, Any]], anchor_name: str, test_name: str) -> str:
    """Markdown: task, metric, BD-rate, BD-metric, and the (bpp, metric) points of both curves."""
    lines = [f"| task | metric | BD-rate of {test_name} vs {anchor_name} | BD-metric | {anchor_name} (bpp, metric) "
             f"| {test_name} (bpp, metric) |", "|---|---|---|---|---|---|"]
    for e in table:
        rate = "n/a" if e["bd_rate_percent"] is None else f"{e['bd_rate_percent']:+.1f} %"
        metric = "n/a" if e["bd_metric"] is None else f"{e['bd_metric']:+.2f}"
        pts = [" ".join(f"({b:g}, {m:g})" for b, m in e[f"points_{n}"]) for n in (anchor_name, test_name)]
        lines.append(f"| {e['task']} | {e['metric_name']} | {rate} | {metric} | {pts[0]} | {pts[1]} |")
        if e["note"]:
            lines.append(f"| | | {e['note']} | | | |")
    return "\n".join(lines)
