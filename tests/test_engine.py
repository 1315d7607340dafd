"""The training engine: bit-exact resume (crash, SIGKILL, max_steps), atomic checkpoints, DDP, logging."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtfc.checkpoint import CheckpointError, atomic_save, load_checkpoint
from mtfc.engine import fit, to_device
from mtfc.optim import OptimSpec, lr_factor

sys.path.insert(0, str(Path(__file__).parent))
from _engine_task import FIT_KWARGS, N_TRAIN, NoisyDataset, TinyTask, collate  # noqa: E402

SCRIPT = Path(__file__).with_name("_engine_task.py")
REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = FIT_KWARGS["epochs"] * N_TRAIN // FIT_KWARGS["batch_size"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the subprocesses use one thread too: identical kernels, so runs can be compared bit for bit
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(out_dir: Path, task: TinyTask | None = None, train_set: NoisyDataset | None = None, **kwargs):
    task = task or TinyTask()
    kwargs = {**FIT_KWARGS, "val_set": NoisyDataset(n=4), "collate_fn": collate, **kwargs}
    history = fit(task, train_set or NoisyDataset(), out_dir=out_dir, **kwargs)
    return task, history


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


def train_part(history: dict) -> list:
    return [(r["epoch"], r["steps"], r["train"], r.get("val")) for r in history["epochs"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run that every interrupted run must reproduce exactly."""
    out = tmp_path_factory.mktemp("reference")
    task, history = train(out)
    return out, task, history


def test_reference_run_logs_and_checkpoint(reference):
    out, task, history = reference
    assert [r["epoch"] for r in history["epochs"]] == [0, 1]
    assert history["global_step"] == TOTAL_STEPS and history["val"] == history["epochs"][-1]["val"]
    steps = N_TRAIN // FIT_KWARGS["batch_size"]
    for r in history["epochs"]:  # per-epoch means of what the task returned
        assert r["train"]["loss"] == pytest.approx(sum(task.losses[r["epoch"] * steps:][:steps]) / steps)
        assert set(r["train"]) == {"loss", "aux_loss", "acc"} and r["val"] == {"top1": 0.5} and r["lr"] == 0.01
    assert task.val_modes == [(False, False)] * 2 and task.training
    assert task.dtypes == {torch.float32}  # amp=True is plain fp32 on the CPU
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == history["epochs"]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    ckpt = torch.load(out / "last.pt", weights_only=True)  # plain data only
    assert (ckpt["format"], ckpt["version"]) == ("mtfc-train-state", 1)
    assert ckpt["done"] and ckpt["global_step"] == TOTAL_STEPS and ckpt["history"] == history["epochs"]
    assert_same_params(ckpt["task"], task.state_dict())
    assert not any(torch.equal(task.state_dict()[k], v) for k, v in TinyTask().state_dict().items())
    assert not list(out.glob(".*.tmp"))


