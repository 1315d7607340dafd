"""``configs/real.yaml`` end to end on tiny datasets in the real layouts (ImageNet, COCO 2017, ADE20K), with
its real architectures (ResNet-50 teacher, Faster R-CNN, ASPP) at tiny sizes and one step per stage."""
import json
import warnings

import pytest

from mtfc.cli import main
from mtfc.data import DatasetWarning
from mtfc.data.testing import write_real_layouts


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    roots = write_real_layouts(tmp / "data", corrupt=False)
    sets = [f"out_dir={tmp / 'run'}", "device=cpu", f"data.root={roots['imagenet']}", "data.image_size=32",
            "teacher.weights=null", "teacher.num_classes=3", "teacher.max_steps=1", "teacher.batch_size=2",
            "bottleneck.betas=[0.64]", "bottleneck.max_steps=1", "bottleneck.batch_size=2", "bottleneck.num_workers=0",
            f"heads.detection.data={{type: coco, root: {roots['coco']}, image_size: 64, resize: keep_aspect}}",
            "heads.detection.kwargs={hidden_channels: 96, image_size: 64}",
            f"heads.segmentation.data={{type: ade20k, root: {roots['ade20k']}, image_size: 64, resize: keep_aspect}}",
            "evaluation.batch_size=2", "evaluation.baselines={jpeg: [50]}"]
    for head in ("classification", "detection", "segmentation"):
        sets += [f"heads.{head}.max_steps=1", f"heads.{head}.batch_size=2", f"heads.{head}.num_workers=0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)  # COCO train's degenerate annotations, counted
        assert main(["run", "configs/real.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    return tmp / "run"


def test_real_yaml_runs_end_to_end_on_the_real_layouts(run_dir):
    rows = json.loads((run_dir / "report" / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert sorted({(r["method"], str(r["rate_point"]), r["task"]) for r in rows}) == [
        (m, p, t) for m, p in (("jpeg", "50"), ("mtfc", "0.64"), ("uncompressed", "raw"))
        for t in ("classification", "detection", "segmentation")]
    assert {r["n_images"] for r in rows if r["task"] == "classification"} == {2}
    # detection and segmentation keep each image's aspect (COCO val: 64x43 and 64x48, padded to 64x44 and 64x48,
    # batched by size): every image is scored once, and the uncompressed rate is 24 bpp of its original pixels
    assert {(r["task"], r["n_images"]) for r in rows} == {("classification", 2), ("detection", 2), ("segmentation", 1)}
    assert {r["bpp_mean"] for r in rows if r["method"] == "uncompressed"} == {24.0}
