"""Loaders for the standard formats mtfc reads: ImageFolder, COCO instances JSON, MMSeg folders.

Every loader is a :class:`TaskDataset`: a list of :class:`Record` s (one per image, saying where its
labels are) read the same way and sent through one :class:`~mtfc.data.transforms.SampleTransform`.
Items are ``(image, target)``: ``image`` float32 (3, H, W) in [0, 1] RGB at the configured size,
``target`` a dict with the keys of mtfc's target contract that the dataset has, plus ``orig_size``
(the (H, W) of the file; the fed image is the file resized by ``image_size / max(orig_size)`` and
padded bottom/right).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from .synthetic import FORMAT, LAYOUT
from .transforms import IGNORE_INDEX, SampleTransform

__all__ = ["DatasetError", "Record", "TaskDataset", "ClassificationDataset", "CocoDetectionDataset",
           "SegmentationDataset", "MultiTaskDataset", "CocoIndex", "load_coco", "label_lut", "collate",
           "mmseg_dataset_config", "register_detectron2", "build_dataset", "palette", "read_image"]


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and what is wrong with it."""


@dataclass
class Record:
    """One image and where its labels are (``None``: the dataset does not have that label)."""

    image_path: Path
    image_id: int
    source: str                                   # the file or folder that listed this image
    size: tuple[int, int] | None = None           # (H, W) the annotation file promises
    label: int | None = None
    instances: list[dict] | None = None           # {"bbox": XYXY, "class": k, "segmentation": COCO or None}
    seg_map_path: Path | None = None


class TaskDataset(torch.utils.data.Dataset):
    """Reads :class:`Record` s into ``(image, target)`` pairs (see the module docstring).

    ``seg_lut`` maps raw label-map values to mtfc's convention (0 background, k+1 class k, 255
    ignore); entries of -1 mark values that must not occur. ``augment`` is passed to
    :func:`~mtfc.data.transforms.build_transforms` (``scale``, ``hflip``, ``color_jitter``, ``seed``).
    """

    def __init__(self, records: Sequence[Record], *, class_names: Sequence[str], image_size: int | tuple[int, int],
                 train: bool = False, augment: dict | None = None, seg_lut: np.ndarray | None = None,
                 with_masks: bool = False, ann_file: Path | None = None, image_root: Path | None = None,
                 description: str = "dataset") -> None:
        if not records:
            raise DatasetError(f"{description}: no images (empty split)")
        self.records = list(records)
        self.class_names = tuple(class_names)
        self.transform = SampleTransform(image_size, train=train, **(augment or {}))
        self.seg_lut = seg_lut
        self.with_masks = with_masks
        self.ann_file = ann_file
        self.image_root = image_root
        first = self.records[0]
        keys = {"image_id", "file_name", "image_size", "orig_size"}
        if first.label is not None:
            keys.add("label")
        if first.instances is not None:
            keys |= {"boxes", "classes", "masks"} if with_masks else {"boxes", "classes"}
        if first.seg_map_path is not None:
            keys.add("sem_seg")
        self.target_keys = frozenset(keys)
        """The target keys every item carries."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.records[index]
        image = read_image(record.image_path, record.source)
        height, width = image.shape[:2]
        if record.size is not None and record.size != (height, width):
            raise DatasetError(f"{record.image_path}: image is {width}x{height} (WxH) but {record.source} "
                               f"says {record.size[1]}x{record.size[0]}")
        sample: dict[str, Any] = {"image": image}
        if record.instances is not None:
            sample["boxes"] = np.array([inst["bbox"] for inst in record.instances], np.float32).reshape(-1, 4)
            sample["classes"] = np.array([inst["class"] for inst in record.instances], np.int64)
            if self.with_masks:
                masks = [_decode_segmentation(inst["segmentation"], height, width) for inst in record.instances]
                sample["masks"] = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
        if record.seg_map_path is not None:
            sample["sem_seg"] = self._read_sem_seg(record.seg_map_path, record.image_path, (height, width))
        image_tensor, target = self.transform(sample)
        target.update(image_id=record.image_id, file_name=str(record.image_path),
                      image_size=tuple(image_tensor.shape[-2:]), orig_size=(height, width))
        if record.label is not None:
            target["label"] = record.label
        return image_tensor, target

    def _read_sem_seg(self, path: Path, image_path: Path, size: tuple[int, int]) -> np.ndarray:
        if not path.is_file():
            raise DatasetError(f"{path}: label map not found (for image {image_path})")
        try:
            with Image.open(path) as label_map:
                raw = np.array(label_map)
        except OSError as err:
            raise DatasetError(f"{path}: cannot read label map ({err})") from err
        if raw.ndim != 2:
            raise DatasetError(f"{path}: label map must be single-channel, got shape {raw.shape}")
        if raw.shape != size:
            raise DatasetError(f"{path}: label map is {raw.shape[1]}x{raw.shape[0]} (WxH) but image "
                               f"{image_path} is {size[1]}x{size[0]}")
        if raw.dtype != np.uint8:
            if raw.min() < 0 or raw.max() > 255:
                raise DatasetError(f"{path}: label values must lie in 0..255, got {raw.min()}..{raw.max()}")
            raw = raw.astype(np.uint8)
        if self.seg_lut is None:
            return raw
        mapped = self.seg_lut[raw]
        if (mapped < 0).any():
            bad = sorted(int(v) for v in np.unique(raw[mapped < 0]))
            raise DatasetError(f"{path}: unknown class ids {bad} in label map "
                               f"(this dataset has {self.num_classes} classes)")
        return mapped.astype(np.uint8)


def read_image(path: Path, source: str = "") -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB; :class:`DatasetError` naming the file if it is unusable."""
    if not Path(path).is_file():
        listed = f" (listed in {source})" if source else ""
        raise DatasetError(f"{path}: image file not found{listed}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: cannot decode image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or compressed RLE) as a uint8 (H, W) mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(np.uint8)


# --------------------------------------------------------------------------------------------- COCO
@dataclass
class CocoIndex:
    """A validated COCO instances file: categories in id order and each image's annotations."""

    path: Path
    categories: list[dict]
    images: list[dict]                                    # in id order
    annotations: dict[int, list[dict]] = field(default_factory=dict)   # image id -> annotations

    @property
    def category_ids(self) -> list[int]:
        """Dataset category ids; contiguous class ``k`` is ``category_ids[k]``."""
        return [c["id"] for c in self.categories]

    @property
    def has_masks(self) -> bool:
        """Whether every non-crowd annotation has a segmentation."""
        return all(a.get("segmentation") for anns in self.annotations.values() for a in anns
                   if not a.get("iscrowd", 0))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_segmentation(seg: Any, image: dict, where: str) -> None:
    if isinstance(seg, list):
        if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_is_number, p)) for p in seg):
            raise DatasetError(f"{where}: polygon segmentation must be lists of >= 3 (x, y) number pairs")
    elif isinstance(seg, dict):
        if "size" not in seg or "counts" not in seg:
            raise DatasetError(f"{where}: RLE segmentation needs 'size' and 'counts'")
        if list(seg["size"]) != [image["height"], image["width"]]:
            raise DatasetError(f"{where}: mask size {seg['size']} (HxW) does not match image {image['id']} "
                               f"size [{image['height']}, {image['width']}]")
    else:
        raise DatasetError(f"{where}: segmentation must be polygons (list) or RLE (dict), got {type(seg).__name__}")


