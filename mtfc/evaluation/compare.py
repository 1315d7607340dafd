"""Two training recipes side by side: BD-rate and BD-metric per task of one run's mtfc curve against another's.

``mtfc compare ANCHOR/results.json TEST/results.json`` reads two reports written by ``mtfc run`` (the
plain recipe and a method, e.g. saliency-guided distillation) and compares their ``mtfc`` rows with
:func:`~mtfc.evaluation.report.bd_rate_table`, the same Bjøntegaard deltas the report uses for codecs,
and, beside them, the bits each run needs to stay within 1 point of its uncompressed reference (the
report's ``within_reference``), which exists even where the curves do not overlap; ``--plot DIR`` draws
both curves of each task in one figure.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mtfc.evaluation.report import bd_rate_table, plot_task


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


def read_within(path: str | Path, method: str = "mtfc") -> dict[str, dict[str, Any]]:
    """Task → the report's ``within_reference`` entry of ``method`` (bpp, status, reference_metric)."""
    entries = json.loads(Path(path).read_text()).get("within_reference", [])
    return {e["task"]: e for e in entries if e.get("method") == method}


def compare(anchor: list[dict[str, Any]], test: list[dict[str, Any]], anchor_name: str = "plain",
            test_name: str = "method", within: tuple[dict[str, Any], dict[str, Any]] | None = None
            ) -> list[dict[str, Any]]:
    """Per task: BD-rate (%, negative = ``test`` needs fewer bits) and BD-metric (+ = ``test`` is more
    accurate at equal rate) of ``test``'s rows against ``anchor``'s, plus each curve's points and, given
    ``within`` (the two runs' :func:`read_within`), their bits within 1 point of the reference. Only the
    rate points (β) both runs have are compared, so a run at fewer β is compared on equal terms."""
    common = {r["rate_point"] for r in anchor} & {r["rate_point"] for r in test}
    anchor, test = ([r for r in rows if r["rate_point"] in common] for rows in (anchor, test))
    rows = _named(anchor, test, anchor_name, test_name)
    table = bd_rate_table(rows, anchor_method=test_name, reference_method="")
    for entry in table:
        for name in (anchor_name, test_name):
            entry[f"points_{name}"] = [(round(r["bpp_mean"], 4), round(r["metric"], 2)) for r in
                                       sorted(rows, key=lambda r: r["bpp_mean"])
                                       if r["method"] == name and r["task"] == entry["task"]]
        for name, entries in zip((anchor_name, test_name), within or ()):
            e = entries.get(entry["task"], {})
            entry[f"within_{name}"] = {k: e.get(k) for k in ("bpp", "status", "reference_metric")}
    return table


def plot_curves(anchor: list[dict[str, Any]], test: list[dict[str, Any]], anchor_name: str, test_name: str,
                out_dir: str | Path) -> list[Path]:
    """``out_dir/<task>.png`` per task: both runs' curves side by side (``test_name``'s drawn bold)."""
    rows = _named(anchor, test, anchor_name, test_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in sorted({r["task"] for r in rows}):
        paths.append(out / f"{task}.png")
        plot_task(task, [r for r in rows if r["task"] == task], paths[-1], test_name, "")
    return paths


def _named(anchor: list[dict[str, Any]], test: list[dict[str, Any]], anchor_name: str,
           test_name: str) -> list[dict[str, Any]]:
    """Both runs' rows, each run's ``method`` renamed to its name."""
    return [{**r, "method": anchor_name} for r in anchor] + [{**r, "method": test_name} for r in test]


def format_table(table: list[dict[str, Any]], anchor_name: str, test_name: str) -> str:
    """Markdown: task, metric, BD-rate, BD-metric, the bpp within 1 point of the reference (when the table
    has them) and the (bpp, metric) points of both curves."""
    names = (anchor_name, test_name)
    within = bool(table) and f"within_{anchor_name}" in table[0]
    head = "| task | metric | BD-rate of {1} vs {0} | BD-metric |" + (
        " bpp within 1 point: {0} | {1} |" if within else "") + " {0} (bpp, metric) | {1} (bpp, metric) |"
    lines = [head.format(*names), "|---" * (6 + 2 * within) + "|"]
    for e in table:
        rate = "n/a" if e["bd_rate_percent"] is None else f"{e['bd_rate_percent']:+.1f} %"
        metric = "n/a" if e["bd_metric"] is None else f"{e['bd_metric']:+.2f}"
        cells = [e["task"], e["metric_name"], rate, metric]
        if within:
            cells += [_within(e[f"within_{n}"]) for n in names]
        cells += [" ".join(f"({b:g}, {m:g})" for b, m in e[f"points_{n}"]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
        if e["note"]:
            lines.append(f"| | | {e['note']} |" + " |" * (3 + 2 * within))
    return "\n".join(lines)


def _within(entry: dict[str, Any]) -> str:
    if entry["status"] is None:
        return "n/a"
    if entry["bpp"] is None:
        return f"not reached (of {entry['reference_metric']:.1f})"
    return f"{'≤ ' if entry['status'] == 'at most' else ''}{entry['bpp']:.3f} (of {entry['reference_metric']:.1f})"
