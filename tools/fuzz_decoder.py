"""Fuzz ``Codec.decode`` with forged streams whose header and CRC are valid (see :mod:`mtfc.fuzz`).

    python tools/fuzz_decoder.py --n 100000                 # a small untrained codec of each kind
    python tools/fuzz_decoder.py --n 10000 --codec runs/demo/codecs/beta_1/codec.pt

Prints the outcome counts per kind of forgery as JSON; exits 1 if any latent was not finite or any
stream answered differently the second time.
"""
from __future__ import annotations

import argparse
import json

import torch

from mtfc.codec import load_codec
from mtfc.fuzz import fuzz_decoder, small_codec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="forged streams per codec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec", help="a codec artifact; default: a small untrained codec of each kind (5 levels for the variable-rate ones)")
    parser.add_argument("--size", type=int, nargs=2, default=(32, 48), metavar=("H", "W"),
                        help="size of the images the legit streams come from")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.codec:
        codecs = {args.codec: load_codec(args.codec)}
    else:
        codecs = {kind: small_codec(kind, levels=5 if kind in ("step", "gain") else 0)
                  for kind in ("factorized", "hyperprior", "step", "gain")}
    failed = False
    for name, codec in codecs.items():
        result = fuzz_decoder(codec, args.n, args.seed, tuple(args.size))
        print(json.dumps({"codec": name, **result}, indent=2))
        failed |= bool(result["non_finite"] or result["inconsistent"])
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
