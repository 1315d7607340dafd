"""Train, freeze and export the shared codec for every beta of a config. Same as `mtfc train-bottleneck`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train-bottleneck", *sys.argv[1:]]))
