"""ImageFolder trees (``root/<class_name>/<image>``, as ImageNet's ``train`` and ``val``) → ``label``.

Every split of one dataset takes its class list from the train split, so that a val folder missing
some classes keeps the train labels; the folder listing is cached per process (:data:`SCANS`).
Type ``imagenet`` evaluates (every split but train) with torchvision's reference protocol, resize
the shorter side to ``eval_resize`` (default ``round(image_size * 256 / 224)``) and crop the centre
``image_size``, as pretrained ImageNet classifiers are scored; ``imagefolder`` does so when its data
block sets ``eval_resize`` and letterboxes otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import DatasetError, FileCache, Record, TaskDataset
from .registry import DATASETS, split_path
from .transforms import reference_resize, size_hw

SCANS = FileCache()
"""Folder listings already made in this process (keyed by the folder and its class folders' mtimes)."""


def find_classes(root: Path) -> list[str]:
    """The class folders of an ImageFolder tree, sorted (torchvision's ``find_classes``)."""
    from torchvision.datasets.folder import find_classes as torchvision_find_classes

    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    try:
        return torchvision_find_classes(str(root))[0]
    except FileNotFoundError as err:
        raise DatasetError(f"{root}: {err}") from err


def scan_image_folder(root: Path, class_names: Sequence[str], class_source: str = "") -> list[tuple[str, int]]:
    """``(path, label)`` for every image of ``root/<class>/`` with ``label = class_names.index(class)``
    (torchvision's ``make_dataset``: sorted, image extensions only); cached in :data:`SCANS`.
    ``class_source`` names where the class list came from, for errors."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    present = find_classes(root)
    unknown = [name for name in present if name not in class_names]
    if unknown:
        raise DatasetError(f"{root / unknown[0]}: class folder {unknown[0]!r} is not one of the "
                           f"{len(class_names)} classes{' of ' + class_source if class_source else ''} "
                           f"(unknown folders: {unknown})")
    index = {name: class_names.index(name) for name in present}

    def scan() -> list[tuple[str, int]]:
        return make_dataset(str(root), index, extensions=IMG_EXTENSIONS, allow_empty=True)

    return SCANS.get((str(root.resolve()), tuple(class_names)), [root, *(root / name for name in present)], scan)


class ClassificationDataset(TaskDataset):
    """A torchvision ``ImageFolder`` tree (``root/<class_name>/<image>``) → ``label``.

    ``class_names`` (default: the sorted class folders) is the class list that labels index; every
    class folder must be in it, and it may have classes without a folder (a val split that lacks
    some of train's classes). ``class_source`` names where the list came from, for errors.
    ``eval_resize``: see :class:`~mtfc.data.base.TaskDataset`."""

    def __init__(self, root: str | Path, *, image_size: int | tuple[int, int], train: bool = False,
                 augment: dict | None = None, class_names: Sequence[str] | None = None, class_source: str = "",
                 on_corrupt: str = "error", eval_resize: int | None = None, resize: str = "letterbox",
                 size_divisibility: int = 1) -> None:
        root = Path(root)
        class_names = list(class_names) if class_names is not None else find_classes(root)
        records = [Record(image_path=Path(path), image_id=i, source=str(root), label=label)
                   for i, (path, label) in enumerate(scan_image_folder(root, class_names, class_source))]
        super().__init__(records, class_names=class_names, image_size=image_size, train=train,
                         augment=augment, image_root=root, description=str(root), on_corrupt=on_corrupt,
                         eval_resize=eval_resize, resize=resize, size_divisibility=size_divisibility)


@DATASETS.register("imagenet", keys=("dir", "eval_resize"), image_size=224)
def build_imagenet(cfg: dict, split: str, **options) -> ClassificationDataset:
    """An ImageFolder tree (:func:`build_image_folder`) whose splits other than train are evaluated
    with torchvision's reference protocol; ``eval_resize`` defaults to ``round(image_size * 256 / 224)``."""
    return _build(cfg, split, "imagenet", reference_resize(options["image_size"]), **options)


@DATASETS.register("imagefolder", keys=("dir", "eval_resize"), image_size=224)
def build_image_folder(cfg: dict, split: str, **options) -> ClassificationDataset:
    """``{root}/{dir}`` (default ``dir``: ``{split}``); other splits take the classes of the train split's
    folder when it exists. Evaluation letterboxes unless ``eval_resize`` is set."""
    return _build(cfg, split, "imagefolder", None, **options)


def _build(cfg: dict, split: str, kind: str, default_resize: int | None, *, strict: bool,
           **options) -> ClassificationDataset:
    eval_resize = default_resize if cfg.get("eval_resize") is None else cfg["eval_resize"]
    if eval_resize is not None:
        side = max(size_hw(options["image_size"]))
        if isinstance(eval_resize, bool) or not isinstance(eval_resize, int) or eval_resize < side:
            raise DatasetError(f"data block ({kind}): eval_resize must be an integer of at least {side} (the "
                               f"largest side of image_size), got {eval_resize!r}")
    pattern = cfg.get("dir", "{split}")
    folder = cfg["root"] / split_path(pattern, split)
    class_names, source = None, ""
    if split != "train" and (not isinstance(pattern, dict) or "train" in pattern):
        train_folder = cfg["root"] / split_path(pattern, "train")
        if train_folder.is_dir() and train_folder.resolve() != folder.resolve():
            class_names, source = find_classes(train_folder), f"the train split {train_folder}"
    return ClassificationDataset(folder, class_names=class_names, class_source=source, eval_resize=eval_resize,
                                 **options)
