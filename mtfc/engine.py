"""The one training engine: every stage (teacher, shared bottleneck, each head) trains through :func:`fit`.

A *task* is an ``nn.Module`` that owns its model and its losses:

* ``task(batch)`` in train mode returns a dict of scalar tensors. The keys of
  ``task.configure_optimizers()`` (``dict[loss_key, Optimizer]`` over disjoint parameters, e.g.
  ``{"loss": Adam(main), "aux_loss": Adam(entropy-model quantiles)}``) are summed and
  back-propagated once, then every optimizer steps; every other scalar (``"bpp"``, …) is only logged.
* optional ``task.validate(loader) -> dict[str, float]`` runs in eval mode under ``torch.no_grad``
  every ``val_every`` epochs and at the end; its batches arrive already on the training device.
* optional attribute ``find_unused_parameters`` (default ``True``) is handed to DDP.

``out_dir/last.pt`` (an :mod:`mtfc.checkpoint` of kind ``mtfc-train-state``) is written atomically every ``ckpt_every`` steps and at each epoch end. It holds
everything needed to continue mid-epoch as if never interrupted: task, optimizers, GradScaler,
position (epoch, step in epoch, global step), each rank's RNG states and running epoch sums, and the
history. With ``num_workers=0`` a resumed run reaches bit-identical parameters; with workers, the data
order is the same but the workers' augmentation RNG restarts at the resume point.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
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


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _epoch_indices(train_set: Dataset, epoch: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's sample order for ``epoch``: a pure function of (seed, epoch), so resume can skip into it."""
    if world_size > 1:
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
    return list(sampler)


