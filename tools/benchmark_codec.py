"""Actual bytes vs estimated bits and encode/decode latency of each codec of a config. Same as `mtfc benchmark-codec`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["benchmark-codec", *sys.argv[1:]]))
