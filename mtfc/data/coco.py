"""COCO instances JSON + image folder → ``boxes``, ``classes`` and (when segmented) ``masks``.

:func:`load_coco` validates a file and tolerates what real COCO-format exports contain, as Detectron2,
mmdet and torchvision do: annotations with a box of zero width or height, a box outside the image, or
no valid polygon are skipped with one :class:`~mtfc.data.DatasetWarning` that counts them (polygons of
fewer than 3 points are dropped from multi-polygon objects); ``strict=True`` makes them errors.
Structural faults (bad JSON, missing keys, unknown ids, RLE of the wrong size) are always errors.
Each file is parsed once per process (:data:`PARSED`).
"""
from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import DatasetError, DatasetWarning, FileCache, Record, TaskDataset
from .registry import DATASETS, split_path

PARSED = FileCache()
"""COCO files already parsed in this process (keyed by path, mtime and size)."""

#: Why an annotation is skipped (or, for the last, a polygon dropped), as the warning words it.
DEGENERATE = {
    "empty_box": "with a box of zero or negative width or height",
    "outside": "with a box outside its image",
    "no_polygon": "without a valid polygon",
    "polygon_dropped": "polygon(s) of fewer than 3 points from multi-polygon objects",
}


@dataclass
class CocoIndex:
    """A validated COCO instances file: categories in id order and each image's usable annotations.

    ``skipped`` counts the degenerate annotations left out (keys of :data:`DEGENERATE`) and
    ``first_skipped`` holds, per reason, the error that strict mode raises for the first of them."""

    path: Path
    categories: list[dict]
    images: list[dict]                                    # in id order
    annotations: dict[int, list[dict]] = field(default_factory=dict)   # image id -> annotations
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)

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


def _check_rle(seg: dict, image: dict, where: str) -> None:
    if "size" not in seg or "counts" not in seg:
        raise DatasetError(f"{where}: RLE segmentation needs 'size' and 'counts'")
    if list(seg["size"]) != [image["height"], image["width"]]:
        raise DatasetError(f"{where}: mask size {seg['size']} (HxW) does not match image {image['id']} "
                           f"size [{image['height']}, {image['width']}]")


def _parse(path: Path) -> CocoIndex:
    """Read and validate ``path``, leaving degenerate annotations out and counting them."""
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

    index = CocoIndex(path=path, categories=[categories[k] for k in sorted(categories)],
                      images=[images[k] for k in sorted(images)], annotations={image_id: [] for image_id in images})

    def skip(reason: str, message: str) -> None:
        index.skipped[reason] += 1
        index.first_skipped.setdefault(reason, message)

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
            skip("empty_box", f"{where}: bbox {bbox} has non-positive width or height")
            continue
        if x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0:
            skip("outside", f"{where}: bbox {bbox} lies outside image {image['id']} "
                            f"({image['width']}x{image['height']})")
            continue
        seg = ann.get("segmentation")
        if isinstance(seg, list) and seg:
            if not all(isinstance(p, list) and all(map(_is_number, p)) for p in seg):
                raise DatasetError(f"{where}: polygon segmentation must be lists of (x, y) numbers")
            valid = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
            if not valid:
                skip("no_polygon", f"{where}: no polygon has >= 3 (x, y) points")
                continue
            if len(valid) < len(seg):
                for _ in range(len(seg) - len(valid)):
                    skip("polygon_dropped", f"{where}: a polygon has fewer than 3 (x, y) points")
                ann = {**ann, "segmentation": valid}
        elif isinstance(seg, dict):
            _check_rle(seg, image, where)
        elif seg:
            raise DatasetError(f"{where}: segmentation must be polygons (list) or RLE (dict), "
                               f"got {type(seg).__name__}")
        index.annotations[ann["image_id"]].append(ann)
    return index


