"""Tiny datasets in every real layout mtfc reads, with the quirks of the real ones, written on demand
(for tests and for a CI smoke of ``configs/real.yaml``; nothing here is committed as images).

:func:`write_real_layouts` writes, under one folder:

- ``imagenet/``: ImageFolder ``train``/``val`` with wnid class folders; a greyscale JPEG, a CMYK JPEG,
  an RGBA PNG, a PNG named ``.JPEG`` (as ImageNet has), a non-image file, and (``corrupt=True``) a
  truncated JPEG; ``val`` lacks one of train's classes.
- ``coco/``: COCO 2017 (``annotations/instances_{split}2017.json``, ``{split}2017/``) with category ids
  1/3/7/90, a two-polygon object, a crowd RLE, images without annotations, a greyscale image, a box
  reaching out of its image, and in train one zero-width box, one object whose only polygon has two
  points and one object with an extra two-point polygon.
- ``ade20k/`` (ADEChallengeData2016), ``voc/`` (VOCdevkit/VOC2012, palette PNGs with 255 borders),
  ``cityscapes/`` (``leftImg8bit`` + ``gtFine`` ``labelTrainIds``).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

#: ImageFolder layout: split → class folder → files (name → kind of file, see :func:`_write_kind`).
IMAGEFOLDER = {
    "train": {"n01440764": {"a.JPEG": "rgb", "b.JPEG": "grey", "notes.txt": "text"},
              "n01443537": {"c.JPEG": "cmyk", "d.JPEG": "png_named_jpeg"},
              "n01484850": {"e.png": "rgba", "f.JPEG": "truncated"}},
    "val": {"n01440764": {"v1.JPEG": "rgb"}, "n01484850": {"v2.JPEG": "grey"}},
}

GREY = 100
"""Value of every pixel of the greyscale images."""
CMYK = (0, 255, 255, 0)
"""Colour of the CMYK JPEG: pure red."""
RGBA = (10, 20, 30, 0)
"""Colour of the RGBA PNG (fully transparent)."""

COCO_CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"},
                   {"id": 7, "name": "train", "supercategory": "vehicle"},
                   {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]


def _square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ann(ann_id: int, image_id: int, category_id: int, bbox: list[float], segmentation, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": float(bbox[2] * bbox[3]), "iscrowd": iscrowd, "segmentation": segmentation}


#: COCO layout: split → images (id, size W x H, greyscale?) and annotations.
COCO = {
    "train": {
        "images": [(1, (48, 32), False), (2, (48, 32), True), (3, (48, 32), False)],
        "annotations": [
            _ann(10, 1, 1, [4, 4, 24, 8], [_square(4, 4, 12, 12), _square(20, 4, 28, 12)]),  # two polygons
            _ann(11, 1, 90, [30, 16, 10, 12], [_square(30, 16, 40, 28)]),
            _ann(12, 1, 3, [10, 0, 2, 32], {"size": [32, 48], "counts": [320, 64, 1152]}, iscrowd=1),
            _ann(13, 3, 7, [5, 5, 0, 10], [[5, 5, 5, 15, 5, 10]]),                   # zero-width box
            _ann(14, 3, 3, [1, 1, 1, 1], [[1, 1, 2, 2]]),                            # two-point polygon
            _ann(15, 3, 7, [40, 20, 20, 20], [_square(40, 20, 60, 40)]),             # reaches out of the image
            _ann(16, 3, 90, [10, 20, 10, 10], [_square(10, 20, 20, 30), [0, 0, 1, 1]]),  # + a two-point part
        ],
    },
    "val": {
        "images": [(101, (48, 32), False), (102, (40, 30), False)],
        "annotations": [
            _ann(20, 101, 3, [8, 8, 16, 16], [_square(8, 8, 24, 24)]),
            _ann(21, 101, 90, [30, 4, 14, 8], [_square(30, 4, 44, 12)]),
        ],
    },
}


def _pixels(size_wh: tuple[int, int], seed: int) -> np.ndarray:
    """A deterministic RGB image: a gradient with noise (so a JPEG of it is not trivially short)."""
    width, height = size_wh
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def _write_kind(path: Path, kind: str, seed: int, size_wh: tuple[int, int] = (32, 24)) -> None:
    """Write one file of ``kind``: rgb / grey / cmyk JPEG, rgba PNG, a PNG named .JPEG, a truncated
    JPEG (the first half of an RGB one) or a text file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size_wh
    if kind == "rgb":  # JPEG or PNG, as the suffix says
        Image.fromarray(_pixels(size_wh, seed)).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    elif kind == "grey":
        Image.new("L", size_wh, GREY).save(path, format="JPEG", quality=95)
    elif kind == "cmyk":
        Image.new("CMYK", size_wh, CMYK).save(path, format="JPEG", quality=95)
    elif kind == "rgba":
        Image.new("RGBA", size_wh, RGBA).save(path, format="PNG")
    elif kind == "png_named_jpeg":
        Image.fromarray(_pixels(size_wh, seed)).save(path, format="PNG")
    elif kind == "truncated":  # 64 x 48: the cut falls in the scan data, where OpenCV fills the rest grey
        buffer = io.BytesIO()
        Image.fromarray(_pixels((64, 48), seed)).save(buffer, format="JPEG", quality=90)
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "text":
        path.write_text("not an image\n")
    else:
        raise ValueError(f"unknown file kind {kind!r}")