def test_crash_mid_epoch_resumes_bit_exact(tmp_path, reference):
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, train_set=NoisyDataset(fail_after=13))  # dies in step 7; last checkpoint at step 6
    assert load_checkpoint(tmp_path / "last.pt")["global_step"] == 6
    (tmp_path / ".last.pt.99999.tmp").write_bytes(b"half a checkpoint")  # as a kill during a save leaves it
    task, history = train(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
    assert len(task.losses) == TOTAL_STEPS - 6  # continued mid-epoch, did not start over
    assert_same_params(task.state_dict(), reference[1].state_dict())
    assert train_part(history) == train_part(reference[2])


def test_max_steps_stop_then_continue_bit_exact(tmp_path, reference):
    task, history = train(tmp_path, max_steps=5)
    assert history["global_step"] == 5 and [r["steps"] for r in history["epochs"]] == [5]
    assert "top1" in history["val"]  # validated at the end
    assert load_checkpoint(tmp_path / "last.pt")["done"]
    task, history = train(tmp_path)
    assert len(task.losses) == TOTAL_STEPS - 5
    assert_same_params(task.state_dict(), reference[1].state_dict())
    assert train_part(history) == train_part(reference[2])


def test_validation_does_not_change_training(tmp_path, reference):
    task, history = train(tmp_path, val_set=None)
    assert_same_params(task.state_dict(), reference[1].state_dict())
    assert history["val"] == {} and all("val" not in r for r in history["epochs"])


def test_finished_run_returns_at_once(reference):
    out, ref_task, ref_history = reference
    before = (out / "last.pt").stat().st_mtime_ns
    task, history = train(out, train_set=NoisyDataset(fail_after=0))  # any data access would raise
    assert history == ref_history and task.losses == []
    assert_same_params(task.state_dict(), ref_task.state_dict())  # the task gets the trained weights
    assert (out / "last.pt").stat().st_mtime_ns == before


def test_sigkill_mid_epoch_loses_nothing_beyond_last_checkpoint(tmp_path, reference):
    ckpt_path = tmp_path / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "--sleep", "0.05"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 60
            while True:  # wait for a checkpoint in the middle of the second epoch
                assert proc.poll() is None, f"run ended before the kill: {(tmp_path / 'stderr.txt').read_text()}"
                assert time.monotonic() < deadline, "no mid-epoch checkpoint within 60 s"
                if ckpt_path.exists():
                    c = load_checkpoint(ckpt_path)
                    if c["epoch"] == 1 and c["step_in_epoch"] > 0:
                        break
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    ckpt = load_checkpoint(ckpt_path)  # intact whatever the moment of the kill
    assert not ckpt["done"] and ckpt["epoch"] == 1 and 0 < ckpt["step_in_epoch"]
    task, history = train(tmp_path)
    assert len(task.losses) == TOTAL_STEPS - ckpt["global_step"]
    assert_same_params(task.state_dict(), reference[1].state_dict())
    assert train_part(history) == train_part(reference[2])


def test_unreadable_checkpoints_are_named(tmp_path, reference):
    good = (reference[0] / "last.pt").read_bytes()
    cases = {"truncated": good[: len(good) // 2], "garbage": b"not a checkpoint at all"}
    for name, data in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "last.pt").write_bytes(data)
    torch.save(argparse.Namespace(x=1), tmp_path / "pickled.pt")  # needs full unpickling
    for path in (tmp_path / "truncated" / "last.pt", tmp_path / "garbage" / "last.pt", tmp_path / "pickled.pt"):
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match=str(tmp_path / "truncated" / "last.pt")):
        train(tmp_path / "truncated")
    atomic_save({"state_dict": {}}, tmp_path / "other" / "last.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'other' / 'last.pt'} is format None, not a training "
                                              "checkpoint"):
        train(tmp_path / "other")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'missing.pt'} does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_the_task_chooses_its_schedule(tmp_path):
    """``task.optim`` is the schedule when ``fit`` gets none; ``fit(optim=...)`` overrides it."""
    spec = OptimSpec(schedule="cosine", warmup=0.0, final_lr=0.5)
    task = TinyTask()
    task.optim = spec
    _, history = train(tmp_path / "task", task=task, val_set=None)
    steps = N_TRAIN // FIT_KWARGS["batch_size"]
    assert [r["lr"] for r in history["epochs"]] == [1e-2 * lr_factor(spec, s * steps - 1, TOTAL_STEPS) for s in (1, 2)]
    assert json.loads((tmp_path / "task" / "log.jsonl").read_text().splitlines()[0])["lr"] == history["epochs"][0]["lr"]
    task = TinyTask()
    task.optim = spec
    _, history = train(tmp_path / "override", task=task, val_set=None, optim=OptimSpec(schedule="constant"))
    assert [r["lr"] for r in history["epochs"]] == [1e-2, 1e-2]
    task.optim = {"lr": 1e-3}
    with pytest.raises(TypeError, match="TinyTask.optim must be an mtfc.optim.OptimSpec, got dict"):
        train(tmp_path / "bad", task=task)


