"""End-to-end latency model: split computing with mtfc vs offloading the image with an image codec.

Per image, for one rate point of a rate–accuracy run (``results.json`` of ``mtfc evaluate``)::

    total = device encode × device_factor + 8·bytes / bandwidth + RTT + (server decode + heads) × server_factor

* bytes: the run's mean stream size (mtfc) and, for each image codec, the mean file size at the
  cheapest quality whose accuracy matches mtfc's on every task (else its best quality, flagged);
* device encode and server decode: measured here, batch 1, on an image of the run's size (mtfc:
  the ONNX device encoder if an export is given, else PyTorch; image codecs: Pillow at that quality);
* heads: every task's head on ŷ (mtfc) or every reference model on the decoded image (offloading),
  measured here at batch 1 with the run's own trained models.

The device factor says how much slower the device is than this machine; the server factor how much
faster (< 1) or slower the edge server is.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mtfc.codec import load_codec
from mtfc.deploy.export import median_ms, synthetic_images

DEFAULT_BANDWIDTHS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)  # Mbit/s


def _same_point(a: Any, b: Any) -> bool:
    """Rate points as the user writes them: ``3`` names β = 3.0."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def match_baselines(rows: Sequence[dict[str, Any]], rate_point: Any,
                    tasks: Sequence[str] | None = None) -> tuple[dict[str, float], dict[str, dict]]:
    """mtfc's accuracy per task at ``rate_point``, and per offloading method its cheapest point that
    reaches that accuracy on every task of ``tasks`` (default: all); failing that, the point that comes closest.
    A task whose rows say ``metric_direction: lower`` (an error) is reached at or below mtfc's value."""
    mtfc = {r["task"]: r for r in rows if r["method"] == "mtfc" and _same_point(r["rate_point"], rate_point)
            and (not tasks or r["task"] in tasks)}
    if not mtfc:
        points = sorted({str(r["rate_point"]) for r in rows if r["method"] == "mtfc"})
        raise ValueError(f"no mtfc rows at rate point {rate_point!r}; the run has {points}")
    target = {task: r["metric"] for task, r in mtfc.items()}
    sign = {task: -1.0 if r.get("metric_direction", "higher") == "lower" else 1.0 for task, r in mtfc.items()}
    chosen = {}
    for method in sorted({r["method"] for r in rows} - {"mtfc"}):
        points: dict[str, dict[str, dict]] = {}
        for r in rows:
            if r["method"] == method:
                points.setdefault(str(r["rate_point"]), {})[r["task"]] = r
        candidates = []
        for point, by_task in points.items():
            shortfall = max(sign[t] * (target[t] - by_task[t]["metric"]) if t in by_task else np.inf for t in target)
            candidates.append((shortfall > 0, by_task[next(iter(target))]["bytes_mean"] if shortfall <= 0 else shortfall,
                               point, by_task))
        unmatched, _, point, by_task = min(candidates, key=lambda c: (c[0], c[1]))
        row = next(iter(by_task.values()))
        chosen[method] = {"rate_point": row["rate_point"], "bytes": row["bytes_mean"], "matched": not unmatched,
                          "accuracy": {t: by_task[t]["metric"] for t in target if t in by_task}}
    return target, chosen


def _server_models(cfg: dict[str, Any], beta: float) -> tuple[Any, dict[str, Any]] | str:
    """The run's MultiTaskModel at ``beta`` and its reference models on pixels, or why they cannot be loaded."""
    from mtfc.model import MultiTaskModel
    from mtfc.pipeline import Pipeline

    p = Pipeline(cfg)
    heads = p.cfg.heads
    teacher_file = p.out / "teacher" / "teacher.pt"
    missing = [path for path in [p.codec_path(beta), *(p.head_path(beta, n) for n in heads),
                                 *(p.head_path(None, n) for n, s in heads.items() if s.reference == "train")]
               if not path.is_file()]
    if p.cfg.teacher.weights is None and not teacher_file.is_file():
        missing.append(teacher_file)
    if missing:
        return f"the run's models are not on this machine ({', '.join(map(str, missing[:3]))} …)"
    model = MultiTaskModel(load_codec(p.codec_path(beta)))
    for name in heads:
        model.load_head(name, p.head_path(beta, name))
    teacher = p.teacher_model()
    refs = {name: p.reference_head(name, teacher, p.dataset(spec, "val", train=False)) for name, spec in heads.items()}
    return model.eval(), refs


