"""The end-to-end job: dataset → teacher → shared bottleneck per β → heads on each codec →
reference models → rate–accuracy evaluation → report. ``mtfc run CONFIG`` runs every stage;
each stage is also its own subcommand.

Every stage writes one artifact and is skipped when that artifact exists and loads; an interrupted
stage resumes from the engine's last atomic checkpoint. The config is declarative YAML (see
``configs/demo.yaml``, whose comments document every key).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from mtfc.codec import load_codec
from mtfc.head import HEADS, Head
from mtfc.model import MultiTaskModel, read_head_checkpoint
from mtfc.teacher import STAGES, build_teacher


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML config; ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    cfg = yaml.safe_load(path.read_text()) or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    for key in ("out_dir", "data", "teacher", "bottleneck"):
        if key not in cfg:
            raise ValueError(f"config {path} lacks the required key {key!r}")
    return cfg


def _log(msg: str) -> None:
    print(f"[mtfc {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Pipeline:
    """The stages of ``mtfc run``, each reading its inputs from the artifacts of the ones before."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.out = Path(cfg["out_dir"])
        self.seed = int(cfg.get("seed", 0))
        self.device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")

    # -- helpers ---------------------------------------------------------------------------------
    def data_cfg(self, stage: dict[str, Any] | None = None) -> dict[str, Any]:
        """The dataset config of a stage: its own ``data`` merged over the top-level one."""
        base = {k: v for k, v in self.cfg["data"].items() if k != "generate"}
        return {**base, **((stage or {}).get("data") or {})}

    def dataset(self, stage: dict[str, Any] | None, split: str, train: bool):
        from mtfc.data import build_dataset

        return build_dataset(self.data_cfg(stage), split, train=train)

    def fit_kwargs(self, stage: dict[str, Any]) -> dict[str, Any]:
        keys = ("epochs", "batch_size", "num_workers", "max_steps", "ckpt_every", "val_every", "amp")
        return {"seed": self.seed, "device": self.device, **{k: stage[k] for k in keys if k in stage}}

    def betas(self) -> list[float]:
        return [float(b) for b in self.cfg["bottleneck"]["betas"]]

    def codec_path(self, beta: float) -> Path:
        return self.out / "bottleneck" / f"beta_{beta:g}" / "codec.pt"

    def head_path(self, beta: float | None, name: str) -> Path:
        where = "reference" if beta is None else f"heads/beta_{beta:g}"
        return self.out / where / name / "head.pt"

    # -- stages ------------------------------------------------------------------------------------
    def make_dataset(self) -> Path | None:
        """Generate the bundled dataset if the config asks for it and it is not there yet."""
        from mtfc.data import make_dataset

        data = self.cfg["data"]
        if data.get("type") != "bundled" or "generate" not in data:
            return None
        root = Path(data["root"])
        if (root / "dataset.json").is_file():
            _log(f"dataset: {root} exists, skipped")
            return root
        _log(f"dataset: generating {root}")
        t0 = time.time()
        make_dataset(root, image_size=data.get("image_size", 64), seed=self.seed, **data["generate"])
        _log(f"dataset: done in {time.time() - t0:.1f} s")
        return root

    def teacher_model(self) -> nn.Module:
        """The teacher: trained here unless ``teacher.weights`` names pretrained or local weights."""
        from mtfc.train import train_teacher

        t = self.cfg["teacher"]
        path = self.out / "teacher" / "teacher.pt"
        if t.get("weights") is None and not path.is_file():
            _log(f"teacher: training {t['arch']} on the dataset")
            train_set = self.dataset(t, "train", train=True)
            train_teacher(train_set, self.dataset(t, "val", train=False), arch=t["arch"],
                          num_classes=train_set.num_classes, out_dir=path.parent, lr=t.get("lr", 1e-3),
                          **self.fit_kwargs(t))
        weights = t.get("weights") or path
        num_classes = t.get("num_classes") or self.dataset(t, "val", train=False).num_classes
        return build_teacher(t["arch"], num_classes, weights).eval()

    def train_bottlenecks(self) -> dict[float, Path]:
        from mtfc.train import train_bottleneck

        b = self.cfg["bottleneck"]
        paths = {}
        teacher = None
        for beta in self.betas():
            path = self.codec_path(beta)
            if _loads(load_codec, path):
                _log(f"bottleneck β={beta:g}: {path} exists, skipped")
            else:
                if teacher is None:
                    teacher = self.teacher_model()
                _log(f"bottleneck β={beta:g}: training")
                train_bottleneck(self.dataset(b, "train", train=True), self.dataset(b, "val", train=False),
                                 copy.deepcopy(teacher), arch=self.cfg["teacher"]["arch"], beta=beta,
                                 out_dir=path.parent, codec=b.get("codec"), stages=b.get("stages", STAGES),
                                 lr=b.get("lr", 1e-3), aux_lr=b.get("aux_lr", 1e-3), **self.fit_kwargs(b))
            paths[beta] = path
        return paths

    def build_head(self, name: str, latent_channels: int | None, num_classes: int) -> Head:
        spec = self.cfg["heads"][name]
        kwargs = {"latent_channels": latent_channels, "num_classes": num_classes,
                  "arch": self.cfg["teacher"]["arch"], **spec.get("kwargs", {})}
        return HEADS.build(spec.get("type", name), **kwargs)

    def head_classes(self, name: str, dataset) -> int:
        """Classes a head predicts: segmentation adds background."""
        spec = self.cfg["heads"][name]
        return dataset.num_classes + (1 if spec.get("type", name) == "segmentation" else 0)

    def train_heads(self, references: bool = False) -> dict[str, Path]:
        """Fine-tune every configured head on every codec (or, with ``references``, on pixels)."""
        from mtfc.train import fit_head

        teacher = None
        done = {}
        for name, spec in self.cfg.get("heads", {}).items():
            if references and spec.get("reference", "train") != "train":
                continue
            for beta in ([None] if references else self.betas()):
                path = self.head_path(beta, name)
                where = "reference" if beta is None else f"β={beta:g}"
                if _loads(read_head_checkpoint, path):
                    _log(f"head {name} ({where}): {path} exists, skipped")
                    done[f"{name}@{where}"] = path
                    continue
                if teacher is None:
                    teacher = self.teacher_model()
                train_set = self.dataset(spec, "train", train=True)
                if beta is None:
                    codec = None
                    head = self.build_head(name, None, self.head_classes(name, train_set))
                else:
                    codec = load_codec(self.codec_path(beta))
                    head = self.build_head(name, codec.latent_channels, self.head_classes(name, train_set))
                    head.init_from_codec(codec)
                head.init_from_teacher(teacher)
                _log(f"head {name} ({where}): training")
                fit_head(head, train_set, codec=codec, out_dir=path.parent, val_set=self.dataset(spec, "val", train=False),
                           teacher=teacher if spec.get("distill", False) else None, lr=spec.get("lr", 1e-3),
                           weight_decay=spec.get("weight_decay", 1e-4), **self.fit_kwargs(spec))
                done[f"{name}@{where}"] = path
        return done

    def reference_head(self, name: str, teacher: nn.Module | None, dataset) -> Head:
        """The head on uncompressed pixels: trained (``reference: train``) or the teacher itself."""
        from mtfc.model import load_head

        if self.cfg["heads"][name].get("reference", "train") == "teacher":
            head = self.build_head(name, None, self.head_classes(name, dataset))
            head.init_from_teacher(teacher)
            return head.eval()
        return load_head(self.head_path(None, name))

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, Any]]:
        """Rate–accuracy rows for mtfc at every β, every image-codec baseline and the uncompressed reference."""
        from mtfc.data import collate
        from mtfc.evaluation.baselines import available_codecs, codec_method, uncompressed_method
        from mtfc.evaluation.runner import evaluate_method

        ev = self.cfg.get("evaluation", {})
        heads = self.cfg.get("heads", {})
        groups: dict[str, list[str]] = {}  # heads sharing a validation set share one encode per image
        for name, spec in heads.items():
            groups.setdefault(yaml.safe_dump(self.data_cfg(spec), sort_keys=True), []).append(name)
        teacher = self.teacher_model()
        rows = []
        for names in groups.values():
            val_set = self.dataset(heads[names[0]], "val", train=False)
            loader = DataLoader(val_set, batch_size=ev.get("batch_size", 32), collate_fn=collate)
            refs = {n: self.reference_head(n, teacher, val_set) for n in names}
            metrics = {n: h.metric for n, h in refs.items()}
            for beta in self.betas():
                model = MultiTaskModel(load_codec(self.codec_path(beta)))
                for name in names:
                    model.load_head(name, self.head_path(beta, name))
                evaluators = {n: h.build_evaluator(val_set) for n, h in model.heads.items()}
                rows += evaluate_method(mtfc_method(model.eval()), loader, evaluators, method="mtfc",
                                        rate_point=beta, metrics=metrics)
            evaluators = {n: h.build_evaluator(val_set) for n, h in refs.items()}
            for codec, qualities in ev.get("baselines", {}).items():
                if codec not in available_codecs():
                    _log(f"evaluate: {codec} is not supported by this Pillow build, skipped")
                    continue
                for q in qualities:
                    rows += evaluate_method(codec_method(codec, q, refs), loader, evaluators, method=codec,
                                            rate_point=q, metrics=metrics)
            rows += evaluate_method(uncompressed_method(refs), loader, evaluators, method="uncompressed",
                                    rate_point="raw", metrics=metrics)
        return rows

    def report(self, rows: list[dict[str, Any]], command: str | None = None) -> dict[str, Path]:
        from mtfc.evaluation.report import collect_provenance, write_report

        prov = collect_provenance(config=self.cfg, seed=self.seed, device=self.device, command=command)
        return write_report(rows, self.out / "report", provenance=prov)

    def run(self, command: str | None = None) -> dict[str, Path]:
        """Every stage in order; finished stages are skipped, an interrupted one resumes."""
        t0 = time.time()
        torch.manual_seed(self.seed)
        self.make_dataset()
        self.teacher_model()
        self.train_bottlenecks()
        self.train_heads(references=True)
        self.train_heads()
        _log("evaluate: rate–accuracy of mtfc, image-codec baselines and the uncompressed reference")
        paths = self.report(self.evaluate(), command)
        _log(f"done in {time.time() - t0:.0f} s; report: {paths['markdown']}")
        return paths


def _loads(loader, path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        loader(path)
        return True
    except (ValueError, RuntimeError) as e:
        _log(f"{path} is unusable ({e}); it will be rebuilt")
        return False


def mtfc_method(model: MultiTaskModel):
    """``predict_fn`` for :func:`~mtfc.evaluation.runner.evaluate_method`: encode each image once, decode
    once, run every attached head on the decoded latent; rate = the bitstreams' real size."""
    from mtfc.evaluation.runner import BatchResult

    def predict(images: torch.Tensor, targets: list[dict[str, Any]]) -> BatchResult:
        t0 = time.perf_counter()
        streams = model.codec.encode(images)
        t1 = time.perf_counter()
        latent = model.codec.decode(streams)
        t2 = time.perf_counter()
        preds = {name: head(latent, targets) for name, head in model.heads.items()}
        return BatchResult(preds, [len(s) for s in streams], t1 - t0, t2 - t1)

    return predict
