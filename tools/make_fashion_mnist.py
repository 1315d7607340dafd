"""Write Fashion-MNIST (from Debian's dataset-fashion-mnist) as an ImageFolder tree for configs/fashion.yaml.

    python tools/make_fashion_mnist.py --root runs/fashion/data [--train 12000] [--val 2000]
"""
import argparse
from pathlib import Path

from mtfc.data.fashion_mnist import DEBIAN_DIR, write_imagefolder

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--train", type=int, default=12000)
    p.add_argument("--val", type=int, default=2000)
    p.add_argument("--source", type=Path, default=DEBIAN_DIR)
    a = p.parse_args()
    print(write_imagefolder(a.root, splits={"train": a.train, "val": a.val}, source=a.source))