# -- helpers -------------------------------------------------------------------------------------
class _OnDevice:
    """A loader whose batches arrive on ``device`` (what ``task.validate`` iterates)."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device, self.dataset = loader, device, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

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


def _summary(history: list[dict[str, Any]], global_step: int) -> dict[str, Any]:
    return {"epochs": history, "val": dict(history[-1].get("val", {})) if history else {}, "global_step": global_step}


# -- the loop ------------------------------------------------------------------------------------
def fit(task: nn.Module, train_set: Dataset, *, out_dir: str | Path, epochs: int, batch_size: int,
        val_set: Dataset | None = None, val_every: int = 1, collate_fn: Callable | None = None,
        num_workers: int = 0, seed: int = 0, amp: bool = True, ckpt_every: int = 50,
        max_steps: int | None = None, resume: bool = True, progress: bool = True,
        device: str | torch.device | None = None, optim: OptimSpec | None = None) -> dict[str, Any]:
    """Train ``task`` on ``train_set``; resumable, reproducible, DDP-aware (run under ``torchrun``).

    Returns ``{"epochs": [record, …], "val": last validation metrics, "global_step": n}``; a record is
    ``{"epoch", "global_step", "steps", "train": {key: mean}, "images_per_s", "val"?}`` and the same
    records are in ``out_dir/log.jsonl`` and as TensorBoard scalars in ``out_dir/tb``. If ``last.pt`` says
    training already reached ``epochs`` / ``max_steps``, the task gets its weights and ``fit`` returns
    at once. AMP (fp16 autocast + GradScaler) is used only on CUDA.

    ``optim`` sets the per-step learning-rate schedule (applied to every optimizer's groups, relative to
    the learning rate each was built with) and gradient clipping (per optimizer); the task builds its
    optimizers from the same spec (:func:`mtfc.optim.build_optimizer`). Each record carries its ``lr``.
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
    ckpt_path = out_dir / "last.pt"
    rank, world_size, device = _setup_distributed(device)
    main = rank == 0
    optim = optim or OptimSpec(schedule="constant")
    run = {"seed": seed, "batch_size": batch_size, "world_size": world_size, "train_size": len(train_set),
           "epochs": epochs, "optim": optim.to_dict()}
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / world_size) / batch_size)
    total_steps = min(epochs * steps_per_epoch, max_steps or epochs * steps_per_epoch)

    ckpt = load_checkpoint(ckpt_path, TRAIN_STATE) if resume and ckpt_path.exists() else None
    epoch = step_in_epoch = global_step = 0
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        task.load_state_dict(ckpt["task"])
        epoch, step_in_epoch, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        history = list(ckpt["history"])

    def finished() -> bool:
        return epoch >= epochs or (max_steps is not None and global_step >= max_steps)

    if ckpt is not None and finished():
        return _summary(history, global_step)
    if ckpt is not None and ckpt["run"] != run:
        raise ValueError(f"{ckpt_path} was written by a run with {ckpt['run']}, this run has {run}: resuming would "
                         "not reproduce its data order; pass resume=False or use another out_dir")

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
    loss_keys = list(optimizers)

    def set_lr() -> float:
        factor = lr_factor(optim, global_step, total_steps)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        return next(iter(optimizers.values())).param_groups[0]["lr"]
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    sums: dict[str, float] = {}  # this rank's per-key sums over the steps of the current epoch
    if ckpt is not None:
        if set(ckpt["optimizers"]) != set(optimizers):
            raise CheckpointError(f"{ckpt_path} holds optimizers {sorted(ckpt['optimizers'])}, "
                                  f"configure_optimizers() returns {sorted(optimizers)}")
        for key, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][key])
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        if history and history[-1]["epoch"] == epoch:  # a max_steps stop mid-epoch, now continued
            history.pop()
        sums = dict(ckpt["ranks"][rank]["sums"])
        _set_rng_state(ckpt["ranks"][rank]["rng"], device)  # last: nothing random may happen in between

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        for stale in out_dir.glob(f".{ckpt_path.name}.*.tmp"):  # left by a run killed while saving
            stale.unlink()
        writer = SummaryWriter(str(out_dir / "tb"))

    def save() -> None:
        ranks = _gather({"rng": _rng_state(device), "sums": dict(sums)}, world_size)
        if main:
            save_checkpoint(ckpt_path, TRAIN_STATE, {
                "run": run, "done": finished(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": global_step, "task": task.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "scaler": scaler.state_dict(), "ranks": ranks, "history": history})

    while not finished():
        indices = _epoch_indices(train_set, epoch, seed, rank, world_size)
        loader = DataLoader(train_set, batch_size=batch_size, sampler=indices[step_in_epoch * batch_size:],
                            collate_fn=collate_fn, num_workers=num_workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not (progress and main), dynamic_ncols=True)
        images, t0 = 0, time.perf_counter()
        lr = set_lr()
        for batch in loader:
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.float16) if use_amp else contextlib.nullcontext():
                out = model(batch)
            keys = _scalars(out, loss_keys)
            total = sum(out[k].float() for k in loss_keys)
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            lr = set_lr()
            scaler.scale(total).backward()
            for opt in optimizers.values():
                if optim.clip_grad is not None:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], optim.clip_grad)
                scaler.step(opt)
            scaler.update()
            step_in_epoch += 1
            global_step += 1
            logged = dict(zip(keys, torch.stack([out[k].detach().float().reshape(()) for k in keys]).tolist()))
            losses = {k: logged[k] for k in loss_keys}
            if not use_amp and not all(map(math.isfinite, losses.values())):
                raise FloatingPointError(f"non-finite loss at global step {global_step}: {losses}")
            for k, v in logged.items():
                sums[k] = sums.get(k, 0.0) + v
            images += _num_images(batch)
            if writer is not None:
                for k, v in logged.items():
                    writer.add_scalar(f"train/{k}", v, global_step)
                writer.add_scalar("train/lr", lr, global_step)
            bar.set_postfix({**{k: f"{v:.4g}" for k, v in logged.items()},
                             "img/s": f"{images / (time.perf_counter() - t0):.1f}"}, refresh=False)
            bar.update(1)
            if finished():
                break
            if global_step % ckpt_every == 0 and step_in_epoch < steps_per_epoch:
                save()
        bar.close()

        # epoch end (or a max_steps stop): averages over all ranks, validation, checkpoint, log
        names = sorted(sums)
        totals = torch.tensor([sums[k] for k in names] + [float(images)], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(totals)
        record: dict[str, Any] = {
            "epoch": epoch, "global_step": global_step, "steps": step_in_epoch,
            "train": {k: float(v) / (step_in_epoch * world_size) for k, v in zip(names, totals[:-1].tolist())},
            "images_per_s": float(totals[-1]) / max(time.perf_counter() - t0, 1e-9),
            "seconds": time.perf_counter() - t0, "lr": lr}
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch, sums = epoch + 1, 0, {}
        if val_set is not None and ((step_in_epoch == 0 and epoch % val_every == 0) or finished()):
            record["val"] = _validate(task, val_set, batch_size, collate_fn, num_workers, device, main, world_size)
        history.append(record)
        save()
        if writer is not None:
            writer.add_scalar("train/images_per_s", record["images_per_s"], global_step)
            for k, v in record.get("val", {}).items():
                writer.add_scalar(f"val/{k}", v, global_step)
            writer.flush()
            _write_log(out_dir / "log.jsonl", history)

    if writer is not None:
        writer.close()
    if world_size > 1:
        dist.barrier()  # last.pt is complete before any rank moves on
    return _summary(history, global_step)


def _validate(task: nn.Module, val_set: Dataset, batch_size: int, collate_fn: Callable | None, num_workers: int,
              device: torch.device, main: bool, world_size: int) -> dict[str, float]:
    """Rank 0 runs ``task.validate`` on the whole set; the metrics are broadcast to every rank."""
    metrics = None
    if main:
        loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
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
