"""The main job end to end on a tiny config: every stage, every artifact, skip-on-rerun."""
import csv
import json
from pathlib import Path

import pytest
import yaml

from mtfc.cli import main
from mtfc.pipeline import Pipeline, load_config

TINY = {
    "seed": 0,
    "data": {"type": "bundled", "image_size": 32,
             "generate": {"num_classes": 3, "splits": {"train": 48, "val": 16}, "max_objects": 2, "workers": 1}},
    "teacher": {"arch": "resnet18", "epochs": 1, "batch_size": 16},
    "bottleneck": {"betas": [0.01, 0.1], "codec": {"kind": "factorized", "latent_channels": 8, "hidden_channels": 16},
                   "epochs": 1, "batch_size": 16},
    "heads": {
        "classification": {"type": "classification", "reference": "teacher", "distill": True,
                           "kwargs": {"hidden_channels": 16}, "epochs": 1, "batch_size": 16},
        "detection": {"type": "detection", "kwargs": {"hidden_channels": 16, "image_size": 32},
                      "epochs": 1, "batch_size": 16},
        "segmentation": {"type": "segmentation", "kwargs": {"hidden_channels": 16}, "epochs": 1, "batch_size": 16},
    },
    "evaluation": {"batch_size": 16, "baselines": {"jpeg": [10, 90], "webp": [10, 90]},
                   "learned_baselines": {"bmshj2018-factorized": {"lambdas": [0.01, 0.1], "N": 8, "M": 8, "steps": 2,
                                                                  "finetune_steps": 1, "batch_size": 8}}},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = {**TINY, "out_dir": str(out), "data": {**TINY["data"], "root": str(out / "data")}}
    (out / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(out / "tiny.yaml"), "--set", "device=cpu"]) == 0
    return out


def test_evaluate_on_another_split_scores_those_images_with_the_same_models(run_dir, tmp_path):
    from mtfc.data import make_dataset

    p = Pipeline(load_config(str(run_dir / "tiny.yaml"), ["evaluation.baselines={}", "evaluation.learned_baselines={}"]))
    mtfc_rows = lambda rows: {(r["task"], r["rate_point"]): (r["metric"], r["bpp_mean"], r["n_images"])  # noqa: E731
                              for r in rows if r["method"] == "mtfc"}
    report = json.loads((run_dir / "report" / "results.json").read_text())["rows"]
    # the val split named explicitly: exactly the report's numbers
    assert mtfc_rows(p.evaluate(on=(str(run_dir / "data"), "val"))) == mtfc_rows(report)
    # fresh scenes of the same generator at another root: those 5 images are scored
    make_dataset(tmp_path / "fresh", image_size=32, num_classes=3, splits={"test": 5}, max_objects=2)
    fresh = mtfc_rows(p.evaluate(on=(str(tmp_path / "fresh"), "test")))
    assert set(fresh) == set(mtfc_rows(report)) and {n for _, _, n in fresh.values()} == {5}


def test_run_produces_every_artifact(run_dir):
    assert (run_dir / "data" / "dataset.json").is_file()
    assert (run_dir / "teacher" / "teacher.pt").is_file()
    for beta in ("0.01", "0.1"):
        assert (run_dir / "bottleneck" / f"beta_{beta}" / "codec.pt").is_file()
        for head in ("classification", "detection", "segmentation"):
            assert (run_dir / "heads" / f"beta_{beta}" / head / "head.pt").is_file()
    for head in ("detection", "segmentation"):
        assert (run_dir / "reference" / head / "head.pt").is_file()
    report = run_dir / "report"
    for name in ("results.csv", "results.json", "bd_rate.csv", "report.md", "plots/classification.png",
                 "plots/detection.png", "plots/segmentation.png"):
        assert (report / name).is_file(), name
    rows = json.loads((report / "results.json").read_text())["rows"]
    methods = {(r["method"], str(r["rate_point"])) for r in rows}
    assert {("mtfc", "0.01"), ("mtfc", "0.1"), ("jpeg", "10"), ("webp", "90"), ("bmshj2018-factorized", "0.01"),
            ("bmshj2018-factorized", "0.1"), ("uncompressed", "raw")} <= methods
    assert {r["task"] for r in rows} == {"classification", "detection", "segmentation"}
    for r in rows:
        assert r["n_images"] == 16 and r["bpp_mean"] > 0
    md = (report / "report.md").read_text()
    assert "tiny.yaml" in md
    for table, column in (("bd_rate.csv", "baseline"), ("within_reference.csv", "method")):
        with open(report / table) as f:
            assert "bmshj2018-factorized" in {r[column] for r in csv.DictReader(f)}, table
    assert (report / "training" / "bmshj2018-factorized.png").is_file()

    def mb(folder: str) -> str:  # the files of one kind of artifact, measured here independently
        return f"{sum(p.stat().st_size for p in (run_dir / folder).rglob('*') if p.is_file()) / 1e6:.1f} MB"

    disk = json.loads((report / "results.json").read_text())["provenance"]["disk"]
    assert list(disk) == ["teacher", "references", "codecs", "heads", "learned baselines", "caches"] and all(disk.values())
    assert (f"- disk: teacher {mb('teacher')}, references {mb('reference')}, codecs {mb('bottleneck')}, "
            f"heads {mb('heads')}, learned baselines {mb('learned')}, caches {mb('cache')}; "
            f"total {sum(disk.values()) / 1e6:.1f} MB") in md


