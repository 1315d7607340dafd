"""mtfc.evaluation: Bjøntegaard deltas, Pillow baselines, the evaluation loop and the report."""
from __future__ import annotations

import csv
import io
import json
import math
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from torch.utils.data import DataLoader

from mtfc.evaluation import (BatchResult, Scorer, available_codecs, bd_metric, bd_rate, bd_rate_table, bits_per_pixel,
                             codec_method, collect_provenance, disk_usage, evaluate_method, rate_at_metric, reference_rate_table,
                             roundtrip, uncompressed_method, upper_envelope, write_report)
from mtfc.evaluation import baselines
from mtfc.evaluation.baselines import RoundTripCache, RoundTripDataset, collate_coded
from mtfc.gitstate import git_state

RATE = [0.1, 0.2, 0.4, 0.8, 1.6]
ACC = [0.42, 0.55, 0.63, 0.68, 0.70]


# ---------------------------------------------------------------------------------------------- BD-rate
def test_bd_rate_of_scaled_rate_is_the_scale():
    assert bd_rate(RATE, ACC, [0.8 * r for r in RATE], ACC) == pytest.approx(-20.0, abs=1e-9)
    assert bd_rate([0.8 * r for r in RATE], ACC, RATE, ACC) == pytest.approx(25.0, abs=1e-9)
    assert bd_rate(RATE, ACC, RATE, ACC) == pytest.approx(0.0, abs=1e-12)
    assert bd_metric(RATE, ACC, RATE, ACC) == pytest.approx(0.0, abs=1e-12)


def test_shifted_metric_on_a_log_linear_curve():
    a, b, delta = 0.5, 0.08, 0.03  # metric = a + b ln(rate): PCHIP reproduces it exactly
    rate = np.geomspace(0.05, 2.0, 6)
    metric = a + b * np.log(rate)
    assert bd_metric(rate, metric, rate, metric + delta) == pytest.approx(delta, abs=1e-12)
    # the same accuracy is reached delta / b nats of log-rate earlier
    assert bd_rate(rate, metric, rate, metric + delta) == pytest.approx((math.exp(-delta / b) - 1) * 100, abs=1e-9)


def test_two_point_curves_are_linear_in_log_rate():
    # anchor: ln r = ln 0.1 + (m − 0.5)/0.2 · ln 10; test: ln r = ln 0.2 + (m − 0.55)/0.2 · ln 2.
    # Overlap [0.55, 0.7]; the difference is linear, so its mean is its value at m = 0.625.
    expected = (math.exp((math.log(0.2) + 0.375 * math.log(2)) - (math.log(0.1) + 0.625 * math.log(10))) - 1) * 100
    assert bd_rate([0.1, 1.0], [0.5, 0.7], [0.2, 0.4], [0.55, 0.75]) == pytest.approx(expected, rel=1e-12)


def test_envelope_drops_dominated_points_and_order_does_not_matter():
    rate, metric = upper_envelope([0.4, 0.1, 0.3, 0.2, 0.5], [0.6, 0.3, 0.61, 0.5, 0.6])
    assert rate.tolist() == [0.1, 0.2, 0.3] and metric.tolist() == [0.3, 0.5, 0.61]
    test_rate, test_acc = [0.07, 0.15, 0.3, 0.6, 1.2], [0.45, 0.56, 0.64, 0.69, 0.71]
    reference = bd_rate(RATE, ACC, test_rate, test_acc)
    shuffled = [4, 0, 3, 1, 2]
    assert bd_rate([RATE[i] for i in shuffled], [ACC[i] for i in shuffled], test_rate, test_acc) == reference
    # a point that costs more for less accuracy changes nothing
    assert bd_rate(RATE, ACC, test_rate + [2.0], test_acc + [0.5]) == reference
    assert reference < 0


