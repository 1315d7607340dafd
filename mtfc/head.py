"""The head contract: the one interface every task plugs into (the README's "Writing your own head").

A head is an :class:`Head` (an ``nn.Module``) on the *decoded, hard-quantized latent* ŷ — exactly the
tensor the edge server gets from :meth:`mtfc.Codec.decode` — or, for a reference head, on the images:

* ``from_config(kwargs, ctx)`` (classmethod): the constructor's arguments from its config section and
  a :class:`HeadContext` (latent channels, the dataset's classes and image size, the teacher's arch);
* ``loss(latent, targets, distill=None)``: training, a dict of scalar losses named ``loss_*``; ``distill``
  is the explicit distillation signal (:class:`Distillation`), given when the config asks for it;
* ``predict(latent, images)``: one prediction per image, in the coordinates of the original image.
  ``images`` holds one :class:`ImageGeometry` record per image (original, content and coded size).
  Every caller hands the same records — :meth:`mtfc.MultiTaskModel.run_heads` (evaluation, the
  server, ``model(streams)``) builds them from the streams' headers, a head's validation from the
  batch's targets — and a head reads each image's sizes from its own record, never from the batch or
  another image's record;
* ``task``, ``metric``, ``required_targets`` (checked against the dataset before training) and
  ``build_evaluator(dataset)``: an object with ``reset()``, ``process(targets, predictions)`` and
  ``evaluate() -> dict[str, float]``, as Detectron2's ``DatasetEvaluator``.

Heads register under a name in :data:`HEADS` so configs and checkpoints can build them. Only the
operator decides which code runs: a head type is found among the registered heads, the built-in
``heads/<name>.py`` and the ``mtfc.heads`` entry points, or in a module the operator imports (the
config's ``imports``, ``mtfc serve --import``); a checkpoint never makes mtfc import a module.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, TypedDict

import torch
from torch import nn

Targets = list[dict[str, Any]]


class ImageGeometry(TypedDict):
    """One image's geometry, handed to every head's :meth:`Head.predict` (the model of torchvision's
    ``original_image_sizes`` + ``image_sizes`` and Detectron2's per-input height/width + ``ImageList``),
    from its original file to the tensor a head gets:

    * ``original_size`` (H0, W0): the image before the device resized it; heads predict in its coordinates;
    * ``content_size`` (h, w): the resized image, unpadded, at the top-left of the input;
    * ``image_size`` (H, W): the input's size, ``content_size`` padded bottom/right (to the codec's
      divisibility, or to a letterbox canvas, which is then coded as picture: ``content_size`` = ``image_size``).

    A stream carries the content and the original size (:mod:`mtfc.bitstream`); the coded size follows
    from the codec's divisibility. Build records with :func:`geometry` (or :func:`geometry_of` for a
    dataset batch), read them with :func:`image_sizes`."""

    image_size: tuple[int, int]
    content_size: tuple[int, int]
    original_size: tuple[int, int]


def geometry(image_size: Sequence[int], original_size: Sequence[int] | None = None,
             content_size: Sequence[int] | None = None) -> ImageGeometry:
    """The record of one image fed (coded) at ``image_size``, whose content is ``content_size`` (default:
    ``image_size``, no padding), resized from an original of ``original_size`` (default: ``content_size``,
    nothing resized)."""
    H, W = (int(v) for v in image_size)
    h, w = (int(v) for v in content_size) if content_size is not None else (H, W)
    h0, w0 = (int(v) for v in original_size) if original_size is not None else (h, w)
    if not (0 < h <= H and 0 < w <= W) or h0 < 1 or w0 < 1:
        raise ValueError(f"bad geometry: content {h}x{w} must be positive and fit the {H}x{W} input, original "
                         f"{h0}x{w0} positive")
    return {"image_size": (H, W), "content_size": (h, w), "original_size": (h0, w0)}


def geometry_of(targets: Targets) -> list[ImageGeometry]:
    """The records of a dataset batch: each target's ``image_size`` (the fed image), ``content_size``
    (its unpadded part) and ``orig_size`` (the file's size, see :mod:`mtfc.data.base`)."""
    return [geometry(t["image_size"], t.get("orig_size"), t.get("content_size")) for t in targets]


def image_sizes(images: Sequence[ImageGeometry] | None, batch: int, head: str,
                canvas: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Each image's ``(content_size, original_size)`` from its record, for a head's
    :meth:`~Head.predict`; a clear error names ``head`` when the records are missing or do not match
    the batch, or the image when its content does not fit the ``canvas`` (H, W) of the head's input.
    A record without ``content_size`` (written before it existed) has its ``image_size`` as content."""
    if images is None or len(images) != batch:
        got = "none" if images is None else len(images)
        raise ValueError(f"{head} needs one geometry record per image (see mtfc.head.geometry), got {got} for a "
                         f"batch of {batch}")
    sizes = []
    for r in images:
        h, w = (int(v) for v in r.get("content_size", r["image_size"]))
        if not (0 < h <= canvas[0] and 0 < w <= canvas[1]):
            raise ValueError(f"image {r.get('image_id', '?')}: content size {(h, w)} does not fit the "
                             f"{canvas[0]}x{canvas[1]} input")
        h0, w0 = (int(v) for v in r.get("original_size", (h, w)))
        sizes.append(((h, w), (h0, w0)))
    return sizes


class Evaluator(Protocol):
    """What ``Head.build_evaluator`` returns (the shape of Detectron2's ``DatasetEvaluator``)."""

    def reset(self) -> None: ...
    def process(self, targets: Targets, predictions: list[Any]) -> None: ...
    def evaluate(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class HeadContext:
    """What the framework knows when it builds a head from its config (:meth:`Head.from_config`):
    the codec's ``latent_channels`` (``None`` for a reference head on pixels), the dataset's classes,
    its ``image_size`` (H, W) and the teacher's architecture."""

    latent_channels: int | None
    num_classes: int
    class_names: tuple[str, ...] = ()
    image_size: tuple[int, int] | None = None
    teacher_arch: str = "resnet18"


@dataclass
class Distillation:
    """The distillation signal a head gets in training (the one channel for it): a frozen ``model`` to
    learn from — the head's reference on pixels (for classification, the teacher) —, the batch's
    ``images`` it runs on, and the training-only ``adapters`` the head asked for
    (:meth:`Head.distill_adapters`), trained with the head but not part of it."""

    model: nn.Module
    images: torch.Tensor
    adapters: nn.Module | None = None


class Head(nn.Module):
    """Base class of task heads. Subclasses set the class attributes and implement :meth:`loss` and
    :meth:`predict` (``forward`` dispatches to them on ``self.training``)."""

    task: str = ""
    metric: str = ""
    #: whether a larger ``metric`` is better (``"higher"``: accuracy, AP, mIoU) or a smaller one (``"lower"``: MAE)
    metric_direction: str = "higher"
    required_targets: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, kwargs: dict[str, Any], ctx: HeadContext) -> dict[str, Any]:
        """The constructor's arguments from the config's ``kwargs`` and the ``ctx`` (as Detectron2's
        ``from_config``); by default ``kwargs`` as they are."""
        return dict(kwargs)

    def loss(self, latent: torch.Tensor, targets: Targets, distill: Distillation | None = None) -> dict[str, torch.Tensor]:
        """Training: a dict of scalar losses named ``loss_*`` (the engine sums them)."""
        if self._legacy_forward():
            return self.forward(latent, targets)
        raise NotImplementedError(f"{type(self).__name__} implements neither loss() nor forward()")

    def predict(self, latent: torch.Tensor, images: Sequence[ImageGeometry] | None = None) -> list[Any]:
        """Inference: one prediction per image, in the format its evaluator consumes and in the
        coordinates of the original image; ``images``: one :class:`ImageGeometry` record per image."""
        if self._legacy_forward():
            return self.forward(latent, images)
        raise NotImplementedError(f"{type(self).__name__} implements neither predict() nor forward()")

    def forward(self, latent: torch.Tensor, targets: Targets | None = None) -> Any:
        return self.loss(latent, targets) if self.training else self.predict(latent, targets)

    def _legacy_forward(self) -> bool:
        """A head written against the old contract (one ``forward`` switching on ``self.training``)."""
        if type(self).forward is Head.forward:
            return False
        warnings.warn(f"{type(self).__name__} overrides forward(); implement loss() and predict() instead "
                      "(forward-only heads are deprecated)", DeprecationWarning, stacklevel=3)
        return True

    def distill_adapters(self, teacher: nn.Module) -> nn.Module | None:
        """Training-only layers this head's distillation needs (e.g. hint adapters); ``None`` by default."""
        return None

    def build_evaluator(self, dataset: Any) -> Evaluator:  # pragma: no cover
        raise NotImplementedError

    def init_from_teacher(self, teacher: nn.Module) -> None:
        """Copy what this head shares with the teacher; by default the stages of every :class:`LatentResNet`."""
        for m in self.modules():
            if isinstance(m, LatentResNet):
                m.init_from_teacher(teacher)

    def init_from_codec(self, codec: nn.Module) -> None:
        """Start this head's decoders from the codec's stage-1 distillation decoder where shapes match."""
        from mtfc.codec import LatentDecoder

        for m in self.modules():
            if isinstance(m, LatentDecoder) and _same_shapes(m, codec.decoder):
                m.load_state_dict(codec.decoder.state_dict())


def trunk_kwargs(kwargs: dict[str, Any], ctx: HeadContext, extra_classes: int = 0) -> dict[str, Any]:
    """The ``from_config`` of the heads built on :class:`LatentResNet`: the codec's latent (or pixels),
    the dataset's classes (+ ``extra_classes``, e.g. background), the teacher's arch; then ``kwargs``."""
    return {"latent_channels": ctx.latent_channels, "num_classes": ctx.num_classes + extra_classes,
            "arch": ctx.teacher_arch, **kwargs}


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


class LatentResNet(nn.Module):
    """The server-side trunk shared by the built-in heads: a :class:`~mtfc.codec.LatentDecoder`
    from ŷ to ``layer1``-like features, then a torchvision ResNet's ``layer2..layer4``.

    With ``latent_channels=None`` it is the *reference* trunk on uncompressed pixels instead: the
    teacher's normalisation, stem and ``layer1`` replace the decoder (same architecture after that),
    and the head then takes images (B, 3, H, W) in [0, 1] where it would take ŷ.

    ``forward`` returns ``{"layer1": ..., "layer4": ...}`` (strides 4, 8, 16, 32, or less with dilation).
    ``init_from_teacher`` copies the teacher's stages; the decoder starts from the codec's
    (:meth:`Head.init_from_codec`).
    """

    def __init__(self, latent_channels: int | None, arch: str = "resnet18", hidden_channels: int = 96,
                 replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)) -> None:
        super().__init__()
        from mtfc.codec import LatentDecoder
        from mtfc.teacher import _ARCHS, STAGES, stage_channels

        self.arch, self.stages = arch, STAGES
        self.channels = stage_channels(arch)
        net = _ARCHS[arch](num_classes=1, replace_stride_with_dilation=list(replace_stride_with_dilation))
        if latent_channels is None:
            self.decoder = _PixelStem(net)
        else:
            self.decoder = LatentDecoder(latent_channels, self.channels["layer1"], hidden_channels)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        self.strides = {"layer1": 4}
        for name, dilate in zip(self.stages[1:], replace_stride_with_dilation):
            self.strides[name] = self.strides[self.stages[self.stages.index(name) - 1]] * (1 if dilate else 2)

    @property
    def on_pixels(self) -> bool:
        return isinstance(self.decoder, _PixelStem)

    def init_from_teacher(self, teacher: nn.Module) -> None:
        names = ("conv1", "bn1", "layer1", *self.stages[1:]) if self.on_pixels else self.stages[1:]
        for name in names:
            owner = self.decoder if name in ("conv1", "bn1", "layer1") else self
            getattr(owner, name).load_state_dict(getattr(teacher, name).state_dict())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {"layer1": self.decoder(x)}
        for prev, name in zip(self.stages, self.stages[1:]):
            feats[name] = getattr(self, name)(feats[prev])
        return feats


class _PixelStem(nn.Module):
    """normalize → conv1 → bn1 → relu → maxpool → layer1: the reference trunk's input side."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool, self.layer1 = net.conv1, net.bn1, net.relu, net.maxpool, net.layer1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from mtfc.teacher import normalize

        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(normalize(images))))))


class Registry(dict):
    """Name → builder; ``@HEADS.register("name")`` on a class or function."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable:
        def deco(obj):
            if name in self:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self[name] = obj
            return obj
        return deco

    def get(self, name: str) -> Any:
        """The builder registered as ``name``; built-in heads (``heads/<name>.py``) and the
        ``mtfc.heads`` entry points of installed packages are imported on first use."""
        if name not in self:
            _import_head_module(name)
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self)} (a head of your own "
                           "registers when its module is imported: list the module under `imports:` in the config "
                           "or declare it as an `mtfc.heads` entry point)")
        return self[name]

    def build(self, name: str, **kwargs) -> Any:
        """``name``'s builder called with ``kwargs`` (recorded so a saved head can be rebuilt)."""
        builder = self.get(name)
        obj = builder(**kwargs)
        obj._mtfc_spec = {"type": name, "kwargs": kwargs, "module": getattr(builder, "__module__", None)}
        return obj

    def rebuild(self, spec: dict[str, Any]) -> Any:
        """Build again from the spec :meth:`build` recorded (a checkpoint's). The module the spec names
        is not imported (a checkpoint must not choose what code runs); a type that is neither
        registered, built in nor an entry point is a ``KeyError`` saying which module to import."""
        name, module = spec["type"], spec.get("module")
        if name not in self:
            _import_head_module(name)
        if name not in self:
            where = f"module {module!r}" if module else "a module of yours"
            raise KeyError(f"head type {name!r} is not registered; it was defined in {where}, which mtfc imports only "
                           f"when you ask: pass `--import {module or 'MODULE'}` (mtfc serve, mtfc loadtest), list it "
                           "under `imports:` in the config, or declare it as an `mtfc.heads` entry point")
        return self.build(name, **spec["kwargs"])

    def from_config(self, name: str, kwargs: dict[str, Any], ctx: HeadContext) -> Any:
        """Build ``name`` from a config's ``kwargs`` through its :meth:`Head.from_config`."""
        builder = self.get(name)
        resolve = getattr(builder, "from_config", None)
        return self.build(name, **(resolve(kwargs, ctx) if resolve is not None else kwargs))


def _import_head_module(name: str) -> None:
    """Import the installed code that registers head ``name``: its ``mtfc.heads`` entry point or the
    built-in ``heads/<name>.py``."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="mtfc.heads"):
        if ep.name == name:
            ep.load()
            return
    if not name.isidentifier():  # a plain module name inside heads/, never a dotted path
        return
    try:  # built-in heads live in heads/<name>.py and register on import
        importlib.import_module(f"heads.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("heads", f"heads.{name}"):
            raise


HEADS = Registry("head")
