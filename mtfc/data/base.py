"""What every dataset format shares: :class:`Record`, :class:`TaskDataset`, image reading, errors.

A loader (one module per format: :mod:`.imagefolder`, :mod:`.coco`, :mod:`.mmseg_folders`,
:mod:`.bundled`) turns its files into a list of :class:`Record` s (one per image, saying where its
labels are); :class:`TaskDataset` reads them the same way for every format and sends them through
one :class:`~mtfc.data.transforms.SampleTransform`. Items are ``(image, target)``: ``image`` float32
(3, H, W) in [0, 1] RGB at the configured size, ``target`` a dict with the keys of mtfc's target
contract that the dataset has, plus ``orig_size`` (the (H, W) of the file) and ``image_size`` (the fed
image's (H, W)). An eval image is the file with its longest side resized to fit ``image_size`` and
padded bottom/right (:data:`~mtfc.data.transforms.RESIZE`: to the whole canvas, or only to the codec's
``size_divisibility``; then ``content_size`` is the resized, unpadded (H, W)), or, for a classification
split with ``eval_resize``, torchvision's reference resize and centre crop. Images of different sizes
are batched by :func:`grouped_loader`.
"""
from __future__ import annotations

import colorsys
import os
import pickle
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from .transforms import IGNORE_INDEX, SampleTransform

ON_CORRUPT = ("error", "skip")
"""What :class:`TaskDataset` does with an image or label map that cannot be decoded."""


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and what is wrong with it."""


class CorruptFileError(DatasetError):
    """An image or label map file exists but cannot be decoded (truncated, not an image)."""


class DatasetWarning(UserWarning):
    """Dataset input that was skipped (degenerate annotations, corrupt files); the message counts it."""


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


class RecordList(Sequence[Record]):
    """:class:`Record` s pickled into one numpy byte buffer, as Detectron2's
    ``DatasetFromList(serialize=True)``: DataLoader workers share two arrays instead of touching
    (and so copying) millions of Python objects. Each record is stored as a tuple of its fields, paths
    as strings (a pickled ``Path`` costs ten times as much)."""

    def __init__(self, records: Iterable[Record]) -> None:
        blobs = [pickle.dumps(self._pack(r), protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._bytes = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    @staticmethod
    def _pack(r: Record) -> tuple:
        return (str(r.image_path), r.image_id, r.source, r.size, r.label, r.instances,
                None if r.seg_map_path is None else str(r.seg_map_path))

    @staticmethod
    def _unpack(values: tuple) -> Record:
        image_path, image_id, source, size, label, instances, seg_map_path = values
        return Record(Path(image_path), image_id, source, size, label, instances,
                      None if seg_map_path is None else Path(seg_map_path))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range ({len(self)} records)")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return self._unpack(pickle.loads(self._bytes[start:int(self._ends[index])].tobytes()))


class TaskDataset(torch.utils.data.Dataset):
    """Reads :class:`Record` s into ``(image, target)`` pairs (see the module docstring).

    ``seg_lut`` maps raw label-map values to mtfc's convention (0 background, k+1 class k, 255
    ignore); entries of -1 mark values that must not occur. ``augment`` is passed to
    :func:`~mtfc.data.transforms.build_transforms` (``scale``, ``hflip``, ``color_jitter``, ``seed``).
    ``eval_resize`` (not with ``train``; images with a label only): evaluate with torchvision's
    reference protocol, the shorter side resized to it and the centre ``image_size`` cropped
    (:func:`~mtfc.data.transforms.reference_eval`).
    ``on_corrupt``: ``"error"`` raises :class:`CorruptFileError` naming an undecodable image or label
    map; ``"skip"`` warns (:class:`DatasetWarning`, with a count) and returns the next good item instead.
    ``resize`` (:data:`~mtfc.data.transforms.RESIZE`) and ``size_divisibility`` (the codec's): how
    evaluation pads (see the module docstring).
    """

    def __init__(self, records: Sequence[Record], *, class_names: Sequence[str], image_size: int | tuple[int, int],
                 train: bool = False, augment: dict | None = None, seg_lut: np.ndarray | None = None,
                 with_masks: bool = False, ann_file: Path | None = None, image_root: Path | None = None,
                 description: str = "dataset", on_corrupt: str = "error", eval_resize: int | None = None,
                 resize: str = "letterbox", size_divisibility: int = 1) -> None:
        if not records:
            raise DatasetError(f"{description}: no images (empty split)")
        if on_corrupt not in ON_CORRUPT:
            raise DatasetError(f"{description}: on_corrupt must be one of {list(ON_CORRUPT)}, got {on_corrupt!r}")
        first = records[0]
        self.records = RecordList(records)
        self.class_names = tuple(class_names)
        self.transform = SampleTransform(image_size, train=train, eval_resize=eval_resize, resize=resize,
                                         size_divisibility=size_divisibility, **(augment or {}))
        self.seg_lut = seg_lut
        self.with_masks = with_masks
        self.ann_file = ann_file
        self.image_root = image_root
        self.description = description
        self.on_corrupt = on_corrupt
        self.corrupt: set[int] = set()
        """Indices found corrupt so far in this process (``on_corrupt="skip"``)."""
        keys = {"image_id", "file_name", "image_size", "content_size", "orig_size"}
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
        if self.on_corrupt == "error":
            return self._load(index)
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            if i in self.corrupt:
                continue
            try:
                return self._load(i)
            except CorruptFileError as err:
                self.corrupt.add(i)
                warnings.warn(f"{err}; skipped ({len(self.corrupt)} corrupt file(s) skipped so far in this "
                              f"process)", DatasetWarning, stacklevel=2)
        raise DatasetError(f"{self.description}: every image or label map is corrupt")

    def _load(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
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
                masks = [decode_segmentation(inst["segmentation"], height, width) for inst in record.instances]
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
        except (OSError, SyntaxError) as err:
            raise CorruptFileError(f"{path}: cannot read label map ({err})") from err
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


def read_image(path: str | Path, source: str = "") -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB, EXIF orientation applied; greyscale, palette, CMYK and
    RGBA files are converted (alpha is dropped). :class:`DatasetError` if the file is missing,
    :class:`CorruptFileError` if it is truncated or not an image; both name the file."""
    if not Path(path).is_file():
        listed = f" (listed in {source})" if source else ""
        raise DatasetError(f"{path}: image file not found{listed}")
    try:
        with Image.open(path) as image:
            # PIL (unlike OpenCV, which fills the rest grey) raises on a truncated file.
            return np.array(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, SyntaxError) as err:
        raise CorruptFileError(f"{path}: corrupt or truncated image ({err})") from err


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or compressed RLE) as a uint8 (H, W) mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(np.uint8)


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
    return [[0, 0, 0]] + [[int(255 * c) for c in colorsys.hsv_to_rgb(k / max(num_classes, 1), 0.75, 0.95)]
                          for k in range(num_classes)]