def load_coco(ann_file: str | Path) -> CocoIndex:
    """Read and validate a COCO instances JSON file; :class:`DatasetError` names what is wrong."""
    path = Path(ann_file)
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO file is a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing or non-list top-level key {key!r}")

    def require(entry: Any, keys: tuple[str, ...], kind: str, index: int) -> None:
        if not isinstance(entry, dict) or any(k not in entry for k in keys):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            raise DatasetError(f"{path}: {kind}[{index}] is missing {missing}")

    categories: dict[int, dict] = {}
    for i, cat in enumerate(data["categories"]):
        require(cat, ("id", "name"), "categories", i)
        if cat["id"] in categories:
            raise DatasetError(f"{path}: duplicate category id {cat['id']}")
        categories[cat["id"]] = cat
    if not categories:
        raise DatasetError(f"{path}: no categories")
    images: dict[int, dict] = {}
    for i, image in enumerate(data["images"]):
        require(image, ("id", "file_name", "width", "height"), "images", i)
        if image["id"] in images:
            raise DatasetError(f"{path}: duplicate image id {image['id']}")
        if not (isinstance(image["width"], int) and isinstance(image["height"], int)
                and image["width"] > 0 and image["height"] > 0):
            raise DatasetError(f"{path}: images[{i}] (id {image['id']}) has bad width/height")
        images[image["id"]] = image
    if not images:
        raise DatasetError(f"{path}: no images (empty split)")
    annotations: dict[int, list[dict]] = {image_id: [] for image_id in images}
    for i, ann in enumerate(data["annotations"]):
        require(ann, ("id", "image_id", "category_id", "bbox"), "annotations", i)
        where = f"{path}: annotation id {ann['id']}"
        if ann["image_id"] not in images:
            raise DatasetError(f"{where}: unknown image id {ann['image_id']}")
        if ann["category_id"] not in categories:
            raise DatasetError(f"{where}: unknown category id {ann['category_id']} "
                               f"(categories: {sorted(categories)})")
        image = images[ann["image_id"]]
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise DatasetError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            raise DatasetError(f"{where}: bbox {bbox} has non-positive width or height")
        if x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0:
            raise DatasetError(f"{where}: bbox {bbox} lies outside image {image['id']} "
                               f"({image['width']}x{image['height']})")
        if ann.get("segmentation"):
            _check_segmentation(ann["segmentation"], image, where)
        annotations[ann["image_id"]].append(ann)
    return CocoIndex(path=path, categories=[categories[k] for k in sorted(categories)],
                     images=[images[k] for k in sorted(images)], annotations=annotations)