def test_rerun_skips_finished_stages(run_dir, capsys):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.pt")}
    pipe = Pipeline(load_config(run_dir / "tiny.yaml", ["device=cpu"]))
    pipe.make_dataset()
    pipe.train_bottlenecks()
    pipe.train_heads(references=True)
    pipe.train_heads()
    assert capsys.readouterr().out.count("skipped") >= 1 + 2 + 2 + 6
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.pt")} == before


def test_a_config_extends_another_and_lays_its_values_over_it(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "demo.yaml").write_text(yaml.safe_dump({**TINY, "out_dir": "x", "data": {"type": "bundled", "root": "y"}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({
        "extends": "base/demo.yaml", "out_dir": "z", "bottleneck": {"codec": {"kind": "step"}, "betas": [1.0]},
        "evaluation": {"baselines": {}}}))
    cfg = load_config(tmp_path / "child.yaml", ["bottleneck.epochs=3"])
    base = load_config(tmp_path / "base" / "demo.yaml")
    assert (cfg.out_dir, cfg.bottleneck.codec["kind"], cfg.bottleneck.betas, cfg.bottleneck.epochs) == ("z", "step", [1.0], 3)
    assert cfg.bottleneck.codec["latent_channels"] == 8 and cfg.evaluation.baselines == {}  # merged; {} replaces
    assert cfg.to_dict()["heads"] == base.to_dict()["heads"] and base.bottleneck.codec["kind"] == "factorized"
    (tmp_path / "loop.yaml").write_text("extends: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ValueError, match="`extends` loops: .*loop.yaml -> .*loop2.yaml -> .*loop.yaml"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml does not exist \\(named by `extends` in .*orphan.yaml\\)"):
        load_config(tmp_path / "orphan.yaml")


def test_the_variant_configs_extend_the_benchmarks():
    for child, parent in (("demo-per-beta", "demo-hues"), ("fashion-per-beta", "fashion")):
        assert yaml.safe_load(Path(f"configs/{child}.yaml").read_text())["extends"] == f"{parent}.yaml"
        cfg, base = load_config(f"configs/{child}.yaml"), load_config(f"configs/{parent}.yaml")
        assert (cfg.bottleneck.codec["kind"], base.bottleneck.codec["kind"]) == ("factorized", "step")
        assert cfg.data == base.data and cfg.teacher == base.teacher
    demo, hues, longer = (load_config(f"configs/{name}.yaml") for name in ("demo", "demo-hues", "shapes"))
    assert (demo.data.generate.hue, hues.data.generate.hue, longer.data.generate.hue) == ("independent", "class", "independent")
    assert [c.teacher.epochs for c in (demo, hues, longer)] == [20, 6, 24]
    assert [[c.heads[h].epochs for h in ("classification", "detection", "segmentation")] for c in (demo, hues, longer)] \
        == [[6, 5, 8], [4, 4, 12], [6, 8, 12]]
    assert demo.bottleneck == hues.bottleneck == longer.bottleneck and demo.evaluation == hues.evaluation == longer.evaluation


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("out_dir: x\n")
    with pytest.raises(ValueError, match="lacks the required key"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({**TINY, "out_dir": "x", "data": {"type": "bundled", "root": "y"}}))
    with pytest.raises(ValueError, match="key=value"):
        load_config(tmp_path / "ok.yaml", ["novalue"])
    assert load_config(tmp_path / "ok.yaml", ["bottleneck.epochs=3"]).bottleneck.epochs == 3


def test_an_artifact_trained_with_another_config_is_moved_aside_and_retrained(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    cfg = yaml.safe_load((run_dir / "tiny.yaml").read_text())
    cfg["out_dir"], cfg["data"]["root"] = str(copy), str(copy / "data")
    cfg["bottleneck"]["betas"] = [0.1]
    (copy / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    old = (copy / "bottleneck/beta_0.1/codec.pt").read_bytes()
    pipe = Pipeline(load_config(copy / "tiny.yaml", ["device=cpu", "bottleneck.saliency=0.5"]))
    pipe.train_bottlenecks()
    out = capsys.readouterr().out
    assert "stale" in out and "saliency" in out
    aside = [p for p in (copy / "bottleneck").iterdir() if p.name.startswith("beta_0.1.stale-")]
    assert len(aside) == 1 and (aside[0] / "codec.pt").read_bytes() == old  # nothing lost
    from mtfc.codec import load_codec

    assert load_codec(copy / "bottleneck/beta_0.1/codec.pt").meta["saliency"] == 0.5
    pipe.train_heads()  # the heads of the old codec no longer fit: retrained on the new one
    assert capsys.readouterr().out.count("trained on codec") == 3


def test_a_stage_of_another_data_type_inherits_only_type_independent_keys():
    cfg = load_config("configs/real.yaml", ["data.strict=true", "data.augment={hflip: true}"])
    pipe = Pipeline(cfg)
    assert pipe.data_cfg(cfg.heads["detection"]) == {
        "type": "coco", "root": "/datasets/coco", "image_size": 512, "resize": "keep_aspect", "augment": {"hflip": True},
        "strict": True}
    assert pipe.data_cfg(None) == {"type": "imagenet", "root": "/datasets/imagenet", "image_size": 224,
                                   "eval_resize": 232, "augment": {"hflip": True}, "strict": True}


def test_the_report_checks_that_every_artifact_was_written_by_this_code(run_dir):
    prov = json.loads((run_dir / "report" / "results.json").read_text())["provenance"]
    # teacher, 2 codecs, 2 reference heads, 6 heads, 2 learned baselines
    assert len(prov["artifacts"]) == 13 and all(state == prov["git"] for state in prov["artifacts"].values())
    assert "- artifacts: all 13 were written by this code (" in (run_dir / "report" / "report.md").read_text()
