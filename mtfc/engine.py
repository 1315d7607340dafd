"""The one training engine: every stage (teacher, shared bottleneck, each head) trains through :func:`fit`.

A *task* is an ``nn.Module`` that owns its model, its losses and its optimisation:

* ``task(batch)`` in train mode returns a dict of scalar tensors. The keys of
  ``task.configure_optimizers()`` (``dict[loss_key, Optimizer]`` over disjoint parameters, e.g.
  ``{"loss": AdamW(main), "aux_loss": Adam(entropy-model quantiles)}``) are summed and
  back-propagated once, then every optimizer steps; every other scalar (``"bpp"``, …) is only logged.
* ``task.optim`` (an :class:`~mtfc.optim.OptimSpec`, optional) is the schedule and clipping the
  engine applies: per step, every optimizer group's learning rate is the rate it was built with times
  :func:`~mtfc.optim.lr_factor`, and each optimizer's gradients are clipped to ``clip_grad``. The task
  builds its optimizers from the same spec (:func:`~mtfc.optim.build_optimizer`), so this one
  attribute plus ``configure_optimizers`` is the whole optimisation hook; ``fit(optim=...)`` overrides
  it, and a task without one trains at a constant rate.
* optional ``task.validate(loader) -> dict[str, float]`` runs in eval mode under ``torch.no_grad``
  every ``val_every`` epochs and at the end; its batches arrive already on the training device.
* optional attribute ``find_unused_parameters`` (default ``True``) is handed to DDP.
* optional attribute ``frozen_modules`` (names of submodules, e.g. ``("teacher",)``): inputs the
  task does not train; their weights are left out of ``last.pt``.

The parts: :class:`TrainState` (task, optimizers, GradScaler, position, running sums, history)
and how it is restored; ``_Loop`` with ``train_step``, ``train_epoch``, ``end_epoch`` (averages,
validation via :func:`_validate`, checkpoint, logs) and ``save``; :func:`fit` wires them.

``out_dir/last.pt`` (an :mod:`mtfc.checkpoint` of kind ``mtfc-train-state``) is written atomically
every ``ckpt_every`` steps and at each epoch end. It holds what is needed to continue mid-epoch as
if never interrupted, and nothing else: the state above (without the ``frozen_modules``) plus each
rank's RNG states and running sums. With ``num_workers=0`` a resumed run reaches bit-identical
parameters; with workers, the data order is the same but the workers' augmentation RNG restarts at the
resume point. Once a stage has written its artifact, :func:`clear_state` deletes ``last.pt``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, default_collate
from tqdm.auto import tqdm

from mtfc.checkpoint import TRAIN_STATE, CheckpointError, load_checkpoint, save_checkpoint
from mtfc.optim import OptimSpec, lr_factor


def to_device(obj: Any, device: str | torch.device) -> Any:
    """Move every tensor inside ``obj`` (nested tuples, lists, dicts) to ``device``; other leaves stay."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=torch.device(device).type == "cuda")
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# -- RNG -----------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy, torch (and this CUDA device's) RNG states as weights-only-loadable plain data."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def _rng_preserved(device: torch.device) -> Iterator[None]:
    """Validation must not shift the training randomness (so results do not depend on ``val_every``)."""
    state = _rng_state(device)
    try:
        yield
    finally:
        _set_rng_state(state, device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: call it before building a model so its initialisation is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# -- distributed ---------------------------------------------------------------------------------
def _setup_distributed(device: str | torch.device | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the torchrun process group when ``WORLD_SIZE`` > 1."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def on_rank_zero(fn: Callable[[], Any], device: str | torch.device | None = None) -> Any:
    """``fn()`` on rank 0 only (its result there, ``None`` elsewhere). Under torchrun (the process group
    is joined here if no stage has yet) every rank first waits until all have arrived, so none is still
    reading what ``fn`` changes, and then until rank 0 is done, so all see its result."""
    rank, world_size, _ = _setup_distributed(device)
    if world_size > 1:
        dist.barrier()
    try:
        return fn() if rank == 0 else None
    finally:
        if world_size > 1:
            dist.barrier()


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _epoch_indices(train_set: Dataset, epoch: int, seed: int, rank: int, world_size: int,
                   batch_size: int) -> list[int]:
    """This rank's sample order for ``epoch``: a pure function of (seed, epoch), so resume can skip into it."""
    if world_size > 1:
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
    return list(sampler)[:_samples_per_epoch(train_set, world_size, batch_size)]


def _samples_per_epoch(train_set: Dataset, world_size: int, batch_size: int) -> int:
    """Samples one rank trains on per epoch: all of its share, less one when that one would be a batch
    on its own (BatchNorm cannot train on one sample, e.g. ASPP's pooled branch; a dataset of N·B + 1)."""
    n = math.ceil(len(train_set) / world_size)
    return n - 1 if n > 1 and n % batch_size == 1 else n


# -- helpers -------------------------------------------------------------------------------------
class _OnDevice:
    """A loader whose batches arrive on ``device`` (what ``task.validate`` iterates)."""

    def __init__(self, loader: Iterable[Any], device: torch.device) -> None:
        self.loader, self.device, self.dataset = loader, device, loader.dataset

    def __iter__(self) -> Iterator[Any]:
        return (to_device(batch, self.device) for batch in self.loader)


def _num_images(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _num_images(batch[0])
    if isinstance(batch, dict) and batch:
        return _num_images(next(iter(batch.values())))
    return 0


def _check_optimizers(optimizers: Any) -> dict[str, torch.optim.Optimizer]:
    if not isinstance(optimizers, dict) or not optimizers or not all(
            isinstance(o, torch.optim.Optimizer) for o in optimizers.values()):
        raise TypeError("task.configure_optimizers() must return a non-empty dict[loss_key, torch.optim.Optimizer]")
    seen: set[int] = set()
    for key, opt in optimizers.items():
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"configure_optimizers(): a parameter of optimizer {key!r} is also in another "
                                     "optimizer; parameter groups must be disjoint")
                seen.add(id(p))
    return optimizers


def _scalars(out: Any, loss_keys: list[str]) -> list[str]:
    """Validate the task's output; returns the keys to log, optimised ones first."""
    if not isinstance(out, dict):
        raise TypeError(f"task(batch) must return a dict of scalar tensors, got {type(out).__name__}")
    missing = [k for k in loss_keys if k not in out]
    if missing:
        raise KeyError(f"task(batch) returned {sorted(out)} but configure_optimizers() optimises {missing}")
    for k, v in out.items():
        if not (isinstance(v, torch.Tensor) and v.numel() == 1):
            raise ValueError(f"task(batch)[{k!r}] must be a scalar tensor, got {type(v).__name__} "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else ''}")
    return loss_keys + sorted(k for k in out if k not in loss_keys)


def _write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """``log.jsonl``: one JSON record per (possibly partial) epoch, rewritten from the history."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    os.replace(tmp, path)


def _frozen_prefixes(task: nn.Module) -> tuple[str, ...]:
    return tuple(f"{name}." for name in getattr(task, "frozen_modules", ()))


def _task_state(task: nn.Module) -> dict[str, torch.Tensor]:
    """The task's state without its ``frozen_modules``: what ``last.pt`` holds of it."""
    frozen = _frozen_prefixes(task)
    return {k: v for k, v in task.state_dict().items() if not k.startswith(frozen)}


def _load_task_state(task: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    missing, unexpected = task.load_state_dict(state, strict=False)
    frozen = _frozen_prefixes(task)
    wrong = list(unexpected) + [k for k in missing if not k.startswith(frozen)]
    if wrong:
        raise CheckpointError(f"{path} does not hold this task's state (missing or unexpected: {wrong[:3]}); "
                              "pass resume=False or use another out_dir")


def clear_state(out_dir: str | Path) -> None:
    """Delete ``out_dir/last.pt``: call it once the stage's artifact is written (resuming is over)."""
    Path(out_dir, "last.pt").unlink(missing_ok=True)


def _summary(history: list[dict[str, Any]], global_step: int) -> dict[str, Any]:
    return {"epochs": history, "val": dict(history[-1].get("val", {})) if history else {}, "global_step": global_step}


# -- the training state and its checkpoint -------------------------------------------------------
@dataclass
class TrainState:
    """What a run continues from: the task, its optimizers and GradScaler, the position, this rank's
    running sums over the current epoch's steps, and the history of finished (or cut) epochs. The RNG
    states are the processes' own; :meth:`_Loop.save` adds them to the checkpoint."""

    task: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)

    def restore(self, ckpt: dict[str, Any], path: Path, rank: int, device: torch.device) -> None:
        """Continue from a training checkpoint (whose task weights are already loaded)."""
        if set(ckpt["optimizers"]) != set(self.optimizers):
            raise CheckpointError(f"{path} holds optimizers {sorted(ckpt['optimizers'])}, "
                                  f"configure_optimizers() returns {sorted(self.optimizers)}; "
                                  "pass resume=False or use another out_dir")
        for key, opt in self.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][key])
        if self.scaler.is_enabled() and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        self.history = list(ckpt["history"])
        if self.history and self.history[-1]["epoch"] == self.epoch:  # a max_steps stop mid-epoch, now continued
            self.history.pop()
        self.sums = dict(ckpt["ranks"][rank]["sums"])
        _set_rng_state(ckpt["ranks"][rank]["rng"], device)  # last: nothing random may happen in between


