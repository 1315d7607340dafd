"""Codec benchmark: real bytes against the entropy model's estimate, and where encode/decode time goes."""
from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from compressai.layers import GDN

from mtfc import bitstream
from mtfc.codec import ENCODERS, Codec
from mtfc.teacher import normalize


def _median_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), out


@torch.no_grad()
def rate_overhead(codec: Codec, images: torch.Tensor) -> dict[str, float]:
    """Actual stream bits vs the model's estimate −Σ log2 p(ŷ) on the same hard-quantized latent.

    Returns totals over ``images``: ``payload/estimate`` (entropy-coder efficiency) and
    ``stream/estimate`` (with the container header), plus the mean header size in bytes.
    """
    codec.eval()
    est = payload = total = 0.0
    for i in range(len(images)):
        x = images[i : i + 1]
        out = codec.latent_codec(codec.g_a(normalize(x)))  # eval mode: likelihoods of the quantized latent
        est += float(sum(-torch.log2(p).sum() for p in out["likelihoods"].values()))
        stream = codec.encode(x)[0]
        _, payloads = bitstream.unpack(stream)
        payload += 8 * sum(map(len, payloads))
        total += 8 * len(stream)
    return {"estimated_bits": est, "payload_bits": payload, "stream_bits": total,
            "payload/estimate": payload / est, "stream/estimate": total / est,
            "header_bytes_mean": (total - payload) / 8 / len(images),
            "bpp": total / (len(images) * images.shape[-2] * images.shape[-1])}


@torch.no_grad()
def latency(codec: Codec, image: torch.Tensor, repeats: int = 20) -> dict[str, float]:
    """Median milliseconds at batch 1, split into network (encoder / decoder convs) and entropy coding.

    ``encode_entropy_ms`` is :meth:`Codec.compress_latent` (what :meth:`Codec.encode` runs) and
    ``decode_entropy_ms`` its inverse (``codec.coder.decompress``); ``encode_ms`` is the whole
    :meth:`Codec.encode` (+ input checks and bitstream packing), timed on its own.
    """
    codec.eval()
    y_ms, y = _median_ms(lambda: codec.g_a(normalize(image)), repeats)
    c_ms, payloads = _median_ms(lambda: codec.compress_latent(y), repeats)
    d_ms, y_hat = _median_ms(lambda: codec.coder.decompress(payloads, tuple(y.shape[-2:])), repeats)
    n_ms, _ = _median_ms(lambda: codec.decoder(y_hat), repeats)
    e_ms, _ = _median_ms(lambda: codec.encode(image), repeats)
    return {"encode_network_ms": y_ms, "encode_entropy_ms": c_ms, "decode_entropy_ms": d_ms,
            "decode_network_ms": n_ms, "encode_total_ms": y_ms + c_ms, "decode_total_ms": d_ms + n_ms,
            "encode_ms": e_ms}