def test_matches_scipy_pchip_reference():
    interpolate = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(20):
        ra = np.sort(rng.uniform(0.05, 2, 5))
        ma = np.sort(rng.uniform(0.3, 0.8, 5))
        rt = np.sort(rng.uniform(0.05, 2, 4))
        mt = np.sort(rng.uniform(0.3, 0.8, 4))
        lo, hi = max(ma[0], mt[0]), min(ma[-1], mt[-1])
        if hi > lo:
            diff = (interpolate.PchipInterpolator(mt, np.log(rt)).integrate(lo, hi)
                    - interpolate.PchipInterpolator(ma, np.log(ra)).integrate(lo, hi)) / (hi - lo)
            assert bd_rate(ra, ma, rt, mt) == pytest.approx((math.exp(diff) - 1) * 100, rel=1e-9, abs=1e-9)
            checked += 1
        lo, hi = max(np.log(ra[0]), np.log(rt[0])), min(np.log(ra[-1]), np.log(rt[-1]))
        if hi > lo:
            diff = (interpolate.PchipInterpolator(np.log(rt), mt).integrate(lo, hi)
                    - interpolate.PchipInterpolator(np.log(ra), ma).integrate(lo, hi)) / (hi - lo)
            assert bd_metric(ra, ma, rt, mt) == pytest.approx(diff, rel=1e-9, abs=1e-12)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("args, message", [
    (([0.1], [0.5], RATE, ACC), "at least 2 points"),
    (([0.1, 0.2], [0.6, 0.5], RATE, ACC), "at least 2 points"),  # the dearer point is dominated
    ((RATE, ACC, [0.1, 0.2], [0.8, 0.9]), "do not overlap"),
    ((RATE, ACC, [0.1, 0.2], [0.5]), "differ in length"),
    ((RATE, ACC, [0.0, 0.2], [0.5, 0.6]), "positive"),
    ((RATE, ACC, [0.1, 0.2], [0.5, float("nan")]), "finite"),
])
def test_bd_errors(args, message):
    with pytest.raises(ValueError, match=message):
        bd_rate(*args)
    if message != "do not overlap":  # metric-overlap and rate-overlap differ for this pair
        with pytest.raises(ValueError, match=message):
            bd_metric(*args)


# -------------------------------------------------------------------------------------------- baselines
def _images(b: int = 2, h: int = 32, w: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) / 2])[None].repeat(b, 1, 1, 1)
    return 0.95 * smooth + 0.05 * torch.rand(b, 3, h, w, generator=gen)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def test_jpeg_and_webp_are_available():
    assert {"jpeg", "webp"} <= set(available_codecs())


@pytest.mark.parametrize("codec", available_codecs())
def test_roundtrip_counts_the_whole_file(codec):
    images = _images()
    high, low = roundtrip(images, codec, 95), roundtrip(images, codec, 5)
    fmt = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}[codec]
    for image, size in zip(images, high.num_bytes):
        buffer = io.BytesIO()
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(buffer, format=fmt, quality=95)
        assert size == len(buffer.getvalue())
        assert bits_per_pixel(size, 32, 48) == 8 * len(buffer.getvalue()) / (32 * 48)
    assert high.images.shape == images.shape and high.images.dtype == torch.float32
    assert 0 <= high.images.min() and high.images.max() <= 1
    assert high.encode_s > 0 and high.decode_s > 0
    assert _psnr(high.images, images) > 33 and _psnr(high.images, images) > _psnr(low.images, images) + 3
    assert sum(low.num_bytes) < sum(high.num_bytes)


def test_roundtrip_errors():
    with pytest.raises(ValueError, match="unknown codec 'png'"):
        roundtrip(_images(), "png", 90)
    with pytest.raises(ValueError, match="quality"):
        roundtrip(_images(), "jpeg", 101)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        roundtrip(torch.rand(3, 8, 8), "jpeg", 90)


# ------------------------------------------------------------------------------------------ the loop
class Top1:
    """A minimal evaluator following the protocol of mtfc.head.Evaluator."""

    def reset(self):
        self.hits, self.seen = 0, 0

    def process(self, targets, predictions):
        self.hits += sum(int(p == t["label"]) for p, t in zip(predictions, targets))
        self.seen += len(targets)

    def evaluate(self):
        return {"top1": self.hits / self.seen}


class Nested(Top1):
    def evaluate(self):
        return {"bbox": {"AP": 50.0, "AP50": 70.0}}


def _loader(batches: int = 2, b: int = 2, h: int = 16, w: int = 16):
    images = torch.rand(batches * b, 3, h, w, generator=torch.Generator().manual_seed(1))
    return [(images[i * b:(i + 1) * b], [{"label": int(i * b + j) % 2} for j in range(b)]) for i in range(batches)]


