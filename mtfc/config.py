"""The pipeline config as one typed schema: every key, its type and its default, in this file only.

A YAML config is read into :class:`Config` by :meth:`Config.from_dict`, which refuses unknown or
misspelled keys (with a did-you-mean) and values of the wrong type, naming the key's dotted path.
``mtfc run CONFIG --print-config`` prints the resolved config (every default filled in); the report
records the same. ``configs/demo.yaml`` documents the keys in its comments.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from mtfc.data.synthetic import HUES
from mtfc.distill import REDUCTIONS
from mtfc.optim import OMIT_AT_DEFAULT, OptimSpec
from mtfc.recipes import apply_recipe
from mtfc.teacher import STAGES


def check_keys(section: dict[str, Any], known: Iterable[str], where: str) -> None:
    """Raise ``KeyError`` naming the first key of ``section`` not in ``known`` and the closest valid one."""
    known = sorted(known)
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(known)}"
            raise KeyError(f"unknown config key {where + '.' if where else ''}{key}: {hint}")


@dataclass
class GenerateConfig:
    """How the bundled dataset is generated into ``data.root`` (see :func:`mtfc.data.make_dataset`)."""

    num_classes: int = 5
    splits: dict[str, int] = field(default_factory=lambda: {"train": 2000, "val": 500})
    max_objects: int = 3
    hue: str = "class"          # class: each class its own band of hues | independent: only the shape tells the class
    workers: int = 1


@dataclass
class DataConfig:
    """A dataset (:func:`mtfc.data.build_dataset`). ``None`` values take the dataset type's default;
    ``ann_file``/``image_root`` (coco), ``dir`` (imagefolder), ``img_dir``/``ann_dir`` (segmentation)
    override where a loader finds its files; ``eval_resize`` (imagenet, imagefolder) sets torchvision's
    reference evaluation (see :mod:`mtfc.data.imagefolder`)."""

    type: str = "bundled"
    root: str = ""
    image_size: int | list[int] | None = None
    augment: dict[str, Any] | None = None
    generate: GenerateConfig | None = None
    ann_file: str | None = None
    image_root: str | None = None
    dir: str | None = None
    img_dir: str | None = None
    ann_dir: str | None = None
    eval_resize: int | None = None    # imagenet/imagefolder: evaluate by resizing the shorter side to it, centre crop
    strict: bool | None = None        # true: a degenerate annotation is an error instead of a counted warning
    on_corrupt: str | None = None     # "error" (default) | "skip": an unreadable image or label map
    resize: str | None = None         # eval: "letterbox" (pad to image_size) | "keep_aspect" (pad to the codec's divisibility); default per type


#: Data settings that hold for any dataset type; a stage whose ``data`` names another type inherits only these.
DATA_GENERIC = ("augment", "strict", "on_corrupt")
#: Stage settings that change how a stage runs, not what it makes: left out of its artifact's key.
HOW_IT_RUNS = ("num_workers", "ckpt_every", "val_every")
#: Data settings that say where a dataset's files are: an artifact's key records the dataset's
#: identity (classes, split sizes, file list) instead, so moving a dataset does not make it stale.
DATA_LOCATION = ("root", "ann_file", "image_root", "dir", "img_dir", "ann_dir")


@dataclass
class StageConfig:
    """What every training stage has: the engine's settings (:func:`mtfc.engine.fit`), its optimizer
    and schedule, and optionally its own ``data`` (merged over the top-level ``data``)."""

    epochs: int = 1
    batch_size: int = 32
    val_every: int = 1
    ckpt_every: int = 50
    num_workers: int = 0
    max_steps: int | None = None
    amp: bool = True
    optim: OptimSpec = field(default_factory=OptimSpec)
    data: dict[str, Any] | None = None

    def what_it_makes(self) -> dict[str, Any]:
        """This section as plain data without :data:`HOW_IT_RUNS` and ``data`` (which the pipeline
        resolves): the settings that determine the stage's artifact."""
        return {k: v for k, v in key_form(self).items() if k not in HOW_IT_RUNS and k != "data"}


