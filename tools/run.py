"""The whole pipeline on a config (the README's main job). Same as `mtfc run`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))
