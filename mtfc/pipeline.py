"""The end-to-end job: dataset → teacher → shared bottleneck per β → heads on each codec →
reference models → rate–accuracy evaluation → report. ``mtfc run CONFIG`` runs every stage;
each stage is also its own subcommand.

Before anything trains, :meth:`Pipeline.validate` opens every dataset and weights file the config
names and checks that they fit together (``mtfc check CONFIG`` runs only that).

Every stage writes one artifact that records its *key*: the SHA-256 of everything that determines it
(its config section with data and kwargs, the seed, the identity of its dataset, the keys of the
artifacts it was trained on). A stage is skipped when its artifact's key is this config's; a stale
artifact (or an interrupted run of other inputs) is moved aside and retrained. An interrupted stage
resumes from the engine's last atomic checkpoint. The config is declarative YAML (see
``configs/demo.yaml``, whose comments document every key).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import os
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
import yaml
from torch import nn

from mtfc.checkpoint import LEARNED_CODEC, TEACHER, TRAIN_STATE, CheckpointError, load_checkpoint, written_by
from mtfc.codec import DEFAULT_KIND, Codec, load_codec
from mtfc.config import DATA_GENERIC, DATA_LOCATION, Config, StageConfig, key_form
from mtfc.engine import on_rank_zero, seed_everything
from mtfc.head import HEADS, Head, HeadContext, geometry_of
from mtfc.model import MultiTaskModel, read_head_checkpoint
from mtfc.priors import PRIORS
from mtfc.recipes import lay_over
from mtfc.teacher import (build_teacher, candidate_taps, is_local_weights, pretrained_cache_file, pretrained_fixes,
                          pretrained_weights, stage_channels)

SPLITS = ("train", "val")
#: The inputs of a key that are other artifacts (their keys, or the codec's fingerprint).
UPSTREAM = ("teacher", "codec", "reference")
STAGE_GROUPS = ("teacher", "bottleneck", "heads")


class ConfigCheckError(ValueError):
    """What :meth:`Pipeline.validate` found: one line per problem, each naming the file or config key
    and the fix."""


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config into the typed :class:`~mtfc.config.Config`; ``overrides`` are
    ``dotted.key=value`` strings (values parsed as YAML; not keys the config's recipe fixes). A file may
    start from another with ``extends: <path relative to it>``: its own values are laid over that file's
    (nested sections merge; lists, values and ``{}`` replace). Errors name the file and the key."""
    path = Path(path)
    try:
        cfg = _read_config(path)
    except ValueError as e:
        raise ValueError(f"config {path}: {e.args[0]}") from None
    overridden = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
        overridden.append(key)
    try:
        return Config.from_dict(cfg, overridden)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"config {path}: {e.args[0]}") from None


