"""Export the device encoder (ONNX) and check its streams against PyTorch's. Same as `mtfc export`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["export", *sys.argv[1:]]))