def _coco_records(coco: CocoIndex, image_root: Path) -> list[Record]:
    contiguous = {cat_id: k for k, cat_id in enumerate(coco.category_ids)}
    records = []
    for image in coco.images:
        instances = []
        for ann in coco.annotations[image["id"]]:
            if ann.get("iscrowd", 0):
                continue  # crowd regions are ignored by training targets; COCOeval reads them from the file
            x, y, w, h = ann["bbox"]
            bbox = [max(x, 0.0), max(y, 0.0), min(x + w, image["width"]), min(y + h, image["height"])]
            instances.append({"bbox": bbox, "class": contiguous[ann["category_id"]],
                              "segmentation": ann.get("segmentation")})
        records.append(Record(image_path=image_root / image["file_name"], image_id=image["id"],
                              source=str(coco.path), size=(image["height"], image["width"]), instances=instances))
    return records


class CocoDetectionDataset(TaskDataset):
    """COCO instances JSON + image folder → ``boxes``, ``classes`` (contiguous 0..K-1 in category-id
    order) and, when every annotation has a segmentation, ``masks``."""

    def __init__(self, image_root: str | Path, ann_file: str | Path, *, image_size: int | tuple[int, int],
                 train: bool = False, augment: dict | None = None) -> None:
        self.coco = load_coco(ann_file)
        super().__init__(_coco_records(self.coco, Path(image_root)),
                         class_names=[c["name"] for c in self.coco.categories], image_size=image_size,
                         train=train, augment=augment, with_masks=self.coco.has_masks, ann_file=self.coco.path,
                         image_root=Path(image_root), description=str(ann_file))


def register_detectron2(name: str, ann_file: str | Path, image_root: str | Path) -> str:
    """Register a COCO split in Detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` (so
    ``COCOEvaluator(name, ...)`` works) and return ``name``. Registering the same files again is a no-op."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    coco = load_coco(ann_file)  # validates before Detectron2 sees it
    json_file, image_root = str(Path(ann_file).resolve()), str(Path(image_root).resolve())
    if name in DatasetCatalog.list():
        if MetadataCatalog.get(name).get("json_file") != json_file:
            raise ValueError(f"Detectron2 dataset {name!r} is already registered with another json_file")
        return name
    # The same mapping load_coco_json derives (sorted category ids -> 0..K-1), set up front so the
    # evaluator maps predictions back to category ids before the dataset is ever loaded.
    register_coco_instances(name, {
        "thing_classes": [c["name"] for c in coco.categories],
        "thing_dataset_id_to_contiguous_id": {cat_id: k for k, cat_id in enumerate(coco.category_ids)},
    }, json_file, image_root)
    return name


# ------------------------------------------------------------------------------------ classification
class ClassificationDataset(TaskDataset):
    """A torchvision ``ImageFolder`` tree (``root/<class_name>/<image>``) → ``label``.

    ``class_names`` (optional) must equal the folder's classes (sorted directory names)."""

    def __init__(self, root: str | Path, *, image_size: int | tuple[int, int], train: bool = False,
                 augment: dict | None = None, class_names: Sequence[str] | None = None) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: image folder not found")
        try:
            folder = ImageFolder(str(root), allow_empty=True)
        except FileNotFoundError as err:
            raise DatasetError(f"{root}: {err}") from err
        if class_names is not None and list(folder.classes) != list(class_names):
            unknown = sorted(set(folder.classes) - set(class_names))
            raise DatasetError(f"{root}: class folders {folder.classes} do not match the classes {list(class_names)}"
                               + (f" (unknown: {unknown})" if unknown else ""))
        records = [Record(image_path=Path(path), image_id=i, source=str(root), label=label)
                   for i, (path, label) in enumerate(folder.samples)]
        super().__init__(records, class_names=folder.classes, image_size=image_size, train=train,
                         augment=augment, image_root=root, description=str(root))


