"""The device side: ONNX Runtime runs the exported encoder, the codec's own entropy model codes it.

An export directory (written by :func:`mtfc.deploy.export_onnx`) holds ``encoder.onnx``
(:func:`mtfc.teacher.normalize` + ``Codec.g_a``), the codec artifact ``codec.pt`` — the source of truth
for the entropy model and its CDF tables, verified against its fingerprint on load — and
``encoder.json`` (what was exported, from which codec). :class:`Encoder` produces the same
:mod:`mtfc.bitstream` streams as :meth:`mtfc.Codec.encode`: byte-identical whenever ONNX Runtime's
``y`` rounds like PyTorch's (see :func:`mtfc.deploy.compare_streams` for when it does not).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mtfc.codec import Codec, load_codec

ONNX_FILE, CODEC_FILE, MANIFEST_FILE = "encoder.onnx", "codec.pt", "encoder.json"
INPUT_NAME, OUTPUT_NAME = "images", "y"


class Encoder:
    """``encode(images) -> list[bytes]`` on the device, from an export directory.

    Args:
        export_dir: directory written by ``mtfc export CODEC --format onnx``.
        threads: ONNX Runtime intra-op threads (a phone-class device: 1).
    """

    def __init__(self, export_dir: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        self.dir = Path(export_dir)
        manifest_path = self.dir / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.dir} is not an encoder export (no {MANIFEST_FILE}); "
                                    f"write one with `mtfc export CODEC --format onnx --out {self.dir}`")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        self.codec: Codec = load_codec(self.dir / CODEC_FILE)
        if self.codec.fingerprint != self.manifest["fingerprint"]:
            raise ValueError(f"{self.dir}: {CODEC_FILE} is codec {self.codec.fingerprint}, but {ONNX_FILE} was "
                             f"exported from codec {self.manifest['fingerprint']}; export again")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(self.dir / ONNX_FILE), options, providers=["CPUExecutionProvider"])

    @property
    def fingerprint(self) -> str:
        return self.codec.fingerprint

    @property
    def size_divisibility(self) -> int:
        return self.codec.size_divisibility

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's continuous output ``y`` (before quantization), computed by ONNX Runtime."""
        self.codec._check_images(images)
        pixels = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0])

    @torch.no_grad()
    def encode(self, images: torch.Tensor, original_sizes: Sequence[tuple[int, int]] | None = None,
               level: int | Sequence[int] | None = None,
               content_sizes: Sequence[tuple[int, int]] | None = None) -> list[bytes]:
        """One :mod:`mtfc.bitstream` stream per image, packed by :meth:`mtfc.Codec.pack_latent` as
        :meth:`mtfc.Codec.encode` packs it (the same ``original_sizes`` and ``content_sizes``; ``level``: a
        variable-rate codec's rate level; the network is the same for every level, the level only picks
        the quantization); images with NaN or infinite values are refused (``ValueError``)."""
        return self.codec.pack_latent(self.latent(images), tuple(images.shape[-2:]), original_sizes, level,
                                      content_sizes)
