"""The ``mtfc`` command line: ``mtfc <subcommand> [options]`` (also ``python -m mtfc``).

Every subcommand is a thin wrapper over one library function; ``tools/<name>.py`` scripts call the
same entry points.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
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


@command("check", "open every dataset and weights file a config names and check they fit together "
                  "(trains nothing; `mtfc run` does this first)")(_config_options)
def _check(args: argparse.Namespace) -> int:
    p = _pipeline(args)
    p.make_dataset()
    p.validate()
    print(f"{args.config}: every dataset, weights file and section checked, no problem found")
    return 0


@command("train-teacher", "train the teacher classifier of a config (unless it names pretrained weights)")(_config_options)
def _train_teacher(args: argparse.Namespace) -> int:
    p = _pipeline(args)
    p.make_dataset()
    p.validate(["teacher"])
    p.teacher_model()
    return 0


@command("train-bottleneck", "train, freeze and export the shared codec for every β of a config")(_config_options)
def _train_bottleneck(args: argparse.Namespace) -> int:
    p = _pipeline(args)
    p.make_dataset()
    p.validate(["teacher", "bottleneck"])
    for beta, path in p.train_bottlenecks().items():
        print(f"β={beta:g}: {path}")
    return 0


@command("train-head", "fine-tune the config's heads on every frozen codec, and the reference heads")(_config_options)
def _train_head(args: argparse.Namespace) -> int:
    p = _pipeline(args)
    p.validate()
    p.train_heads(references=True)
    for key, path in p.train_heads().items():
        print(f"{key}: {path}")
    return 0


@command("evaluate", "per-task rate–accuracy of mtfc, image codecs and the uncompressed reference")(_config_options)
def _evaluate(args: argparse.Namespace) -> int:
    p = _pipeline(args)
    p.validate()
    paths = p.report(p.evaluate(), args.command_line)
    print(f"report: {paths['markdown']}")
    return 0


def _run_options(parser: argparse.ArgumentParser) -> None:
    _config_options(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every default filled in) as YAML and exit")


@command("run", "the whole pipeline: dataset, teacher, bottlenecks, heads, evaluation, report")(_run_options)
def _run(args: argparse.Namespace) -> int:
    if args.print_config:
        import yaml

        from mtfc.pipeline import load_config

        print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
        return 0
    _pipeline(args).run(args.command_line)
    return 0


def _benchmark_options(parser: argparse.ArgumentParser) -> None:
    _config_options(parser)
    parser.add_argument("--images", type=int, default=100, help="validation images for the rate measurement")
    parser.add_argument("--size", type=int, default=224, help="image side for the latency measurement")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the latency measurement")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (medians)")
    parser.add_argument("--encoder-sizes", type=int, nargs="*", default=[224, 64], metavar="SIZE",
                        help="image sides of the encoder table (every encoder variant and each trained codec; "
                             "none: skip the table)")


@command("benchmark-codec", "actual bytes vs estimated bits, encode/decode latency split by part, and the "
                            "encoder variants' size and encode time")(_benchmark_options)
def _benchmark_codec(args: argparse.Namespace) -> int:
    import json

    import torch

    from mtfc.benchmark import benchmark, encoder_table, format_encoder_table
    from mtfc.codec import load_codec

    p = _pipeline(args)
    val = p.dataset(p.cfg.bottleneck, "val", train=False)
    images = torch.stack([val[i][0] for i in range(min(args.images, len(val)))])
    codecs = {f"{beta:g}": load_codec(path) for beta, path in p.train_bottlenecks().items()}
    results = {beta: benchmark(codec, images, args.size, args.threads, args.repeats) for beta, codec in codecs.items()}
    out = p.out / "benchmark_codec.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"{'beta':>6} {'bpp':>7} {'payload/est':>11} {'stream/est':>10} {'hdr B':>6} "
          f"{'enc net':>8} {'enc ec':>7} {'encode':>7} {'dec ec':>7} {'dec net':>8}  "
          f"(ms at {args.size}x{args.size}, {args.threads} thread)")
    for beta, r in results.items():
        rate, lat = r["rate"], r["latency"]
        print(f"{beta:>6} {rate['bpp']:7.4f} {rate['payload/estimate']:11.4f} {rate['stream/estimate']:10.4f} "
              f"{rate['header_bytes_mean']:6.1f} {lat['encode_network_ms']:8.2f} {lat['encode_entropy_ms']:7.2f} "
              f"{lat['encode_ms']:7.2f} {lat['decode_entropy_ms']:7.2f} {lat['decode_network_ms']:8.2f}")
    print(f"written to {out}")
    if args.encoder_sizes:
        rows = encoder_table({f"beta {beta}": c for beta, c in codecs.items()}, images, tuple(args.encoder_sizes),
                             args.threads, args.repeats)
        out = p.out / "benchmark_encoders.json"
        out.write_text(json.dumps({"machine": results[next(iter(results))]["machine"] if results else None,
                                   "rows": rows}, indent=2))
        print(format_encoder_table(rows, args.threads))
        print(f"written to {out}")
    return 0


def _compare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("anchor", help="results.json of the plain recipe (e.g. runs/demo/report/results.json)")
    parser.add_argument("test", help="results.json of the run to compare with it")
    parser.add_argument("--names", nargs=2, default=["plain", "method"], metavar=("ANCHOR", "TEST"),
                        help="names of the two runs in the table")
    parser.add_argument("--out", help="also write the table as JSON here")
    parser.add_argument("--plot", metavar="DIR", help="also draw both curves of each task in DIR/<task>.png")


@command("compare", "BD-rate and BD-metric per task of one run's mtfc curve against another's")(_compare_options)
def _compare(args: argparse.Namespace) -> int:
    import json

    from mtfc.evaluation.compare import compare, format_table, plot_curves, read_rows, read_within

    anchor, test = read_rows(args.anchor), read_rows(args.test)
    table = compare(anchor, test, *args.names, within=(read_within(args.anchor), read_within(args.test)))
    print(format_table(table, *args.names))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=2))
    if args.plot:
        print("plots:", ", ".join(str(p) for p in plot_curves(anchor, test, *args.names, args.plot)))
    return 0


def _export_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("codec", help="frozen codec artifact (codec.pt)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    parser.add_argument("--out", required=True, help="export directory (encoder.onnx, codec.pt, encoder.json)")
    parser.add_argument("--check", type=int, default=300, metavar="N",
                        help="compare the ONNX encoder's streams with PyTorch's on N images (0: skip)")
    parser.add_argument("--data", help="bundled dataset root whose val images the check uses (default: synthetic)")
    parser.add_argument("--size", type=int, default=64, help="side of the synthetic check images")
    parser.add_argument("--benchmark", action="store_true", help="time PyTorch vs ONNX Runtime (batch 1; 224 and 64 px)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both runtimes")


def _check_images(data: str | None, n: int, size: int):
    import torch

    from mtfc.deploy.export import synthetic_images

    if not data:
        return synthetic_images(n, size)
    from mtfc.data import build_dataset

    val = build_dataset({"type": "bundled", "root": data}, "val")
    return torch.stack([val[i][0] for i in range(min(n, len(val)))])


@command("export", "export the device encoder (ONNX) and check its streams against PyTorch's")(_export_options)
def _export(args: argparse.Namespace) -> int:
    from mtfc.deploy.export import export_report, format_report

    images = _check_images(args.data, args.check, args.size) if args.check else None
    report = export_report(args.codec, args.out, fmt=args.format, images=images, benchmark=args.benchmark,
                           threads=args.threads)
    print(format_report(report))
    return 0


def _heads(specs: list[str]) -> dict[str, str]:
    heads = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--head takes NAME=PATH (e.g. cls=runs/demo/heads/levels/classification/head.pt), got {spec!r}")
        heads[name] = path
    return heads


#: ``mtfc serve`` / ``mtfc loadtest`` options, one per :class:`mtfc.deploy.ServerConfig` field (whose
#: defaults apply to options not given), plus ``--image-size``.
SERVER_OPTIONS: dict[str, tuple[type, str]] = {
    "max_batch": (int, "most images per head batch"),
    "max_batch_pixels": (int, "most image pixels per head batch"),
    "max_wait_ms": (float, "longest wait for a batch to fill"),
    "max_body_bytes": (int, "larger bodies get 413"),
    "max_pixels_in_flight": (int, "most image pixels of requests being decoded or run at once"),
    "max_queue": (int, "requests waiting for room; more get 503"),
    "request_timeout_s": (float, "deadline from the received body to the answer; past it 504, work cancelled"),
    "header_timeout_s": (float, "close connections that do not send a request's headers within this time"),
    "body_timeout_s": (float, "408 for bodies not received within this time"),
    "keep_alive_s": (float, "close idle keep-alive connections after this time"),
    "max_connections": (int, "most connections and requests at once; uvicorn answers 503 beyond"),
    "decoder_workers": (int, "crash-isolated entropy-decoding processes"),
    "threads": (int, "PyTorch threads of the server and of each decoder"),
}


def _image_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size takes HxW or S (e.g. 64x64 or 224), got {text!r}") from None


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("codec", help="frozen codec artifact (codec.pt)")
    parser.add_argument("--head", action="append", default=[], metavar="NAME=PATH", help="a head checkpoint (repeatable)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module first (user heads register in mtfc.HEADS on import; repeatable)")
    parser.add_argument("--image-size", dest="image_sizes", action="append", type=_image_size, metavar="HxW",
                        help="an image size to serve (repeatable; default: the training sizes the codec and heads "
                             "record); streams of other sizes get 400/413")
    for name, (kind, help) in SERVER_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind,
                            help=f"{help} (default: see mtfc.deploy.ServerConfig)")


def _server_config(args: argparse.Namespace):
    from mtfc.deploy.server import ServerConfig

    given = {name: getattr(args, name) for name in SERVER_OPTIONS if getattr(args, name) is not None}
    return ServerConfig(**given, image_sizes=args.image_sizes,
                        token=getattr(args, "token", None) or os.environ.get("MTFC_TOKEN") or None)


def _serve_options(parser: argparse.ArgumentParser) -> None:
    _server_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", help="require this bearer token (default: $MTFC_TOKEN; unset: no authentication)")
    parser.add_argument("--ssl-certfile", help="TLS certificate (PEM): serve HTTPS")
    parser.add_argument("--ssl-keyfile", help="TLS private key (PEM)")
    parser.add_argument("--log-level", default="info")


@command("serve", "serve a frozen codec and its heads over HTTP (FastAPI + uvicorn; one decode for every head)")(
    _serve_options)
def _serve(args: argparse.Namespace) -> int:
    from mtfc.deploy.server import serve

    serve(args.codec, _heads(args.head), host=args.host, port=args.port, config=_server_config(args),
          imports=args.imports, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, log_level=args.log_level)
    return 0


def _send_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--encoder", help="export directory of `mtfc export` (ONNX Runtime encoder)")
    where.add_argument("--codec", help="codec artifact (PyTorch encoder)")
    parser.add_argument("--heads", help="comma-separated heads (default: all)")
    parser.add_argument("--size", type=int, help="resize images to SIZExSIZE first (default: pad only)")
    parser.add_argument("--level", "--rate", type=int, dest="level",
                        help="rate level of a variable-rate codec (0: the highest rate; default its middle level)")
    parser.add_argument("--token", help="bearer token (default: $MTFC_TOKEN)")
    parser.add_argument("--cacert", help="CA bundle that signed the server's certificate (self-signed TLS)")
    parser.add_argument("--threads", type=int, default=1, help="encoder threads")
    parser.add_argument("--json", help="write every answer to this JSON file")


@command("send", "encode images on the device side, send them to `mtfc serve`, print predictions and timings")(
    _send_options)
def _send(args: argparse.Namespace) -> int:
    import json
    import os
    from dataclasses import asdict

    from mtfc.deploy.client import Client, ServerError, send_images

    if args.encoder:
        from mtfc.deploy.encoder import Encoder

        encoder = Encoder(args.encoder, threads=args.threads)
    else:
        from mtfc.codec import load_codec

        encoder = load_codec(args.codec)
    token = args.token or os.environ.get("MTFC_TOKEN")
    with Client(args.server, encoder, token=token, verify=args.cacert or True) as client:
        try:
            results = send_images(args.images, client, args.heads.split(",") if args.heads else None, args.size,
                                  args.level)
        except ServerError as e:
            print(f"mtfc send: the server refused the request: {e}", file=sys.stderr)
            return 1
    total = sum(r.bytes_sent for _, r in results)
    print(f"{len(results)} image(s), {total} bytes sent")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({path: asdict(r) for path, r in results}, f, indent=2)
        print(f"answers written to {args.json}")
    return 0


def _latency_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results.json of a rate–accuracy run (runs/<name>/report/results.json)")
    parser.add_argument("--rate-point", help="mtfc rate point (β) to model (default: its most accurate)")
    parser.add_argument("--tasks", help="tasks whose accuracy the image codecs must match, comma-separated (default: all)")
    parser.add_argument("--bandwidths", default="0.1,0.2,0.5,1,2,5,10,20,50,100", help="Mbit/s, comma-separated")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="network round-trip time")
    parser.add_argument("--device-factor", type=float, default=1.0, help="how many times slower the device is than this machine")
    parser.add_argument("--server-factor", type=float, default=1.0, help="edge server time relative to this machine")
    parser.add_argument("--encoder", help="export directory: time the ONNX Runtime encoder (default: PyTorch)")
    parser.add_argument("--codec", help="codec artifact (default: the run's codec at the rate point)")
    parser.add_argument("--run-dir", help="the run's models, if not at the out_dir its config names")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the measurements")
    parser.add_argument("--out", help="output directory (default: next to results.json)")


@command("latency", "end-to-end latency of mtfc vs offloading with JPEG/WebP/AVIF over a bandwidth sweep")(
    _latency_options)
def _latency(args: argparse.Namespace) -> int:
    from mtfc.deploy.latency import format_table, latency_model

    report = latency_model(args.results, rate_point=args.rate_point, tasks=args.tasks.split(",") if args.tasks else None,
                           bandwidths=[float(b) for b in args.bandwidths.split(",")], rtt_ms=args.rtt_ms,
                           device_factor=args.device_factor, server_factor=args.server_factor,
                           encoder_dir=args.encoder, codec=args.codec, out_dir=args.out, run_dir=args.run_dir,
                           threads=args.threads)
    print(format_table(report))
    print(f"written to {args.out or Path(args.results).parent}/latency.{{json,md,png}}")
    return 0


def _loadtest_options(parser: argparse.ArgumentParser) -> None:
    _server_options(parser)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--bad", type=float, default=0.1, help="share of malformed / oversized bodies")
    parser.add_argument("--max-size", type=float, default=0.0,
                        help="share of forged streams announcing the largest served image size")
    parser.add_argument("--slow-connections", type=int, default=0,
                        help="connections held open by trickling headers or bodies during the load")
    parser.add_argument("--baseline", type=int, default=0,
                        help="valid requests sent alone first: the unloaded reference the report compares with")
    parser.add_argument("--data", help="bundled dataset root whose val images make the requests (default: synthetic)")
    parser.add_argument("--images", type=int, default=32, help="distinct images per size")
    parser.add_argument("--sizes", default="64,96", help="image sides, comma-separated (requests mix them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the report to this JSON file")


@command("loadtest", "N requests at concurrency C against a real server process on 127.0.0.1")(_loadtest_options)
def _loadtest(args: argparse.Namespace) -> int:
    import json

    import torch.nn.functional as F

    from mtfc.deploy.loadtest import load_test

    base = _check_images(args.data, args.images, 64)
    sizes = [int(s) for s in args.sizes.split(",")]
    images = [F.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False).clamp(0, 1)
              for s in sizes for x in base]
    report = load_test(args.codec, _heads(args.head), images, requests=args.requests, concurrency=args.concurrency,
                       bad_fraction=args.bad, max_size_fraction=args.max_size, slow_connections=args.slow_connections,
                       baseline_requests=args.baseline, config=_server_config(args), imports=args.imports,
                       seed=args.seed, log_dir=Path(args.out).parent if args.out else None)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    ok = (report["valid_mismatched"] == 0 and not report["wrong_status"] and report["server_alive_and_healthy"]
          and "500" not in report["server_by_status"])
    return 0 if ok else 1


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
    try:
        return COMMANDS[args.command][2](args)
    except (FileNotFoundError, KeyError, ValueError) as e:  # bad input: the message says what and where
        if os.environ.get("MTFC_TRACEBACK"):
            raise
        what = e if isinstance(e, OSError) and e.filename else e.args[0] if e.args else e  # OSError: "[Errno 2] … 'path'"
        print(f"mtfc {args.command}: error: {what}\n(MTFC_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return 2
