"""Fashion-MNIST (Xiao et al., 2017) as an ImageFolder tree: the real-photograph benchmark.

70,000 greyscale 28×28 photographs of Zalando articles in 10 classes, installed offline from Debian's
``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``; ``tools/setup.sh`` installs it
when it runs as root). :func:`write_imagefolder` writes the first ``n`` images of each split file as PNGs
under ``root/{train,val}/<class>/``, which ``type: imagefolder`` reads like any other ImageFolder tree.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FILES = {"train": "train", "val": "t10k"}  # the official test set serves as validation


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (LeCun's MNIST format): big-endian magic, dimensions, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {got:#x}, expected {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_imagefolder(root: str | Path, *, splits: dict[str, int] | None = None,
                      source: str | Path = DEBIAN_DIR) -> Path:
    """Write the first ``splits[split]`` images of each split (default 12,000 train, 2,000 val) to ``root``.

    Deterministic: the same arguments give the same files. Skips the work when ``root/dataset.json``
    already records the same splits."""
    root, source = Path(root), Path(source)
    splits = splits or {"train": 12000, "val": 2000}
    info = {"dataset": "fashion-mnist", "source": str(source), "splits": splits, "classes": list(CLASSES)}
    stamp = root / "dataset.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == info:
        return root
    for split, n in splits.items():
        stem = FILES[split]
        images_file, labels_file = source / f"{stem}-images-idx3-ubyte.gz", source / f"{stem}-labels-idx1-ubyte.gz"
        for f in (images_file, labels_file):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: install Debian's dataset-fashion-mnist "
                                        "(`apt-get install dataset-fashion-mnist`) or pass --source")
        images, labels = _read_idx(images_file, 0x803), _read_idx(labels_file, 0x801)
        if n > len(images):
            raise ValueError(f"{split}: {n} images asked, {images_file} has {len(images)}")
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(images[i]).save(root / split / CLASSES[labels[i]] / f"{i:05d}.png")
    stamp.write_text(json.dumps(info, indent=1))
    return root
