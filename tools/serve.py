"""Serve a frozen codec and its heads over HTTP (FastAPI + uvicorn). Same as `mtfc serve`; see `--help`."""
import sys

from mtfc.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
