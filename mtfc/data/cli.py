"""``mtfc make-dataset``: generate the bundled multi-task dataset (ImageFolder + COCO JSON + MMSeg
label maps), optionally with a preview grid of samples.

    mtfc make-dataset --root data/shapes --image-size 64 --train 2000 --val 500 --preview docs/samples.png
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .bundled import MultiTaskDataset
from .preview import render_samples
from .synthetic import HUES, SHAPES, make_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mtfc make-dataset``."""
    parser.add_argument("--root", type=Path, required=True, help="output folder (created; must be empty)")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default 64)")
    parser.add_argument("--classes", type=int, default=5,
                        help=f"number of shape classes, 1..{len(SHAPES)} (default 5)")
    parser.add_argument("--train", type=int, default=2000, help="images in the train split (default 2000)")
    parser.add_argument("--val", type=int, default=500, help="images in the val split (default 500; 0: none)")
    parser.add_argument("--max-objects", type=int, default=3, help="objects per image: 1..N (default 3)")
    parser.add_argument("--hue", choices=HUES, default="class",
                        help="class: each class its own band of hues (default) | independent: only the shape tells the class")
    parser.add_argument("--seed", type=int, default=0, help="generator seed; same seed + options = same bytes")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="generator processes (the output does not depend on it; default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at --root")
    parser.add_argument("--preview", type=Path, metavar="PATH",
                        help="also draw samples with their boxes and masks into this PNG")


def run(args: argparse.Namespace) -> int:
    """Generate the dataset the parsed options describe; print where and how long."""
    splits = {name: count for name, count in (("train", args.train), ("val", args.val)) if count > 0}
    start = time.perf_counter()
    root = make_dataset(args.root, image_size=args.image_size, num_classes=args.classes, splits=splits,
                        max_objects=args.max_objects, seed=args.seed, hue=args.hue, workers=args.workers,
                        overwrite=args.overwrite)
    print(f"wrote {sum(splits.values())} images ({args.image_size}x{args.image_size}, {args.classes} classes) "
          f"to {root} in {time.perf_counter() - start:.1f} s with {args.workers} worker(s); "
          f"see {root / 'README.md'}")
    if args.preview:
        split = "val" if "val" in splits else "train"
        print(f"preview: {render_samples(MultiTaskDataset(root, split), args.preview)}")
    return 0