@torch.no_grad()
def latency_model(results: str | Path, *, rate_point: Any = None, tasks: Sequence[str] | None = None, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
                  rtt_ms: float = 20.0, device_factor: float = 1.0, server_factor: float = 1.0,
                  encoder_dir: str | Path | None = None, codec: str | Path | None = None,
                  out_dir: str | Path | None = None, run_dir: str | Path | None = None, threads: int = 1) -> dict[str, Any]:
    """Build the latency table over ``bandwidths`` (Mbit/s); writes ``latency.json``, ``latency.md`` and
    ``latency.png`` to ``out_dir`` (default: next to ``results``). ``tasks``: the tasks whose accuracy an
    image codec must match (default: every task of the run); every head is timed either way. ``run_dir``:
    where the run's models are, if not at the ``out_dir`` its config names (e.g. results copied from
    another machine, timed with models of the same architectures)."""
    from mtfc.deploy.encoder import Encoder
    from mtfc.evaluation.baselines import roundtrip
    from mtfc.pipeline import Pipeline

    results = Path(results)
    data = json.loads(results.read_text())
    rows, cfg = data["rows"], data["provenance"]["config"]
    if run_dir:
        old, new = str(cfg["out_dir"]), str(run_dir)
        root = str(cfg["data"].get("root", ""))
        cfg = {**cfg, "out_dir": new, "data": {**cfg["data"], "root": new + root[len(old):] if root.startswith(old) else root}}
    if rate_point is None:  # the most accurate mtfc point on the first task
        first = next(r["task"] for r in rows if r["method"] == "mtfc")
        rate_point = max((r for r in rows if r["method"] == "mtfc" and r["task"] == first), key=lambda r: r["metric"])["rate_point"]
    target, baselines = match_baselines(rows, rate_point, tasks)
    mtfc_row = next(r for r in rows if r["method"] == "mtfc" and _same_point(r["rate_point"], rate_point))
    side = round((8 * mtfc_row["bytes_mean"] / mtfc_row["bpp_mean"]) ** 0.5)  # the run's image size (square)
    image = synthetic_images(1, side, seed=1)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        codec_model = load_codec(codec or Pipeline(cfg).codec_path(float(rate_point)))
        encoder = Encoder(encoder_dir, threads=threads) if encoder_dir else codec_model
        level = Pipeline(cfg).level(float(rate_point))
        stream = encoder.encode(image, level=level)
        models = _server_models(cfg, float(rate_point))
        methods: dict[str, dict[str, Any]] = {"mtfc": {
            "rate_point": rate_point, "bytes": mtfc_row["bytes_mean"], "matched": True, "accuracy": target,
            "device_encode_ms": median_ms(lambda: encoder.encode(image, level=level)),
            "server_decode_ms": median_ms(lambda: codec_model.decode(stream))}}
        for method, b in baselines.items():
            if method == "uncompressed":
                b.update(device_encode_ms=0.0, server_decode_ms=0.0)
            else:
                rts = [roundtrip(image, method, int(b["rate_point"])) for _ in range(20)]
                b.update(device_encode_ms=1000 * statistics.median(r.encode_s for r in rts),
                         server_decode_ms=1000 * statistics.median(r.decode_s for r in rts))
            methods[method] = b
        note = ""
        if isinstance(models, str):
            note = f"heads not timed: {models}"
            for m in methods.values():
                m["server_heads_ms"] = 0.0
        else:
            model, refs = models
            latent = codec_model.decode(stream)
            methods["mtfc"]["server_heads_ms"] = median_ms(lambda: [h(latent) for h in model.heads.values()])
            pixels_ms = median_ms(lambda: [h(image) for h in refs.values()])
            for method in baselines:
                methods[method]["server_heads_ms"] = pixels_ms
    finally:
        torch.set_num_threads(previous)

    table = []
    for bw in bandwidths:
        line = {"bandwidth_mbps": bw}
        for name, m in methods.items():
            line[name] = (m["device_encode_ms"] * device_factor + 8 * m["bytes"] / (bw * 1e3) + rtt_ms
                          + (m["server_decode_ms"] + m["server_heads_ms"]) * server_factor)
        table.append(line)
    report = {"results": str(results), "models": str(cfg["out_dir"]), "rate_point": rate_point, "image_size": [side, side], "rtt_ms": rtt_ms,
              "device_factor": device_factor, "server_factor": server_factor, "threads": threads,
              "device_encoder": "onnxruntime" if encoder_dir else "pytorch", "note": note, "methods": methods,
              "table": table}
    out = Path(out_dir) if out_dir else results.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "latency.md").write_text(format_table(report) + "\n")
    plot(report, out / "latency.png")
    return report


def format_table(report: dict[str, Any]) -> str:
    """The latency table as Markdown: the components of each method, then total ms per bandwidth."""
    methods = report["methods"]
    lines = [f"End-to-end ms per image at {report['image_size'][0]}x{report['image_size'][1]}, mtfc rate point "
             f"{report['rate_point']}, RTT {report['rtt_ms']:g} ms, device factor {report['device_factor']:g}, "
             f"server factor {report['server_factor']:g}; device encoder: {report['device_encoder']}."
             + (f" Note: {report['note']}." if report["note"] else ""), "",
             "| method | point | matches mtfc's accuracy | bytes | device encode ms | server decode ms | heads ms |",
             "|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        lines.append(f"| {name} | {m['rate_point']} | {'yes' if m['matched'] else 'no (best it reaches)'} | "
                     f"{m['bytes']:.0f} | {m['device_encode_ms']:.2f} | {m['server_decode_ms']:.2f} | {m['server_heads_ms']:.2f} |")
    names = list(methods)
    lines += ["", "| Mbit/s | " + " | ".join(names) + " | mtfc speed-up vs best offloading |",
              "|---" * (len(names) + 2) + "|"]
    for line in report["table"]:
        best = min(line[n] for n in names if n != "mtfc") if len(names) > 1 else line["mtfc"]
        lines.append(f"| {line['bandwidth_mbps']:g} | " + " | ".join(f"{line[n]:.1f}" for n in names)
                     + f" | {best / line['mtfc']:.2f}× |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Total ms per image against bandwidth (log–log), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bw = [line["bandwidth_mbps"] for line in report["table"]]
    for name, m in report["methods"].items():
        label = name if name == "mtfc" else f"{name} q={m['rate_point']}" + ("" if m["matched"] else " (no match)")
        ax.plot(bw, [line[name] for line in report["table"]], marker="o", ms=3, label=label,
                lw=2.5 if name == "mtfc" else 1.2)
    ax.set(xscale="log", yscale="log", xlabel="bandwidth (Mbit/s)", ylabel="end-to-end ms per image",
           title=f"RTT {report['rtt_ms']:g} ms, device ×{report['device_factor']:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