@dataclass
class TeacherConfig(StageConfig):
    """``weights``: null (train on ``data``), a torchvision weights name or a local checkpoint."""

    arch: str = "resnet18"
    weights: str | None = None
    num_classes: int | None = None


@dataclass
class BottleneckConfig(StageConfig):
    """Stage 1, one codec per β. ``codec``: :class:`mtfc.Codec`'s arguments. ``stages``: the teacher
    taps distilled, or ``select_taps`` = k picks k by clustering; ``saliency`` in [0, 1] weights the
    distillation by the teacher's Grad-CAM; ``entropy_lr``/``aux_lr``: the prior's learning rates;
    ``reduction``: ``mean`` (each tap's MSE) or ``sum`` (sc2bench's, see :class:`mtfc.train.BottleneckTask`)."""

    betas: list[float] = field(default_factory=lambda: [1.0])
    codec: dict[str, Any] = field(default_factory=dict)
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    select_taps: int | None = None
    saliency: float = 0.0
    aux_lr: float = 1e-2
    entropy_lr: float | None = None
    reduction: str = field(default="mean", metadata=OMIT_AT_DEFAULT)


@dataclass
class HeadConfig(StageConfig):
    """A head: ``type`` (registered name; default the head's name), ``reference`` (``train``: a reference
    head trained on pixels; ``teacher``: the teacher itself), ``distill`` (learn from the reference too),
    ``kwargs`` for the head's :meth:`~mtfc.head.Head.from_config`."""

    type: str | None = None
    reference: str = "train"
    distill: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LearnedBaselineConfig:
    """One learned image codec of :mod:`mtfc.evaluation.learned`, trained on the bottleneck's training
    split: ``lambdas`` (its rate points; CompressAI's λ of ``λ·255²·MSE + bpp``), ``N``/``M`` (hidden and
    latent channels), ``steps`` (the highest λ, from scratch), ``finetune_steps`` (each lower λ, from the
    highest λ's weights), ``batch_size``, ``optim``, ``entropy_lr`` (the entropy bottleneck's density;
    null: ``optim.lr``) and ``aux_lr`` (Adam on its quantiles)."""

    lambdas: list[float]
    N: int = 32
    M: int = 48
    steps: int = 600
    finetune_steps: int = 150
    batch_size: int = 8
    optim: OptimSpec = field(default_factory=OptimSpec)
    entropy_lr: float | None = None
    aux_lr: float = 1e-3


@dataclass
class EvaluationConfig:
    """``baselines``: Pillow codec → qualities swept (jpeg, webp, avif); their files are cached under
    ``<out_dir>/cache/baselines``. ``learned_baselines``: CompressAI architecture (bmshj2018-factorized,
    bmshj2018-hyperprior, mbt2018-mean) → :class:`LearnedBaselineConfig`. ``num_workers``: DataLoader
    workers, which also encode and decode the Pillow baselines (``null``: one per CPU core; 0: in the
    main process)."""

    batch_size: int = 32
    num_workers: int | None = None
    baselines: dict[str, list[int]] = field(default_factory=dict)
    learned_baselines: dict[str, LearnedBaselineConfig] = field(default_factory=dict)


