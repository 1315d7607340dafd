"""Optimizer / schedule / clipping specs, config key checking and reproducible initialisation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtfc.config import check_config
from mtfc.engine import fit
from mtfc.optim import OptimSpec, build_optimizer, lr_factor


def test_cosine_schedule_known_values():
    spec = OptimSpec(schedule="cosine", warmup=0.1, final_lr=0.0)
    # 100 steps: 10 warm-up steps rising linearly to 1, then a half cosine from 1 (step 10) to 0 (step 99)
    assert lr_factor(spec, 0, 100) == pytest.approx(1 / 11)
    assert lr_factor(spec, 9, 100) == pytest.approx(10 / 11)
    assert lr_factor(spec, 10, 100) == pytest.approx(1.0)
    assert lr_factor(spec, 10 + 89 // 2, 100) == pytest.approx((1 + math.cos(math.pi * 44 / 89)) / 2)
    assert lr_factor(spec, 99, 100) == pytest.approx(0.0)
    assert lr_factor(OptimSpec(schedule="cosine", final_lr=0.01, warmup=0.0), 99, 100) == pytest.approx(0.01)


def test_onecycle_and_constant_schedules():
    spec = OptimSpec(schedule="onecycle", warmup=0.25, final_lr=0.0)
    assert lr_factor(spec, 0, 100) == pytest.approx(1 / 25)
    assert lr_factor(spec, 25, 100) == pytest.approx(1.0)
    assert lr_factor(spec, 99, 100) == pytest.approx(0.0)
    assert all(lr_factor(OptimSpec(schedule="constant"), s, 50) == 1.0 for s in range(50))


def test_multistep_schedule_known_values():
    """torch's MultiStepLR at fractions of the steps: ×0.1 from step 50 and again from step 80 of 100."""
    spec = OptimSpec(schedule="multistep", milestones=[0.5, 0.8], gamma=0.1, warmup=0.0)
    assert [lr_factor(spec, s, 100) for s in (0, 49, 50, 79, 80, 99)] == [1.0, 1.0, 0.1, 0.1, 0.1**2, 0.1**2]
    warm = OptimSpec(schedule="multistep", milestones=[0.5], warmup=0.1)
    assert [lr_factor(warm, s, 100) for s in (0, 9, 10, 50)] == [1 / 11, 10 / 11, 1.0, 0.1]
    for bad in ({"milestones": [0.5]}, {"schedule": "multistep"}, {"schedule": "multistep", "milestones": [0.8, 0.5]},
                {"schedule": "multistep", "milestones": [1.0]}):
        with pytest.raises(ValueError, match="optim.milestones must be increasing fractions in"):
            OptimSpec(**bad)


def test_settings_added_later_stay_out_of_the_record_at_their_default():
    assert OptimSpec().to_dict() == {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "cosine",
                                     "warmup": 0.05, "final_lr": 0.01, "clip_grad": None}
    assert OptimSpec(name="sgd", nesterov=False).to_dict()["nesterov"] is False
    sgd = build_optimizer(nn.Linear(2, 2).parameters(), OptimSpec(name="sgd", nesterov=False))
    assert sgd.param_groups[0]["nesterov"] is False and sgd.param_groups[0]["momentum"] == 0.9


def test_spec_errors_name_the_key():
    with pytest.raises(KeyError, match="did you mean 'weight_decay'"):
        OptimSpec.from_dict({"weight_decy": 0.1}, "teacher.optim")
    with pytest.raises(ValueError, match="not one of"):
        OptimSpec(name="lion")
    with pytest.raises(ValueError, match="clip_grad"):
        OptimSpec(clip_grad=0)


def test_no_weight_decay_on_biases_and_norms():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = build_optimizer(net.parameters(), OptimSpec(name="adamw", weight_decay=0.5))
    decays = {p.dim(): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {4: 0.5, 1: 0.0}


def test_config_rejects_misspelled_keys():
    cfg = {"out_dir": "x", "data": {"type": "bundled", "root": "y"}, "teacher": {"arch": "resnet10", "epoch": 5},
           "bottleneck": {"betas": [1]}}
    with pytest.raises(KeyError, match="teacher.epoch: did you mean 'epochs'"):
        check_config(cfg)
    cfg["teacher"] = {"arch": "resnet10", "optim": {"lr": 1e-3, "shedule": "cosine"}}
    with pytest.raises(KeyError, match="teacher.optim.shedule: did you mean 'schedule'"):
        check_config(cfg)
    cfg["teacher"] = {"arch": "resnet10"}
    cfg["heads"] = {"cls": {"type": "classification", "kwarg": {}}}
    with pytest.raises(KeyError, match="heads.cls.kwarg: did you mean 'kwargs'"):
        check_config(cfg)


class _Huge(nn.Module):
    """Loss 1e6·p: without clipping one SGD step of lr 1 moves p by 1e6."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, batch):
        return {"loss": 1e6 * self.p}

    def configure_optimizers(self):
        return {"loss": torch.optim.SGD([self.p], lr=1.0)}


def test_engine_clips_gradients_and_records_the_schedule(tmp_path):
    data = [torch.zeros(1)] * 8
    task = _Huge()
    spec = OptimSpec(schedule="cosine", warmup=0.0, final_lr=0.5, clip_grad=0.25)
    history = fit(task, data, out_dir=tmp_path, epochs=2, batch_size=4, progress=False, optim=spec)
    # 4 steps, factors 1, (1+cos(pi/3))/2 scaled, ...: each step moves p by exactly lr_t * 0.25
    expected = -0.25 * sum(lr_factor(spec, s, 4) for s in range(4))
    assert float(task.p.detach()) == pytest.approx(expected)
    assert [r["lr"] for r in history["epochs"]] == pytest.approx([lr_factor(spec, 1, 4), lr_factor(spec, 3, 4)])
    assert all(r["seconds"] > 0 for r in history["epochs"])


def test_same_seed_same_model(tmp_path, shapes_root):
    """Models are initialised after seeding: two trainings with one seed end bit-identical, another seed differs."""
    from mtfc.data import build_dataset
    from mtfc.train import train_teacher

    data = build_dataset({"type": "bundled", "root": str(shapes_root), "image_size": 32}, "train", train=True)
    data = torch.utils.data.Subset(data, range(16))
    states = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        path = train_teacher(data, None, arch="resnet10", num_classes=3, out_dir=tmp_path / run, seed=seed,
                             epochs=1, batch_size=8, progress=False, optim=OptimSpec(lr=1e-2, clip_grad=1.0))
        states.append(torch.load(path, weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["conv1.weight"], states[2]["conv1.weight"])


def test_settle_quantiles_fits_the_entropy_model():
    from mtfc.codec import Codec
    from mtfc.train import settle_quantiles

    torch.manual_seed(0)
    codec = Codec(latent_channels=4, hidden_channels=8)
    with torch.no_grad():
        codec.latent_codec.entropy_bottleneck.quantiles.mul_(3.0)  # far from the density's true quantiles
    aux = settle_quantiles(codec)
    assert aux["before"] > 10 and aux["after"] < 0.05 * aux["before"]
    assert float(codec.aux_loss().detach()) == pytest.approx(aux["after"])
    assert all(p.requires_grad for p in codec.parameters())  # restored
