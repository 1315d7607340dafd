"""The ``mtfc`` command line: ``mtfc <subcommand> [options]`` (also ``python -m mtfc``).

Every subcommand is a thin wrapper over one library function; ``tools/<name>.py`` scripts call the
same entry points.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``run(args) -> exit code`` as subcommand ``name``; ``configure(parser)`` adds its options."""
    def deco(configure):
        def with_run(run):
            COMMANDS[name] = (help, configure, run)
            return run
        return with_run
    return deco


def _no_options(parser: argparse.ArgumentParser) -> None:
    pass


@command("doctor", "report the installed dependency stack and how to fix what is missing")(_no_options)
def _doctor(args: argparse.Namespace) -> int:
    from mtfc.doctor import main

    return main()


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config value, e.g. --set bottleneck.epochs=1 (repeatable)")


def _pipeline(args: argparse.Namespace):
    from mtfc.pipeline import Pipeline, load_config

    return Pipeline(load_config(args.config, args.overrides))


def _make_dataset_options(parser: argparse.ArgumentParser) -> None:
    from mtfc.data.cli import add_arguments

    add_arguments(parser)


@command("make-dataset", "generate the bundled multi-task dataset (ImageFolder + COCO JSON + MMSeg label maps)")(
    _make_dataset_options)
def _make_dataset(args: argparse.Namespace) -> int:
    from mtfc.data.cli import run

    return run(args)


@command("train-teacher", "train the teacher classifier of a config (unless it names pretrained weights)")(_config_options)
def _train_teacher(args: argparse.Namespace) -> int:
    p = _pipeline(args)
    p.make_dataset()
    p.teacher_model()
    return 0


@command("train-bottleneck", "train, freeze and export the shared codec for every β of a config")(_config_options)
def _train_bottleneck(args: argparse.Namespace) -> int:
    p = _pipeline(args)
    p.make_dataset()
    for beta, path in p.train_bottlenecks().items():
        print(f"β={beta:g}: {path}")
    return 0


@command("train-head", "fine-tune the config's heads on every frozen codec, and the reference heads")(_config_options)
def _train_head(args: argparse.Namespace) -> int:
    p = _pipeline(args)
    p.train_heads(references=True)
    for key, path in p.train_heads().items():
        print(f"{key}: {path}")
    return 0


@command("evaluate", "per-task rate–accuracy of mtfc, image codecs and the uncompressed reference")(_config_options)
def _evaluate(args: argparse.Namespace) -> int:
    p = _pipeline(args)
    paths = p.report(p.evaluate(), args.command_line)
    print(f"report: {paths['markdown']}")
    return 0


@command("run", "the whole pipeline: dataset, teacher, bottlenecks, heads, evaluation, report")(_config_options)
def _run(args: argparse.Namespace) -> int:
    _pipeline(args).run(args.command_line)
    return 0


def _benchmark_options(parser: argparse.ArgumentParser) -> None:
    _config_options(parser)
    parser.add_argument("--images", type=int, default=100, help="validation images for the rate measurement")
    parser.add_argument("--size", type=int, default=224, help="image side for the latency measurement")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the latency measurement")


@command("benchmark-codec", "actual bytes vs estimated bits, and encode/decode latency split by part")(_benchmark_options)
def _benchmark_codec(args: argparse.Namespace) -> int:
    import json

    import torch

    from mtfc.benchmark import benchmark
    from mtfc.codec import load_codec

    p = _pipeline(args)
    val = p.dataset(p.cfg["bottleneck"], "val", train=False)
    images = torch.stack([val[i][0] for i in range(min(args.images, len(val)))])
    results = {f"{beta:g}": benchmark(load_codec(path), images, args.size, args.threads)
               for beta, path in p.train_bottlenecks().items()}
    out = p.out / "benchmark_codec.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"{'beta':>6} {'bpp':>7} {'payload/est':>11} {'stream/est':>10} {'hdr B':>6} "
          f"{'enc net':>8} {'enc ec':>7} {'dec ec':>7} {'dec net':>8}  (ms at {args.size}x{args.size}, {args.threads} thread)")
    for beta, r in results.items():
        rate, lat = r["rate"], r["latency"]
        print(f"{beta:>6} {rate['bpp']:7.4f} {rate['payload/estimate']:11.4f} {rate['stream/estimate']:10.4f} "
              f"{rate['header_bytes_mean']:6.1f} {lat['encode_network_ms']:8.2f} {lat['encode_entropy_ms']:7.2f} "
              f"{lat['decode_entropy_ms']:7.2f} {lat['decode_network_ms']:8.2f}")
    print(f"written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtfc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)
    for name, (help, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["mtfc", *argv])  # recorded in reports' provenance
    return COMMANDS[args.command][2](args)