# -------------------------------------------------------------------------------------- segmentation
def label_lut(num_classes: int, *, offset: int = 0, zero_is_ignore: bool = False) -> np.ndarray:
    """A lookup table: raw label value → mtfc's convention (0 background, k+1 class k, 255 ignore);
    -1 marks values that must not occur.

    Raw values ``0..num_classes - offset`` map to ``value + offset``: offset 0 for maps whose 0 is
    background (VOC, bundled), 1 for train-id maps without one (Cityscapes). ``zero_is_ignore``
    maps raw 0 to ignore (ADE20K's "other"). 255 stays ignore."""
    lut = np.full(256, -1, np.int16)
    values = np.arange(num_classes + 1 - offset)
    lut[values] = values + offset
    if zero_is_ignore:
        lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def palette(num_classes: int) -> list[list[int]]:
    """A fixed colour per semantic class (index 0, background, is black)."""
    import colorsys

    return [[0, 0, 0]] + [[int(255 * c) for c in colorsys.hsv_to_rgb(k / max(num_classes, 1), 0.75, 0.95)]
                          for k in range(num_classes)]


class SegmentationDataset(TaskDataset):
    """Images + single-channel label maps listed by an MMSeg dataset → ``sem_seg``.

    ``mmseg_cfg`` is an MMSeg dataset config (``type`` is any registered MMSeg dataset, e.g.
    ``BaseSegDataset``, ``ADE20KDataset``); MMSeg lists the files, mtfc reads them. ``lut`` maps raw
    label values to mtfc's convention (:func:`label_lut`)."""

    def __init__(self, mmseg_cfg: dict, *, class_names: Sequence[str], lut: np.ndarray,
                 image_size: int | tuple[int, int], train: bool = False, augment: dict | None = None) -> None:
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
                         seg_lut=lut, image_root=where, description=str(where))


def mmseg_dataset_config(root: str | Path, split: str, *, pipeline: list[dict] | None = None) -> dict:
    """An MMSeg dataset config for a split of the bundled dataset (``DATASETS.build(cfg)`` or
    ``BaseSegDataset(**cfg minus type)``); ``pipeline`` defaults to loading image + annotation."""
    info = _read_info(Path(root))
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


# ------------------------------------------------------------------------------ bundled multi-task
def _read_info(root: Path) -> dict:
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
    """Every target of the bundled dataset for each image, read from its standard files: ``label``
    from the ImageFolder path, ``boxes``/``classes``/``masks`` from the COCO JSON, ``sem_seg`` from
    the MMSeg label map; ``image_size`` defaults to the generated size."""

    def __init__(self, root: str | Path, split: str, *, image_size: int | tuple[int, int] | None = None,
                 train: bool = False, augment: dict | None = None) -> None:
        root = Path(root)
        info = _read_info(root)
        names = list(info["class_names"])
        splits = info.get("config", {}).get("splits", {})
        if split not in splits:
            raise DatasetError(f"{root / 'dataset.json'}: no split {split!r} (splits: {sorted(splits)})")
        layout = info["layout"]
        image_root = root / layout["image_root"].format(split=split)
        seg_root = root / layout["seg_map_root"].format(split=split)
        coco = load_coco(root / layout["ann_file"].format(split=split))
        if [c["name"] for c in coco.categories] != names:
            raise DatasetError(f"{coco.path}: categories {[c['name'] for c in coco.categories]} do not match "
                               f"class_names {names} of {root / 'dataset.json'}")
        records = _coco_records(coco, image_root)
        for record, image in zip(records, coco.images):
            class_dir = Path(image["file_name"]).parts[0]
            if class_dir not in names:
                raise DatasetError(f"{coco.path}: image {image['id']} file {image['file_name']!r} is not in a "
                                   f"class folder (unknown class {class_dir!r}; classes: {names})")
            record.label = names.index(class_dir)
            record.seg_map_path = (seg_root / image["file_name"]).with_suffix(".png")
        super().__init__(records, class_names=names, image_size=image_size or info["config"]["image_size"],
                         train=train, augment=augment, seg_lut=label_lut(len(names)), with_masks=coco.has_masks,
                         ann_file=coco.path, image_root=image_root, description=str(coco.path))
        self.root = root


