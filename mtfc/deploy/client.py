"""The device client: encode on the device, send the stream, get every head's prediction back.

>>> client = Client("http://edge:8000", Encoder("export/"), token="...")
>>> result = client.predict(images)[0]      # images: float (B, 3, H, W) in [0, 1]
>>> result.predictions["cls"]["class"], result.bytes_sent, result.timing_ms
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mtfc.deploy.wire import STREAM_TYPE


class StreamEncoder(Protocol):
    """What the client encodes with: :class:`mtfc.deploy.Encoder` (ONNX) or a :class:`mtfc.Codec`."""

    size_divisibility: int

    def encode(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]] | None = None,
               level: int | None = None, content_sizes: Sequence[tuple[int, int]] | None = None) -> list[bytes]: ...


class ServerError(RuntimeError):
    """The server answered with an error status; ``kind`` and ``detail`` are its explanation."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(f"{status} {kind}: {detail}")
        self.status, self.kind, self.detail = status, kind, detail


@dataclass
class Result:
    """One image's answer: every requested head's prediction, the bytes sent and where the time went.

    ``timing_ms``: ``encode`` (device, per image), ``request`` (send → answer, seen by the device),
    ``server`` (inside the server: ``decode``, ``queue``, ``heads`` for the whole batch of
    ``batch_size``), and ``network`` = request − server (transfer, round trip, HTTP).
    """

    predictions: dict[str, Any]
    bytes_sent: int
    image_size: tuple[int, int]
    timing_ms: dict[str, float] = field(default_factory=dict)


class Client:
    """HTTP client of ``mtfc serve``.

    Args:
        server: base URL, e.g. ``http://127.0.0.1:8000`` (``https://`` with TLS).
        encoder: encodes images into streams on the device.
        token: bearer token, if the server requires one.
        verify: TLS verification: ``True``, ``False`` or a CA bundle path (e.g. a self-signed certificate).
    """

    def __init__(self, server: str, encoder: StreamEncoder | None = None, *, token: str | None = None,
                 timeout: float = 60.0, verify: bool | str = True) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.encoder = encoder
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout, verify=verify)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _json(self, response: Any) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
                raise ServerError(response.status_code, body.get("error", "Error"), str(body.get("detail", body)))
            except ValueError:
                raise ServerError(response.status_code, "Error", response.text[:200]) from None
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._json(self.http.get("/health"))

    def info(self) -> dict[str, Any]:
        """The server's codec (fingerprint), heads, versions and limits."""
        return self._json(self.http.get("/info"))

    def metrics(self) -> str:
        """The server's metrics in the Prometheus text format."""
        response = self.http.get("/metrics")
        if response.status_code >= 400:
            self._json(response)
        return response.text

    def send(self, stream: bytes, heads: Sequence[str] | None = None) -> dict[str, Any]:
        """POST one stream; the server's JSON answer (raises :class:`ServerError` on 4xx/5xx)."""
        params = {"heads": ",".join(heads)} if heads else None
        return self._json(self.http.post("/predict", content=stream, params=params,
                                         headers={"Content-Type": STREAM_TYPE}))

    def predict(self, images: torch.Tensor, heads: Sequence[str] | None = None,
                original_sizes: Sequence[tuple[int, int]] | None = None, level: int | None = None,
                content_sizes: Sequence[tuple[int, int]] | None = None) -> list[Result]:
        """Encode ``images`` (B, 3, H, W) on the device and send each stream; one :class:`Result` per image,
        in the coordinates of each original image. ``original_sizes``: each image's (H, W) before it was
        resized; ``content_sizes``: before it was padded to the codec's divisibility (both sent in its
        stream for the heads; see :meth:`mtfc.Codec.encode`); ``level``: the rate level of a variable-rate
        codec (0: the highest rate; default its middle one)."""
        if self.encoder is None:
            raise ValueError("this Client has no encoder: pass one, or send ready streams with send()")
        t0 = time.perf_counter()
        streams = self.encoder.encode(images, original_sizes, level, content_sizes)
        encode_ms = 1000 * (time.perf_counter() - t0) / len(streams)
        results = []
        for stream in streams:
            t0 = time.perf_counter()
            answer = self.send(stream, heads)
            request_ms = 1000 * (time.perf_counter() - t0)
            server = answer["timing_ms"]
            timing = {"encode": encode_ms, "request": request_ms, "network": request_ms - server["total"],
                      "server": server["total"], "decode": server["decode"], "queue": server["queue"],
                      "heads": server["heads"], "batch_size": server["batch_size"]}
            results.append(Result(answer["predictions"], len(stream), tuple(answer["image_size"]), timing))
        return results


def load_image(path: str | Path, divisibility: int,
               size: int | None = None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """An image file as float (1, 3, H, W) in [0, 1]: resized to ``size``×``size`` if given, then
    zero-padded bottom/right to multiples of ``divisibility`` (what the codec accepts); the file's (H, W)
    and the content's (H, W) before the padding (both travel in the stream, see :meth:`mtfc.Codec.encode`)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        original = (rgb.height, rgb.width)
        if size:
            rgb = rgb.resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)[None].float() / 255
    H, W = x.shape[-2:]
    return F.pad(x, (0, -W % divisibility, 0, -H % divisibility)), original, (H, W)


def send_images(paths: Sequence[str | Path], client: Client, heads: Sequence[str] | None = None,
                size: int | None = None, level: int | None = None) -> list[tuple[str, Result]]:
    """``mtfc send``: each image file through ``client`` (one request per image), printing a line per image."""
    out = []
    for path in paths:
        image, original, content = load_image(path, client.encoder.size_divisibility, size)
        result = client.predict(image, heads, [original], level, [content])[0]
        t = result.timing_ms
        print(f"{path}: {result.bytes_sent} B sent ({8 * result.bytes_sent / (original[0] * original[1]):.3f} bpp of the "
              f"original) | "
              f"encode {t['encode']:.1f} ms, network {t['network']:.1f} ms, server decode {t['decode']:.1f} ms, "
              f"queue {t['queue']:.1f} ms, heads {t['heads']:.1f} ms (batch {t['batch_size']}) | "
              f"{summarize(result.predictions)}", flush=True)
        out.append((str(path), result))
    return out


def summarize(predictions: dict[str, Any]) -> str:
    """A one-line summary of the built-in heads' JSON predictions."""
    parts = []
    for name, p in predictions.items():
        if isinstance(p, dict) and "class" in p:
            parts.append(f"{name}: class {p['class']} ({p['score']:.2f})")
        elif isinstance(p, dict) and "instances" in p:
            parts.append(f"{name}: {len(p['instances'])} boxes")
        elif isinstance(p, dict) and p.get("format") == "png":
            parts.append(f"{name}: {p['size'][0]}x{p['size'][1]} mask")
        else:
            parts.append(f"{name}: {str(p)[:40]}")
    return "; ".join(parts)