def benchmark(codec: Codec, images: torch.Tensor, size: int = 224, threads: int = 1, repeats: int = 20) -> dict[str, Any]:
    """Both measurements; latency on one ``size``×``size`` image with ``threads`` CPU threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big = F.interpolate(images[:1], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        return {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                           f"{threads} thread(s)", "images": len(images), "image_size": list(images.shape[-2:]),
                "rate": rate_overhead(codec, images), "latency_size": size, "latency": latency(codec, big, repeats)}
    finally:
        torch.set_num_threads(previous)


def encoder_complexity(g_a: torch.nn.Module, size: int = 224) -> dict[str, float]:
    """Parameters of a device encoder and its MACs per input pixel at ``size``×``size``.

    Counted with forward hooks: a conv costs out·in/groups·k² MACs per output position (biases not
    counted), a GDN over C channels C·(C+1) (its 1×1 conv on x², then x · norm). The export manifest
    (:func:`mtfc.deploy.export.encoder_complexity`) reports these counts.
    """
    macs = 0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        positions = output.shape[0] * output.shape[2] * output.shape[3]
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            macs += positions * module.out_channels * module.in_channels // module.groups * k
        elif isinstance(module, GDN):
            macs += positions * output.shape[1] * (output.shape[1] + 1)

    hooks = [m.register_forward_hook(count) for m in g_a.modules() if isinstance(m, (torch.nn.Conv2d, GDN))]
    try:
        with torch.no_grad():
            g_a(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return {"params": sum(p.numel() for p in g_a.parameters()), "kmac_per_pixel": macs / (size * size) / 1000}


def calibrate(encoder: torch.nn.Module, entropy_bottleneck: torch.nn.Module, inputs: torch.Tensor,
              latent_std: float = 1.0, steps: int = 100, lr: float = 0.01) -> None:
    """Make an untrained encoder + ``EntropyBottleneck`` code like a trained pair, for timing only.

    Untrained, the latent is near 0 and the CDFs are the initial ones, so entropy coding codes
    zeros — faster than any trained codec, and by an amount that differs between encoders. This
    scales the encoder's last conv so that its latent on ``inputs`` has standard deviation
    ``latent_std``, fits the entropy bottleneck to that latent for ``steps`` Adam steps (rate +
    quantile loss), then builds its CDF tables (``update``). Applied identically to every encoder
    compared, it makes their entropy-coding times comparable. ``entropy_bottleneck=None`` (a
    hyperprior codec): the latent is only scaled.
    """
    last = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        scale = latent_std / float(encoder(inputs).std())
        last.weight.mul_(scale)
        if last.bias is not None:
            last.bias.mul_(scale)
        y = encoder(inputs)
    if entropy_bottleneck is None:
        return
    entropy_bottleneck.train()
    opt = torch.optim.Adam(entropy_bottleneck.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            _, likelihoods = entropy_bottleneck(y)
            loss = -torch.log2(likelihoods).mean() + entropy_bottleneck.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    entropy_bottleneck.update(force=True)
    entropy_bottleneck.eval()


def interleaved_medians(fns: dict[Any, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[Any, float]:
    """Median ms of each ``fn``, the functions taking turns (the order rotates every repeat), so that
    a change of machine load during the run falls on all of them alike."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[Any, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(1000 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def untrained_variant(encoder: str, like: Codec, calibration: torch.Tensor, seed: int = 0,
                      latent_std: float = 1.0) -> Codec:
    """A frozen, untrained codec with ``encoder`` at ``like``'s sizes, calibrated (:func:`calibrate`)."""
    torch.manual_seed(seed)
    cfg = {**like.config, "encoder": encoder}
    codec = Codec.from_config(cfg)
    eb = codec.latent_codec.entropy_bottleneck if codec.kind == "factorized" else None
    calibrate(codec.g_a, eb, normalize(calibration), latent_std=latent_std)
    return codec.freeze()


