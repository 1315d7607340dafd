"""MultiTaskModel: one frozen codec, any number of heads, one decode for all of them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mtfc.bitstream import Header
from mtfc.checkpoint import HEAD, CheckpointError, load_checkpoint, save_checkpoint
from mtfc.codec import Codec
from mtfc.head import HEADS, Head, ImageGeometry, geometry


class MultiTaskModel(nn.Module):
    """The server side of split computing: bitstreams (or images, encoded on the spot) → every head.

    >>> model = MultiTaskModel(load_codec("codec.pt"))
    >>> model.attach("cls", ClassificationHead(latent_channels=24, num_classes=5))
    >>> preds = model(streams)            # {"cls": [...]}, one decode for all heads
    """

    def __init__(self, codec: Codec) -> None:
        super().__init__()
        if not codec.frozen:
            raise ValueError("MultiTaskModel needs a frozen codec (codec.freeze() or mtfc.load_codec)")
        self.codec = codec
        self.heads = nn.ModuleDict()

    def attach(self, name: str, head: Head) -> Head:
        if not isinstance(head, Head):
            raise TypeError(f"{type(head).__name__} is not an mtfc.Head (see mtfc/head.py for the contract)")
        if name in self.heads:
            raise KeyError(f"a head named {name!r} is already attached; detach it first")
        self.heads[name] = head
        return head

    def detach(self, name: str) -> Head:
        if name not in self.heads:
            raise KeyError(f"no head named {name!r}; attached: {list(self.heads)}")
        return self.heads.pop(name)

    def train(self, mode: bool = True) -> MultiTaskModel:
        super().train(mode)
        self.codec.eval()
        return self

    def latent(self, inputs: torch.Tensor | Sequence[bytes]) -> torch.Tensor:
        """ŷ from images (B, 3, H, W) in [0, 1] or from a list of bitstreams."""
        return self.decode(inputs)[0]

    @torch.no_grad()
    def decode(self, inputs: torch.Tensor | Sequence[bytes]) -> tuple[torch.Tensor, list[ImageGeometry]]:
        """ŷ and one :class:`~mtfc.head.ImageGeometry` record per image: from the streams' headers, or
        for images (B, 3, H, W) in [0, 1] (quantized on the spot) from their shape."""
        if isinstance(inputs, torch.Tensor):
            return self.codec.quantize(inputs), [geometry(inputs.shape[-2:])] * len(inputs)
        latent, headers = self.codec.decode_with_headers(list(inputs))
        return latent, [self.geometry(h) for h in headers]

    def geometry(self, header: Header) -> ImageGeometry:
        """The :class:`~mtfc.head.ImageGeometry` record of a stream's header: its content and original
        size, coded at the content size padded to the codec's divisibility."""
        return geometry(self.codec.coded_size(header), header.original_size, header.image_size)

    @torch.no_grad()
    def run_heads(self, latent: torch.Tensor, images: Sequence[ImageGeometry],
                  heads: Sequence[str] | None = None) -> dict[str, list[Any]]:
        """Every attached head (or ``heads``) on one decoded latent: the one place where a decode
        feeds the heads (``model(streams)``, the evaluation and the server all come here). Each head
        gets the same per-image records."""
        if len(images) != len(latent):
            raise ValueError(f"got {len(images)} geometry records for a batch of {len(latent)} latents")
        return {name: self.heads[name].predict(latent, list(images)) for name in (heads or self.heads)}

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor | Sequence[bytes], images: Sequence[ImageGeometry] | None = None,
                heads: Sequence[str] | None = None) -> dict[str, Any]:
        """Predictions of every attached head (or of ``heads``) from one decode; ``images``: the
        records to hand the heads, by default those of :meth:`decode`."""
        latent, records = self.decode(inputs)
        return self.run_heads(latent, records if images is None else images, heads)

    # -- head checkpoints, independent of the codec ------------------------------------------------
    def save_head(self, name: str, path: str | Path, **meta: Any) -> Path:
        """Save one head with the fingerprint of the codec it was trained on."""
        return save_head(self.heads[name], path, self.codec.fingerprint, **meta)

    def load_head(self, name: str, path: str | Path, head: Head | None = None) -> Head:
        """Attach a saved head; ``head`` is needed only for heads not built from the registry."""
        return self.attach(name, load_head(path, self.codec.fingerprint, head))


def save_head(head: Head, path: str | Path, codec_fingerprint: str | None, **meta: Any) -> Path:
    """Write a head checkpoint; ``codec_fingerprint`` is ``None`` for a reference head on pixels."""
    return save_checkpoint(path, HEAD, {"spec": getattr(head, "_mtfc_spec", None), "task": head.task,
                                        "codec_fingerprint": codec_fingerprint, "meta": meta,
                                        "state_dict": head.state_dict()})


def load_head(path: str | Path, codec_fingerprint: str | None = None, head: Head | None = None) -> Head:
    """Rebuild a saved head (from the registry unless ``head`` is given) and check its codec; the
    checkpoint names a head type, never code to import (see :meth:`~mtfc.head.Registry.rebuild`)."""
    ckpt = read_head_checkpoint(path)
    if ckpt["codec_fingerprint"] != codec_fingerprint:
        trained = ckpt["codec_fingerprint"] or "uncompressed pixels (a reference head)"
        raise CheckpointError(f"{path} was trained on codec {trained}, not on "
                              f"{codec_fingerprint or 'uncompressed pixels'}; retrain the head on this codec")
    if head is None:
        if not ckpt["spec"]:
            raise CheckpointError(f"{path} holds a head built outside the registry: pass `head=` to load it into")
        try:
            head = HEADS.rebuild(ckpt["spec"])
        except KeyError as e:
            raise CheckpointError(f"{path}: {e.args[0]}") from None
    head.load_state_dict(ckpt["state_dict"])
    return head.eval()


def read_head_checkpoint(path: str | Path) -> dict[str, Any]:
    """A head checkpoint's contents; a :class:`~mtfc.checkpoint.CheckpointError` names the file
    (missing, unreadable, not a head, too new)."""
    return load_checkpoint(path, HEAD)
