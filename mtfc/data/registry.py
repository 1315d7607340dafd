"""The catalog of dataset types: ``type:`` in a data block → a builder, as Detectron2's
``DatasetCatalog``. Each format module registers its builders with ``@DATASETS.register``; a user
module can register its own type the same way (``imports:`` in the config loads it)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .base import ON_CORRUPT, DatasetError, TaskDataset
from .transforms import RESIZE

COMMON_KEYS = ("type", "root", "image_size", "augment", "strict", "on_corrupt", "resize")
"""Keys every data block may have (see :func:`build_dataset`)."""

Builder = Callable[..., TaskDataset]


@dataclass(frozen=True)
class DatasetType:
    """A registered dataset type: its builder, the keys it reads besides :data:`COMMON_KEYS`, its
    default ``image_size`` and its default ``resize`` (:data:`~mtfc.data.transforms.RESIZE`)."""

    name: str
    build: Builder
    keys: tuple[str, ...] = ()
    image_size: int | None = None
    resize: str = "letterbox"


class DatasetRegistry(dict):
    """Type name → :class:`DatasetType`; ``@DATASETS.register("name", keys=(...), image_size=..., resize=...)`` on a
    builder ``build(cfg, split, *, train, image_size, augment, strict, on_corrupt, resize, size_divisibility)``
    (the last two for :class:`~mtfc.data.TaskDataset`), where ``cfg`` is the data block with ``root``
    made a :class:`~pathlib.Path`."""

    def register(self, *names: str, keys: tuple[str, ...] = (), image_size: int | None = None,
                 resize: str = "letterbox") -> Callable[[Builder], Builder]:
        if resize not in RESIZE:
            raise ValueError(f"resize must be one of {list(RESIZE)}, got {resize!r}")

        def decorate(build: Builder) -> Builder:
            for name in names:
                if name in self:
                    raise KeyError(f"dataset type {name!r} is already registered")
                self[name] = DatasetType(name, build, tuple(keys), image_size, resize)
            return build

        return decorate


DATASETS = DatasetRegistry()
"""Registered dataset types by name (lower case)."""


def split_path(spec: str | dict, split: str) -> str:
    """A per-split path: ``{split}`` substituted in a string, or the split's entry of a dict."""
    if isinstance(spec, dict):
        if split not in spec:
            raise DatasetError(f"no split {split!r} for this dataset (splits: {sorted(spec)})")
        return spec[split]
    return spec.format(split=split)


def build_dataset(cfg: dict, split: str, train: bool = False, size_divisibility: int = 1) -> TaskDataset:
    """Build a split's dataset from a data block (as declared in YAML).

    Every type takes ``type``, ``root``, ``image_size`` (int or [H, W]; default per type),
    ``augment`` (for :func:`~mtfc.data.transforms.build_transforms`), ``strict`` (default false:
    degenerate annotations are skipped with a :class:`~mtfc.data.DatasetWarning` counting them;
    true: they are errors), ``on_corrupt`` (``error``, the default, or ``skip``: undecodable
    images are skipped with a warning) and ``resize`` (how evaluation fits images to ``image_size``,
    :data:`~mtfc.data.transforms.RESIZE`: ``letterbox`` pads to the whole canvas, ``keep_aspect`` only
    to multiples of ``size_divisibility``, the codec's; default per type: ``keep_aspect`` for the
    photographs of COCO, ADE20K, VOC and Cityscapes, ``letterbox`` for the rest). The type's own keys
    are in :data:`DATASETS` (``keys``); other keys are errors. Paths other than ``root`` are relative to
    it; ``{split}`` is substituted.
    """
    if not isinstance(cfg, dict) or "type" not in cfg or "root" not in cfg:
        raise DatasetError(f"dataset config needs 'type' and 'root', got {cfg!r}")
    kind = str(cfg["type"]).lower()
    if kind not in DATASETS:
        raise DatasetError(f"unknown dataset type {cfg['type']!r} (known: {', '.join(sorted(DATASETS))})")
    spec = DATASETS[kind]
    known = COMMON_KEYS + spec.keys
    for key in cfg:
        if key not in known:
            owners = sorted(name for name, other in DATASETS.items() if key in other.keys)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = (f"it belongs to type {'/'.join(owners)}" if owners else
                    f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(known)}")
            raise DatasetError(f"unknown key {key!r} in the {kind} data block: {hint}")
    on_corrupt = cfg.get("on_corrupt") or "error"
    if on_corrupt not in ON_CORRUPT:
        raise DatasetError(f"data block ({kind}): on_corrupt must be one of {list(ON_CORRUPT)}, got {on_corrupt!r}")
    strict = cfg.get("strict") or False
    if not isinstance(strict, bool):
        raise DatasetError(f"data block ({kind}): strict must be true or false, got {strict!r}")
    resize = cfg.get("resize") or spec.resize
    if resize not in RESIZE:
        close = difflib.get_close_matches(str(resize), RESIZE, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {list(RESIZE)}"
        raise DatasetError(f"data block ({kind}): unknown resize {resize!r}: {hint}")
    options: dict[str, Any] = {"train": train, "augment": cfg.get("augment"), "strict": strict,
                               "on_corrupt": on_corrupt, "image_size": cfg.get("image_size") or spec.image_size,
                               "resize": resize, "size_divisibility": size_divisibility}
    return spec.build({**cfg, "root": Path(cfg["root"])}, split, **options)
