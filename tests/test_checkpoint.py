"""mtfc.checkpoint: one header, one loader, one error for every artifact — and the layouts written before it."""
import pytest
import torch

import mtfc
from mtfc.checkpoint import (CODEC, HEAD, KINDS, LEARNED_CODEC, TEACHER, TRAIN_STATE, CheckpointError, atomic_save,
                             header, load_checkpoint, save_checkpoint)
from mtfc.codec import load_codec, save_codec
from mtfc.head import HEADS
from mtfc.model import load_head, save_head
from mtfc.teacher import build_teacher, save_teacher


def _head(latent_channels: int = 8):
    torch.manual_seed(0)
    return HEADS.build("classification", latent_channels=latent_channels, num_classes=3, arch="resnet10",
                       hidden_channels=16)


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_one_error_class_a_value_error_exported_at_the_top():
    assert mtfc.CheckpointError is CheckpointError and issubclass(CheckpointError, ValueError)
    assert {k: v.version for k, v in KINDS.items()} == {CODEC: 1, HEAD: 1, TEACHER: 1, TRAIN_STATE: 1,
                                                          LEARNED_CODEC: 1}


def test_round_trip_is_bit_identical(tmp_path, frozen_codec):
    payload = {"state_dict": {"w": torch.randn(3, 4, dtype=torch.float64), "n": torch.arange(5, dtype=torch.int16)},
               "meta": {"beta": 0.5, "stages": ["layer1"]}}
    path = save_checkpoint(tmp_path / "a" / "x.pt", HEAD, payload)
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]  # no temporary file left
    loaded = load_checkpoint(path, HEAD)
    assert (loaded["format"], loaded["version"], loaded["meta"]) == (HEAD, 1, payload["meta"])
    assert _equal_state(loaded["state_dict"], payload["state_dict"])

    codec = load_codec(save_codec(frozen_codec, tmp_path / "codec.pt"))
    assert codec.fingerprint == frozen_codec.fingerprint
    assert _equal_state(codec.state_dict(), frozen_codec.state_dict())
    head = _head()
    again = load_head(save_head(head, tmp_path / "head.pt", codec.fingerprint), codec.fingerprint)
    assert _equal_state(again.state_dict(), head.state_dict())
    teacher = build_teacher("resnet10", 3)
    save_teacher(teacher, "resnet10", tmp_path / "teacher.pt", history={"global_step": 7})
    assert header(torch.load(tmp_path / "teacher.pt", weights_only=True)) == (TEACHER, 1)
    assert _equal_state(build_teacher("resnet10", 3, tmp_path / "teacher.pt").state_dict(), teacher.state_dict())


def test_layouts_written_before_the_uniform_header_still_load(tmp_path, frozen_codec):
    """Exactly what earlier mtfc wrote: codec v1 (unchanged), a head without "version", a teacher
    without "format", a plain state_dict as teacher weights, training state in "mtfc.engine/1"."""
    head, teacher = _head(), build_teacher("resnet10", 3)
    atomic_save({"format": "mtfc-codec", "version": 1, "config": frozen_codec.config,
                 "fingerprint": frozen_codec.fingerprint, "meta": {}, "state_dict": frozen_codec.state_dict()},
                tmp_path / "codec.pt")
    atomic_save({"format": "mtfc-head", "spec": head._mtfc_spec, "task": head.task,
                 "codec_fingerprint": frozen_codec.fingerprint, "meta": {}, "state_dict": head.state_dict()},
                tmp_path / "head.pt")
    atomic_save({"arch": "resnet10", "num_classes": 3, "state_dict": teacher.state_dict(), "history": {}},
                tmp_path / "teacher.pt")
    atomic_save(teacher.state_dict(), tmp_path / "plain.pth")
    atomic_save({"format": "mtfc.engine/1", "epoch": 2}, tmp_path / "last.pt")

    assert load_codec(tmp_path / "codec.pt").fingerprint == frozen_codec.fingerprint
    assert _equal_state(load_head(tmp_path / "head.pt", frozen_codec.fingerprint).state_dict(), head.state_dict())
    for name in ("teacher.pt", "plain.pth"):
        assert _equal_state(build_teacher("resnet10", 3, tmp_path / name).state_dict(), teacher.state_dict())
    assert load_checkpoint(tmp_path / "last.pt", TRAIN_STATE)["epoch"] == 2
    names = ("codec.pt", "head.pt", "teacher.pt", "last.pt")
    headers = [header(torch.load(tmp_path / n, weights_only=True)) for n in names]
    assert headers == [(CODEC, 1), (HEAD, 1), (TEACHER, 1), (TRAIN_STATE, 1)]


def test_every_error_names_the_file_and_the_fix(tmp_path, frozen_codec):
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match=f"^teacher checkpoint {missing} does not exist; "
                                              "`mtfc train-teacher CONFIG` writes it$"):
        build_teacher("resnet10", 3, missing)

    good = save_codec(frozen_codec, tmp_path / "codec.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=f"^cannot read {tmp_path / 'cut.pt'}: truncated, corrupt or not a "
                                              r"weights-only checkpoint \(.*\); `mtfc train-bottleneck CONFIG`"):
        load_codec(tmp_path / "cut.pt")

    head_path = save_head(_head(), tmp_path / "head.pt", frozen_codec.fingerprint)
    with pytest.raises(CheckpointError, match=f"^{head_path} is a head checkpoint, not a codec artifact: pass the "
                                              "file `mtfc train-bottleneck CONFIG`"):
        load_codec(head_path)

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'tensor.pt'} holds a Tensor, not an mtfc checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt", HEAD)

    save_teacher(build_teacher("resnet10", 3), "resnet10", tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'teacher.pt'} holds a resnet10 teacher, the config asks "
                                              "for resnet18: set teacher.arch to resnet10"):
        build_teacher("resnet18", 3, tmp_path / "teacher.pt")


def test_a_version_from_the_future_is_refused(tmp_path, frozen_codec):
    art = torch.load(save_codec(frozen_codec, tmp_path / "codec.pt"), weights_only=True)
    torch.save({**art, "version": 2}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'future.pt'} is a codec artifact of version 2, written "
                                              "by a newer mtfc; this mtfc reads versions up to 1: upgrade mtfc"):
        load_codec(tmp_path / "future.pt")
