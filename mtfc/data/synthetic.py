"""The bundled multi-task dataset: a deterministic procedural scene generator and its writer.

Each scene is 1..N shapes of K classes (each class has its own geometry and, by default, its own band
of hues; with ``hue="independent"`` every object's hue is drawn uniformly, so only the shape tells the
class; random scale, rotation, position;
later shapes may partly occlude earlier ones, each keeps at least half of its area visible) on a
background full of *task-irrelevant detail*: a muted texture (smooth noise, stripes, checks or
waves) plus film grain everywhere. The split is deliberate: what every task needs (which shape,
where, which pixels) is carried by the silhouette of a bright, saturated object against a darker,
desaturated background, and is easy to learn; the texture and grain carry no task information but
cost an image codec many bytes. A supervised codec can learn to drop them — the point of feature
compression that the demo measures. Every image carries all three labels:
the image-level class (the largest *visible* object), one box + visible instance mask per object,
and a semantic mask (0 = background, k+1 = class k). :func:`make_dataset` writes them in standard
formats (see :data:`LAYOUT`) so the loaders that read real datasets read this one too.
"""
from __future__ import annotations

import colorsys
import json
import multiprocessing
import shutil
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

#: Shapes in the order classes are taken from; class names are then sorted, so that class ``k``
#: is also torchvision ``ImageFolder``'s ``k`` (it sorts directory names).
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow", "crescent", "ell")

FORMAT = "mtfc-bundled"
FORMAT_VERSION = 2

#: Where every file of a bundled dataset lives, relative to its root (``{split}`` per split).
LAYOUT = {
    "image_root": "classification/{split}",              # ImageFolder tree: <class_name>/<id>.png
    "ann_file": "annotations/instances_{split}.json",     # COCO instances; file_name relative to image_root
    "seg_map_root": "segmentation/{split}",               # MMSeg ann_dir: <class_name>/<id>.png label maps
}

_MIN_VISIBLE = 0.5  # an occluded object keeps at least this fraction of its pixels
_PLACEMENT_TRIES = 12


