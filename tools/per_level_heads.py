"""Heads trained once for every level of a variable-rate codec vs one head per level (issue 21).

    mtfc run configs/demo.yaml --set out_dir=runs/vr-step --set bottleneck.codec.kind=step ...
    python tools/per_level_heads.py configs/demo.yaml --head classification \
        --set out_dir=runs/vr-step --set bottleneck.codec.kind=step

On a finished variable-rate run, trains head HEAD once per level (same section, same seed, the same
initialisation and distillation as the run's head, but only that level's latents) into
``<out_dir>/per_level_heads/<head>/level_<l>``, then scores both on every level through the deployed
path (encode at the level → decode → head) with the head's evaluator. Prints and writes
``<out_dir>/per_level_heads/<head>.json``.
"""
from __future__ import annotations

import argparse
import json

from torch.utils.data import DataLoader

from mtfc.codec import load_codec
from mtfc.data import collate
from mtfc.engine import seed_everything
from mtfc.model import MultiTaskModel
from mtfc.pipeline import Pipeline, load_config, mtfc_method
from mtfc.train import fit_head


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--head", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    p = Pipeline(load_config(args.config, args.set))
    if not p.variable_rate:
        parser.error("bottleneck.codec.kind must be a variable-rate kind (step or gain)")
    name, spec = args.head, p.cfg.heads[args.head]
    run = p.runs()[0]
    codec, teacher = load_codec(p.codec_path(run)), p.teacher_model()
    train_set, val_set = p.dataset(spec, "train", train=True), p.dataset(spec, "val", train=False)
    shared = MultiTaskModel(codec)
    shared.load_head(name, p.head_path(run, name))
    results = []
    for level, beta in enumerate(p.betas()):
        out = p.out / "per_level_heads" / name / f"level_{level}"
        if not (out / "head.pt").is_file():
            seed_everything(p.seed)
            head = p.build_head(name, codec.latent_channels, train_set)
            head.init_from_codec(codec)
            head.init_from_teacher(teacher)
            reference = p.reference_head(name, teacher, train_set) if spec.distill else None
            fit_head(head, train_set, codec=codec, out_dir=out, val_set=val_set, teacher=reference, level=level,
                     **p.fit_kwargs(spec))
        own = MultiTaskModel(codec)
        own.load_head(name, out / "head.pt")
        row = {"level": level, "beta": beta}
        for kind, model in (("per_level", own.eval()), ("once", shared.eval())):
            predict, ev = mtfc_method(model, level), model.heads[name].build_evaluator(val_set)
            ev.reset()
            n_bytes = pixels = 0
            for images, targets in DataLoader(val_set, batch_size=p.cfg.evaluation.batch_size, collate_fn=collate):
                result = predict(images, targets)
                ev.process(targets, result.predictions[name])
                n_bytes += sum(result.num_bytes)
                pixels += sum(t["orig_size"][0] * t["orig_size"][1] for t in targets)
            row[kind] = ev.evaluate()
            row["bpp"] = 8 * n_bytes / pixels
        results.append(row)
        print(json.dumps(row), flush=True)
    (p.out / "per_level_heads" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
