"""albumentations pipelines that keep an image, its boxes, instance masks and semantic mask consistent.

One train pipeline (random resized crop, horizontal flip, colour jitter) and one deterministic eval
pipeline: resize the longest side to fit ``image_size``, then pad bottom/right (:data:`RESIZE`) either
to the full ``image_size`` canvas (``letterbox``) or only to the codec's ``size_divisibility``
(``keep_aspect``, as Detectron2's ``ResizeShortestEdge`` + ``ImageList.from_tensors`` padding, so
images differ in size and are batched by it: :func:`~mtfc.data.base.grouped_loader`). Classification
datasets may instead evaluate
with torchvision's reference protocol (:func:`reference_eval`: resize the shorter side, crop the
centre), which pretrained ImageNet classifiers are scored with. Boxes travel through albumentations as
``pascal_voc`` with their instance index as label field; boxes that vanish are dropped together with
their masks. Where instance masks exist, each box is then re-tightened around its transformed mask
(the COCO definition of a segmented object's box), and instances whose mask vanished are dropped.
"""
from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
import torch
from PIL import Image

from mtfc.bitstream import padded_size

IGNORE_INDEX = 255
"""Semantic-mask value of pixels that count as no class (padding, boundaries)."""

RESIZE = ("letterbox", "keep_aspect")
"""How evaluation fits an image to ``image_size``: both resize its longest side to fit (aspect kept);
``letterbox`` pads bottom/right to the whole ``image_size`` canvas (every image one size; the padding
is coded as part of the picture, so heads map predictions back to the original as if it were: exact
for images of the canvas's aspect, such as the bundled dataset's), ``keep_aspect`` only to the next
multiple of the codec's ``size_divisibility`` (predictions map back exactly, for any aspect)."""


def size_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``image_size`` as (H, W): an int is a square."""
    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return height, width


def build_transforms(image_size: int | tuple[int, int], *, train: bool, scale: tuple[float, float] = (0.5, 1.0),
                     hflip: float = 0.5, color_jitter: float = 0.2, seed: int | None = None) -> A.Compose:
    """The albumentations pipeline: ``train`` → RandomResizedCrop + HorizontalFlip + ColorJitter to
    ``image_size``; eval → LongestMaxSize (padding follows in :class:`SampleTransform`)."""
    height, width = size_hw(image_size)
    if train:
        steps = [A.RandomResizedCrop(size=(height, width), scale=tuple(scale), ratio=(3 / 4, 4 / 3)),
                 A.HorizontalFlip(p=hflip)]
        if color_jitter > 0:
            steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                       hue=color_jitter / 4, p=0.8))
    else:
        steps = [A.LongestMaxSize(max_size_hw=(height, width))]
    return A.Compose(steps, bbox_params=bbox_params(), seed=seed)


def reference_resize(image_size: int | tuple[int, int] | list[int]) -> int:
    """The shorter side torchvision's reference evaluation resizes to before cropping ``image_size``:
    ``round(side * 256 / 224)`` of its largest side (256 for 224)."""
    return round(max(size_hw(image_size)) * 256 / 224)


def reference_eval(image: np.ndarray, resize: int, image_size: int | tuple[int, int]) -> np.ndarray:
    """torchvision's classification evaluation (``transforms._presets.ImageClassification`` before its
    rescaling and normalisation) on a uint8 (H, W, 3) image: the shorter side resized to ``resize``
    (bilinear, antialiased, by PIL as torchvision does for a PIL image), then the centre ``image_size``
    cropped."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    resized = F.resize(Image.fromarray(image), [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return np.array(F.center_crop(resized, list(size_hw(image_size))))


def bbox_params() -> A.BboxParams:
    """How boxes travel: pascal_voc pixels, the instance index as label field (to drop the masks of
    vanished boxes), clipped to the image, dropped below one pixel of width, height or area."""
    return A.BboxParams(format="pascal_voc", label_fields=["instance_ids"], min_area=1.0, min_width=1.0,
                        min_height=1.0, clip=True)


