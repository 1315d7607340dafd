"""The rate–accuracy evaluation loop, independent of what produces the predictions.

A *method* is a ``predict_fn(images, targets) -> BatchResult``: it sends the batch through its
channel (mtfc's codec once for every head, an image codec for a baseline, nothing for the
uncompressed reference) and returns each task's predictions, the bytes sent per image and the time
spent encoding and decoding. A :class:`Scorer` scores one method at one rate point batch by batch
with every task's evaluator (``reset`` / ``process`` / ``evaluate``), so that one pass over the data
can score many methods; :func:`evaluate_method` runs one method over a loader.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from mtfc.head import Evaluator

__all__ = ["BatchResult", "DIRECTIONS", "ROW_FIELDS", "Scorer", "bits_per_pixel", "raw_rgb_bytes", "evaluate_method"]

#: the columns of a result row, in order (``all_metrics`` holds every number the evaluator returned)
ROW_FIELDS = ("method", "rate_point", "task", "metric_name", "metric", "metric_direction", "bpp_mean", "bpp_std",
              "bytes_mean", "encode_ms", "decode_ms", "n_images", "all_metrics")
#: the values of a head's ``metric_direction``: which way its metric gets better
DIRECTIONS = ("higher", "lower")


class BatchResult(NamedTuple):
    predictions: dict[str, list[Any]]  # task -> one prediction per image
    num_bytes: list[int]               # bytes sent per image (whole bitstream / file)
    encode_s: float                    # encoding time for the batch
    decode_s: float                    # decoding time for the batch


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
    """8 × bytes / (H × W): the rate of ``num_bytes`` for an image of H × W pixels."""
    return 8.0 * num_bytes / (height * width)


def raw_rgb_bytes(images: torch.Tensor, targets: list[dict[str, Any]] | None = None) -> list[int]:
    """Size of each image stored as raw 8-bit RGB (3 bytes a pixel) at its original size (the target's
    ``orig_size``; the fed size without one): the uncompressed reference's rate, 24 bpp."""
    b, c, h, w = images.shape
    sizes = [t.get("orig_size", (h, w)) for t in targets] if targets is not None else [(h, w)] * b
    return [c * H * W for H, W in sizes]