def load_coco(ann_file: str | Path, *, strict: bool = False) -> CocoIndex:
    """Read and validate a COCO instances JSON file (parsed once per process; see the module
    docstring). Degenerate annotations are left out with a :class:`~mtfc.data.DatasetWarning`
    counting them, or, with ``strict``, raise :class:`~mtfc.data.DatasetError` naming the first."""
    path = Path(ann_file)
    index = PARSED.get(str(path.resolve()), [path] if path.is_file() else [], lambda: _parse(path))
    if index.skipped:
        if strict:
            reason = next(iter(index.first_skipped))
            raise DatasetError(f"{index.first_skipped[reason]} (strict: true; without it such annotations "
                               f"are skipped with a warning)")
        counts = {reason: n for reason, n in index.skipped.items() if reason != "polygon_dropped"}
        parts = []
        if counts:
            parts.append(f"skipped {sum(counts.values())} degenerate annotation(s) ("
                         + ", ".join(f"{n} {DEGENERATE[reason]}" for reason, n in counts.items()) + ")")
        if index.skipped["polygon_dropped"]:
            parts.append(f"dropped {index.skipped['polygon_dropped']} {DEGENERATE['polygon_dropped']}")
        message = f"{path}: {'; '.join(parts)}"
        warnings.warn(message + "; strict: true makes them errors", DatasetWarning, stacklevel=2)
    return index


def coco_records(coco: CocoIndex, image_root: Path) -> list[Record]:
    """One :class:`~mtfc.data.Record` per image: non-crowd instances, boxes XYXY clipped to the image,
    category ids mapped to 0..K-1 in id order."""
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
    order) and, when every annotation has a segmentation, ``masks``. ``strict``: see :func:`load_coco`."""

    def __init__(self, image_root: str | Path, ann_file: str | Path, *, image_size: int | tuple[int, int],
                 train: bool = False, augment: dict | None = None, strict: bool = False,
                 on_corrupt: str = "error", resize: str = "letterbox", size_divisibility: int = 1) -> None:
        self.coco = load_coco(ann_file, strict=strict)
        super().__init__(coco_records(self.coco, Path(image_root)),
                         class_names=[c["name"] for c in self.coco.categories], image_size=image_size,
                         train=train, augment=augment, with_masks=self.coco.has_masks, ann_file=self.coco.path,
                         image_root=Path(image_root), description=str(ann_file), on_corrupt=on_corrupt,
                         resize=resize, size_divisibility=size_divisibility)


def check_same_categories(coco: CocoIndex, reference: CocoIndex) -> None:
    """:class:`~mtfc.data.DatasetError` unless both files have the same categories (ids and names), so
    that class ``k`` means the same in both."""
    ours = [(c["id"], c["name"]) for c in coco.categories]
    theirs = [(c["id"], c["name"]) for c in reference.categories]
    if ours != theirs:
        differ = sorted(set(ours) ^ set(theirs))
        raise DatasetError(f"{coco.path}: categories differ from those of {reference.path} "
                           f"((id, name) in one only: {differ}); class indices would not match")


@DATASETS.register("coco", keys=("ann_file", "image_root"), image_size=512, resize="keep_aspect")
def build_coco(cfg: dict, split: str, *, strict: bool, **options) -> CocoDetectionDataset:
    """``{root}/{ann_file}`` (default ``annotations/instances_{split}2017.json``) and
    ``{root}/{image_root}`` (default ``{split}2017``); another split must have the same categories as
    the train split's file when it exists."""
    root = cfg["root"]
    pattern = cfg.get("ann_file", "annotations/instances_{split}2017.json")
    dataset = CocoDetectionDataset(root / split_path(cfg.get("image_root", "{split}2017"), split),
                                   root / split_path(pattern, split), strict=strict, **options)
    if split != "train" and (not isinstance(pattern, dict) or "train" in pattern):
        train_file = root / split_path(pattern, "train")
        if train_file.is_file() and train_file.resolve() != dataset.coco.path.resolve():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DatasetWarning)  # the train split warns when it is built
                check_same_categories(dataset.coco, load_coco(train_file))
    return dataset


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