def class_names(num_classes: int) -> tuple[str, ...]:
    """The class names of a bundled dataset with ``num_classes`` classes (sorted)."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    return tuple(sorted(SHAPES[:num_classes]))


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    points = _regular(10, phase=-np.pi / 2)
    points[1::2] *= 0.45
    return points


_CROSS = 0.34 * np.array([[-1, -3], [1, -3], [1, -1], [3, -1], [3, 1], [1, 1],
                          [1, 3], [-1, 3], [-1, 1], [-3, 1], [-3, -1], [-1, -1]], dtype=float)
_ARROW = np.array([[-1.0, -0.3], [0.2, -0.3], [0.2, -0.75], [1.0, 0.0],
                   [0.2, 0.75], [0.2, 0.3], [-1.0, 0.3]])
_ELL = np.array([[-0.8, -0.9], [-0.25, -0.9], [-0.25, 0.35], [0.8, 0.35], [0.8, 0.9], [-0.8, 0.9]])
_CIRCLE = _regular(48)

#: Each shape as (polygon in unit coordinates, fill value) operations; value 0 cuts a hole.
_GEOMETRY: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_CIRCLE, 1)],
    "square": [(_regular(4, np.sqrt(2) * 0.8, np.pi / 4), 1)],
    "triangle": [(_regular(3, 1.1, -np.pi / 2), 1)],
    "star": [(_star(), 1)],
    "cross": [(_CROSS, 1)],
    "ring": [(_CIRCLE, 1), (0.55 * _CIRCLE, 0)],
    "hexagon": [(_regular(6), 1)],
    "arrow": [(_ARROW, 1)],
    "crescent": [(_CIRCLE, 1), (0.85 * _CIRCLE + [0.45, -0.1], 0)],
    "ell": [(_ELL, 1)],
}

SHAPES_BY_CLASS = {k: class_names(k) for k in range(1, len(SHAPES) + 1)}


@dataclass
class Scene:
    """One generated image with every label it carries."""

    image: np.ndarray        # uint8 (H, W, 3) RGB
    sem_seg: np.ndarray      # uint8 (H, W): 0 background, k+1 class k
    classes: list[int]       # class of each visible object, in drawing order
    masks: np.ndarray        # bool (N, H, W) visible (post-occlusion) instance masks
    label: int               # class of the largest visible object


def _rasterize(shape: str, centre: np.ndarray, radius: float, angle: float, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    for polygon, value in _GEOMETRY[shape]:
        points = (polygon @ rotation.T) * radius + centre
        # 4 fractional bits: sub-pixel vertex positions, exact (non-antialiased) coverage.
        cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], value, cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float],
            hue: float | None = None) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random() if hue is None else hue % 1.0, rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb) * 255.0


def _ramp(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """A random linear ramp in [0, 1] over the given pixel coordinates."""
    angle = rng.uniform(0, 2 * np.pi)
    t = (xs * np.cos(angle) + ys * np.sin(angle)) / size
    return (t - t.min()) / max(float(np.ptp(t)), 1e-6)


def _pattern(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """A [0, 1] stripe / checker / wave texture over the given pixel coordinates."""
    angle = rng.uniform(0, np.pi)
    frequency = rng.uniform(3, 10) * 2 * np.pi / size
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    kind = rng.integers(3)
    if kind == 0:
        return (np.sin(u * frequency) > 0).astype(np.float32)
    if kind == 1:
        return ((np.sin(u * frequency) * np.sin(v * frequency)) > 0).astype(np.float32)
    return 0.5 + 0.5 * np.sin(u * frequency + 2 * np.sin(v * frequency * 0.5))


#: Object colours are saturated and bright, background colours muted and darker: the silhouette is
#: always visible, whatever the texture.
_OBJECT_SV = ((0.8, 1.0), (0.8, 1.0))
_BACKGROUND_SV = ((0.0, 0.3), (0.1, 0.45))
_GRAIN = (6.0, 14.0)       # std of the per-pixel film grain, in 8-bit levels (drawn per image)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    low, high = _colour(rng, *_BACKGROUND_SV), _colour(rng, *_BACKGROUND_SV)
    kind = rng.integers(3)
    if kind == 0:
        t = _ramp(rng, ys, xs, size)
    elif kind == 1:
        cells = int(rng.integers(2, 9))
        t = cv2.resize(rng.random((cells, cells), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        t = np.clip(t, 0, 1)
    else:
        t = _pattern(rng, ys, xs, size)
    return low + t[..., None] * (high - low)


#: How an object's hue relates to its class: ``class`` (each class its own band, :func:`class_hue`) or
#: ``independent`` (uniform, whatever the class).
HUES = ("class", "independent")
#: Generator arguments added after format version 2 was written: ``dataset.json`` leaves them out at these
#: defaults, so that datasets (and the artifact keys derived from them) stay what they were.
_LATER_DEFAULTS = {"hue": "class"}


def class_hue(rng: np.random.Generator, cls: int, num_classes: int) -> float:
    """A hue from class ``cls``'s band: bands of width 1/(2K) centred on (k + ½)/K, gaps of the same width."""
    return (cls + 0.5 + rng.uniform(-0.25, 0.25)) / num_classes


def _hue(rng: np.random.Generator, cls: int, num_classes: int, hue: str) -> float:
    return class_hue(rng, cls, num_classes) if hue == "class" else float(rng.random())


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, hue: float) -> None:
    """Fill ``mask`` in ``image`` with a saturated colour of ``hue``, plain or with a faint gradient / pattern."""
    ys, xs = np.nonzero(mask)
    base = _colour(rng, *_OBJECT_SV, hue=hue)
    kind = rng.integers(3)
    if kind == 0:
        pixels = np.broadcast_to(base, (len(ys), 3))
    else:
        t = _ramp(rng, ys, xs, image.shape[0]) if kind == 1 else _pattern(rng, ys, xs, image.shape[0])
        pixels = base * (0.8 + 0.2 * t[:, None])
    image[ys, xs] = pixels