def _flatten(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"bbox": {"AP": 1}}`` (Detectron2's nesting) -> ``{"bbox/AP": 1.0}``."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = float(value)
    return flat


class Scorer:
    """One method at one rate point, scored batch by batch: every task's evaluator, the bytes sent
    and the coding time; :meth:`rows` gives one result row per task.

    ``metrics`` names each task's primary metric among the keys its evaluator returns (nested dicts
    are flattened with ``/``, e.g. ``"bbox/AP"``); it may be left out for evaluators that return a
    single number. ``directions``: each task's ``metric_direction`` (default ``"higher"``).
    """

    def __init__(self, evaluators: Mapping[str, Evaluator], *, method: str, rate_point: Any,
                 metrics: Mapping[str, str] | None = None, directions: Mapping[str, str] | None = None) -> None:
        if not evaluators:
            raise ValueError("evaluating a method needs at least one task evaluator")
        self.directions = {task: (directions or {}).get(task, "higher") for task in evaluators}
        for task, direction in self.directions.items():
            if direction not in DIRECTIONS:
                raise ValueError(f"task {task!r}: metric_direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        self.evaluators, self.method, self.rate_point, self.metrics = dict(evaluators), method, rate_point, metrics or {}
        for evaluator in self.evaluators.values():
            evaluator.reset()
        self.bpp: list[float] = []
        self.sizes: list[int] = []
        self.encode_s = self.decode_s = 0.0

    def add(self, result: BatchResult, targets: list[dict[str, Any]], image_size: tuple[int, int]) -> None:
        """Score one batch's ``result`` for images fed at ``image_size`` (H, W). The rate's denominator is each
        image's original size (its target's ``orig_size``, the file's pixels, as published bpp counts them;
        ``image_size`` when the target has none), not the resized and padded canvas."""
        n, method = len(targets), self.method
        if not isinstance(result, tuple) or len(result) != len(BatchResult._fields):
            raise ValueError(f"method {method!r} must return a BatchResult (predictions, num_bytes, encode_s, "
                             f"decode_s); got {type(result).__name__}")
        out = BatchResult(*result)
        if len(out.num_bytes) != n:
            raise ValueError(f"method {method!r} returned {len(out.num_bytes)} byte counts for {n} images")
        missing = sorted(set(self.evaluators) - set(out.predictions))
        if missing:
            raise ValueError(f"method {method!r} returned no predictions for task(s) {missing}; "
                             f"got {sorted(out.predictions)}")
        for task, evaluator in self.evaluators.items():
            if len(out.predictions[task]) != n:
                raise ValueError(f"method {method!r} returned {len(out.predictions[task])} {task!r} "
                                 f"predictions for {n} images")
            evaluator.process(targets, out.predictions[task])
        self.sizes.extend(int(s) for s in out.num_bytes)
        self.bpp.extend(bits_per_pixel(int(s), *t.get("orig_size", image_size)) for s, t in zip(out.num_bytes, targets))
        self.encode_s += out.encode_s
        self.decode_s += out.decode_s

    def rows(self) -> list[dict[str, Any]]:
        """One row per task with the fields of :data:`ROW_FIELDS`: rate as bpp per image (mean and
        population std over images), mean bytes, and encode/decode milliseconds per image."""
        if not self.bpp:
            raise ValueError(f"the loader yielded no images for method {self.method!r}")
        n_images = len(self.bpp)
        shared = {"bpp_mean": float(np.mean(self.bpp)), "bpp_std": float(np.std(self.bpp)),
                  "bytes_mean": float(np.mean(self.sizes)), "encode_ms": 1000 * self.encode_s / n_images,
                  "decode_ms": 1000 * self.decode_s / n_images, "n_images": n_images}
        rows = []
        for task, evaluator in self.evaluators.items():
            results = _flatten(evaluator.evaluate() or {})
            name = self.metrics.get(task)
            if name is None:
                if len(results) != 1:
                    raise ValueError(f"task {task!r}: name its primary metric (metrics={{{task!r}: ...}}); "
                                     f"the evaluator returned {sorted(results)}")
                name = next(iter(results))
            if name not in results:
                raise ValueError(f"task {task!r}: the evaluator returned no {name!r}; it returned {sorted(results)}")
            rows.append({"method": self.method, "rate_point": self.rate_point, "task": task, "metric_name": name,
                         "metric": results[name], "metric_direction": self.directions[task], **shared,
                         "all_metrics": results})
        return rows


def evaluate_method(predict_fn: Callable[[torch.Tensor, list[dict[str, Any]]], BatchResult],
                    loader: Iterable[tuple[torch.Tensor, list[dict[str, Any]]]],
                    evaluators: Mapping[str, Evaluator], *, method: str, rate_point: Any,
                    metrics: Mapping[str, str] | None = None, directions: Mapping[str, str] | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Run ``predict_fn`` on every ``(images, targets)`` batch of ``loader`` and score it with a
    :class:`Scorer` (``metrics``, ``directions`` as there); one result row per task."""
    scorer = Scorer(evaluators, method=method, rate_point=rate_point, metrics=metrics, directions=directions)
    total = len(loader) if hasattr(loader, "__len__") else None
    with torch.no_grad():
        for images, targets in tqdm(loader, total=total, desc=f"{method} @ {rate_point}", disable=not progress):
            check_batch(images, targets)
            scorer.add(predict_fn(images, targets), targets, tuple(images.shape[-2:]))
    return scorer.rows()


def check_batch(images: torch.Tensor, targets: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless ``images`` is (B, 3, H, W) with one target per image."""
    if images.ndim != 4:
        raise ValueError(f"loader must yield images of shape (B, 3, H, W); got {tuple(images.shape)}")
    if len(targets) != len(images):
        raise ValueError(f"batch has {len(images)} images but {len(targets)} targets")