T = TypeVar("T")


class FileCache:
    """A small process-level LRU cache of what was parsed from files, so that building the train and
    the val split (again and again, in one run) reads each annotation file or folder listing once.
    Entries are keyed by the caller's key plus the (mtime, size) of the files it depends on: an
    edited file is read again."""

    def __init__(self, maxsize: int = 8) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, files: Iterable[Path], compute: Callable[[], T]) -> T:
        """The cached value for ``key`` if none of ``files`` changed since, else ``compute()`` (cached)."""
        stamp = (key, tuple((str(f), st.st_mtime_ns, st.st_size) for f in files for st in [os.stat(f)]))
        if stamp in self._entries:
            self._entries.move_to_end(stamp)
            return self._entries[stamp]
        value = compute()
        self._entries[stamp] = value
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """DataLoader ``collate_fn``: images stacked to (B, 3, H, W), targets kept as a list of dicts."""
    images, targets = zip(*batch)
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise ValueError(f"images of different shapes {sorted(sizes)} cannot be batched; batch them with "
                         "mtfc.data.grouped_loader")
    return torch.stack(images), list(targets)


class SizeGroupedBatches:
    """Batches of ``items`` (an iterable of dataset items) in which every image has one size, as
    Detectron2's ``AspectRatioGroupedDataset`` (grouped by the exact size rather than the aspect, since
    a batch is one tensor): each item goes to the bucket of its image's shape (the first element's, for
    an ``(image, ...)`` tuple), a full bucket is collated and yielded, the partial buckets follow at the
    end. Items of one size come out in one batch sequence in their order, so a dataset of one size
    gives the batches a plain ``DataLoader`` gives. ``dataset``: what ``items`` come from."""

    def __init__(self, items: Iterable[Any], batch_size: int, collate_fn: Callable[[list], Any],
                 dataset: Any = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.items, self.batch_size, self.collate_fn, self.dataset = items, batch_size, collate_fn, dataset

    def __iter__(self) -> Iterator[Any]:
        buckets: dict[Hashable, list] = {}
        for item in self.items:
            image = item[0] if isinstance(item, (tuple, list)) else item
            bucket = buckets.setdefault(tuple(getattr(image, "shape", ())), [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield self.collate_fn(bucket)
                bucket.clear()
        for bucket in buckets.values():
            if bucket:
                yield self.collate_fn(bucket)


def grouped_loader(dataset: torch.utils.data.Dataset, batch_size: int, *, collate_fn: Callable[[list], Any] = collate,
                   num_workers: int = 0, pin_memory: bool = False) -> SizeGroupedBatches:
    """The evaluation loader of ``dataset`` (in order, every item once): a ``DataLoader`` reading items
    in ``num_workers`` workers, batched by :class:`SizeGroupedBatches` so that each batch has one image
    size (``resize: keep_aspect`` pads each image only to the codec's divisibility)."""
    items = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=_single,
                                        num_workers=num_workers, pin_memory=pin_memory)
    return SizeGroupedBatches(items, batch_size, collate_fn, dataset)


def _single(item: Any) -> Any:
    """The ``collate_fn`` of an unbatched DataLoader: the item as the dataset returned it."""
    return item