@dataclass
class _Loop:
    """One run of :func:`fit`: its fixed settings, its :class:`TrainState`, and the steps that move it."""

    state: TrainState
    model: nn.Module  # the task, or its DDP wrapper
    train_set: Dataset
    val_set: Dataset | None
    out_dir: Path
    run: dict[str, Any]  # what a resumed run must match to reproduce this one
    optim: OptimSpec
    epochs: int
    max_steps: int | None
    batch_size: int
    val_every: int
    ckpt_every: int
    collate_fn: Callable | None
    num_workers: int
    seed: int
    use_amp: bool
    progress: bool
    device: torch.device
    rank: int
    world_size: int
    writer: Any = None  # rank 0's TensorBoard SummaryWriter
    lr: float = 0.0  # the learning rate of the last step

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(_samples_per_epoch(self.train_set, self.world_size, self.batch_size) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return min(self.epochs * self.steps_per_epoch, self.max_steps or self.epochs * self.steps_per_epoch)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "last.pt"

    def finished(self) -> bool:
        return _finished(self.state.epoch, self.state.global_step, self.epochs, self.max_steps)

    def set_lr(self) -> float:
        """Apply the schedule at the current step to every optimizer; returns the first group's rate."""
        factor = lr_factor(self.optim, self.state.global_step, self.total_steps)
        for opt in self.state.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        return next(iter(self.state.optimizers.values())).param_groups[0]["lr"]

    def save(self) -> None:
        """Write ``last.pt`` (rank 0) with every rank's RNG state and running sums."""
        s = self.state
        ranks = _gather({"rng": _rng_state(self.device), "sums": dict(s.sums)}, self.world_size)
        if self.rank == 0:
            save_checkpoint(self.ckpt_path, TRAIN_STATE, {
                "run": self.run, "done": self.finished(), "epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
                "global_step": s.global_step, "task": _task_state(s.task),
                "optimizers": {k: o.state_dict() for k, o in s.optimizers.items()},
                "scaler": s.scaler.state_dict(), "ranks": ranks, "history": s.history})

    def train_step(self, batch: Any) -> dict[str, float]:
        """Forward, one backward of the summed losses, clip and step every optimizer; returns the scalars."""
        s, loss_keys = self.state, list(self.state.optimizers)
        with torch.autocast(self.device.type, dtype=torch.float16) if self.use_amp else contextlib.nullcontext():
            out = self.model(batch)
        keys = _scalars(out, loss_keys)
        total = sum(out[k].float() for k in loss_keys)
        for opt in s.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.lr = self.set_lr()
        s.scaler.scale(total).backward()
        for opt in s.optimizers.values():
            if self.optim.clip_grad is not None:
                s.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.optim.clip_grad)
            s.scaler.step(opt)
        s.scaler.update()
        s.step_in_epoch += 1
        s.global_step += 1
        logged = dict(zip(keys, torch.stack([out[k].detach().float().reshape(()) for k in keys]).tolist()))
        losses = {k: logged[k] for k in loss_keys}
        if not self.use_amp and not all(map(math.isfinite, losses.values())):
            raise FloatingPointError(f"non-finite loss at global step {s.global_step}: {losses}")
        for k, v in logged.items():
            s.sums[k] = s.sums.get(k, 0.0) + v
        return logged

    def train_epoch(self) -> tuple[int, float]:
        """The rest of the current epoch (or up to ``max_steps``), checkpointing every ``ckpt_every``
        steps; returns the images seen and the start time."""
        s = self.state
        indices = _epoch_indices(self.train_set, s.epoch, self.seed, self.rank, self.world_size, self.batch_size)
        loader = DataLoader(self.train_set, batch_size=self.batch_size,
                            sampler=indices[s.step_in_epoch * self.batch_size:], collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(_epoch_seed(self.seed, s.epoch)))
        bar = tqdm(total=self.steps_per_epoch, initial=s.step_in_epoch, desc=f"epoch {s.epoch + 1}/{self.epochs}",
                   disable=not (self.progress and self.rank == 0), dynamic_ncols=True)
        images, t0 = 0, time.perf_counter()
        self.lr = self.set_lr()
        for batch in loader:
            batch = to_device(batch, self.device)
            logged = self.train_step(batch)
            images += _num_images(batch)
            if self.writer is not None:
                for k, v in logged.items():
                    self.writer.add_scalar(f"train/{k}", v, s.global_step)
                self.writer.add_scalar("train/lr", self.lr, s.global_step)
            bar.set_postfix({**{k: f"{v:.4g}" for k, v in logged.items()},
                             "img/s": f"{images / (time.perf_counter() - t0):.1f}"}, refresh=False)
            bar.update(1)
            if self.finished():
                break
            if s.global_step % self.ckpt_every == 0 and s.step_in_epoch < self.steps_per_epoch:
                self.save()
        bar.close()
        return images, t0

    def end_epoch(self, images: int, t0: float) -> None:
        """Epoch end (or a ``max_steps`` stop): means over all ranks, validation, checkpoint, logs."""
        s = self.state
        names = sorted(s.sums)
        totals = torch.tensor([s.sums[k] for k in names] + [float(images)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(totals)
        record: dict[str, Any] = {
            "epoch": s.epoch, "global_step": s.global_step, "steps": s.step_in_epoch,
            "train": {k: float(v) / (s.step_in_epoch * self.world_size) for k, v in zip(names, totals[:-1].tolist())},
            "images_per_s": float(totals[-1]) / max(time.perf_counter() - t0, 1e-9),
            "seconds": time.perf_counter() - t0, "lr": self.lr}
        if s.step_in_epoch >= self.steps_per_epoch:
            s.epoch, s.step_in_epoch, s.sums = s.epoch + 1, 0, {}
        if self.val_set is not None and ((s.step_in_epoch == 0 and s.epoch % self.val_every == 0) or self.finished()):
            record["val"] = _validate(s.task, self.val_set, self.batch_size, self.collate_fn, self.num_workers,
                                      self.device, self.rank == 0, self.world_size)
        s.history.append(record)
        self.save()
        if self.writer is not None:
            self.writer.add_scalar("train/images_per_s", record["images_per_s"], s.global_step)
            for k, v in record.get("val", {}).items():
                self.writer.add_scalar(f"val/{k}", v, s.global_step)
            self.writer.flush()
            _write_log(self.out_dir / "log.jsonl", s.history)


def _finished(epoch: int, global_step: int, epochs: int, max_steps: int | None) -> bool:
    return epoch >= epochs or (max_steps is not None and global_step >= max_steps)


def _optim_spec(task: nn.Module, optim: OptimSpec | None) -> OptimSpec:
    """``fit``'s ``optim``, else the task's ``optim`` attribute, else a constant learning rate."""
    spec = optim or getattr(task, "optim", None) or OptimSpec(schedule="constant")
    if not isinstance(spec, OptimSpec):
        raise TypeError(f"{type(task).__name__}.optim must be an mtfc.optim.OptimSpec, got {type(spec).__name__}")
    return spec


def _open_writer(out_dir: Path) -> Any:
    """Rank 0's TensorBoard writer; first removes temporary files left by a run killed while saving."""
    from torch.utils.tensorboard import SummaryWriter

    for stale in out_dir.glob(".last.pt.*.tmp"):
        stale.unlink()
    return SummaryWriter(str(out_dir / "tb"))


# -- the loop ------------------------------------------------------------------------------------
def fit(task: nn.Module, train_set: Dataset, *, out_dir: str | Path, epochs: int, batch_size: int,
        val_set: Dataset | None = None, val_every: int = 1, collate_fn: Callable | None = None,
        num_workers: int = 0, seed: int = 0, amp: bool = True, ckpt_every: int = 50,
        max_steps: int | None = None, resume: bool = True, progress: bool = True,
        device: str | torch.device | None = None, optim: OptimSpec | None = None,
        tag: str | None = None) -> dict[str, Any]:
    """Train ``task`` on ``train_set``; resumable, reproducible, DDP-aware (run under ``torchrun``).

    Returns ``{"epochs": [record, …], "val": last validation metrics, "global_step": n}``; a record is
    ``{"epoch", "global_step", "steps", "train": {key: mean}, "images_per_s", "seconds", "lr", "val"?}``
    and the same records are in ``out_dir/log.jsonl`` and as TensorBoard scalars in ``out_dir/tb``. If
    ``last.pt`` says training already reached ``epochs`` / ``max_steps``, the task gets its weights and
    ``fit`` returns at once. AMP (fp16 autocast + GradScaler) is used only on CUDA.

    ``optim`` (default: ``task.optim``, see the module docstring) sets the per-step learning-rate
    schedule and gradient clipping. ``tag`` names what is trained (the pipeline passes its artifact
    key): a ``last.pt`` with another tag is not resumed.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("val_every", val_every),
                        ("ckpt_every", ckpt_every)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if len(train_set) == 0:
        raise ValueError("train_set is empty")
    if val_set is not None and not callable(getattr(task, "validate", None)):
        raise TypeError(f"val_set given but {type(task).__name__} has no validate(loader) method")

    out_dir = Path(out_dir)
    rank, world_size, device = _setup_distributed(device)
    optim = _optim_spec(task, optim)
    run = {"seed": seed, "batch_size": batch_size, "world_size": world_size, "train_size": len(train_set),
           "epochs": epochs, "optim": optim.to_dict(), **({"tag": tag} if tag is not None else {})}
    ckpt_path = out_dir / "last.pt"
    ckpt = load_checkpoint(ckpt_path, TRAIN_STATE) if resume and ckpt_path.exists() else None
    if ckpt is not None:
        if ckpt["run"].get("tag") != tag:
            raise ValueError(f"{ckpt_path} is the training state of {ckpt['run'].get('tag')!r}, this run trains "
                             f"{tag!r}; pass resume=False or use another out_dir")
        _load_task_state(task, ckpt["task"], ckpt_path)
        if _finished(ckpt["epoch"], ckpt["global_step"], epochs, max_steps):
            return _summary(list(ckpt["history"]), ckpt["global_step"])
        if ckpt["run"] != run:
            raise ValueError(f"{ckpt_path} was written by a run with {ckpt['run']}, this run has {run}: resuming "
                             "would not reproduce its data order; pass resume=False or use another out_dir")

    seed_everything(seed + rank)
    task.to(device).train()
    model = task
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            task, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=getattr(task, "find_unused_parameters", True))
    optimizers = _check_optimizers(task.configure_optimizers())
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    use_amp = amp and device.type == "cuda"
    state = TrainState(task, optimizers, torch.amp.GradScaler(device.type, enabled=use_amp))
    if ckpt is not None:
        state.restore(ckpt, ckpt_path, rank, device)
    loop = _Loop(state, model, train_set, val_set, out_dir, run, optim, epochs, max_steps, batch_size, val_every,
                ckpt_every, collate_fn, num_workers, seed, use_amp, progress, device, rank, world_size,
                writer=_open_writer(out_dir) if rank == 0 else None)
    while not loop.finished():
        loop.end_epoch(*loop.train_epoch())
    if loop.writer is not None:
        loop.writer.close()
    if world_size > 1:
        dist.barrier()  # last.pt is complete before any rank moves on
    return _summary(state.history, state.global_step)


def _validate(task: nn.Module, val_set: Dataset, batch_size: int, collate_fn: Callable | None, num_workers: int,
              device: torch.device, main: bool, world_size: int) -> dict[str, float]:
    """Rank 0 runs ``task.validate`` on the whole set, in batches of one image size
    (:func:`mtfc.data.grouped_loader`); the metrics are broadcast to every rank."""
    from mtfc.data.base import grouped_loader

    metrics = None
    if main:
        loader = grouped_loader(val_set, batch_size, collate_fn=collate_fn or default_collate,
                                num_workers=num_workers, pin_memory=device.type == "cuda")
        task.eval()
        try:
            with _rng_preserved(device), torch.no_grad():
                metrics = {k: float(v) for k, v in task.validate(_OnDevice(loader, device)).items()}
        finally:
            task.train()
    if world_size > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics
