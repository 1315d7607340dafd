"""Load test of a real mtfc server process on 127.0.0.1. Same as `mtfc loadtest`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["loadtest", *sys.argv[1:]]))