def generate_scene(rng: np.random.Generator, image_size: int, num_classes: int, max_objects: int,
                   label: int | None = None, hue: str = "class") -> Scene:
    """Draw one scene. ``label`` (optional) is the class of the first object, drawn largest; the
    scene's image-level label is measured after occlusion all the same. ``hue``: one of :data:`HUES`."""
    size = image_size
    owner = np.full((size, size), -1, np.int16)   # which placed object each pixel shows (-1: none)
    full_areas: list[int] = []
    classes: list[int] = []
    image = _background(rng, size)
    min_area = max(12, int(0.004 * size * size))
    for index in range(int(rng.integers(1, max_objects + 1))):
        for _ in range(_PLACEMENT_TRIES):
            cls = int(label) if index == 0 and label is not None else int(rng.integers(num_classes))
            radius = size * (rng.uniform(0.22, 0.32) if index == 0 else rng.uniform(0.11, 0.2))
            centre = rng.uniform(0.35 * radius, size - 0.35 * radius, 2)
            mask = _rasterize(SHAPES_BY_CLASS[num_classes][cls], centre, radius, rng.uniform(0, 2 * np.pi), size)
            area = int(mask.sum())
            if area < min_area:
                continue
            placed = len(classes)
            candidate = np.where(mask, placed, owner)
            visible = np.bincount(candidate.ravel() + 1, minlength=placed + 2)[1:placed + 1]
            if all(v >= _MIN_VISIBLE * a for v, a in zip(visible, full_areas)):
                owner = candidate
                full_areas.append(area)
                classes.append(cls)
                _paint(rng, image, mask, _hue(rng, cls, num_classes, hue))
                break
    if not classes:  # only reachable for image sizes where every shape rasterises below min_area
        raise RuntimeError(f"could not place any object in a {size}x{size} image")
    grain = rng.uniform(*_GRAIN)
    image = cv2.GaussianBlur(image, (0, 0), 0.6) + grain * rng.standard_normal(image.shape, dtype=np.float32)
    masks = owner[None] == np.arange(len(classes), dtype=np.int16)[:, None, None]
    sem_seg = np.zeros((size, size), np.uint8)
    for cls, mask in zip(classes, masks):
        sem_seg[mask] = cls + 1
    return Scene(image=np.clip(np.round(image), 0, 255).astype(np.uint8), sem_seg=sem_seg, classes=classes,
                 masks=masks, label=classes[int(np.argmax(masks.sum(axis=(1, 2))))])


def _mask_annotation(mask: np.ndarray) -> tuple[list[float], int, dict]:
    """COCO bbox [x, y, w, h] (tight around the pixels), area and compressed RLE of a bool mask."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    x0, y0 = int(cols[0]), int(rows[0])
    bbox = [float(x0), float(y0), float(cols[-1] + 1 - x0), float(rows[-1] + 1 - y0)]
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return bbox, int(mask.sum()), rle


def _generate_and_write(job: tuple[str, str, int, int, int, int, int, str]) -> tuple[int, str, list[tuple[int, list, int, dict]]]:
    """Generate and write image ``index`` of ``split``; return its label, file name and objects."""
    root, split, index, seed, image_size, num_classes, max_objects, hue = job
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    names = SHAPES_BY_CLASS[num_classes]
    scene = generate_scene(rng, image_size, num_classes, max_objects, label=index % num_classes, hue=hue)
    file_name = f"{names[scene.label]}/{index:06d}.png"
    image_path = Path(root, LAYOUT["image_root"].format(split=split), file_name)
    seg_path = Path(root, LAYOUT["seg_map_root"].format(split=split), file_name)
    for path, array in ((image_path, cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)), (seg_path, scene.sem_seg)):
        if not cv2.imwrite(str(path), array):
            raise OSError(f"{path}: could not write")
    objects = [(cls, *_mask_annotation(mask)) for cls, mask in zip(scene.classes, scene.masks)]
    return scene.label, file_name, objects


def _dataset_readme(config: dict, names: tuple[str, ...]) -> str:
    splits = ", ".join(f"`{s}` ({n} images)" for s, n in config["splits"].items())
    return f"""# mtfc bundled multi-task dataset

Procedurally generated by `mtfc make-dataset` (mtfc.data.make_dataset); regenerating with the
configuration in `dataset.json` (same mtfc and OpenCV versions) gives byte-identical files. Splits: {splits}.
Images are {config['image_size']}x{config['image_size']} RGB PNGs, stored once and shared by all tasks.

Classes (index: name): {', '.join(f'{k}: {n}' for k, n in enumerate(names))}.

| task | format | where |
| --- | --- | --- |
| classification | torchvision ImageFolder; label = largest visible object | `classification/<split>/<class_name>/<id>.png` |
| detection / instance segmentation | COCO instances JSON (bbox, area, iscrowd=0, RLE segmentation of the visible pixels; category_id = index + 1); `file_name` is relative to `classification/<split>/` | `annotations/instances_<split>.json` |
| semantic segmentation | MMSeg `img_dir` = `classification/<split>`, `ann_dir` = `segmentation/<split>`; single-channel PNG label maps, 0 = background, index + 1 = class | `segmentation/<split>/<class_name>/<id>.png` |