# ---------------------------------------------------------------------------------------- factory
_DEFAULT_SIZE = {"imagenet": 224, "imagefolder": 224, "coco": 512, "ade20k": 512, "voc": 512, "cityscapes": 512}

_MMSEG = {  # MMSeg dataset type, folders per split (as in mmseg's configs/_base_/datasets), label mapping
    "ade20k": {"type": "ADE20KDataset", "img_path": {"train": "images/training", "val": "images/validation"},
               "seg_map_path": {"train": "annotations/training", "val": "annotations/validation"},
               "lut": {"zero_is_ignore": True}},
    "voc": {"type": "PascalVOCDataset", "img_path": "JPEGImages", "seg_map_path": "SegmentationClass",
            "ann_file": "ImageSets/Segmentation/{split}.txt", "lut": {}},
    "cityscapes": {"type": "CityscapesDataset", "img_path": "leftImg8bit/{split}", "seg_map_path": "gtFine/{split}",
                   "lut": {"offset": 1}},
}


def _split_path(spec: str | dict, split: str) -> str:
    if isinstance(spec, dict):
        if split not in spec:
            raise DatasetError(f"no split {split!r} for this dataset (splits: {sorted(spec)})")
        return spec[split]
    return spec.format(split=split)


def build_dataset(cfg: dict, split: str, train: bool = False) -> TaskDataset:
    """Build a split's dataset from a config dict (as declared in YAML).

    Keys: ``type`` (``bundled`` | ``imagefolder``/``imagenet`` | ``coco`` | ``ade20k`` | ``voc`` |
    ``cityscapes``), ``root``, optional ``image_size`` (int or [H, W]) and ``augment`` (dict for
    :func:`~mtfc.data.transforms.build_transforms`). ``coco`` also takes ``ann_file`` and
    ``image_root`` (default ``{root}/annotations/instances_{split}2017.json``, ``{root}/{split}2017``);
    the segmentation types take ``img_dir`` / ``ann_dir`` / ``ann_file`` to override MMSeg's folders.
    Relative paths other than ``root`` are relative to ``root``; ``{split}`` in them is substituted.
    """
    if not isinstance(cfg, dict) or "type" not in cfg or "root" not in cfg:
        raise DatasetError(f"dataset config needs 'type' and 'root', got {cfg!r}")
    kind, root = str(cfg["type"]).lower(), Path(cfg["root"])
    size = cfg.get("image_size", _DEFAULT_SIZE.get(kind))
    common = {"train": train, "augment": cfg.get("augment")}

    def path(key: str, default: str) -> Path:
        return root / _split_path(cfg.get(key, default), split)

    if kind == "bundled":
        return MultiTaskDataset(root, split, image_size=size, **common)
    if kind in ("imagenet", "imagefolder"):
        return ClassificationDataset(path("dir", "{split}"), image_size=size, **common)
    if kind == "coco":
        return CocoDetectionDataset(path("image_root", "{split}2017"),
                                    path("ann_file", "annotations/instances_{split}2017.json"), image_size=size,
                                    **common)
    if kind in _MMSEG:
        spec = _MMSEG[kind]
        from mmseg.registry import DATASETS

        dataset_class = DATASETS.get(spec["type"])
        mm_classes = list(dataset_class.METAINFO["classes"])
        if kind == "voc":
            mm_classes = mm_classes[1:]  # VOC's "background" is value 0, mtfc's background
        mmseg_cfg = {"type": spec["type"], "data_root": str(root),
                     "data_prefix": {"img_path": _split_path(cfg.get("img_dir", spec["img_path"]), split),
                                     "seg_map_path": _split_path(cfg.get("ann_dir", spec["seg_map_path"]), split)}}
        if "ann_file" in spec or "ann_file" in cfg:
            mmseg_cfg["ann_file"] = _split_path(cfg.get("ann_file", spec.get("ann_file", "")), split)
        return SegmentationDataset(mmseg_cfg, class_names=mm_classes, lut=label_lut(len(mm_classes), **spec["lut"]),
                                   image_size=size, **common)
    raise DatasetError(f"unknown dataset type {cfg['type']!r} "
                       f"(known: bundled, imagenet, imagefolder, coco, {', '.join(_MMSEG)})")


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """DataLoader ``collate_fn``: images stacked to (B, 3, H, W), targets kept as a list of dicts."""
    images, targets = zip(*batch)
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise ValueError(f"images of different shapes {sorted(sizes)} cannot be batched; set image_size")
    return torch.stack(images), list(targets)
