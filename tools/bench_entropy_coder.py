"""mtfc's entropy coder (constriction ANS on CompressAI's tables) vs CompressAI's rANS coder, side by side.

    python tools/bench_entropy_coder.py                     # untrained, calibrated codecs at the class defaults
    python tools/bench_entropy_coder.py --codec runs/demo/codecs/beta_1/codec.pt

One process, 1 thread, batch 1, the coders timed in turn (:func:`mtfc.benchmark.coder_comparison`).
Without ``--codec``, each prior comes from an untrained codec (latent 24, hidden 96) calibrated by
:func:`mtfc.benchmark.untrained_variant` so that it codes symbols like a trained one.
"""
from __future__ import annotations

import argparse
import json

import torch

from mtfc.benchmark import coder_comparison, format_coder_comparison, untrained_variant
from mtfc.codec import DEFAULT_ENCODER, Codec, load_codec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", action="append", help="codec artifact (repeatable)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--latent-std", type=float, default=1.0, help="calibration of the untrained codecs")
    parser.add_argument("--json", help="also write every number here")
    args = parser.parse_args()
    if args.codec:
        codecs = [load_codec(path) for path in args.codec]
    else:
        calibration = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        codecs = [untrained_variant(DEFAULT_ENCODER, Codec(kind=kind), calibration, latent_std=args.latent_std)
                  for kind in ("factorized", "hyperprior")]
    results = [coder_comparison(codec, tuple(args.sizes), threads=1, repeats=args.repeats) for codec in codecs]
    for result in results:
        print(format_coder_comparison(result) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