@dataclass
class Config:
    """The whole pipeline. ``imports``: Python modules imported first (they register user heads).
    ``recipe``: a named recipe of :mod:`mtfc.recipes` laid over the config (e.g. ``entropic-student``)."""

    out_dir: str
    data: DataConfig
    teacher: TeacherConfig
    bottleneck: BottleneckConfig
    heads: dict[str, HeadConfig] = field(default_factory=dict)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    seed: int = 0
    device: str | None = None
    imports: list[str] = field(default_factory=list)
    recipe: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], overridden: Iterable[str] = ()) -> Config:
        """Check and resolve a config dict (its recipe applied; ``overridden``: the dotted keys set on the
        command line, which may not be keys the recipe fixes); errors name the key (``teacher.epoch: did
        you mean 'epochs'?``)."""
        config = _parse(cls, apply_recipe(cfg, list(overridden)), "")
        stages = {"teacher": config.teacher, "bottleneck": config.bottleneck,
                  **{f"heads.{name}": head for name, head in config.heads.items()}}
        for where, stage in stages.items():
            check_keys(stage.data or {}, [f.name for f in fields(DataConfig)], f"{where}.data")
        for name, head in config.heads.items():
            if head.reference not in ("train", "teacher"):
                raise ValueError(f"heads.{name}.reference must be 'train' or 'teacher', got {head.reference!r}")
            head.type = head.type or name
        if not config.bottleneck.betas:
            raise ValueError("bottleneck.betas is empty")
        if config.bottleneck.reduction not in REDUCTIONS:
            raise ValueError(f"bottleneck.reduction must be one of {REDUCTIONS}, got {config.bottleneck.reduction!r}")
        generate = config.data.generate
        if generate is not None and generate.hue not in HUES:
            raise ValueError(f"data.generate.hue must be one of {', '.join(HUES)}, got {generate.hue!r}")
        _check_learned(config.evaluation.learned_baselines)
        return config

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``--print-config`` prints and the report records)."""
        return _plain(self)


def check_config(cfg: dict[str, Any]) -> None:
    """Raise ``KeyError``/``ValueError`` for a config dict that :meth:`Config.from_dict` refuses."""
    Config.from_dict(cfg)


def _check_learned(sections: dict[str, LearnedBaselineConfig]) -> None:
    from mtfc.evaluation.learned import ARCHS

    check_keys(sections, ARCHS, "evaluation.learned_baselines")
    for arch, spec in sections.items():
        where = f"evaluation.learned_baselines.{arch}"
        if not spec.lambdas or min(spec.lambdas) <= 0 or len(set(spec.lambdas)) != len(spec.lambdas):
            raise ValueError(f"{where}.lambdas must be distinct positive numbers, got {spec.lambdas!r}")
        for key in ("N", "M", "steps", "finetune_steps", "batch_size"):
            if getattr(spec, key) < 1:
                raise ValueError(f"{where}.{key} must be >= 1, got {getattr(spec, key)!r}")


def _parse(cls: type, data: Any, where: str) -> Any:
    if cls is OptimSpec:
        return OptimSpec.from_dict(data, where)
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or '(top level)'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    check_keys(data, [f.name for f in fields(cls)], where)
    missing = [f.name for f in fields(cls) if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"config lacks the required key {'.'.join(filter(None, [where, missing[0]]))}")
    return cls(**{key: _value(hints[key], value, f"{where}.{key}" if where else key) for key, value in data.items()})


def _value(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (dataclasses parsed, ints accepted for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _value(arg, value, where)
            except (TypeError, ValueError) as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise TypeError(f"config key {where} has value {value!r}, expected {_name(hint)}")
    if dataclasses.is_dataclass(hint):
        return _parse(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"config key {where} must be a list, got {value!r}")
        return [_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"config key {where} must be a mapping, got {value!r}")
        return {k: _value(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise TypeError(f"config key {where} must be {_name(hint)}, got {value!r}")
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _plain(obj: Any, keyed: bool = False) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in fields(obj):
            value = getattr(obj, f.name)
            if not (keyed and f.metadata.get("omit_at_default") and value == _default(f)):
                out[f.name] = _plain(value, keyed)
        return out
    if isinstance(obj, dict):
        return {k: _plain(v, keyed) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, keyed) for v in obj]
    return obj


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def key_form(obj: Any) -> Any:
    """A config section as plain data for an artifact's key: settings marked
    :data:`~mtfc.optim.OMIT_AT_DEFAULT` (added after artifacts existed) appear only when not at their
    default, so upgrading mtfc does not make finished artifacts stale."""
    return _plain(obj, keyed=True)
