"""Fine-tune a config's heads on every frozen codec (and the reference heads). Same as `mtfc train-head`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train-head", *sys.argv[1:]]))
