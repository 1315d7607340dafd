"""The bundled multi-task dataset (:func:`~mtfc.data.make_dataset`) read from its standard files:
``label`` from the ImageFolder path, ``boxes``/``classes``/``masks`` from the COCO JSON, ``sem_seg``
from the MMSeg label map."""
from __future__ import annotations

import json
from pathlib import Path

from .base import DatasetError, TaskDataset, label_lut, palette
from .coco import coco_records, load_coco
from .registry import DATASETS
from .synthetic import FORMAT, LAYOUT


def read_info(root: Path) -> dict:
    """``{root}/dataset.json``, checked to describe a bundled dataset."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; {root} is not an mtfc bundled dataset (make one with "
                           f"`mtfc make-dataset --root {root}`)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT or not info.get("class_names"):
        raise DatasetError(f"{path}: not an {FORMAT} dataset description")
    info.setdefault("layout", LAYOUT)
    return info


class MultiTaskDataset(TaskDataset):
    """Every target of the bundled dataset for each image (see the module docstring); ``image_size``
    defaults to the generated size. ``strict``: see :func:`~mtfc.data.load_coco`."""

    def __init__(self, root: str | Path, split: str, *, image_size: int | tuple[int, int] | None = None,
                 train: bool = False, augment: dict | None = None, strict: bool = False,
                 on_corrupt: str = "error", resize: str = "letterbox", size_divisibility: int = 1) -> None:
        root = Path(root)
        info = read_info(root)
        names = list(info["class_names"])
        splits = info.get("config", {}).get("splits", {})
        if split not in splits:
            raise DatasetError(f"{root / 'dataset.json'}: no split {split!r} (splits: {sorted(splits)})")
        layout = info["layout"]
        image_root = root / layout["image_root"].format(split=split)
        seg_root = root / layout["seg_map_root"].format(split=split)
        coco = load_coco(root / layout["ann_file"].format(split=split), strict=strict)
        if [c["name"] for c in coco.categories] != names:
            raise DatasetError(f"{coco.path}: categories {[c['name'] for c in coco.categories]} do not match "
                               f"class_names {names} of {root / 'dataset.json'}")
        records = coco_records(coco, image_root)
        for record, image in zip(records, coco.images):
            class_dir = Path(image["file_name"]).parts[0]
            if class_dir not in names:
                raise DatasetError(f"{coco.path}: image {image['id']} file {image['file_name']!r} is not in a "
                                   f"class folder (unknown class {class_dir!r}; classes: {names})")
            record.label = names.index(class_dir)
            record.seg_map_path = (seg_root / image["file_name"]).with_suffix(".png")
        super().__init__(records, class_names=names, image_size=image_size or info["config"]["image_size"],
                         train=train, augment=augment, seg_lut=label_lut(len(names)), with_masks=coco.has_masks,
                         ann_file=coco.path, image_root=image_root, description=str(coco.path),
                         on_corrupt=on_corrupt, resize=resize, size_divisibility=size_divisibility)
        self.root = root
        self.coco = coco


@DATASETS.register("bundled")
def build_bundled(cfg: dict, split: str, **options) -> MultiTaskDataset:
    """The bundled dataset at ``root`` (``image_size`` defaults to the generated size)."""
    return MultiTaskDataset(cfg["root"], split, **options)


def mmseg_dataset_config(root: str | Path, split: str, *, pipeline: list[dict] | None = None) -> dict:
    """An MMSeg dataset config for a split of the bundled dataset (``DATASETS.build(cfg)`` or
    ``BaseSegDataset(**cfg minus type)``); ``pipeline`` defaults to loading image + annotation."""
    info = read_info(Path(root))
    names = info["class_names"]
    return {
        "type": "BaseSegDataset",
        "data_root": str(root),
        "data_prefix": {"img_path": info["layout"]["image_root"].format(split=split),
                        "seg_map_path": info["layout"]["seg_map_root"].format(split=split)},
        "img_suffix": ".png",
        "seg_map_suffix": ".png",
        "reduce_zero_label": False,
        "metainfo": {"classes": ("background", *names), "palette": palette(len(names))},
        "pipeline": pipeline if pipeline is not None else [
            {"type": "LoadImageFromFile"}, {"type": "LoadAnnotations"}, {"type": "PackSegInputs"}],
    }
