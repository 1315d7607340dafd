"""Train the teacher classifier of a config. Same as `mtfc train-teacher`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train-teacher", *sys.argv[1:]]))
