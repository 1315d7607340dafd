"""Predictions on the wire: each head's output as JSON, the same for the server, the client and the load test.

Built-in tasks get a compact, documented form; any other head's output is converted generically
(tensors → nested lists, dicts and lists recursively), so user heads are served without extra code.

* ``classification``: ``{"class": k, "score": softmax probability of k, "logits": [...]}``
* ``detection``: ``{"image_size": [H0, W0], "instances": [{"class", "score", "box": [x1, y1, x2, y2]}, ...]}``
  (pixels of the original image, before the device resized it; Detectron2's ``pred_classes`` /
  ``scores`` / ``pred_boxes``)
* ``segmentation``: ``{"size": [H0, W0], "format": "png", "mask": base64 PNG}`` — a lossless 8-bit
  (16-bit for > 256 classes) label map of the original image; :func:`decode_mask` reads it back.

The built-in heads predict in original-image coordinates (the stream's ``original_size``, see
:class:`mtfc.head.ImageGeometry`), so a client draws them on the photograph it took.
"""
from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

#: The content type of a bitstream on the wire (``POST /predict``).
STREAM_TYPE = "application/octet-stream"


def prediction_to_json(task: str, prediction: Any) -> Any:
    """One head's prediction for one image, as JSON-serialisable data."""
    if task == "classification" and isinstance(prediction, torch.Tensor) and prediction.dim() == 1:
        probs = prediction.float().softmax(0)
        k = int(probs.argmax())
        return {"class": k, "score": float(probs[k]), "logits": prediction.tolist()}
    if task == "detection" and isinstance(prediction, dict) and "instances" in prediction:
        inst = prediction["instances"]
        boxes = inst.pred_boxes.tensor.tolist()
        return {"image_size": list(inst.image_size),
                "instances": [{"class": int(c), "score": float(s), "box": b}
                              for c, s, b in zip(inst.pred_classes.tolist(), inst.scores.tolist(), boxes)]}
    if task == "segmentation" and isinstance(prediction, torch.Tensor) and prediction.dim() == 2:
        return encode_mask(prediction)
    return _plain(prediction)


def encode_mask(label_map: torch.Tensor) -> dict[str, Any]:
    """A (H, W) integer label map as a base64 PNG (mode ``L`` below 256 labels, else 16-bit)."""
    labels = label_map.cpu().numpy()
    if labels.min() < 0 or labels.max() > 65535:
        raise ValueError(f"label values must lie in [0, 65535], got [{labels.min()}, {labels.max()}]")
    image = Image.fromarray(labels.astype(np.uint8 if labels.max() < 256 else np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return {"size": list(labels.shape), "format": "png", "mask": base64.b64encode(buffer.getvalue()).decode()}


def decode_mask(encoded: dict[str, Any]) -> np.ndarray:
    """The label map of :func:`encode_mask`, as an int64 (H, W) array."""
    with Image.open(io.BytesIO(base64.b64decode(encoded["mask"]))) as image:
        return np.asarray(image).astype(np.int64)


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot serialise a head prediction of type {type(value).__name__} to JSON")
