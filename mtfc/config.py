"""The keys a config may hold, checked before anything runs: a misspelled key is an error with a
did-you-mean instead of a silently ignored setting."""
from __future__ import annotations

import difflib
from typing import Any, Iterable

_FIT = {"epochs", "batch_size", "num_workers", "max_steps", "ckpt_every", "val_every", "amp", "optim", "data"}
SECTIONS: dict[str, set[str]] = {
    "": {"out_dir", "seed", "device", "data", "teacher", "bottleneck", "heads", "evaluation"},
    "data": {"type", "root", "image_size", "augment", "generate", "ann_file", "image_root", "dir", "img_dir",
             "ann_dir"},
    "teacher": _FIT | {"arch", "weights", "num_classes"},
    "bottleneck": _FIT | {"betas", "codec", "stages", "select_taps", "saliency", "aux_lr", "entropy_lr"},
    "head": _FIT | {"type", "reference", "distill", "kwargs"},
    "evaluation": {"batch_size", "baselines"},
}


def check_keys(section: dict[str, Any], known: Iterable[str], where: str) -> None:
    """Raise ``KeyError`` naming the first key of ``section`` not in ``known`` and the closest valid one."""
    known = sorted(known)
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(known)}"
            raise KeyError(f"unknown config key {where + '.' if where else ''}{key}: {hint}")


def check_config(cfg: dict[str, Any]) -> None:
    """Check every section's keys (and each stage's ``optim``) of a pipeline config."""
    from mtfc.optim import OptimSpec

    check_keys(cfg, SECTIONS[""], "")
    check_keys(cfg.get("data") or {}, SECTIONS["data"], "data")
    for name in ("teacher", "bottleneck", "evaluation"):
        check_keys(cfg.get(name) or {}, SECTIONS[name], name)
    stages = {"teacher": cfg.get("teacher") or {}, "bottleneck": cfg.get("bottleneck") or {}}
    for head, spec in (cfg.get("heads") or {}).items():
        check_keys(spec, SECTIONS["head"], f"heads.{head}")
        stages[f"heads.{head}"] = spec
    for where, stage in stages.items():
        check_keys(stage.get("data") or {}, SECTIONS["data"], f"{where}.data")
        OptimSpec.from_dict(stage.get("optim"), f"{where}.optim")
