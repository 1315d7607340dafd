"""BD-rate and BD-metric per task of one run's mtfc curve against another's. Same as `mtfc compare`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["compare", *sys.argv[1:]]))
