"""End-to-end latency of mtfc vs offloading the image, over a bandwidth sweep. Same as `mtfc latency`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["latency", *sys.argv[1:]]))