def _read_config(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of ``path`` laid over the file its ``extends`` names (recursively)."""
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist"
                                + (f" (named by `extends` in {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ValueError(f"`extends` loops: {' -> '.join(str(p) for p in (*chain, path.resolve()))}")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a {type(cfg).__name__}, not a mapping of config sections")
    base = cfg.pop("extends", None)
    if base is None:
        return cfg
    if not isinstance(base, str):
        raise ValueError(f"`extends` in {path} must be a file name, got {base!r}")
    return lay_over(_read_config(path.parent / base, (*chain, path.resolve())), cfg)


#: what one codec is trained for: a β, or every β of a variable-rate codec (its levels, in order)
Run = float | tuple[float, ...]


def _log(msg: str) -> None:
    print(f"[mtfc {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Pipeline:
    """The stages of ``mtfc run``, each reading its inputs from the artifacts of the ones before."""

    def __init__(self, cfg: Config | dict[str, Any]) -> None:
        self.cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg)
        for module in self.cfg.imports:  # user modules that register heads
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigCheckError(f"imports: cannot import {module!r} ({e}): install it, add its folder to "
                                       "PYTHONPATH, or remove it from `imports:`") from None
        self.out = Path(self.cfg.out_dir)
        self.seed = self.cfg.seed
        self.device = self.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._identities: dict[str, dict[str, Any]] = {}  # data config → its dataset's identity
        self._digests: dict[Path, str] = {}  # local teacher weights → their SHA-256

    # -- helpers ---------------------------------------------------------------------------------
    def data_cfg(self, stage: StageConfig | None = None) -> dict[str, Any]:
        """The dataset config of a stage: its own ``data`` merged over the top-level one (only the
        type-independent keys, :data:`~mtfc.config.DATA_GENERIC`, when the stage names another type)."""
        base = {k: v for k, v in dataclasses.asdict(self.cfg.data).items() if k != "generate" and v is not None}
        own = (stage.data if stage is not None else None) or {}
        if own.get("type", base["type"]) != base["type"]:
            base = {k: v for k, v in base.items() if k in DATA_GENERIC}
        return {**base, **own}

    def dataset(self, stage: StageConfig | None, split: str, train: bool, root: str | None = None):
        """A stage's split (``root``: of the same kind of dataset elsewhere); evaluation images are padded to
        the codec's divisibility (:data:`~mtfc.data.transforms.RESIZE`), the one place the data layer learns it."""
        from mtfc.data import build_dataset

        cfg = self.data_cfg(stage) if root is None else {**self.data_cfg(stage), "root": root}
        return build_dataset(cfg, split, train=train,
                             size_divisibility=Codec.size_divisibility_of(self.cfg.bottleneck.codec))

    def fit_kwargs(self, stage: StageConfig) -> dict[str, Any]:
        keys = ("epochs", "batch_size", "num_workers", "max_steps", "ckpt_every", "val_every", "amp", "optim")
        return {"seed": self.seed, "device": self.device, **{k: getattr(stage, k) for k in keys}}

    def betas(self) -> list[float]:
        """The rate points: one codec each, or the levels of one variable-rate codec (in this order)."""
        return list(self.cfg.bottleneck.betas)

    @property
    def variable_rate(self) -> bool:
        """Whether ``bottleneck.codec.kind`` is a variable-rate prior: one codec for every β."""
        return getattr(PRIORS.get(self.cfg.bottleneck.codec.get("kind", DEFAULT_KIND)), "variable", False)

    def runs(self) -> list[Run]:
        """What stage 1 trains and every head trains on: each β (one codec each), or all βs at once
        (the levels of one variable-rate codec)."""
        return [tuple(self.betas())] if self.variable_rate else self.betas()

    def level(self, beta: float) -> int | None:
        """β's rate level on the variable-rate codec (``None`` for per-β codecs)."""
        return self.betas().index(beta) if self.variable_rate else None

    @staticmethod
    def _where(run: Run) -> str:
        return "levels" if isinstance(run, tuple) else f"β={run:g}"

    def codec_path(self, run: Run) -> Path:
        """The codec of ``run`` (a β, or :meth:`runs`' tuple); on a variable-rate codec every β's is the same."""
        if self.variable_rate:
            return self.out / "bottleneck" / "levels" / "codec.pt"
        return self.out / "bottleneck" / f"beta_{run:g}" / "codec.pt"

    def learned_path(self, arch: str, lmbda: float) -> Path:
        return self.out / "learned" / arch / f"lambda_{lmbda:g}" / "codec.pt"

    def head_path(self, beta: Run | None, name: str) -> Path:
        where = "reference" if beta is None else "heads/levels" if self.variable_rate else f"heads/beta_{beta:g}"
        return self.out / where / name / "head.pt"

    def teacher_classes(self) -> int:
        """The teacher's number of classes: ``teacher.num_classes``, else its data's."""
        t = self.cfg.teacher
        return t.num_classes or len(self.dataset_identity(t)["train"]["classes"])

    # -- what determines each artifact: its key -------------------------------------------------------
    def dataset_identity(self, stage: StageConfig | None) -> dict[str, Any]:
        """What identifies a stage's dataset, per split: its classes, its target keys, its size and a
        digest of its file list (relative to the root); for a generated dataset also the generator's
        config. Built once per data config (this opens the annotation files)."""
        cfg = self.data_cfg(stage)
        token = _canonical(cfg)
        if token not in self._identities:
            identity = {split: _identity(self.dataset(stage, split, train=split == "train"), cfg["root"])
                        for split in SPLITS}
            if cfg["type"] == "bundled":
                info = json.loads((Path(cfg["root"]) / "dataset.json").read_text())
                identity["generated"] = {"format_version": info.get("format_version"),
                                         **{k: v for k, v in info.get("config", {}).items() if k != "workers"}}
            self._identities[token] = identity
        return self._identities[token]

    def _data_inputs(self, stage: StageConfig) -> dict[str, Any]:
        return {"config": {k: v for k, v in self.data_cfg(stage).items() if k not in DATA_LOCATION},
                "identity": self.dataset_identity(stage)}

    def teacher_key(self) -> dict[str, Any]:
        """The teacher's key: its section, seed and data when it trains here; else its weights."""
        t = self.cfg.teacher
        if t.weights is None:
            return _key({"stage": "teacher", "seed": self.seed, "config": t.what_it_makes(),
                         "data": self._data_inputs(t)})
        inputs = {"stage": "teacher", "arch": t.arch, "weights": t.weights, "num_classes": self.teacher_classes()}
        if is_local_weights(t.weights):
            path = Path(t.weights)
            if path not in self._digests:
                self._digests[path] = _file_digest(path)
            inputs["sha256"] = self._digests[path]
        return _key(inputs)

    def codec_key(self, run: Run) -> dict[str, Any]:
        """The key of ``run``'s codec: the bottleneck section (with its β, or all βs for a variable-rate
        codec), seed, data and the teacher's key."""
        b = self.cfg.bottleneck
        config = {k: v for k, v in b.what_it_makes().items() if k != "betas"}
        if b.select_taps is not None:
            del config["stages"]  # chosen by clustering instead
        return _key({"stage": "bottleneck", "beta": list(run) if isinstance(run, tuple) else run, "seed": self.seed,
                     "config": config,
                     "data": self._data_inputs(b), "teacher": self.teacher_key()["sha256"]})

    def head_key(self, name: str, beta: Run | None) -> dict[str, Any]:
        """The key of head ``name`` on β's codec (``None``: its reference on pixels): its section, seed,
        data, the teacher's key (heads start from it) and, on a codec, the codec's fingerprint and the
        key of the reference it distils from."""
        spec = self.cfg.heads[name]
        config = spec.what_it_makes()
        if beta is None:
            del config["distill"]  # the reference itself is not distilled
        inputs = {"stage": "reference" if beta is None else "head",
                  "beta": list(beta) if isinstance(beta, tuple) else beta, "seed": self.seed,
                  "config": config, "data": self._data_inputs(spec),
                  "teacher": self.teacher_key()["sha256"]}
        if beta is not None:
            inputs["codec"] = load_codec(self.codec_path(beta)).fingerprint
            if spec.distill and spec.reference == "train":
                inputs["reference"] = self.head_key(name, None)["sha256"]
        return _key(inputs)

    def learned_key(self, arch: str, lmbda: float) -> dict[str, Any]:
        """The key of learned baseline ``arch`` at ``lmbda``: its section (without the other λs), seed and
        the bottleneck's data; a lower λ, fine-tuned from the highest, also the highest one's key."""
        spec = self.cfg.evaluation.learned_baselines[arch]
        top = max(spec.lambdas)
        config = {k: v for k, v in key_form(spec).items() if k != "lambdas"}
        inputs = {"stage": "learned-baseline", "arch": arch, "lambda": lmbda, "seed": self.seed,
                  "data": self._data_inputs(self.cfg.bottleneck)}
        if lmbda == top:
            del config["finetune_steps"]
        else:
            inputs["init"] = self.learned_key(arch, top)["sha256"]
        return _key({**inputs, "config": config})

    # -- checks before anything trains ----------------------------------------------------------------
    def validate(self, stages: Sequence[str] = STAGE_GROUPS) -> None:
        """Check in seconds, before anything trains, that what ``stages`` (of :data:`STAGE_GROUPS`)
        need is there and fits together: every dataset opens (roots, annotation files) with the same
        classes in both splits; the teacher's ``num_classes`` fits its data and weights; its weights
        file loads or torchvision's pretrained weights are cached or downloadable; the codec and every
        head build from their sections; each head's data has the targets it needs. Trains nothing;
        raises :class:`ConfigCheckError` with one line per problem."""
        t, b = self.cfg.teacher, self.cfg.bottleneck
        sections: dict[str, StageConfig] = {}
        if "teacher" in stages and (t.weights is None or t.num_classes is None):
            sections["teacher"] = t
        if "bottleneck" in stages:
            sections["bottleneck"] = b
        if "heads" in stages:
            sections.update({f"heads.{name}": spec for name, spec in self.cfg.heads.items()})
        problems, broken = [], set()
        for where, stage in sections.items():
            cfg = self.data_cfg(stage)
            token = _canonical(cfg)
            if token in broken:
                continue
            source = f"{where}.data" if stage.data else "data"
            try:
                identity = self.dataset_identity(stage)
            except (ValueError, OSError, KeyError) as e:  # a DatasetError names the file
                broken.add(token)
                problems.append(f"{source} ({cfg.get('type')} at {cfg.get('root')}): {_line(e)}")
                continue
            train, val = identity["train"]["classes"], identity["val"]["classes"]
            if train != val:
                broken.add(token)
                problems.append(f"{source} ({cfg['type']} at {cfg['root']}): the train split has {len(train)} classes "
                                f"{_short(train)}, the val split {len(val)} {_short(val)}: give both splits the "
                                "same class list")
        if "teacher" in sections and _canonical(self.data_cfg(t)) in broken:
            return self._fail(problems)
        try:
            channels = stage_channels(t.arch)["layer1"]
        except ValueError as e:
            return self._fail(problems + [f"teacher.arch: {_line(e)}"])
        try:
            levels = {"levels": len(b.betas)} if self.variable_rate else {}
            latent_channels = Codec(**{"out_channels": channels, **b.codec, **levels}).latent_channels
        except (TypeError, ValueError) as e:
            return self._fail(problems + [f"bottleneck.codec: {_line(e)}"])
        if "teacher" in stages:
            problems += self._teacher_problems()
        if "bottleneck" in stages and b.select_taps is None:
            known = set(candidate_taps(build_teacher(t.arch, 1))) | {"logits"}
            unknown = [s for s in b.stages if s not in known]
            if unknown or not b.stages:
                problems.append(f"bottleneck.stages: unknown distillation taps {unknown or '(none given)'} of "
                                f"{t.arch}; choose from {sorted(known)}")
        for where, spec in sections.items():
            if where.startswith("heads.") and _canonical(self.data_cfg(spec)) not in broken:
                problems += self._head_problems(where.removeprefix("heads."), latent_channels)
        self._fail(problems)

    @staticmethod
    def _fail(problems: list[str]) -> None:
        if problems:
            raise ConfigCheckError("\n".join(problems))

    def _teacher_problems(self) -> list[str]:
        t = self.cfg.teacher
        if t.weights is None:
            n = len(self.dataset_identity(t)["train"]["classes"])
            if t.num_classes is not None and t.num_classes != n:
                return [f"teacher.num_classes is {t.num_classes} but teacher.weights is null, so the teacher trains on "
                        f"its data, which has {n} classes: set teacher.num_classes to {n} (or null)"]
            return []
        if is_local_weights(t.weights):
            path = Path(t.weights)
            if not path.is_file():
                return [f"teacher.weights: {path} does not exist: set teacher.weights to an existing checkpoint, to a "
                        "torchvision weights name (e.g. IMAGENET1K_V1), or to null (the teacher then trains on `data`)"]
            try:
                ckpt = load_checkpoint(path, TEACHER, plain_state_dict=True)
            except CheckpointError as e:
                return [f"teacher.weights: {e}"]
            if ckpt.get("arch", t.arch) != t.arch:
                return [f"teacher.weights: {path} holds a {ckpt['arch']} teacher, teacher.arch is {t.arch}: set "
                        f"teacher.arch to {ckpt['arch']} or pass a {t.arch} checkpoint"]
            fc = ckpt["state_dict"].get("fc.weight")
            want = self.teacher_classes()
            if fc is not None and fc.shape[0] != want:
                said = f"teacher.num_classes is {want}" if t.num_classes else f"its data has {want} classes"
                return [f"teacher.weights: {path} predicts {fc.shape[0]} classes but {said}: set teacher.num_classes "
                        f"to {fc.shape[0]}"]
            return []
        try:
            entry = pretrained_weights(t.arch, t.weights)
        except ValueError as e:
            return [f"teacher.weights: {e}"]
        if pretrained_cache_file(entry).is_file():
            return []
        reason = _unreachable(entry.url)
        if reason is None:
            return []
        return [f"teacher.weights: torchvision's {t.arch} {entry.name} is not in torch's hub cache and cannot be "
                f"downloaded ({reason}): {pretrained_fixes(entry)}"]

    def _head_problems(self, name: str, latent_channels: int) -> list[str]:
        spec, cfg = self.cfg.heads[name], self.data_cfg(self.cfg.heads[name])
        identity = self.dataset_identity(spec)["train"]
        data = SimpleNamespace(num_classes=len(identity["classes"]), class_names=identity["classes"])
        try:
            head = self.build_head(name, latent_channels, data)
        except (TypeError, ValueError, KeyError, ImportError) as e:
            return [f"heads.{name}: cannot build a {spec.type!r} head from its section: {_line(e)}"]
        missing = [k for k in head.required_targets if k not in identity["targets"]]
        if missing:
            return [f"heads.{name}: a {spec.type} head needs targets {missing} that its data ({cfg['type']} at "
                    f"{cfg['root']}) does not have (it has {identity['targets']}): give heads.{name} a `data` section "
                    "with these labels"]
        return []

    def _usable(self, what: str, path: Path, key: dict[str, Any], recorded: Callable[[Path], Any]) -> bool:
        """Whether the artifact at ``path`` loads and ``recorded(path)`` (the key it records) is ``key``.

        A stale or broken artifact's folder, or the folder of an interrupted run that trained other
        inputs, is moved aside (``<folder>.stale-<time>``, nothing is deleted): the stage trains afresh."""
        state = path.parent / "last.pt"
        if path.is_file():
            try:
                reason = _differences(recorded(path), key)
            except (ValueError, RuntimeError) as e:
                reason = f"{path} is unusable: {_line(e)}"
            else:
                if reason is None:
                    return True
                reason = f"{path} is stale: {reason}"
        elif state.is_file():
            try:
                tag = load_checkpoint(state, TRAIN_STATE)["run"].get("tag")
            except CheckpointError as e:
                tag = _line(e)
            if tag == key["sha256"]:
                return False  # the engine resumes it
            reason = f"the interrupted run in {state} trained other inputs than this config's"
        else:
            return False

        def move_aside() -> None:  # once, by rank 0 under torchrun (every rank gets here)
            aside = path.parent.with_name(f"{path.parent.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            path.parent.rename(aside)
            _log(f"{what}: {reason}; moved its folder to {aside}, retraining")

        on_rank_zero(move_aside, self.device)
        return False

    # -- stages ------------------------------------------------------------------------------------
    def make_dataset(self) -> Path | None:
        """Generate the bundled dataset if the config asks for it and it is not there yet."""
        from mtfc.data import make_dataset
        from mtfc.data.synthetic import generated_with

        data = self.cfg.data
        if data.type != "bundled" or data.generate is None:
            return None
        root = Path(data.root)
        self._identities.clear()
        config = {"seed": self.seed, **dataclasses.asdict(data.generate)}
        if data.image_size is not None:
            config["image_size"] = data.image_size
        if (root / "dataset.json").is_file():
            if generated_with(root, config):
                _log(f"dataset: {root} exists, skipped")
                return root
            _log(f"dataset: {root} was generated by another generator version or config; regenerating it "
                 "(artifacts trained on the old one will be moved aside and retrained)")
        _log(f"dataset: generating {root}")
        t0 = time.time()
        make_dataset(root, overwrite=True, **config)
        _log(f"dataset: done in {time.time() - t0:.1f} s")
        return root

    def teacher_model(self) -> nn.Module:
        """The teacher: trained here unless ``teacher.weights`` names pretrained or local weights (a
        trained one whose key is not this config's is moved aside and retrained)."""
        from mtfc.train import train_teacher

        t = self.cfg.teacher
        if t.weights is not None:
            return build_teacher(t.arch, self.teacher_classes(), t.weights).eval()
        self._fail(self._teacher_problems())
        path = self.out / "teacher" / "teacher.pt"
        key = self.teacher_key()
        if not self._usable("teacher", path, key, lambda p: load_checkpoint(p, TEACHER).get("key")):
            _log(f"teacher: training {t.arch} on the dataset")
            train_set = self.dataset(t, "train", train=True)
            train_teacher(train_set, self.dataset(t, "val", train=False), arch=t.arch,
                          num_classes=train_set.num_classes, out_dir=path.parent, key=key, **self.fit_kwargs(t))
        return build_teacher(t.arch, self.teacher_classes(), path).eval()

    def train_bottlenecks(self) -> dict[Run, Path]:
        from mtfc.train import train_bottleneck

        b = self.cfg.bottleneck
        paths = {}
        teacher = None
        for beta in self.runs():
            path, where = self.codec_path(beta), self._where(beta)
            key = self.codec_key(beta)
            if self._usable(f"bottleneck {where}", path, key, lambda p: load_codec(p).meta.get("key")):
                _log(f"bottleneck {where}: {path} exists, skipped")
            else:
                if teacher is None:
                    teacher = self.teacher_model()
                _log(f"bottleneck {where}: training")
                train_bottleneck(self.dataset(b, "train", train=True), self.dataset(b, "val", train=False),
                                 copy.deepcopy(teacher), arch=self.cfg.teacher.arch, beta=beta,
                                 out_dir=path.parent, codec=b.codec, stages=b.stages, select=b.select_taps,
                                 saliency=b.saliency, aux_lr=b.aux_lr, entropy_lr=b.entropy_lr,
                                 reduction=b.reduction, key=key,
                                 **self.fit_kwargs(b))
            paths[beta] = path
        return paths

    def train_learned_baselines(self) -> dict[tuple[str, float], Path]:
        """Every learned image codec of ``evaluation.learned_baselines`` at every λ, on the bottleneck's
        training split: the highest λ from scratch, each lower λ fine-tuned from it
        (:func:`~mtfc.evaluation.learned.train_learned_codec`); an artifact whose key is this config's is reused."""
        from mtfc.evaluation.learned import train_learned_codec

        b, paths = self.cfg.bottleneck, {}
        for arch, spec in self.cfg.evaluation.learned_baselines.items():
            top = max(spec.lambdas)
            for lmbda in sorted(spec.lambdas, reverse=True):
                path, key, what = self.learned_path(arch, lmbda), self.learned_key(arch, lmbda), f"{arch} λ={lmbda:g}"
                if self._usable(what, path, key, lambda p: load_checkpoint(p, LEARNED_CODEC).get("key")):
                    _log(f"{what}: {path} exists, skipped")
                else:
                    _log(f"{what}: training" + ("" if lmbda == top else f" (fine-tuned from λ={top:g})"))
                    train_learned_codec(arch, self.dataset(b, "train", train=True), self.dataset(b, "val", train=False),
                                        lmbda=lmbda, N=spec.N, M=spec.M, batch_size=spec.batch_size,
                                        steps=spec.steps if lmbda == top else spec.finetune_steps,
                                        init=None if lmbda == top else self.learned_path(arch, top), optim=spec.optim,
                                        aux_lr=spec.aux_lr, entropy_lr=spec.entropy_lr, out_dir=path.parent, seed=self.seed,
                                        key=key, device=self.device, num_workers=b.num_workers, ckpt_every=b.ckpt_every)
                paths[(arch, lmbda)] = path
        return paths

    def build_head(self, name: str, latent_channels: int | None, dataset) -> Head:
        """Head ``name`` built from its config section by its :meth:`~mtfc.head.Head.from_config`."""
        spec = self.cfg.heads[name]
        size = self.data_cfg(spec).get("image_size")
        ctx = HeadContext(latent_channels, dataset.num_classes, tuple(getattr(dataset, "class_names", ())),
                          (size, size) if isinstance(size, int) else tuple(size) if size else None,
                          self.cfg.teacher.arch)
        return HEADS.from_config(spec.type, spec.kwargs, ctx)

    def train_heads(self, references: bool = False) -> dict[str, Path]:
        """Fine-tune every configured head on every codec (or, with ``references``, on pixels)."""
        from mtfc.train import fit_head

        teacher = None
        done = {}
        for name, spec in self.cfg.heads.items():
            if references and spec.reference != "train":
                continue
            for beta in ([None] if references else self.runs()):
                path = self.head_path(beta, name)
                where = "reference" if beta is None else self._where(beta)
                key = self.head_key(name, beta)
                if self._usable(f"head {name} ({where})", path, key,
                                lambda p: (read_head_checkpoint(p).get("meta") or {}).get("key")):
                    _log(f"head {name} ({where}): {path} exists, skipped")
                    done[f"{name}@{where}"] = path
                    continue
                if teacher is None:
                    teacher = self.teacher_model()
                train_set = self.dataset(spec, "train", train=True)
                distill_from = None
                if beta is not None and spec.distill:
                    distill_from = self.reference_head(name, teacher, train_set)
                seed_everything(self.seed)  # the head's initialisation is part of the run's reproducibility
                if beta is None:
                    codec = None
                    head = self.build_head(name, None, train_set)
                else:
                    codec = load_codec(self.codec_path(beta))
                    head = self.build_head(name, codec.latent_channels, train_set)
                    head.init_from_codec(codec)
                head.init_from_teacher(teacher)
                _log(f"head {name} ({where}): training" + (" (distilled from its reference)" if distill_from else ""))
                fit_head(head, train_set, codec=codec, out_dir=path.parent, val_set=self.dataset(spec, "val", train=False),
                         teacher=distill_from, key=key, **self.fit_kwargs(spec))
                done[f"{name}@{where}"] = path
        return done

    def reference_head(self, name: str, teacher: nn.Module | None, dataset) -> Head:
        """The head on uncompressed pixels: trained (``reference: train``) or the teacher itself."""
        from mtfc.model import load_head

        if self.cfg.heads[name].reference == "teacher":
            head = self.build_head(name, None, dataset)
            head.init_from_teacher(teacher)
            return head.eval()
        return load_head(self.head_path(None, name))

    @torch.no_grad()
    def evaluate(self, on: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """Rate–accuracy rows for mtfc at every β, every image-codec baseline (Pillow's and the learned
        ones, trained first if needed) and the uncompressed reference, on each head's ``val`` split or,
        with ``on`` = (root, split), on that split of a dataset of the same type and settings at ``root``
        (e.g. more images from the bundled generator: ``tools/eval_fresh.py``).

        Every model runs on ``self.device`` (the learned codecs' range coding on the CPU). Heads that share a
        validation set share one pass over it: each image is loaded once, encoded and decoded once per codec
        (each β, each baseline setting) and every head runs on that. The Pillow baselines' files come from
        the on-disk cache (:class:`~mtfc.evaluation.baselines.RoundTripCache`) or are encoded in the
        DataLoader's workers.
        """
        import os
        from itertools import chain

        from tqdm.auto import tqdm

        from mtfc.data import grouped_loader
        from mtfc.evaluation.baselines import RoundTripCache, RoundTripDataset, available_codecs, collate_coded
        from mtfc.evaluation.learned import load_learned_codec, roundtrip
        from mtfc.evaluation.runner import BatchResult, Scorer, raw_rgb_bytes

        ev, heads, device = self.cfg.evaluation, self.cfg.heads, torch.device(self.device)
        if ev.num_workers is not None and ev.num_workers < 0:
            raise ValueError(f"evaluation.num_workers must be 0 or more (or null: one per CPU core), got {ev.num_workers}")
        points = []
        for codec, qualities in ev.baselines.items():
            if codec not in available_codecs():
                _log(f"evaluate: {codec} is not supported by this Pillow build, skipped")
                continue
            points += [(codec, q) for q in qualities]
        root, split = on or (None, "val")
        groups: dict[str, list[str]] = {}  # heads sharing a validation set share one encode per image
        for name, spec in heads.items():
            data = self.data_cfg(spec) if on is None else {**self.data_cfg(spec), "root": root, "split": split}
            groups.setdefault(yaml.safe_dump(data, sort_keys=True), []).append(name)
        with torch.enable_grad():  # this method runs under no_grad
            learned_paths = self.train_learned_baselines()
        teacher = self.teacher_model().to(device)
        rows = []
        for key, names in groups.items():
            val_set = self.dataset(heads[names[0]], split, train=False, root=root)
            cache = RoundTripCache(self.out / "cache" / "baselines", _dataset_key(key), points)
            loader = grouped_loader(RoundTripDataset(val_set, cache), ev.batch_size, collate_fn=collate_coded,
                                    num_workers=(os.cpu_count() or 1) if ev.num_workers is None else ev.num_workers)
            refs = {n: self.reference_head(n, teacher, val_set).to(device).eval() for n in names}
            metrics = {n: h.metric for n, h in refs.items()}
            directions = {n: h.metric_direction for n, h in refs.items()}

            def scorer(method: str, rate_point: Any, on: dict[str, Head]) -> Scorer:
                return Scorer({n: h.build_evaluator(val_set) for n, h in on.items()}, method=method,
                              rate_point=rate_point, metrics=metrics, directions=directions)

            models = {}
            for run in self.runs():
                model = MultiTaskModel(load_codec(self.codec_path(run)))
                for name in names:
                    model.load_head(name, self.head_path(run, name))
                model.to(device).eval()
                for beta in (run if isinstance(run, tuple) else [run]):
                    models[beta] = (mtfc_method(model, self.level(beta)), scorer("mtfc", beta, model.heads))
            baselines = {point: scorer(*point, refs) for point in points}
            learned = {(arch, lmbda): (load_learned_codec(path)[0], scorer(arch, lmbda, refs))
                       for (arch, lmbda), path in learned_paths.items()}
            raw = scorer("uncompressed", "raw", refs)
            cached = min((len(cache.entries[p]) for p in points), default=0)
            _log(f"evaluate {', '.join(names)} on {device}: {len(val_set)} images through {len(models)} codecs, "
                 f"{len(points)} baseline settings ({min(cached, len(val_set))} images' baselines cached) and "
                 f"{len(learned)} learned codecs")
            progress = tqdm(total=len(val_set), desc=f"evaluate {', '.join(names)}", unit="image")
            try:
                for batch in loader:  # batches of one image size
                    progress.update(len(batch.targets))
                    images, targets = batch.images.to(device), batch.targets
                    size, records = tuple(images.shape[-2:]), geometry_of(targets)
                    for predict, score in models.values():
                        score.add(predict(images, targets), targets, size)
                    # every image codec's round trip through the references, one at a time: Pillow's (coded in
                    # the workers, uint8) and the learned ones
                    trips = chain(((score, batch.roundtrips[point]) for point, score in baselines.items()),
                                  ((score, roundtrip(model, arch, images)) for (arch, _), (model, score) in learned.items()))
                    for score, rt in trips:
                        if not rt.images.is_floating_point():
                            rt = rt._replace(images=rt.images.to(device).float().div_(255))
                        preds = {n: h.predict(rt.images, records) for n, h in refs.items()}
                        score.add(BatchResult(preds, rt.num_bytes, rt.encode_s, rt.decode_s), targets, size)
                    raw.add(BatchResult({n: h.predict(images, records) for n, h in refs.items()}, raw_rgb_bytes(images, targets),
                                        0.0, 0.0), targets, size)
                    cache.add(batch.new)
            finally:
                progress.close()
                cache.save()  # an interrupted evaluation keeps the baselines it encoded
            rows += [row for _, score in models.values() for row in score.rows()]
            scores = [*baselines.values(), *(score for _, score in learned.values()), raw]
            rows += [row for score in scores for row in score.rows()]
        return rows

    def report(self, rows: list[dict[str, Any]], command: str | None = None) -> dict[str, Path]:
        from mtfc.evaluation.report import collect_provenance, disk_usage, write_report

        prov = collect_provenance(config=self.cfg.to_dict(), seed=self.seed, device=self.device, command=command,
                                  artifacts={str(p): written_by(p) for p in self.artifacts() if p.is_file()},
                                  disk=disk_usage(self.artifact_dirs()))
        return write_report(rows, self.out / "report", provenance=prov, training=self.training_logs())

    def artifact_dirs(self) -> dict[str, Path]:
        """Where each kind of artifact lives under ``out_dir`` (with its training logs and state)."""
        return {"teacher": self.out / "teacher", "references": self.out / "reference", "codecs": self.out / "bottleneck",
                "heads": self.out / "heads", "learned baselines": self.out / "learned", "caches": self.out / "cache"}

    def artifacts(self) -> list[Path]:
        """Every artifact the results use: teacher, codecs, reference heads, heads and learned baselines."""
        refs = [self.head_path(None, n) for n, spec in self.cfg.heads.items() if spec.reference == "train"]
        learned = [self.learned_path(arch, lmbda) for arch, spec in self.cfg.evaluation.learned_baselines.items()
                   for lmbda in spec.lambdas]
        return [self.out / "teacher" / "teacher.pt", *map(self.codec_path, self.runs()), *refs,
                *(self.head_path(b, n) for b in self.runs() for n in self.cfg.heads), *learned]

    def training_logs(self) -> dict[str, tuple[dict[str, Path], list[tuple[str, str]]]]:
        """Every stage's runs (name → the engine's out_dir) and the curves to plot for it."""
        from mtfc.evaluation.curves import headline, read_log

        stages = {"teacher": ({"teacher": self.out / "teacher"}, [("train", "loss"), ("train", "acc"), ("val", "top1")]),
                  "bottleneck": ({self._where(b): self.codec_path(b).parent for b in self.runs()},
                                 [("train", "loss"), ("train", "distill"), ("train", "bpp"), ("val", "bpp_est"),
                                  ("train", "aux_loss"), ("val", "student_top1")])}
        for name in self.cfg.heads:
            runs = {"reference": self.head_path(None, name).parent,
                    **{self._where(b): self.head_path(b, name).parent for b in self.runs()}}
            val_keys = next((list(r["val"]) for d in runs.values() for r in read_log(d) if r.get("val")), [])
            stages[f"head {name}"] = (runs, [("train", "loss")] + [("val", k) for k in headline(val_keys)[:3]])
        for arch, spec in self.cfg.evaluation.learned_baselines.items():
            stages[arch] = ({f"λ={lm:g}": self.learned_path(arch, lm).parent for lm in spec.lambdas},
                            [("train", "loss"), ("train", "psnr"), ("train", "bpp"), ("val", "psnr"),
                             ("val", "bpp_est")])
        return {k: v for k, v in stages.items() if any(read_log(d) for d in v[0].values())}

    def run(self, command: str | None = None) -> dict[str, Path]:
        """Every stage in order; finished stages are skipped, an interrupted one resumes."""
        t0 = time.time()
        torch.manual_seed(self.seed)
        self.make_dataset()
        self.validate()
        self.teacher_model()
        self.train_bottlenecks()
        self.train_heads(references=True)
        self.train_heads()
        _log("evaluate: rate–accuracy of mtfc, image-codec baselines (learned ones trained first) and the "
             "uncompressed reference")
        paths = self.report(self.evaluate(), command)
        _log(f"done in {time.time() - t0:.0f} s; report: {paths['markdown']}")
        return paths


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _key(inputs: dict[str, Any]) -> dict[str, Any]:
    """An artifact's key: ``inputs`` as plain JSON data and their SHA-256."""
    text = _canonical(inputs)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "inputs": json.loads(text)}


def _identity(dataset, root: str) -> dict[str, Any]:
    files = "".join(f"{os.path.relpath(r.image_path, root)}\t{r.label}\n" for r in dataset.records)
    # content_size follows from image_size and the data config's `resize`, which the key holds already
    targets = sorted(k for k in dataset.target_keys if k != "content_size")
    return {"classes": list(dataset.class_names), "targets": targets, "size": len(dataset),
            "files": hashlib.sha256(files.encode()).hexdigest()}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): obj}


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{', '.join(map(repr, value[:3]))}, … ({len(value)} items)]"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a digest
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _differences(recorded: Any, key: dict[str, Any]) -> str | None:
    """``None`` if the recorded key is ``key``, else what differs (the first few inputs, one line)."""
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        return "it records no key (written before artifacts recorded what determines them)"
    if recorded["sha256"] == key["sha256"]:
        return None
    old, new = _flat(recorded.get("inputs", {})), _flat(key["inputs"])
    absent = object()
    diffs = [f"trained on {k} {_short(old.get(k))}, this run's is {_short(new.get(k))}" if k in UPSTREAM else
             f"{k} was {_short(old.get(k))}, this config's is {_short(new.get(k))}"
             for k in sorted(old.keys() | new.keys(), key=lambda k: (k not in UPSTREAM, k))
             if old.get(k, absent) != new.get(k, absent)]
    return "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")


