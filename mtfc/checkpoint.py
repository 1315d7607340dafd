"""Every file mtfc writes — codec artifacts, head and teacher checkpoints, training state — in one format.

A file is a ``dict`` saved with ``torch.save`` holding only plain data and tensors, so it loads with
``torch.load(weights_only=True)``. Its header is two keys, ``"format"`` (the kind of file, one of
:data:`KINDS`) and ``"version"`` (of that kind's layout); the rest is the kind's payload. Writes are
atomic (:func:`atomic_save`). Reading (:func:`load_checkpoint`) checks the header and raises one
error, :class:`CheckpointError`, whose message names the file and what to do.

Files written before the header was uniform still load: head checkpoints without ``"version"`` are
version 1, teacher checkpoints without ``"format"`` are recognised by their ``"arch"`` and
``"state_dict"``, and training state in format ``"mtfc.engine/1"`` is ``mtfc-train-state`` version 1.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mtfc.gitstate import code_state


class Kind(NamedTuple):
    version: int  #: the newest layout this mtfc writes and reads
    what: str  #: how messages call a file of this kind
    made_by: str  #: what writes it: the fix for a missing or broken file


CODEC, HEAD, TEACHER, TRAIN_STATE = "mtfc-codec", "mtfc-head", "mtfc-teacher", "mtfc-train-state"
LEARNED_CODEC = "mtfc-learned-codec"
KINDS: dict[str, Kind] = {
    CODEC: Kind(1, "codec artifact", "`mtfc train-bottleneck CONFIG` (or `mtfc.save_codec`)"),
    HEAD: Kind(1, "head checkpoint", "`mtfc train-head CONFIG` (or `MultiTaskModel.save_head`)"),
    TEACHER: Kind(1, "teacher checkpoint", "`mtfc train-teacher CONFIG`"),
    TRAIN_STATE: Kind(1, "training checkpoint", "any training command (`mtfc.engine.fit`)"),
    LEARNED_CODEC: Kind(1, "learned-codec baseline", "`mtfc run CONFIG` (`evaluation.learned_baselines`)"),
}
_LEGACY_FORMATS = {"mtfc.engine/1": (TRAIN_STATE, 1)}


class CheckpointError(ValueError):
    """A checkpoint or artifact is missing, unreadable, of another kind, too new, or does not match
    its fingerprint; the message names the file and the fix."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` ``obj`` so that a crash at any moment leaves either the old ``path`` or the new one.

    Writes a temporary file in the same directory, fsyncs it, ``os.replace``-s it over ``path`` and
    fsyncs the directory so the rename itself is durable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def save_checkpoint(path: str | Path, kind: str, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` under the header of ``kind`` (its current version) and the state of the
    code that wrote it (``code``: :func:`~mtfc.gitstate.code_state`, checked by the report's provenance)."""
    return atomic_save({"format": kind, "version": KINDS[kind].version, "code": code_state(), **payload}, path)


def written_by(path: str | Path) -> dict[str, Any] | None:
    """The code state (:func:`~mtfc.gitstate.code_state`) an artifact recorded when it was written; ``None``
    for one written before artifacts recorded it. Memory-maps the file: reads no weights."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("code")


def load_checkpoint(path: str | Path, kind: str | None = None, *, map_location: str | torch.device = "cpu",
                    plain_state_dict: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; with ``kind``, check its header.

    ``plain_state_dict`` also accepts a bare ``state_dict`` (a dict of tensors, e.g. torchvision's
    ``.pth`` files), returned as ``{"state_dict": ...}``. Raises :class:`CheckpointError` if the file
    is missing, unreadable or truncated, of another kind, or of a newer version than this mtfc reads.
    """
    path = Path(path)
    want = KINDS.get(kind) if kind else None
    made = f"; {want.made_by} writes it" if want else ""
    if not path.is_file():
        raise CheckpointError(f"{want.what if want else 'checkpoint'} {path} does not exist{made}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read {path}: truncated, corrupt or not a weights-only checkpoint "
                              f"({type(exc).__name__}: {reason}){made or '; write it again'}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not an mtfc checkpoint (a dict){made}")
    if want is None:
        return obj
    found, version = header(obj)
    if found is None and plain_state_dict and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}
    if found != kind:
        described = f"a {KINDS[found].what}" if found in KINDS else f"format {obj.get('format')!r}"
        raise CheckpointError(f"{path} is {described}, not a {want.what}: pass the file {want.made_by} writes")
    if not isinstance(version, int) or version > want.version:
        raise CheckpointError(f"{path} is a {want.what} of version {version!r}, written by a newer mtfc; this mtfc "
                              f"reads versions up to {want.version}: upgrade mtfc, or re-create the file with "
                              f"{want.made_by}")
    return obj


def header(obj: dict[str, Any]) -> tuple[str | None, int | None]:
    """``(kind, version)`` of a loaded checkpoint, including the layouts written before the uniform
    header; ``(None, None)`` for a dict that is not an mtfc checkpoint."""
    fmt = obj.get("format")
    if fmt in _LEGACY_FORMATS:
        return _LEGACY_FORMATS[fmt]
    if fmt in KINDS:
        return fmt, obj.get("version", 1)
    if fmt is None and "arch" in obj and "state_dict" in obj:
        return TEACHER, 1
    return None, None