def test_evaluate_method_rates_timings_and_metrics():
    def method(images, targets):  # right on even labels only; 100 or 300 bytes
        return BatchResult({"cls": [0] * len(targets), "det": [None] * len(targets)}, [100, 300], 0.002, 0.004)

    rows = evaluate_method(method, _loader(), {"cls": Top1(), "det": Nested()}, method="fake", rate_point=7,
                           metrics={"det": "bbox/AP"}, progress=False)
    assert [r["task"] for r in rows] == ["cls", "det"]
    cls, det = rows
    assert cls["metric_name"] == "top1" and cls["metric"] == 0.5
    assert det["metric_name"] == "bbox/AP" and det["metric"] == 50.0 and det["all_metrics"]["bbox/AP50"] == 70.0
    assert cls["bpp_mean"] == pytest.approx(8 * 200 / 256) and cls["bpp_std"] == pytest.approx(8 * 100 / 256)
    assert cls["bytes_mean"] == 200 and cls["n_images"] == 4 and cls["rate_point"] == 7 and cls["method"] == "fake"
    assert cls["encode_ms"] == pytest.approx(1.0) and cls["decode_ms"] == pytest.approx(2.0)


def test_evaluate_method_errors():
    def method(images, targets):
        return BatchResult({"cls": [0] * len(targets)}, [1] * len(targets), 0.0, 0.0)

    with pytest.raises(ValueError, match=r"no predictions for task\(s\) \['det'\]"):
        evaluate_method(method, _loader(), {"cls": Top1(), "det": Nested()}, method="m", rate_point=1, progress=False)
    with pytest.raises(ValueError, match="primary metric"):
        evaluate_method(lambda i, t: BatchResult({"det": [0] * len(t)}, [1] * len(t), 0, 0), _loader(),
                        {"det": Nested()}, method="m", rate_point=1, progress=False)
    with pytest.raises(ValueError, match="3 byte counts for 2 images"):
        evaluate_method(lambda i, t: BatchResult({"cls": [0, 0]}, [1, 1, 1], 0, 0), _loader(), {"cls": Top1()},
                        method="m", rate_point=1, progress=False)
    with pytest.raises(ValueError, match="no images"):
        evaluate_method(method, [], {"cls": Top1()}, method="m", rate_point=1, progress=False)


def test_baseline_methods_feed_the_loop():
    seen = []

    def model(images, targets):  # a reference "model": records what it was given
        seen.append(images)
        return [0] * len(targets)

    loader = _loader(h=32, w=32)
    raw = evaluate_method(uncompressed_method({"cls": model}), loader, {"cls": Top1()}, method="uncompressed",
                          rate_point=None, progress=False)[0]
    assert raw["bpp_mean"] == 24.0 and raw["bpp_std"] == 0.0 and raw["metric"] == 0.5
    assert seen[0] is loader[0][0]
    jpeg = evaluate_method(codec_method("jpeg", 50, {"cls": model}), loader, {"cls": Top1()}, method="jpeg",
                           rate_point=50, progress=False)[0]
    sizes = [n for images, _ in loader for n in roundtrip(images, "jpeg", 50).num_bytes]
    assert jpeg["bytes_mean"] == pytest.approx(np.mean(sizes))
    assert jpeg["bpp_mean"] == pytest.approx(np.mean([8 * n / (32 * 32) for n in sizes]))
    assert not torch.equal(seen[-1], loader[-1][0])  # the model saw the decoded images


# --------------------------------------------------------------------------------------------- report
def _row(method, point, task, metric, bpp, name):
    return {"method": method, "rate_point": point, "task": task, "metric_name": name, "metric": metric,
            "bpp_mean": bpp, "bpp_std": 0.1 * bpp, "bytes_mean": bpp * 1024 / 8, "encode_ms": 1.5, "decode_ms": 2.5,
            "n_images": 8, "all_metrics": {name: metric}}


MTFC = {"classification": ([0.05, 0.15, 0.4], [0.60, 0.68, 0.71]), "segmentation": ([0.05, 0.15, 0.4], [0.40, 0.48, 0.51])}
JPEG = {"classification": ([0.25, 0.6, 1.2], [0.58, 0.67, 0.71]), "segmentation": ([0.25, 0.6, 1.2], [0.41, 0.47, 0.52])}
REF = {"classification": 0.72, "segmentation": 0.52}
NAME = {"classification": "top1", "segmentation": "mIoU"}


def _rows():
    rows = []
    for task in MTFC:
        rows += [_row("mtfc", beta, task, m, r, NAME[task]) for beta, r, m in zip([0.01, 0.1, 1], *MTFC[task])]
        rows += [_row("jpeg", q, task, m, r, NAME[task]) for q, r, m in zip([10, 50, 90], *JPEG[task])]
        rows.append(_row("webp", 75, task, 0.5, 0.4, NAME[task]))  # one point: no curve
        rows.append(_row("uncompressed", None, task, REF[task], 24.0, NAME[task]))
    return rows