def _line(error: BaseException) -> str:
    """An exception as one line."""
    text = str(error.args[0]) if error.args else type(error).__name__
    return " ".join(text.split())


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """``None`` if ``url`` answers a HEAD request, else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except OSError as e:  # URLError (no network, DNS) or an HTTP error
        return " ".join(str(getattr(e, "reason", e)).split())


def _dataset_key(data_cfg_yaml: str) -> str:
    """A short name for a validation set's config (its baselines' cache files carry it)."""
    import hashlib

    return hashlib.sha1(f"val\n{data_cfg_yaml}".encode()).hexdigest()[:12]


def mtfc_method(model: MultiTaskModel, level: int | None = None):
    """``predict_fn`` for :func:`~mtfc.evaluation.runner.evaluate_method`: encode each image once (at
    ``level`` on a variable-rate codec), its streams carrying each image's content and original size as
    a device sends them, then :meth:`~mtfc.model.MultiTaskModel.decode` and
    :meth:`~mtfc.model.MultiTaskModel.run_heads`, as the server does (the heads get the records of the
    streams' headers, not the ``targets``); rate = the bitstreams' real size."""
    from mtfc.evaluation.runner import BatchResult

    def predict(images: torch.Tensor, targets: list[dict[str, Any]]) -> BatchResult:
        records = geometry_of(targets)
        t0 = time.perf_counter()
        streams = model.codec.encode(images, [r["original_size"] for r in records], level,
                                     [r["content_size"] for r in records])
        t1 = time.perf_counter()
        latent, records = model.decode(streams)
        if latent.is_cuda:  # the decode's last kernels finish before the clock stops
            torch.cuda.synchronize(latent.device)
        t2 = time.perf_counter()
        return BatchResult(model.run_heads(latent, records), [len(s) for s in streams], t1 - t0, t2 - t1)

    return predict