`dataset.json` records the generator configuration, seed, class names, per-split counts and the mtfc version.
"""


def _mtfc_version() -> str:
    try:
        return metadata.version("mtfc")
    except metadata.PackageNotFoundError:  # running from a source tree that is not pip-installed
        return "unknown"


def generated_with(root: str | Path, config: dict) -> bool:
    """Whether ``root`` holds a dataset this generator version wrote with ``config`` (keyword arguments
    of :func:`make_dataset`, absent ones at their defaults; ``workers`` and ``overwrite`` do not change the files)."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return False
    info = json.loads(path.read_text())
    written, asked = ({**_LATER_DEFAULTS, **c} for c in (info.get("config", {}), config))
    return info.get("format_version") == FORMAT_VERSION and all(
        written.get(k) == v for k, v in asked.items() if k not in ("workers", "overwrite"))


def make_dataset(root: str | Path, *, image_size: int = 64, num_classes: int = 5,
                 splits: dict[str, int] | None = None, max_objects: int = 3, seed: int = 0,
                 hue: str = "class", workers: int = 1, overwrite: bool = False) -> Path:
    """Generate the bundled multi-task dataset under ``root`` and return ``root``.

    ``splits`` maps split name to image count (default ``{"train": 2000, "val": 500}``); ``hue``: one
    of :data:`HUES` (``independent``: the class is carried by the shape alone). The output
    depends only on the arguments other than ``workers`` (byte-identical for the same ones).
    ``overwrite`` replaces a dataset already at ``root``; any other non-empty ``root`` is refused.
    """
    root = Path(root)
    splits = dict(splits or {"train": 2000, "val": 500})
    names = class_names(num_classes)
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    if hue not in HUES:
        raise ValueError(f"hue must be one of {', '.join(HUES)}, got {hue!r}")
    if not splits or any(n < 1 for n in splits.values()) or not all(s.isidentifier() for s in splits):
        raise ValueError(f"splits must map identifier-like names to positive counts, got {splits}")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty (pass overwrite=True / --overwrite to replace a dataset)")
        if not (root / "dataset.json").is_file():
            raise FileExistsError(f"{root} is not empty and holds no dataset.json: refusing to overwrite it")
        for child in ("classification", "segmentation", "annotations", "dataset.json", "README.md"):
            path = root / child
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    for split in splits:
        for pattern in ("image_root", "seg_map_root"):
            for name in names:
                Path(root, LAYOUT[pattern].format(split=split), name).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)

    jobs = [(str(root), split, i, seed, image_size, num_classes, max_objects, hue)
            for split, count in splits.items() for i in range(count)]
    if workers > 1:
        with multiprocessing.get_context().Pool(workers) as pool:
            results = pool.map(_generate_and_write, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    else:
        results = [_generate_and_write(job) for job in jobs]

    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(names)]
    counts: dict[str, dict] = {}
    position = 0
    for split, count in splits.items():
        images, annotations = [], []
        per_class = [0] * num_classes
        for index, (label, file_name, objects) in enumerate(results[position:position + count]):
            images.append({"id": index + 1, "file_name": file_name, "width": image_size, "height": image_size})
            per_class[label] += 1
            for cls, bbox, area, rle in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": cls + 1,
                                    "bbox": bbox, "area": area, "iscrowd": 0, "segmentation": rle})
        position += count
        coco = {"info": {"description": f"mtfc bundled dataset, split {split}", "version": str(FORMAT_VERSION)},
                "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        Path(root, LAYOUT["ann_file"].format(split=split)).write_text(json.dumps(coco, separators=(",", ":")))
        counts[split] = {"images": count, "instances": len(annotations),
                         "images_per_class": dict(zip(names, per_class))}

    config = {"image_size": image_size, "num_classes": num_classes, "splits": splits,
              "max_objects": max_objects, "seed": seed,
              **{k: v for k, v in {"hue": hue}.items() if v != _LATER_DEFAULTS[k]}}
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "mtfc_version": _mtfc_version(),
            "generator": "mtfc.data.make_dataset", "config": config, "class_names": list(names),
            "counts": counts, "layout": LAYOUT}
    (root / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    (root / "README.md").write_text(_dataset_readme(config, names))
    return root

