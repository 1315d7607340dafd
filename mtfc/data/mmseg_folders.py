"""Semantic segmentation folders listed by MMSeg's dataset classes → ``sem_seg``: ADE20K, Pascal VOC,
Cityscapes (mmseg lists the image / label-map pairs, mtfc reads them and maps the labels to its
convention: 0 background, k+1 class k, 255 ignore)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import DatasetError, Record, TaskDataset, label_lut
from .registry import DATASETS, split_path


class SegmentationDataset(TaskDataset):
    """Images + single-channel label maps listed by an MMSeg dataset → ``sem_seg``.

    ``mmseg_cfg`` is an MMSeg dataset config (``type`` is any registered MMSeg dataset, e.g.
    ``BaseSegDataset``, ``ADE20KDataset``); MMSeg lists the files, mtfc reads them. ``lut`` maps raw
    label values to mtfc's convention (:func:`~mtfc.data.label_lut`)."""

    def __init__(self, mmseg_cfg: dict, *, class_names: Sequence[str], lut: np.ndarray,
                 image_size: int | tuple[int, int], train: bool = False, augment: dict | None = None,
                 on_corrupt: str = "error", resize: str = "letterbox", size_divisibility: int = 1) -> None:
        from mmseg.registry import DATASETS

        cfg = dict(mmseg_cfg, pipeline=[], lazy_init=False, serialize_data=False)
        where = Path(cfg.get("data_root", ""), cfg.get("data_prefix", {}).get("img_path", ""))
        try:
            listing = DATASETS.build(cfg)
        except (AssertionError, FileNotFoundError, OSError) as err:
            raise DatasetError(f"{where}: MMSeg {cfg['type']} cannot list this dataset ({err})") from err
        records = [Record(image_path=Path(info["img_path"]), image_id=i, source=str(where),
                          seg_map_path=Path(info["seg_map_path"]))
                   for i, info in enumerate(listing.data_list)]
        super().__init__(records, class_names=class_names, image_size=image_size, train=train, augment=augment,
                         seg_lut=lut, image_root=where, description=str(where), on_corrupt=on_corrupt,
                         resize=resize, size_divisibility=size_divisibility)


#: Per type: MMSeg dataset class, folders per split (as in mmseg's configs/_base_/datasets), label mapping.
MMSEG_LAYOUTS = {
    "ade20k": {"type": "ADE20KDataset", "img_path": {"train": "images/training", "val": "images/validation"},
               "seg_map_path": {"train": "annotations/training", "val": "annotations/validation"},
               "lut": {"zero_is_ignore": True}},
    "voc": {"type": "PascalVOCDataset", "img_path": "JPEGImages", "seg_map_path": "SegmentationClass",
            "ann_file": "ImageSets/Segmentation/{split}.txt", "lut": {}},
    "cityscapes": {"type": "CityscapesDataset", "img_path": "leftImg8bit/{split}", "seg_map_path": "gtFine/{split}",
                   "lut": {"offset": 1}},
}


def _build_mmseg(kind: str, cfg: dict, split: str, *, strict: bool, **options) -> SegmentationDataset:
    from mmseg.registry import DATASETS

    spec = MMSEG_LAYOUTS[kind]
    class_names = list(DATASETS.get(spec["type"]).METAINFO["classes"])
    if kind == "voc":
        class_names = class_names[1:]  # VOC's "background" is value 0, mtfc's background
    mmseg_cfg = {"type": spec["type"], "data_root": str(cfg["root"]),
                 "data_prefix": {"img_path": split_path(cfg.get("img_dir", spec["img_path"]), split),
                                 "seg_map_path": split_path(cfg.get("ann_dir", spec["seg_map_path"]), split)}}
    if "ann_file" in spec or "ann_file" in cfg:
        mmseg_cfg["ann_file"] = split_path(cfg.get("ann_file", spec.get("ann_file", "")), split)
    return SegmentationDataset(mmseg_cfg, class_names=class_names, lut=label_lut(len(class_names), **spec["lut"]),
                               **options)


@DATASETS.register("ade20k", keys=("img_dir", "ann_dir", "ann_file"), image_size=512,
                   resize="keep_aspect")
def build_ade20k(cfg: dict, split: str, **options) -> SegmentationDataset:
    """ADEChallengeData2016: ``images/{training,validation}``, ``annotations/…``; raw 0 ("other") → 255."""
    return _build_mmseg("ade20k", cfg, split, **options)


@DATASETS.register("voc", keys=("img_dir", "ann_dir", "ann_file"), image_size=512,
                   resize="keep_aspect")
def build_voc(cfg: dict, split: str, **options) -> SegmentationDataset:
    """VOCdevkit/VOC2012: ``JPEGImages``, ``SegmentationClass`` listed by ``ImageSets/Segmentation/{split}.txt``."""
    return _build_mmseg("voc", cfg, split, **options)


@DATASETS.register("cityscapes", keys=("img_dir", "ann_dir", "ann_file"), image_size=512,
                   resize="keep_aspect")
def build_cityscapes(cfg: dict, split: str, **options) -> SegmentationDataset:
    """``leftImg8bit/{split}`` + ``gtFine/{split}`` ``*_labelTrainIds.png``; train id k → k+1."""
    return _build_mmseg("cityscapes", cfg, split, **options)