@torch.no_grad()
def encoder_table(codecs: dict[str, Codec], images: torch.Tensor, sizes: tuple[int, ...] = (224, 64),
                  threads: int = 1, repeats: int = 20, latent_std: float = 1.0) -> list[dict[str, Any]]:
    """Every encoder variant at the sizes of ``codecs`` (untrained, calibrated) and each trained codec.

    One row per encoder: ``g_a``'s parameters, kMAC per input pixel (at 224×224), and per size the
    median ms (batch 1, ``threads`` threads, all rows interleaved) of the network (normalize +
    ``g_a``), of entropy coding (:meth:`Codec.compress_latent`) and of the whole
    :meth:`Codec.encode` (+ input checks and bitstream packing). The image is ``images[0]`` resized.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows: list[dict[str, Any]] = []
        configs = {json.dumps({k: v for k, v in c.config.items() if k != "encoder"}, sort_keys=True): c
                   for c in codecs.values()}
        calibration = F.interpolate(images[:4], size=(64, 64), mode="bilinear", align_corners=False).clamp(0, 1)
        models: list[tuple[dict[str, Any], Codec]] = []
        for like in configs.values():
            for name in ENCODERS:
                models.append(({"encoder": name, "weights": "untrained, calibrated", **_sizes(like)},
                               untrained_variant(name, like, calibration, latent_std=latent_std)))
        for label, codec in codecs.items():
            models.append(({"encoder": codec.encoder, "weights": f"trained ({label})", **_sizes(codec)}, codec))
        for row, codec in models:
            rows.append({**row, **encoder_complexity(codec.g_a), "ms": {}})
        for size in sizes:
            image = F.interpolate(images[:1], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
            fns: dict[Any, Callable[[], Any]] = {}
            for i, (_, codec) in enumerate(models):
                codec.eval()
                y = codec.g_a(normalize(image))
                fns[i, "network"] = lambda c=codec: c.g_a(normalize(image))
                fns[i, "entropy"] = lambda c=codec, y=y: c.compress_latent(y)
                fns[i, "encode"] = lambda c=codec: c.encode(image)
            ms = interleaved_medians(fns, repeats)
            for i, row in enumerate(rows):
                row["ms"][str(size)] = {part: ms[i, part] for part in ("network", "entropy", "encode")}
        return rows
    finally:
        torch.set_num_threads(previous)


def _sizes(codec: Codec) -> dict[str, Any]:
    return {"kind": codec.kind, "latent_channels": codec.latent_channels, "hidden_channels": codec.config["hidden_channels"]}


def format_encoder_table(rows: list[dict[str, Any]], threads: int = 1) -> str:
    """The rows of :func:`encoder_table` as a Markdown table."""
    sizes = list(rows[0]["ms"]) if rows else []
    head = "| encoder | weights | latent/hidden | params | kMAC/px |" + "".join(
        f" {s}² net | {s}² entropy | {s}² encode |" for s in sizes)
    lines = [f"Encoders (ms: median, batch 1, {threads} thread(s); network = normalize + g_a, entropy = "
             "Codec.compress_latent, encode = the whole Codec.encode)", head,
             "|" + "---|" * (5 + 3 * len(sizes))]
    for r in rows:
        cells = "".join(f" {r['ms'][s]['network']:.2f} | {r['ms'][s]['entropy']:.2f} | {r['ms'][s]['encode']:.2f} |"
                        for s in sizes)
        lines.append(f"| {r['encoder']} | {r['weights']} | {r['latent_channels']}/{r['hidden_channels']} | "
                     f"{r['params']:,} | {r['kmac_per_pixel']:.2f} |{cells}")
    return "\n".join(lines)


def _compressai_coder(codec: Codec, y: torch.Tensor) -> tuple[Callable[[], list[bytes]], Callable[[list[bytes]], Any]]:
    """(encode, decode) of one latent with CompressAI's own rANS coder: what ``Codec.compress_latent``
    and ``Codec.decode`` ran before :mod:`mtfc.entropy_coding` (format version 1)."""
    lc, (h, w) = codec.latent_codec, tuple(y.shape[-2:])
    if codec.kind == "factorized":
        return (lambda: lc.entropy_bottleneck.compress(y),
                lambda payloads: lc.decompress([payloads], (h, w)))
    hyper, gc = lc.latent_codec["hyper"], lc.latent_codec["y"]

    def encode() -> list[bytes]:
        z = hyper.compress(y)  # ẑ's payload, and ŷ's prior from the decoded ẑ
        scales, means = gc.entropy_parameters(z["params"]).chunk(2, 1)
        cond = gc.gaussian_conditional
        return [cond.compress(y, cond.build_indexes(scales), means)[0], z["strings"][0][0]]

    return encode, lambda payloads: lc.decompress([[p] for p in payloads], {"y": (h, w), "hyper": (h // 4, w // 4)})


@torch.no_grad()
def coder_comparison(codec: Codec, sizes: tuple[int, ...] = (64, 224), threads: int = 1,
                     repeats: int = 30) -> dict[str, Any]:
    """mtfc's entropy coder (:mod:`mtfc.entropy_coding`: constriction's ANS on CompressAI's tables)
    against CompressAI's rANS coder on the same latent: median ms of encoding and decoding one latent
    (batch 1, ``threads`` threads, the four timed in turn by :func:`interleaved_medians`) and the payload
    bytes, per ``size``×``size`` image (smoothed noise)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    codec.eval()
    try:
        out: dict[str, Any] = {"kind": codec.kind, "latent_channels": codec.latent_channels, "threads": threads,
                               "sizes": {}}
        for size in sizes:
            image = F.avg_pool2d(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)), 5, 1, 2)
            y = codec.g_a(normalize(image))
            shape = tuple(y.shape[-2:])
            ours = codec.compress_latent(y)
            old_encode, old_decode = _compressai_coder(codec, y)
            theirs = old_encode()
            ms = interleaved_medians({("mtfc", "encode"): lambda: codec.compress_latent(y),
                                      ("mtfc", "decode"): lambda: codec.coder.decompress(ours, shape),
                                      ("compressai", "encode"): old_encode,
                                      ("compressai", "decode"): lambda: old_decode(theirs)}, repeats)
            out["sizes"][str(size)] = {coder: {"encode_ms": ms[coder, "encode"], "decode_ms": ms[coder, "decode"],
                                               "bytes": sum(map(len, payloads))}
                                       for coder, payloads in (("mtfc", ours), ("compressai", theirs))}
        return out
    finally:
        torch.set_num_threads(previous)


def format_coder_comparison(result: dict[str, Any]) -> str:
    """One Markdown table row per size of :func:`coder_comparison`."""
    lines = [f"{result['kind']} prior, {result['latent_channels']} latent channels, {result['threads']} thread(s), "
             "batch 1; median ms",
             "| image | mtfc encode | CompressAI encode | mtfc decode | CompressAI decode | mtfc bytes "
             "| CompressAI bytes |",
             "|---|---|---|---|---|---|---|"]
    for size, r in result["sizes"].items():
        m, c = r["mtfc"], r["compressai"]
        lines.append(f"| {size}² | {m['encode_ms']:.2f} | {c['encode_ms']:.2f} | {m['decode_ms']:.2f} | "
                     f"{c['decode_ms']:.2f} | {m['bytes']} | {c['bytes']} |")
    return "\n".join(lines)
