"""Generate the bundled multi-task dataset. Same as `mtfc make-dataset`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["make-dataset", *sys.argv[1:]]))
