"""Per-task rate-accuracy of mtfc, image codecs and the uncompressed reference. Same as `mtfc evaluate`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