class SampleTransform:
    """Apply :func:`build_transforms` to one numpy sample and return tensors in mtfc's target format.

    A sample is a dict with ``image`` (uint8 (H, W, 3) RGB) and optionally ``boxes`` (float (N, 4)
    XYXY pixels), ``classes`` (N,), ``masks`` (uint8 (N, H, W)) and ``sem_seg`` (uint8 (H, W)). Targets
    are transformed with the image, except an eval ``sem_seg``, kept at the file's size (heads predict
    in original-image coordinates and MMSeg scores there, as its test pipeline loads annotations after
    the resize). The targets returned add ``content_size``: the (H, W) of the picture at the top-left of the fed image,
    the resized image with ``keep_aspect``, else the whole fed image (a letterbox's padding is coded
    as part of the picture).
    ``eval_resize`` (eval only, images without targets): :func:`reference_eval` to that shorter side
    instead of the letterbox. ``resize`` (eval only, one of :data:`RESIZE`) and ``size_divisibility``
    (the codec's, see :attr:`mtfc.Codec.size_divisibility`) set the eval padding.
    """

    def __init__(self, image_size: int | tuple[int, int], *, train: bool, eval_resize: int | None = None,
                 resize: str = "letterbox", size_divisibility: int = 1, **augment: Any) -> None:
        if resize not in RESIZE:
            raise ValueError(f"resize must be one of {list(RESIZE)}, got {resize!r}")
        if size_divisibility < 1:
            raise ValueError(f"size_divisibility must be positive, got {size_divisibility}")
        self.size = size_hw(image_size)
        self.compose = build_transforms(self.size, train=train, **augment)
        self.train = train
        self.eval_resize = None if train else eval_resize
        self.keep_aspect = not train and resize == "keep_aspect"
        self.size_divisibility = size_divisibility
        self._worker_seed: int | None = None
        # Without workers, random augmentations draw their seed from torch's generator, which the
        # engine seeds and checkpoints: runs are reproducible and resume exactly.
        self._seed_from_torch = train and augment.get("seed") is None

    def __call__(self, sample: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            # DataLoader workers start from copies of one random state: give each its own stream,
            # derived from torch's per-worker seed (new every epoch; fixed by torch.manual_seed).
            self._worker_seed = worker.seed
            self.compose.set_random_seed(worker.seed % 2**32)
        elif worker is None and self._seed_from_torch:
            self.compose.set_random_seed(int(torch.randint(2**31, ())))
        if self.eval_resize is not None:
            if set(sample) != {"image"}:
                extra = sorted(set(sample) - {"image"})
                raise ValueError(f"eval_resize crops images only, but the sample also has {extra}")
            return _to_tensor(reference_eval(sample["image"], self.eval_resize, self.size)), {"content_size": self.size}
        data: dict[str, Any] = {"image": sample["image"]}
        has_boxes, has_masks = "boxes" in sample, "masks" in sample
        count = len(sample["boxes"]) if has_boxes else 0
        data["bboxes"] = np.asarray(sample["boxes"], np.float32).reshape(-1, 4) if has_boxes else np.zeros((0, 4))
        data["instance_ids"] = np.arange(count)
        if has_masks and count:
            data["masks"] = np.asarray(sample["masks"], np.uint8)
        if "sem_seg" in sample and self.train:
            data["mask"] = sample["sem_seg"]
        out = self.compose(**data)

        keep = np.asarray(out["instance_ids"], np.int64).reshape(-1)
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        height, width = out["image"].shape[:2]
        targets: dict[str, Any] = {}
        if has_masks:
            masks = np.asarray(out["masks"], np.uint8)[keep] if count else np.zeros((0, height, width), np.uint8)
            nonempty = masks.any(axis=(1, 2))
            keep, masks = keep[nonempty], masks[nonempty]
            boxes = _tight_boxes(masks)
            targets["masks"] = self._pad(masks, 0, leading=1)
        if has_boxes:
            targets["boxes"] = boxes
            targets["classes"] = np.asarray(sample["classes"], np.int64).reshape(-1)[keep]
        if "sem_seg" in sample:  # evaluation scores the file's label map, as MMSeg's test pipeline does
            targets["sem_seg"] = self._pad(out["mask"], IGNORE_INDEX) if self.train else sample["sem_seg"]
        tensors = {"boxes": torch.float32, "classes": torch.int64, "masks": torch.uint8, "sem_seg": torch.int64}
        targets = {k: torch.as_tensor(np.ascontiguousarray(v), dtype=tensors[k]) for k, v in targets.items()}
        image = self._pad(out["image"], 0)
        # the picture's size in the fed image: letterbox codes its padding as picture (the canvas)
        targets["content_size"] = (height, width) if self.keep_aspect else image.shape[:2]
        return _to_tensor(image), targets

    def _pad(self, array: np.ndarray, fill: int, leading: int = 0) -> np.ndarray:
        """Pad bottom/right (box coordinates stay valid) to the configured size, or with ``keep_aspect``
        to the next multiples of ``size_divisibility``; the spatial axes start after ``leading`` axes."""
        h, w = array.shape[leading:leading + 2]
        height, width = padded_size((h, w), self.size_divisibility) if self.keep_aspect else self.size
        if (h, w) == (height, width):
            return array
        pad = [(0, 0)] * leading + [(0, height - h), (0, width - w)] + [(0, 0)] * (array.ndim - leading - 2)
        return np.pad(array, pad, constant_values=fill)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float32 (3, H, W) in [0, 1] (torchvision's ``pil_to_tensor`` + ``convert_image_dtype``)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """XYXY pixel boxes just enclosing each (non-empty) mask: pixel (r, c) covers [c, c+1) x [r, r+1)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes
