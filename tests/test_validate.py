"""Fail fast: every problem a config's datasets and weights have is one line, reported before training."""
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import mtfc.pipeline
from mtfc.cli import main
from mtfc.data import make_dataset
from mtfc.head import HEADS, Head
from mtfc.pipeline import ConfigCheckError, Pipeline
from mtfc.teacher import build_teacher, pretrained_cache_file, pretrained_weights, save_teacher


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("validate") / "data", image_size=32, num_classes=3,
                        splits={"train": 8, "val": 4}, max_objects=1, seed=0)


def config(root: Path, out: Path, **sections) -> dict:
    return {"out_dir": str(out), "device": "cpu", "data": {"type": "bundled", "root": str(root)},
            "teacher": {"arch": "resnet10"},
            "bottleneck": {"betas": [0.1], "codec": {"latent_channels": 8, "hidden_channels": 16}},
            "heads": {"cls": {"type": "classification", "kwargs": {"hidden_channels": 16}}}, **sections}


def problems(cfg: dict) -> list[str]:
    with pytest.raises(ConfigCheckError) as e:
        Pipeline(cfg).validate()
    return e.value.args[0].split("\n")


def test_a_good_config_passes_and_trains_nothing(data, tmp_path, capsys):
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(config(data, tmp_path / "run")))
    assert main(["check", str(tmp_path / "ok.yaml")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'ok.yaml'}: every dataset, weights file and section checked, " \
                                      "no problem found\n"
    assert not (tmp_path / "run").exists()


def test_a_wrong_coco_root(data, tmp_path):
    cfg = config(data, tmp_path, heads={"det": {"type": "detection", "data": {"type": "coco", "root": str(tmp_path)}}})
    assert problems(cfg) == [
        f"heads.det.data (coco at {tmp_path}): {tmp_path}/annotations/instances_train2017.json: COCO annotation file "
        "not found"]


def test_class_lists_must_be_equal_between_splits(data, tmp_path):
    for split, classes in (("train", "ab"), ("val", "ac")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    cfg = config(data, tmp_path / "run", data={"type": "imagefolder", "root": str(tmp_path), "image_size": 8})
    # The loader itself refuses a val class that train lacks (val takes train's class list).
    assert problems(cfg) == [f"data (imagefolder at {tmp_path}): {tmp_path}/val/c: class folder 'c' is not one of "
                             f"the 2 classes of the train split {tmp_path}/train (unknown folders: ['c'])"]


def test_num_classes_of_a_teacher_trained_here_must_be_its_datas(data, tmp_path):
    cfg = config(data, tmp_path, teacher={"arch": "resnet10", "weights": None, "num_classes": 1000})
    assert problems(cfg) == ["teacher.num_classes is 1000 but teacher.weights is null, so the teacher trains on its "
                             "data, which has 3 classes: set teacher.num_classes to 3 (or null)"]
    with pytest.raises(ConfigCheckError):  # also when the stage is called directly: before it trains
        Pipeline(cfg).teacher_model()
    assert not (tmp_path / "teacher").exists()


def test_local_teacher_weights(data, tmp_path):
    missing = tmp_path / "teacher.pt"
    assert problems(config(data, tmp_path, teacher={"arch": "resnet10", "weights": str(missing)})) == [
        f"teacher.weights: {missing} does not exist: set teacher.weights to an existing checkpoint, to a torchvision "
        "weights name (e.g. IMAGENET1K_V1), or to null (the teacher then trains on `data`)"]
    save_teacher(build_teacher("resnet10", 10), "resnet10", missing)
    assert problems(config(data, tmp_path, teacher={"arch": "resnet10", "weights": str(missing)})) == [
        f"teacher.weights: {missing} predicts 10 classes but its data has 3 classes: set teacher.num_classes to 10"]
    assert problems(config(data, tmp_path, teacher={"arch": "resnet18", "weights": str(missing), "num_classes": 10})) == [
        f"teacher.weights: {missing} holds a resnet10 teacher, teacher.arch is resnet18: set teacher.arch to "
        "resnet10 or pass a resnet18 checkpoint"]
    Pipeline(config(data, tmp_path, teacher={"arch": "resnet10", "weights": str(missing), "num_classes": 10})).validate()


def test_pretrained_weights_offline(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(mtfc.pipeline, "_unreachable", lambda url: "[Errno -3] Temporary failure in name resolution")
    cfg = config(data, tmp_path, teacher={"arch": "resnet18", "weights": "IMAGENET1K_V1", "num_classes": 1000})
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    fixes = (f"download {url} to {tmp_path}/hub/checkpoints/resnet18-f37072fd.pth, set teacher.weights to a local "
             "checkpoint, or set teacher.weights to null (the teacher then trains on `data`)")
    assert problems(cfg) == ["teacher.weights: torchvision's resnet18 IMAGENET1K_V1 is not in torch's hub cache and "
                             f"cannot be downloaded ([Errno -3] Temporary failure in name resolution): {fixes}"]
    entry = pretrained_weights("resnet18", "IMAGENET1K_V1")
    pretrained_cache_file(entry).parent.mkdir(parents=True)
    pretrained_cache_file(entry).touch()  # in the cache: no network needed
    Pipeline(cfg).validate()
    assert problems({**cfg, "teacher": {"arch": "resnet18", "weights": "IMAGENET1K_V9"}}) == [
        "teacher.weights: unknown weights 'IMAGENET1K_V9' for resnet18; torchvision has ['IMAGENET1K_V1'] (or DEFAULT)"]


def test_offline_download_is_one_line_with_fixes_that_work(tmp_path, monkeypatch):
    from mtfc.checkpoint import CheckpointError

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(type(pretrained_weights("resnet18", "DEFAULT")), "get_state_dict", offline)
    with pytest.raises(CheckpointError) as e:
        build_teacher("resnet18", 1000, "DEFAULT")
    assert e.value.args[0] == (
        "cannot fetch torchvision weights resnet18/IMAGENET1K_V1 (<urlopen error [Errno -3] Temporary failure in name "
        "resolution>): download https://download.pytorch.org/models/resnet18-f37072fd.pth to "
        f"{tmp_path}/hub/checkpoints/resnet18-f37072fd.pth, set teacher.weights to a local checkpoint, or set "
        "teacher.weights to null (the teacher then trains on `data`)")


class NeedsDepth(Head):
    task, metric, required_targets = "depth", "rmse", ("depth",)

    def __init__(self, **kwargs) -> None:
        super().__init__()


@pytest.fixture
def needs_depth():
    HEADS.register("needs_depth")(NeedsDepth)
    yield
    del HEADS["needs_depth"]


def test_heads_build_from_their_sections_and_their_data_has_their_targets(data, tmp_path, needs_depth):
    cfg = config(data, tmp_path, heads={
        "cls": {"type": "classification", "kwargs": {"hiden_channels": 16}},
        "depth": {"type": "needs_depth"},
        "typo": {"type": "clasification"}})
    lines = problems(cfg)
    assert lines[:2] == [
        "heads.cls: cannot build a 'classification' head from its section: ClassificationHead.__init__() got an "
        "unexpected keyword argument 'hiden_channels'",
        f"heads.depth: a needs_depth head needs targets ['depth'] that its data (bundled at {data}) does not have (it "
        "has ['boxes', 'classes', 'file_name', 'image_id', 'image_size', 'label', 'masks', 'orig_size', 'sem_seg']): "
        "give heads.depth a `data` section with these labels"]
    assert lines[2].startswith("heads.typo: cannot build a 'clasification' head from its section: unknown head "
                               "'clasification'; registered: [")


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_every_problem_at_once_before_anything_trains(command, data, tmp_path, capsys):
    cfg = config(data, tmp_path / "run", teacher={"arch": "resnet10", "num_classes": 7},
                 bottleneck={"betas": [0.1], "stages": ["layer5"]},
                 heads={"det": {"type": "detection", "data": {"type": "coco", "root": str(tmp_path / "coco")}}})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main([command, str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"mtfc {command}: error: heads.det.data (coco at {tmp_path / 'coco'}): {tmp_path / 'coco'}/annotations/"
        "instances_train2017.json: COCO annotation file not found",
        "teacher.num_classes is 7 but teacher.weights is null, so the teacher trains on its data, which has 3 classes: "
        "set teacher.num_classes to 3 (or null)",
        "bottleneck.stages: unknown distillation taps ['layer5'] of resnet10; choose from ['layer1', 'layer2', "
        "'layer3', 'layer4', 'logits']",
        "(MTFC_TRACEBACK=1 shows the traceback)"]
    assert not (tmp_path / "run").exists()


def test_a_missing_imports_module_is_one_line(data, tmp_path):
    with pytest.raises(ConfigCheckError) as e:
        Pipeline(config(data, tmp_path, imports=["no_such_heads_module"]))
    assert e.value.args[0] == ("imports: cannot import 'no_such_heads_module' (No module named "
                               "'no_such_heads_module'): install it, add its folder to PYTHONPATH, or remove it from "
                               "`imports:`")
