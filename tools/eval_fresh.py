"""Score a finished run of the bundled dataset on fresh images: N more scenes from the same generator (split
``test``: seeded apart from ``train`` and ``val``), so that curves which differ by a few validation images can be
told apart (300 images: one image is 0.33 point of top-1). Writes the rows as a results.json for `mtfc compare`.

    python tools/eval_fresh.py configs/demo-hues.yaml --images 3000 --out runs/demo-hues/fresh.json
    python tools/eval_fresh.py configs/demo-per-beta.yaml --images 3000 --out runs/demo-per-beta/fresh.json
    mtfc compare runs/demo-per-beta/fresh.json runs/demo-hues/fresh.json --names per-beta step

Only mtfc and the uncompressed reference are scored (image-codec baselines off) unless --set says otherwise;
the run's artifacts must exist (this trains nothing but learned baselines that are asked for).
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

from mtfc.data import make_dataset
from mtfc.data.synthetic import generated_with
from mtfc.evaluation.report import reference_rate_table
from mtfc.pipeline import Pipeline, load_config

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("config")
parser.add_argument("--images", type=int, default=3000, help="fresh scenes to generate and score")
parser.add_argument("--out", required=True, help="results.json to write")
parser.add_argument("--root", default="runs/fresh", help="where the fresh scenes are generated (once per count)")
parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE")
args = parser.parse_args()

p = Pipeline(load_config(args.config, ["evaluation.baselines={}", "evaluation.learned_baselines={}", *args.sets]))
p.validate()
data = p.cfg.data
if data.type != "bundled" or data.generate is None:
    raise SystemExit(f"{args.config}: fresh scenes come from the bundled generator; its data is {data.type!r}")
gen = {k: v for k, v in dataclasses.asdict(data.generate).items() if k not in ("splits", "workers")}
config = {"image_size": data.image_size, "splits": {"test": args.images}, "seed": p.seed, **gen}
root = Path(args.root) / f"test_{args.images}"
if not generated_with(root, config):
    make_dataset(root, overwrite=True, workers=2, **config)
start = time.time()
rows = p.evaluate(on=(str(root), "test"))
Path(args.out).write_text(json.dumps({"rows": rows, "within_reference": reference_rate_table(rows),
                                      "fresh": {"root": str(root), "images": args.images},
                                      "seconds": round(time.time() - start, 1)}, indent=1))
print(f"{len(rows)} rows on {args.images} fresh images in {time.time() - start:.0f} s: {args.out}")
