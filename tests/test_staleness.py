"""Never silently stale: every artifact records a key of what determines it, and a change of any kind
retrains exactly the artifacts it determines, moving the old ones aside.

The training functions are replaced by fakes that write real (untrained) artifacts with the key they
are given, so each case runs in seconds; ``calls`` lists what was (re)trained.
"""
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

import mtfc.train
from mtfc.checkpoint import HEAD, TRAIN_STATE, load_checkpoint, save_checkpoint
from mtfc.codec import load_codec, save_codec
from mtfc.data import make_dataset
from mtfc.model import save_head
from mtfc.pipeline import Pipeline
from mtfc.teacher import build_teacher, save_teacher

from conftest import tiny_codec

EVERYTHING = ["teacher", "bottleneck/beta_0.1", "reference/b", "heads/beta_0.1/a", "heads/beta_0.1/b"]


def config(root: Path, out: Path, **changes) -> dict:
    """Two heads: ``a`` with the teacher as reference, ``b`` distilled from a trained reference."""
    cfg = {"out_dir": str(out), "seed": 0, "device": "cpu",
           "data": {"type": "bundled", "root": str(root)},
           "teacher": {"arch": "resnet10", "epochs": 1},
           "bottleneck": {"betas": [0.1], "codec": {"latent_channels": 8, "hidden_channels": 16}},
           "heads": {"a": {"type": "classification", "reference": "teacher", "kwargs": {"hidden_channels": 16}},
                     "b": {"type": "classification", "reference": "train", "distill": True,
                           "kwargs": {"hidden_channels": 16}}}}
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


class FakeTraining:
    """What the pipeline trains, in order; writes untrained artifacts recording the key it gets."""

    def __init__(self, out: Path) -> None:
        self.out, self.calls = out, []

    def _did(self, out_dir) -> None:
        self.calls.append(Path(out_dir).relative_to(self.out).as_posix())

    def train_teacher(self, train_set, val_set, *, arch, num_classes, out_dir, key, **kwargs):
        self._did(out_dir)
        torch.manual_seed(len(self.calls))
        save_teacher(build_teacher(arch, num_classes), arch, Path(out_dir) / "teacher.pt", key=key)

    def train_bottleneck(self, train_set, val_set, teacher, *, beta, out_dir, key, **kwargs):
        self._did(out_dir)
        codec = tiny_codec(seed=len(self.calls))  # a retrained codec has another fingerprint
        codec.meta = {"beta": beta, "key": key}
        save_codec(codec, Path(out_dir) / "codec.pt")

    def fit_head(self, head, train_set, *, codec, out_dir, key, **kwargs):
        self._did(out_dir)
        save_head(head, Path(out_dir) / "head.pt", codec.fingerprint if codec is not None else None, key=key)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("staleness") / "data", image_size=32, num_classes=3,
                        splits={"train": 8, "val": 4}, max_objects=1, seed=0)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """An out_dir with every artifact of :func:`config`, made once by the fakes."""
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        fake = FakeTraining(out)
        for name in ("train_teacher", "train_bottleneck", "fit_head"):
            mp.setattr(mtfc.train, name, getattr(fake, name))
        run_stages(Pipeline(config(tiny_data, out)))
    assert fake.calls == EVERYTHING
    return out


def run_stages(pipe: Pipeline) -> None:
    pipe.teacher_model()
    pipe.train_bottlenecks()
    pipe.train_heads(references=True)
    pipe.train_heads()


