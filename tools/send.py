"""Encode images on the device side and send them to an mtfc server. Same as `mtfc send`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["send", *sys.argv[1:]]))