def test_write_report(tmp_path):
    rows = _rows()
    provenance = collect_provenance(config={"codec": "runs/codec.pt", "qualities": [10, 50, 90]}, seed=3,
                                    device="cpu", command="mtfc evaluate --config configs/demo.yaml")
    paths = write_report(rows, tmp_path / "out", provenance=provenance)

    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 16
    assert {(r["method"], r["task"]) for r in table} >= {("mtfc", "segmentation"), ("uncompressed", "classification")}
    assert json.loads(table[0]["all_metrics"]) == {"top1": 0.6}

    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == 16 and data["provenance"]["seed"] == 3
    assert data["rows"][-1]["rate_point"] is None and data["provenance"]["machine"]["device"] == "cpu"

    expected = {task: bd_rate(*JPEG[task], *MTFC[task]) for task in MTFC}
    bd = {(b["task"], b["baseline"]): b for b in data["bd_rate"]}
    assert set(bd) == {(t, m) for t in MTFC for m in ("jpeg", "webp")}
    for task in MTFC:
        assert bd[(task, "jpeg")]["bd_rate_percent"] == pytest.approx(expected[task])
        assert bd[(task, "jpeg")]["bd_metric"] == pytest.approx(bd_metric(*JPEG[task], *MTFC[task]))
        assert bd[(task, "webp")]["bd_rate_percent"] is None and "'webp' has 1 point(s)" in bd[(task, "webp")]["note"]
        assert bd[(task, "jpeg")]["note"] == ""
        assert expected[task] < 0  # mtfc reaches the same accuracy with fewer bits here
    with open(paths["bd_rate"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 4

    for task in MTFC:
        with Image.open(paths[f"plot/{task}"]) as png:
            assert png.format == "PNG" and png.width > 300

    md = paths["markdown"].read_text()
    for task in MTFC:
        assert f"| {task} | {NAME[task]} | jpeg | {expected[task]:+.2f} |" in md
        assert f"](plots/{task}.png)" in md
    assert "| uncompressed | n/a | 24 ± 2.4 |" in md
    assert "`mtfc evaluate --config configs/demo.yaml`" in md and "- seed: 3" in md
    assert "codec: runs/codec.pt" in md and "torch=" in md and provenance["timestamp"] in md
    assert "- disk:" not in md  # no disk usage given, none reported


def test_report_says_disk_per_kind_of_artifact(tmp_path):
    run = tmp_path / "run"
    for rel, size in {"teacher/teacher.pt": 1_500_000, "teacher/log.jsonl": 250_000, "heads/beta_0.1/cls/head.pt": 300_000,
                      "heads/beta_0.1/det/head.pt": 200_000, "cache/baselines/jpeg_q10.pt": 42}.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(run / rel, "wb") as f:
            f.truncate(size)
    disk = disk_usage({"teacher": run / "teacher", "codecs": run / "bottleneck", "heads": run / "heads",
                       "caches": run / "cache"})
    assert disk == {"teacher": 1_750_000, "codecs": 0, "heads": 500_000, "caches": 42}
    provenance = collect_provenance(config=None, seed=0, device="cpu", disk=disk)
    md = write_report(_rows(), tmp_path / "out", provenance=provenance)["markdown"].read_text()
    assert "- disk: teacher 1.8 MB, codecs 0.0 MB, heads 0.5 MB, caches 0.0 MB; total 2.3 MB\n" in md


def test_report_errors(tmp_path):
    provenance = collect_provenance(config=None, seed=0, device="cpu")
    with pytest.raises(ValueError, match=r"provenance lacks \['seed'\]"):
        write_report(_rows(), tmp_path, provenance={k: v for k, v in provenance.items() if k != "seed"})
    mixed = _rows() + [_row("jpeg", 95, "classification", 0.7, 2.0, "top5")]
    with pytest.raises(ValueError, match="mixes metrics"):
        write_report(mixed, tmp_path, provenance=provenance)
    with pytest.raises(ValueError, match=r"row 0 lacks \['bpp_mean'\]"):
        write_report([{k: v for k, v in _rows()[0].items() if k != "bpp_mean"}], tmp_path, provenance=provenance)
    assert bd_rate_table(_rows(), anchor_method="absent")[0]["note"] == "no 'absent' results"
    # same accuracies, disjoint rates: a BD-rate but no BD-metric
    far = [_row("far", q, "classification", m, r, "top1") for q, r, m in zip([1, 2], [5.0, 10.0], [0.6, 0.7])]
    entry = {b["baseline"]: b for b in bd_rate_table(_rows() + far)}["far"]
    assert entry["bd_rate_percent"] < -90 and entry["bd_metric"] is None
    assert entry["note"].startswith("bd_metric (anchor far, test mtfc): the curves do not overlap in log-rate")


# ------------------------------------------------------------------------------- lower-is-better metrics
MAE = [3.0, 2.2, 1.7, 1.4, 1.3]  # an error (a counting head's MAE): lower is better


def test_envelope_of_a_lower_is_better_metric_keeps_the_low_errors():
    rate, metric = upper_envelope([0.4, 0.1, 0.3, 0.2, 0.5], [1.0, 3.0, 0.9, 2.0, 1.0], higher_is_better=False)
    assert rate.tolist() == [0.1, 0.2, 0.3] and metric.tolist() == [3.0, 2.0, 0.9]
    # read as higher-is-better, every dearer point would be "dominated"
    assert upper_envelope(RATE, MAE)[0].tolist() == [0.1]


def test_bd_of_a_lower_is_better_metric():
    assert bd_rate(RATE, MAE, [0.8 * r for r in RATE], MAE, higher_is_better=False) == pytest.approx(-20.0, abs=1e-9)
    neg = [-m for m in MAE]
    test_rate, test_mae = [0.07, 0.15, 0.3, 0.6, 1.2], [2.9, 2.1, 1.6, 1.35, 1.25]
    assert bd_rate(RATE, MAE, test_rate, test_mae, higher_is_better=False) == \
        bd_rate(RATE, neg, test_rate, [-m for m in test_mae])
    # BD-metric stays in metric units: test − anchor, negative = fewer errors
    assert bd_metric(RATE, MAE, test_rate, test_mae, higher_is_better=False) == \
        pytest.approx(-bd_metric(RATE, neg, test_rate, [-m for m in test_mae]), abs=1e-15)
    rate = np.geomspace(0.05, 2.0, 6)
    mae = 2.0 - 0.3 * np.log(rate)
    assert bd_metric(rate, mae, rate, mae - 0.1, higher_is_better=False) == pytest.approx(-0.1, abs=1e-12)


# ------------------------------------------------------------------------- rate to reach a given metric
def test_rate_at_metric_known_answers():
    # two points: log-rate linear in the metric between them
    assert rate_at_metric([0.1, 0.4], [60.0, 70.0], 69.5) == (pytest.approx(0.1 * 4**0.95, rel=1e-12), "interpolated")
    # metric = 60 + 5 log2(r / 0.1) through 4 points (PCHIP reproduces a straight line), one dominated point
    rate, metric = [0.1, 0.4, 1.6, 6.4, 3.0], [60.0, 70.0, 80.0, 90.0, 75.0]
    assert rate_at_metric(rate, metric, 71.0) == (pytest.approx(0.1 * 2**2.2, rel=1e-12), "interpolated")
    assert rate_at_metric(rate, metric, 80.0) == (pytest.approx(1.6, rel=1e-12), "interpolated")
    assert rate_at_metric(rate, metric, 55.0) == (0.1, "at most")
    assert rate_at_metric(rate, metric, 60.0) == (0.1, "at most")
    assert rate_at_metric(rate, metric, 90.5) == (None, "not reached")
    assert rate_at_metric([0.3], [50.0], 49.0) == (0.3, "at most")
    assert rate_at_metric([0.3], [50.0], 51.0) == (None, "not reached")
    # lower is better: MAE 3.0 at 0.1 bpp, 1.0 at 0.4 bpp; reaching 1.5 takes 3/4 of the log-rate step
    assert rate_at_metric([0.1, 0.4], [3.0, 1.0], 1.5, higher_is_better=False) == \
        (pytest.approx(0.1 * 4**0.75, rel=1e-12), "interpolated")
    assert rate_at_metric([0.1, 0.4], [3.0, 1.0], 0.9, higher_is_better=False) == (None, "not reached")


def test_rate_at_metric_is_the_pchip_that_bd_rate_integrates():
    interpolate = pytest.importorskip("scipy.interpolate")
    rate, metric = [0.05, 0.1, 0.3, 0.5, 1.5], [40.0, 55.0, 58.0, 66.0, 67.0]
    fit = interpolate.PchipInterpolator(metric, np.log(rate))
    for target in (41.0, 56.5, 60.0, 66.9):
        bpp, status = rate_at_metric(rate, metric, target)
        assert status == "interpolated" and bpp == pytest.approx(math.exp(fit(target)), rel=1e-12)


def _near_rows():
    rows = [_row("mtfc", b, "cls", m, r, "top1") for b, r, m in zip([1, 2, 3], [0.1, 0.4, 1.6], [60.0, 70.0, 80.0])]
    rows += [_row("jpeg", q, "cls", m, r, "top1") for q, r, m in zip([10, 90], [0.5, 2.0], [50.0, 65.0])]
    rows += [_row("webp", 75, "cls", 75.0, 0.05, "top1"), _row("uncompressed", "raw", "cls", 72.0, 24.0, "top1")]
    count = [_row("mtfc", b, "count", m, r, "MAE") for b, r, m in zip([1, 2], [0.1, 0.4], [3.0, 1.0])]
    count += [_row("jpeg", q, "count", m, r, "MAE") for q, r, m in zip([10, 90], [0.2, 0.8], [2.5, 2.0])]
    count.append(_row("uncompressed", "raw", "count", 0.5, 24.0, "MAE"))
    for r in count:
        r["metric_direction"] = "lower"
    return rows + count


def test_reference_rate_table_known_answers(tmp_path):
    table = reference_rate_table(_near_rows())
    got = {(e["task"], e["method"]): (e["bpp"], e["status"]) for e in table}
    assert got == {("cls", "mtfc"): (pytest.approx(0.1 * 2**2.2, rel=1e-12), "interpolated"),
                   ("cls", "jpeg"): (None, "not reached"), ("cls", "webp"): (0.05, "at most"),
                   ("count", "mtfc"): (pytest.approx(0.1 * 4**0.75, rel=1e-12), "interpolated"),
                   ("count", "jpeg"): (None, "not reached")}
    assert [e["method"] for e in table if e["task"] == "cls"] == ["mtfc", "jpeg", "webp"]
    cls, count = table[0], table[-1]
    assert (cls["reference_metric"], cls["target_metric"], cls["metric_direction"]) == (72.0, 71.0, "higher")
    assert (count["reference_metric"], count["target_metric"], count["metric_direction"]) == (0.5, 1.5, "lower")
    assert reference_rate_table(_near_rows(), tolerance=2.0)[0]["bpp"] == pytest.approx(0.1 * 2**2.0, rel=1e-12)
    assert reference_rate_table([r for r in _near_rows() if r["method"] != "uncompressed"]) == []

    paths = write_report(_near_rows(), tmp_path, provenance=collect_provenance(config=None, seed=0, device="cpu"))
    with open(paths["within_reference"], newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["task"], r["method"], r["status"]) for r in csv_rows] == [
        ("cls", "mtfc", "interpolated"), ("cls", "jpeg", "not reached"), ("cls", "webp", "at most"),
        ("count", "mtfc", "interpolated"), ("count", "jpeg", "not reached")]
    assert float(csv_rows[0]["bpp"]) == pytest.approx(0.1 * 2**2.2, rel=1e-12) and csv_rows[1]["bpp"] == ""
    md = paths["markdown"].read_text()
    assert md.index("within 1 point of uncompressed") < md.index("## BD-rate")
    assert "| task | metric | uncompressed | target | mtfc | jpeg | webp |" in md
    assert f"| cls | top1 (higher is better) | 72 | 71 | {0.1 * 2**2.2:.4g} | not reached | ≤ 0.05 |" in md
    assert f"| count | MAE (lower is better) | 0.5 | 1.5 | {0.1 * 4**0.75:.4g} | not reached | n/a |" in md
    assert "## count (MAE, lower is better)" in md
    # the count head's better (lower) points make its curve: a BD-rate exists
    bd = {(b["task"], b["baseline"]): b for b in json.loads(paths["json"].read_text())["bd_rate"]}
    assert bd[("count", "jpeg")]["note"] == ""
    assert bd[("count", "jpeg")]["bd_rate_percent"] == pytest.approx(
        bd_rate([0.2, 0.8], [2.5, 2.0], [0.1, 0.4], [3.0, 1.0], higher_is_better=False))
    assert json.loads(paths["json"].read_text())["rows"][-1]["metric_direction"] == "lower"


def test_scorer_direction_and_rows():
    scorer = Scorer({"cls": Top1()}, method="m", rate_point=1, directions={"cls": "lower"})
    scorer.add(BatchResult({"cls": [0, 0]}, [10, 30], 0.5, 0.25), [{"label": 0}, {"label": 1}], (4, 5))
    row = scorer.rows()[0]
    assert row["metric_direction"] == "lower" and row["metric"] == 0.5 and row["bpp_mean"] == 8 * 20 / 20
    assert row["encode_ms"] == 250.0 and row["decode_ms"] == 125.0
    with pytest.raises(ValueError, match="metric_direction must be one of"):
        Scorer({"cls": Top1()}, method="m", rate_point=1, directions={"cls": "up"})


def test_bpp_counts_the_original_pixels_not_the_resized_canvas():
    """A 28x28 file fed at 32x32 (resized, or letterboxed): its bytes over its own 784 pixels."""
    scorer = Scorer({"cls": Top1()}, method="m", rate_point=1)
    targets = [{"label": 0, "orig_size": (28, 28)}, {"label": 0, "orig_size": (14, 56)}, {"label": 0}]
    scorer.add(BatchResult({"cls": [0, 0, 0]}, [98, 49, 128], 0.0, 0.0), targets, (32, 32))
    assert scorer.bpp == [1.0, 0.5, 1.0]
    images = torch.zeros(3, 3, 32, 32)
    assert uncompressed_method({"cls": lambda x, t: [0] * len(x)})(images, targets).num_bytes == [2352, 2352, 3072]
    with pytest.raises(ValueError, match=r"metric_direction \['higher', 'lower'\]"):
        bd_rate_table(_near_rows() + [_row("webp", 5, "count", 4.0, 0.01, "MAE")])


# ---------------------------------------------------------------------------------------- provenance
def test_provenance_records_the_git_commit_and_a_dirty_tree(tmp_path):
    assert git_state(tmp_path) is None
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    sha = git("rev-parse", "HEAD").strip()
    assert git_state(tmp_path) == {"commit": sha, "dirty": False}
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert git_state(tmp_path) == {"commit": sha, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": sha, "dirty": True}

    prov = {**collect_provenance(config=None, seed=0, device="cpu"), "git": {"commit": sha, "dirty": True}}
    md = write_report(_rows(), tmp_path / "out", provenance=prov)["markdown"].read_text()
    assert f"- git: {sha} (dirty: uncommitted changes to tracked files)" in md
    prov["git"] = None
    assert "- git: not a git checkout" in write_report(_rows(), tmp_path / "out", provenance=prov)["markdown"].read_text()


# ------------------------------------------------------------------------------------ baseline cache
POINTS = [("jpeg", 50), ("webp", 10)]


def _dataset(seed: int = 0):
    images = torch.rand(5, 3, 32, 48, generator=torch.Generator().manual_seed(seed))
    return [(image, {"label": i}) for i, image in enumerate(images)]


def _batches(dataset, cache, num_workers=0):
    loader = DataLoader(RoundTripDataset(dataset, cache), batch_size=2, collate_fn=collate_coded, num_workers=num_workers)
    return list(loader)


def test_roundtrip_dataset_matches_roundtrip_and_the_cache_serves_reruns(tmp_path, monkeypatch):
    data = _dataset()
    cache = RoundTripCache(tmp_path, "abc", POINTS)
    first = _batches(data, cache)
    assert [len(b.targets) for b in first] == [2, 2, 1] and [t["label"] for t in first[0].targets] == [0, 1]
    for batch in first:
        for point in POINTS:
            rt, direct = batch.roundtrips[point], roundtrip(batch.images, *point)
            assert rt.images.dtype == torch.uint8 and torch.equal(rt.images.float() / 255, direct.images)
            assert rt.num_bytes == direct.num_bytes
        assert len(batch.new) == len(batch.targets) * len(POINTS)
        cache.add(batch.new)
    cache.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jpeg_q50_abc.pt", "webp_q10_abc.pt"]

    def no_encoding(*args):
        raise AssertionError("a cached image was encoded again")

    monkeypatch.setattr(baselines, "encode", no_encoding)
    rerun = _batches(data, RoundTripCache(tmp_path, "abc", POINTS), num_workers=2)
    for a, b in zip(first, rerun):
        assert b.new == [] and torch.equal(a.images, b.images)
        for point in POINTS:
            assert torch.equal(a.roundtrips[point].images, b.roundtrips[point].images)
            assert a.roundtrips[point].num_bytes == b.roundtrips[point].num_bytes
            assert a.roundtrips[point].encode_s == b.roundtrips[point].encode_s  # the time measured when encoded
    with pytest.raises(AssertionError, match="encoded again"):  # other pixels are never served from the cache
        _batches(_dataset(seed=1), RoundTripCache(tmp_path, "abc", POINTS))


def test_cache_written_by_other_versions_is_not_used(tmp_path):
    cache = RoundTripCache(tmp_path, "k", POINTS[:1])
    cache.add([(POINTS[0], "digest", b"file", 0.5)])
    cache.save()
    assert RoundTripCache(tmp_path, "k", POINTS[:1]).lookup(POINTS[0], "digest") == (b"file", 0.5)
    data = torch.load(tmp_path / "jpeg_q50_k.pt", weights_only=True)
    data["header"]["library"] = "0.0.0"
    torch.save(data, tmp_path / "jpeg_q50_k.pt")
    assert RoundTripCache(tmp_path, "k", POINTS[:1]).lookup(POINTS[0], "digest") is None
    (tmp_path / "jpeg_q50_k.pt").write_bytes(b"cut short")
    assert RoundTripCache(tmp_path, "k", POINTS[:1]).entries[POINTS[0]] == {}
    with pytest.raises(ValueError, match="unknown codec 'png'"):
        RoundTripCache(tmp_path, "k", [("png", 50)])


def test_reference_rate_table_without_a_usable_curve_or_reference():
    rows = _near_rows()
    rows[3]["metric"] = rows[4]["metric"] = float("nan")  # jpeg on cls
    table = {(e["task"], e["method"]): e for e in reference_rate_table(rows)}
    assert (table[("cls", "jpeg")]["bpp"], table[("cls", "jpeg")]["status"]) == (None, "n/a")
    rows[6]["metric"] = float("nan")  # the cls reference
    assert {e["task"] for e in reference_rate_table(rows)} == {"count"}


def test_provenance_names_the_artifacts_other_code_wrote():
    from mtfc.evaluation.report import _artifacts

    now, old = {"commit": "abc", "dirty": False}, {"commit": "def", "dirty": True}
    assert _artifacts({"a.pt": now, "b.pt": now}, now) == "all 2 were written by this code (abc (clean))"
    assert _artifacts({"a.pt": now, "b.pt": old, "c.pt": None}, now) == (
        "2 of 3 were written by other code than this report's: b.pt (def (dirty: uncommitted changes to tracked "
        "files)); c.pt (code not recorded)")
    assert _artifacts({}, now) == "none recorded"


def test_compare_prints_bd_and_the_bits_within_one_point_of_each_run(tmp_path, capsys):
    from mtfc.cli import main

    def results(path, points, within):
        rows = [{"method": "mtfc", "rate_point": beta, "task": "classification", "metric_name": "top1",
                 "metric_direction": "higher", "bpp_mean": bpp, "metric": metric, "bpp_std": 0.0, "bytes_mean": 0.0,
                 "encode_ms": 0.0, "decode_ms": 0.0, "n_images": 1} for beta, bpp, metric in points]
        path.write_text(json.dumps({"rows": rows, "within_reference": [
            {"task": "classification", "method": "mtfc", "reference_metric": 97.0, **within}]}))
        return str(path)

    # straight in log-rate, and the test curve is the anchor's at half the rate: −50 %, +2 points
    anchor = results(tmp_path / "a.json", [(1, 0.2, 90.0), (2, 0.4, 92.0), (3, 0.8, 94.0)],
                     {"bpp": 0.6, "status": "interpolated"})
    test = results(tmp_path / "b.json", [(1, 0.1, 90.0), (2, 0.2, 92.0), (3, 0.4, 94.0)],
                   {"bpp": None, "status": "not reached"})
    assert main(["compare", anchor, test, "--names", "plain", "es", "--plot", str(tmp_path / "plots")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"plots: {tmp_path / 'plots' / 'classification.png'}"
    assert (tmp_path / "plots" / "classification.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[0] == ("| task | metric | BD-rate of es vs plain | BD-metric | bpp within 1 point: plain | es | "
                        "plain (bpp, metric) | es (bpp, metric) |")
    assert lines[2] == ("| classification | top1 | -50.0 % | +2.00 | 0.600 (of 97.0) | not reached (of 97.0) | "
                        "(0.2, 90) (0.4, 92) (0.8, 94) | (0.1, 90) (0.2, 92) (0.4, 94) |")