@pytest.fixture
def rerun(trained, tiny_data, tmp_path, monkeypatch):
    """``rerun(**changes)``: every stage again on a copy of ``trained`` with the config changed;
    returns what was retrained and the folders moved aside."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    fake = FakeTraining(out)
    for name in ("train_teacher", "train_bottleneck", "fit_head"):
        monkeypatch.setattr(mtfc.train, name, getattr(fake, name))

    def rerun(root: Path = tiny_data, **changes) -> tuple[list[str], list[str]]:
        run_stages(Pipeline(config(root, out, **changes)))
        aside = sorted(re.sub(r"\.stale-\d{8}-\d{6}$", ".stale", p.relative_to(out).as_posix())
                       for p in out.rglob("*.stale-*"))
        return fake.calls, aside

    rerun.out = out
    return rerun


def test_the_same_config_retrains_nothing(rerun, capsys):
    assert rerun() == ([], [])
    assert capsys.readouterr().out.count("exists, skipped") == 4  # the teacher is reused silently


@pytest.mark.parametrize("changes", [
    {"teacher__num_workers": 2, "bottleneck__ckpt_every": 7, "heads__a__val_every": 3},  # how a stage runs
    {"device": "cuda"},
], ids=["how-it-runs", "device"])
def test_settings_that_do_not_change_what_a_stage_makes_retrain_nothing(rerun, changes):
    assert rerun(**changes) == ([], [])


@pytest.mark.parametrize("changes, retrained", [
    ({"seed": 1}, EVERYTHING),
    ({"teacher__epochs": 2}, EVERYTHING),
    ({"teacher__data": {"image_size": 24}}, EVERYTHING),
    ({"bottleneck__saliency": 0.5}, ["bottleneck/beta_0.1", "heads/beta_0.1/a", "heads/beta_0.1/b"]),
    ({"bottleneck__codec": {"latent_channels": 8, "hidden_channels": 16, "kind": "hyperprior"}},
     ["bottleneck/beta_0.1", "heads/beta_0.1/a", "heads/beta_0.1/b"]),
    ({"heads__a__kwargs": {"hidden_channels": 8}}, ["heads/beta_0.1/a"]),
    ({"heads__a__optim": {"lr": 0.01}}, ["heads/beta_0.1/a"]),
    ({"heads__b__epochs": 2}, ["reference/b", "heads/beta_0.1/b"]),  # b's distillation reference changed too
    ({"heads__b__distill": False}, ["heads/beta_0.1/b"]),
], ids=["seed", "teacher-section", "teacher-data", "bottleneck-section", "codec-kwargs", "head-kwargs", "head-optim",
        "reference-upstream", "distill"])
def test_a_change_retrains_what_it_determines_and_moves_the_old_aside(rerun, changes, retrained):
    calls, aside = rerun(**changes)
    assert calls == retrained
    assert aside == sorted(f"{c}.stale" for c in retrained)


def test_a_head_on_another_dataset_is_retrained(rerun, tmp_path):
    other = make_dataset(tmp_path / "voc-like", image_size=32, num_classes=4, splits={"train": 8, "val": 4},
                         max_objects=1, seed=0)
    calls, aside = rerun(heads__a__data={"type": "bundled", "root": str(other)})
    assert calls == ["heads/beta_0.1/a"] and aside == ["heads/beta_0.1/a.stale"]
    new = load_checkpoint(rerun.out / "heads/beta_0.1/a/head.pt", HEAD)
    assert new["spec"]["kwargs"]["num_classes"] == 4


def test_a_regenerated_dataset_retrains_everything(rerun, tmp_path):
    regenerated = make_dataset(tmp_path / "data", image_size=32, num_classes=3, splits={"train": 8, "val": 4},
                               max_objects=1, seed=1)  # the same files and classes, other images
    assert rerun(root=regenerated)[0] == EVERYTHING


def test_a_moved_dataset_retrains_nothing(rerun, tiny_data, tmp_path):
    moved = Path(shutil.copytree(tiny_data, tmp_path / "elsewhere"))
    assert rerun(root=moved) == ([], [])


def test_the_log_line_says_what_differs(rerun, capsys):
    rerun(heads__b__kwargs={"hidden_channels": 8})
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines() if "stale" in line]
    lines = [re.sub(r"\b[0-9a-f]{12}\b", "H", re.sub(r"stale-\d{8}-\d{6}", "stale-T", line)) for line in lines]
    out = rerun.out
    assert lines == [
        f"head b (reference): {out}/reference/b/head.pt is stale: config.kwargs.hidden_channels was 16, this "
        f"config's is 8; moved its folder to {out}/reference/b.stale-T, retraining",
        f"head b (β=0.1): {out}/heads/beta_0.1/b/head.pt is stale: trained on reference H, this run's is H; "
        f"config.kwargs.hidden_channels was 16, this config's is 8; moved its folder to "
        f"{out}/heads/beta_0.1/b.stale-T, retraining"]


def test_an_artifact_without_a_key_is_moved_aside_not_deleted(rerun, capsys):
    path = rerun.out / "heads/beta_0.1/a/head.pt"
    ckpt = load_checkpoint(path, HEAD)
    del ckpt["meta"]["key"]  # as written before artifacts recorded their key
    save_checkpoint(path, HEAD, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    old = path.read_bytes()
    assert rerun() == (["heads/beta_0.1/a"], ["heads/beta_0.1/a.stale"])
    assert "is stale: it records no key (written before artifacts recorded what determines them)" in capsys.readouterr().out
    assert next(rerun.out.glob("heads/beta_0.1/a.stale-*/head.pt")).read_bytes() == old


def test_an_interrupted_run_resumes_only_if_it_trained_the_same_inputs(rerun, tiny_data, capsys):
    folder = rerun.out / "heads/beta_0.1/a"
    key = load_checkpoint(folder / "head.pt", HEAD)["meta"]["key"]["sha256"]
    (folder / "head.pt").unlink()
    save_checkpoint(folder / "last.pt", TRAIN_STATE, {"run": {"tag": key}})
    pipe = Pipeline(config(tiny_data, rerun.out))
    assert not pipe._usable("head a", folder / "head.pt", {"sha256": key}, lambda p: None)
    assert (folder / "last.pt").is_file()  # left for the engine to resume
    save_checkpoint(folder / "last.pt", TRAIN_STATE, {"run": {"tag": "another"}})
    assert rerun() == (["heads/beta_0.1/a"], ["heads/beta_0.1/a.stale"])
    assert f"the interrupted run in {folder}/last.pt trained other inputs than this config's" in capsys.readouterr().out


def test_every_artifact_records_its_key(trained):
    from mtfc.model import read_head_checkpoint

    keys = [load_checkpoint(trained / "teacher/teacher.pt")["key"],
            load_codec(trained / "bottleneck/beta_0.1/codec.pt").meta["key"],
            *(read_head_checkpoint(trained / p / "head.pt")["meta"]["key"]
              for p in ("reference/b", "heads/beta_0.1/a", "heads/beta_0.1/b"))]
    assert [k["inputs"]["stage"] for k in keys] == ["teacher", "bottleneck", "reference", "head", "head"]
    teacher = keys[0]["sha256"]
    assert [k["inputs"].get("teacher") for k in keys] == [None, teacher, teacher, teacher, teacher]
    assert keys[4]["inputs"]["reference"] == keys[2]["sha256"]
    assert keys[3]["inputs"]["codec"] == load_codec(trained / "bottleneck/beta_0.1/codec.pt").fingerprint
    data = keys[0]["inputs"]["data"]
    assert data["config"] == {"type": "bundled"}  # where the files are is not part of it
    assert {s: (v["classes"], v["size"]) for s, v in data["identity"].items() if s in ("train", "val")} == {
        "train": (["circle", "square", "triangle"], 8), "val": (["circle", "square", "triangle"], 4)}


def _torchrun_rank(rank: int, port: int, out: Path, start, results) -> None:
    """One rank of a 2-process torchrun-like job (its environment variables, a gloo group over TCP)."""
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    pipe = Pipeline(config(out / "data", out))

    def recorded(path: Path) -> dict:
        if rank == 1:  # rank 1 is still reading the old key when rank 0 would already move the folder
            time.sleep(0.5)
        return {"sha256": "old", "inputs": {"teacher.arch": "resnet10"}}

    start.wait()  # both ranks reach the stage together, as they do after the same earlier stages
    try:
        usable = pipe._usable("teacher", out / "teacher" / "teacher.pt",
                              {"sha256": "new", "inputs": {"teacher.arch": "resnet18"}}, recorded)
        results.put((rank, usable, (out / "teacher").exists()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_under_torchrun_only_rank_zero_moves_a_stale_artifact_aside(tmp_path, capfd):
    import multiprocessing
    import socket

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "teacher.pt").write_bytes(b"stale")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(2), ctx.Queue()
    ranks = [ctx.Process(target=_torchrun_rank, args=(r, port, tmp_path, start, results)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(60)
    assert [p.exitcode for p in ranks] == [0, 0]
    # both ranks retrain, and when either goes on the folder has been moved, once, by rank 0
    assert sorted(results.get(timeout=5) for _ in ranks) == [(0, False, False), (1, False, False)]
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("teacher.stale-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "teacher.pt").read_bytes() == b"stale"
    assert capfd.readouterr().out.count("moved its folder to") == 1