def write_imagefolder(root: Path, *, corrupt: bool = True) -> Path:
    """The ImageFolder (ImageNet) layout of :data:`IMAGEFOLDER` under ``root``; without ``corrupt`` the
    truncated JPEG is left out."""
    seed = 0
    for split, classes in IMAGEFOLDER.items():
        for class_name, files in classes.items():
            for name, kind in files.items():
                if kind == "truncated" and not corrupt:
                    continue
                seed += 1
                _write_kind(root / split / class_name / name, kind, seed)
    return root


def write_coco(root: Path) -> Path:
    """The COCO 2017 layout of :data:`COCO` under ``root``."""
    for split, content in COCO.items():
        images = []
        for image_id, size_wh, grey in content["images"]:
            file_name = f"{image_id:012d}.jpg"
            _write_kind(root / f"{split}2017" / file_name, "grey" if grey else "rgb", image_id, size_wh)
            images.append({"id": image_id, "file_name": file_name, "width": size_wh[0], "height": size_wh[1]})
        data = {"info": {"description": f"mtfc.data.testing COCO {split}"}, "licenses": [], "images": images,
                "annotations": content["annotations"], "categories": COCO_CATEGORIES}
        path = root / "annotations" / f"instances_{split}2017.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return root


def ade20k_label_map() -> np.ndarray:
    """The ADE20K label map of every image (16 x 24): raw 0 ("other") with a block of 1 (wall) at
    rows 2..5, cols 2..9 and a block of 150 (the last class) at rows 8..13, cols 12..21."""
    raw = np.zeros((16, 24), np.uint8)
    raw[2:6, 2:10] = 1
    raw[8:14, 12:22] = 150
    return raw


def voc_label_map() -> np.ndarray:
    """The VOC label map of every image (16 x 24): background 0, a person (15) at rows 4..11,
    cols 6..17, and 255 on its one-pixel border (as VOC marks object boundaries)."""
    raw = np.zeros((16, 24), np.uint8)
    raw[3:13, 5:19] = 255
    raw[4:12, 6:18] = 15
    return raw


def cityscapes_label_map() -> np.ndarray:
    """The Cityscapes ``labelTrainIds`` map of every image (16 x 24): road (0) in the bottom half,
    bicycle (18) at rows 2..5, cols 2..5, and 255 (void) elsewhere."""
    raw = np.full((16, 24), 255, np.uint8)
    raw[8:, :] = 0
    raw[2:6, 2:6] = 18
    return raw


def _voc_palette() -> list[int]:
    """VOC's colour map (the bit pattern of the class index spread over R, G, B)."""
    colours = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours += [r, g, b]
    return colours


def write_ade20k(root: Path) -> Path:
    """ADEChallengeData2016 under ``root``: two training images, one validation image."""
    for split, folder, index in (("train", "training", 1), ("train", "training", 2), ("val", "validation", 1)):
        name = f"ADE_{split}_{index:08d}"
        _write_kind(root / "images" / folder / f"{name}.jpg", "rgb", index, (24, 16))
        path = root / "annotations" / folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ade20k_label_map()).save(path)
    return root


def write_voc(root: Path) -> Path:
    """VOCdevkit/VOC2012 (``root`` is VOC2012) with palette label maps; one image per split."""
    for split, stem in (("train", "2007_000032"), ("val", "2007_000033")):
        _write_kind(root / "JPEGImages" / f"{stem}.jpg", "rgb", len(stem), (24, 16))
        label = Image.fromarray(voc_label_map(), mode="L").convert("P")
        label.putpalette(_voc_palette())
        path = root / "SegmentationClass" / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        label.save(path)
        listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(f"{stem}\n")
    return root


def write_cityscapes(root: Path) -> Path:
    """Cityscapes under ``root``: one image per split in a city folder."""
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        _write_kind(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", "rgb", 7, (24, 16))
        path = root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(cityscapes_label_map()).save(path)
    return root


def write_real_layouts(root: str | Path, *, corrupt: bool = True) -> dict[str, Path]:
    """Every layout under ``root`` (see the module docstring); returns the root of each by its
    ``type:`` name. ``corrupt=False`` leaves out the truncated JPEG (for a smoke run that trains)."""
    root = Path(root)
    return {"imagenet": write_imagefolder(root / "imagenet", corrupt=corrupt), "coco": write_coco(root / "coco"),
            "ade20k": write_ade20k(root / "ade20k"), "voc": write_voc(root / "voc"),
            "cityscapes": write_cityscapes(root / "cityscapes")}
