"""sc2bench's Entropic Student encoder + entropy coding vs mtfc's ``Codec.encode``, side by side.

Run through ``tools/bench_sc2bench.sh``, which provides sc2bench in a throw-away environment (sc2bench
is not a dependency of mtfc). One process, 1 thread, batch 1; every contestant is timed in turn,
the order rotating each repeat (:func:`mtfc.benchmark.interleaved_medians`), so load changes during
the run fall on all alike.

* sc2bench: ``FPBasedResNetBottleneck()`` exactly as sc2bench defines it (its defaults: 24 latent
  channels, encoder 3→96→48→24, 138,672 parameters — the Entropic Student bottleneck of SC2's ResNet
  experiments); timed: ``model.encode(normalize(x))`` = encoder + ``EntropyBottleneck.compress``.
* mtfc: each encoder variant at the class defaults (latent 24, hidden 96) and at the demo's sizes
  (latent 8, hidden 48); timed: the whole ``Codec.encode(x)`` (normalize, input checks, encoder,
  entropy coding, bitstream packing) — more work than the sc2bench side, never less.

All weights are untrained; so that entropy coding codes comparable symbols on both sides, each model
goes through the same :func:`mtfc.benchmark.calibrate` (latent scaled to standard deviation
``--latent-std`` on the calibration images, entropy bottleneck fitted for 100 steps, then
``update()``) before timing. ``--codec PATH`` adds trained mtfc codecs (as they are).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

from mtfc.benchmark import calibrate, encoder_complexity, interleaved_medians
from mtfc.codec import ENCODERS, Codec, load_codec
from mtfc.deploy.export import synthetic_images
from mtfc.teacher import normalize


def sc2bench_encoder(calibration: torch.Tensor, latent_std: float, seed: int = 0):
    from sc2bench.models.layer import FPBasedResNetBottleneck

    torch.manual_seed(seed)
    model = FPBasedResNetBottleneck()
    calibrate(model.encoder, model.entropy_bottleneck, normalize(calibration), latent_std=latent_std)
    model.update(force=True)  # sc2bench's own update (sets model.updated); the CDFs calibrate() built are kept
    return model.eval()


def mtfc_codec(encoder: str, latent: int, hidden: int, calibration: torch.Tensor, latent_std: float,
               seed: int = 0) -> Codec:
    torch.manual_seed(seed)
    codec = Codec(latent_channels=latent, hidden_channels=hidden, encoder=encoder)
    calibrate(codec.g_a, codec.latent_codec.entropy_bottleneck, normalize(calibration), latent_std=latent_std)
    return codec.freeze()


def machine() -> str:
    try:
        info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                                  check=True).stdout.splitlines() if ":" in line)
        cpu = f"{info['Model name'].strip()}, {info['CPU(s)'].strip()} CPU(s)"
    except Exception:
        cpu = platform.processor() or platform.machine()
    return f"{cpu}; torch {torch.__version__}; load average {os.getloadavg()[0]:.2f} at start"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--configs", nargs="+", default=["24/96", "8/48"], metavar="LATENT/HIDDEN",
                    help="mtfc sizes to build every encoder variant at")
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    ap.add_argument("--codec", action="append", default=[], metavar="PATH", help="also a trained codec artifact")
    ap.add_argument("--latent-std", type=float, default=1.0, help="latent standard deviation of the calibration")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    import compressai
    import sc2bench

    calibration = synthetic_images(4, 64, seed=1)
    ref = sc2bench_encoder(calibration, args.latent_std)
    # name -> (weights, encoder network, encode(x), entropy coding of the network's output)
    models: dict[str, tuple] = {}
    models["sc2bench ES (FPBasedResNetBottleneck)"] = ("untrained, calibrated", ref.encoder,
                                                      lambda x: ref.encode(normalize(x)), ref.entropy_bottleneck.compress)
    for cfg in args.configs:
        latent, hidden = map(int, cfg.split("/"))
        for name in args.encoders:
            codec = mtfc_codec(name, latent, hidden, calibration, args.latent_std)
            models[f"mtfc {name} {latent}/{hidden}"] = ("untrained, calibrated", codec.g_a, codec.encode,
                                                        codec.compress_latent)
    for path in args.codec:
        codec = load_codec(path)
        models[f"mtfc {codec.encoder} {codec.latent_channels}/{codec.config['hidden_channels']} ({path})"] = (
            "trained", codec.g_a, codec.encode, codec.compress_latent)

    ref_name = next(iter(models))
    results = {"machine": machine(), "threads": torch.get_num_threads(), "batch": 1, "repeats": args.repeats,
               "versions": {"torch": torch.__version__, "compressai": compressai.__version__,
                            "sc2bench": sc2bench.__version__},
               "latent_std": args.latent_std, "rows": []}
    for name, (weights, net, *_) in models.items():
        results["rows"].append({"name": name, "weights": weights, **encoder_complexity(net), "ms": {}, "parts": {}})
    with torch.no_grad():
        for size in args.sizes:
            image = synthetic_images(1, size, seed=size)
            fns = {}
            for name, (_, net, encode, entropy) in models.items():
                y = net(normalize(image))
                fns[name, "encode"] = lambda f=encode: f(image)
                fns[name, "network"] = lambda n=net: n(normalize(image))
                fns[name, "entropy"] = lambda f=entropy, y=y: f(y)
            ms = interleaved_medians(fns, args.repeats)
            for row in results["rows"]:
                row["ms"][str(size)] = ms[row["name"], "encode"]
                row["parts"][str(size)] = {"network": ms[row["name"], "network"], "entropy": ms[row["name"], "entropy"]}
    results["load_average_end"] = os.getloadavg()[0]

    print(f"# {results['machine']}; 1 thread, batch 1, median of {args.repeats} interleaved repeats; "
          f"load average {results['load_average_end']:.2f} at end")
    print("| encoder | weights | params | kMAC/px | " + " | ".join(
        f"{s}² net + entropy ms | {s}² encode ms | {s}² ratio" for s in args.sizes) + " |")
    print("|---|---|---|---|" + "---|---|---|" * len(args.sizes))
    ref_ms = results["rows"][0]["ms"]
    for row in results["rows"]:
        row["ratio"] = {s: row["ms"][s] / ref_ms[s] for s in row["ms"]}
        cells = " | ".join(f"{row['parts'][str(s)]['network']:.2f} + {row['parts'][str(s)]['entropy']:.2f} | "
                           f"{row['ms'][str(s)]:.2f} | {row['ratio'][str(s)]:.2f}" for s in args.sizes)
        print(f"| {row['name']} | {row['weights']} | {row['params']:,} | {row['kmac_per_pixel']:.2f} | {cells} |")
    print(f"(ratio: encode time / {ref_name}'s encode = its encoder + entropy coding; net + entropy: the two "
          "parts timed separately, interleaved with the rest)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