def test_resume_refuses_a_different_run(tmp_path):
    train(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="batch_size"):
        train(tmp_path, batch_size=4)
    task, history = train(tmp_path / "fresh", batch_size=4, resume=False, epochs=1)
    assert history["global_step"] == N_TRAIN // 4


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "artifact.pt"
    atomic_save({"v": torch.arange(3)}, path)
    with pytest.raises(Exception):
        atomic_save({"v": lambda: 0}, path)  # cannot be pickled: fails mid-write
    assert torch.equal(load_checkpoint(path)["v"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.pt"]


class NoAux(TinyTask):
    def forward(self, batch):
        return {"loss": super().forward(batch)["loss"]}


class Shared(TinyTask):
    def configure_optimizers(self):
        return {"loss": torch.optim.Adam(self.parameters()), "aux_loss": torch.optim.SGD([self.centre], lr=0.1)}


class NotScalar(TinyTask):
    def forward(self, batch):
        return {**super().forward(batch), "per_image": torch.zeros(2)}


class NoValidate(TinyTask):
    validate = None


@pytest.mark.parametrize("task_cls, error, match", [
    (NoAux, KeyError, "aux_loss"), (Shared, ValueError, "disjoint"),
    (NotScalar, ValueError, "per_image"), (NoValidate, TypeError, "validate")])
def test_task_contract_errors(tmp_path, task_cls, error, match):
    with pytest.raises(error, match=match):
        train(tmp_path, task=task_cls())


def test_val_every_progress_and_workers(tmp_path, capsys):
    task, history = train(tmp_path / "a", epochs=3, val_every=2, progress=True)
    assert ["val" in r for r in history["epochs"]] == [False, True, True]  # every 2nd epoch and the end
    assert len(task.val_modes) == 2
    err = capsys.readouterr().err
    assert "epoch 3/3" in err and "loss=" in err and "img/s" in err
    # worker processes are seeded from (seed, epoch): two runs with workers agree
    runs = [train(tmp_path / name, epochs=1, num_workers=2)[0].state_dict() for name in "bc"]
    assert_same_params(*runs)


def test_to_device_moves_nested_tensors():
    batch = (torch.zeros(2, 3), [{"boxes": torch.ones(1, 4), "file_name": "a.png", "size": (4, 4)}])
    images, targets = to_device(batch, "meta")
    assert images.is_meta and targets[0]["boxes"].is_meta
    assert targets[0]["file_name"] == "a.png" and targets[0]["size"] == (4, 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(SCRIPT), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [load_checkpoint(tmp_path / f"rank{r}.pt") for r in range(2)]
    steps = FIT_KWARGS["epochs"] * N_TRAIN // (2 * FIT_KWARGS["batch_size"])
    assert [r["calls"] for r in ranks] == [steps, steps]  # each rank saw half of the data
    assert_same_params(ranks[0]["task"], ranks[1]["task"])  # gradients were averaged across ranks
    assert train_part(ranks[0]["history"]) == train_part(ranks[1]["history"])
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["done"] and ckpt["global_step"] == steps and ckpt["run"]["world_size"] == 2
    assert_same_params(ckpt["task"], ranks[0]["task"])
    assert not torch.equal(ckpt["ranks"][0]["rng"]["torch"], ckpt["ranks"][1]["rng"]["torch"])
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1  # only rank 0 writes


class WithFrozenInput(TinyTask):
    """TinyTask plus a frozen module it only reads (as a teacher): its weights are not training state."""

    frozen_modules = ("teacher",)

    def __init__(self) -> None:
        super().__init__()
        self.teacher = torch.nn.Linear(3, 3).requires_grad_(False)

    def forward(self, batch):
        out = super().forward(batch)
        out["loss"] = out["loss"] + 0.0 * self.teacher(self.centre[None]).sum()
        return out


def test_last_pt_leaves_the_frozen_modules_out_and_still_resumes_exactly(tmp_path):
    full, _ = train(tmp_path / "full", WithFrozenInput())
    saved = load_checkpoint(tmp_path / "full" / "last.pt")["task"]
    assert sorted(saved) == sorted(k for k in full.state_dict() if not k.startswith("teacher."))
    train(tmp_path / "cut", WithFrozenInput(), max_steps=3)
    resumed, _ = train(tmp_path / "cut", WithFrozenInput())
    assert_same_params(resumed.state_dict(), full.state_dict())


def test_a_run_with_another_tag_is_not_resumed(tmp_path):
    train(tmp_path, max_steps=2, tag="codec β=0.1 of config A")
    with pytest.raises(ValueError) as e:
        train(tmp_path, tag="codec β=0.1 of config B")
    assert e.value.args[0] == (f"{tmp_path / 'last.pt'} is the training state of 'codec β=0.1 of config A', this "
                               "run trains 'codec β=0.1 of config B'; pass resume=False or use another out_dir")


def test_clear_state_removes_the_training_state(tmp_path):
    from mtfc.engine import clear_state

    train(tmp_path, max_steps=1)
    clear_state(tmp_path)
    assert not (tmp_path / "last.pt").exists()
    clear_state(tmp_path)  # nothing to remove: no error


@pytest.mark.parametrize("n, steps", [(9, 4), (10, 5), (1, 1)])
def test_no_batch_of_one_image(tmp_path, n, steps):
    """9 samples at batch 2: the 9th would train alone (BatchNorm cannot), so an epoch is 4 batches of 2;
    a dataset of one image still trains."""
    task, history = train(tmp_path, train_set=NoisyDataset(n=n), epochs=1, val_set=None)
    assert history["global_step"] == steps and history["epochs"][0]["steps"] == steps
