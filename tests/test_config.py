"""The typed config schema: defaults in one place, mistakes refused with the key's path, --print-config."""
import pytest
import yaml

from mtfc.cli import main
from mtfc.config import Config
from mtfc.optim import OptimSpec

MINIMAL = {"out_dir": "x", "data": {"root": "d"}, "teacher": {"arch": "resnet10"}, "bottleneck": {"betas": [1]}}


def test_defaults_are_filled_in():
    cfg = Config.from_dict({**MINIMAL, "heads": {"cls": {"type": "classification"}, "seg": {}}})
    assert cfg.bottleneck.betas == [1.0] and isinstance(cfg.bottleneck.betas[0], float)
    assert (cfg.bottleneck.aux_lr, cfg.bottleneck.saliency, cfg.bottleneck.select_taps) == (1e-2, 0.0, None)
    assert cfg.bottleneck.stages == ["layer1", "layer2", "layer3", "layer4"]
    assert cfg.teacher.optim == OptimSpec() and cfg.teacher.epochs == 1 and cfg.teacher.amp is True
    assert cfg.heads["seg"].type == "seg" and cfg.heads["cls"].reference == "train"
    assert cfg.data.type == "bundled" and cfg.evaluation.baselines == {} and cfg.imports == []


@pytest.mark.parametrize("patch, error, message", [
    ({"teacher": {"arch": "resnet10", "epoch": 5}}, KeyError, "teacher.epoch: did you mean 'epochs'"),
    ({"heads": {"c": {"kwarg": {}}}}, KeyError, "heads.c.kwarg: did you mean 'kwargs'"),
    ({"bottleneck": {"betas": [1], "optim": {"shedule": "cosine"}}}, KeyError, "bottleneck.optim.shedule"),
    ({"bottleneck": {"betas": [1], "data": {"roots": "z"}}}, KeyError, "bottleneck.data.roots: did you mean 'root'"),
    ({"data": {"root": "d", "generate": {"num_class": 3}}}, KeyError, "data.generate.num_class"),
    ({"teacher": {"arch": "resnet10", "epochs": "5"}}, TypeError, "teacher.epochs must be int, got '5'"),
    ({"teacher": {"arch": "resnet10", "amp": 1}}, TypeError, "teacher.amp must be bool"),
    ({"bottleneck": {"betas": [1, "a"]}}, TypeError, r"bottleneck.betas\[1\] must be float"),
    ({"bottleneck": {"betas": []}}, ValueError, "bottleneck.betas is empty"),
    ({"heads": {"c": {"reference": "pixels"}}}, ValueError, "heads.c.reference must be 'train' or 'teacher'"),
    ({"teacher": None}, ValueError, "teacher must be a mapping"),
])
def test_mistakes_are_refused_with_the_keys_path(patch, error, message):
    with pytest.raises(error, match=message):
        Config.from_dict({**MINIMAL, **patch})


def test_required_keys():
    with pytest.raises(ValueError, match="lacks the required key bottleneck"):
        Config.from_dict({k: v for k, v in MINIMAL.items() if k != "bottleneck"})


def test_print_config_prints_the_resolved_config_that_reads_back(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert main(["run", str(path), "--set", "bottleneck.saliency=0.5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["bottleneck"]["saliency"] == 0.5 and printed["bottleneck"]["aux_lr"] == 0.01
    assert Config.from_dict(printed) == Config.from_dict({**MINIMAL, "bottleneck": {"betas": [1], "saliency": 0.5}})
    assert not (tmp_path / "x").exists()  # printing runs nothing


def test_cli_reports_a_config_mistake_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "teacher": {"arch": "resnet10", "epoch": 5}}))
    assert main(["run", str(path)]) == 2
    assert "teacher.epoch: did you mean 'epochs'" in capsys.readouterr().err


def test_what_a_stage_makes_leaves_out_how_it_runs_and_its_data():
    from mtfc.config import HeadConfig

    head = HeadConfig(type="segmentation", num_workers=8, ckpt_every=5, val_every=2, data={"type": "voc"},
                      kwargs={"decode_head": "aspp"})
    assert head.what_it_makes() == {
        "epochs": 1, "batch_size": 32, "max_steps": None, "amp": True,
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "cosine", "warmup": 0.05,
                  "final_lr": 0.01, "clip_grad": None},
        "type": "segmentation", "reference": "train", "distill": False, "kwargs": {"decode_head": "aspp"}}


def test_a_recipe_lays_its_values_over_the_config_and_refuses_overrides_of_them(tmp_path):
    from mtfc.pipeline import load_config

    cfg = {**MINIMAL, "bottleneck": {"betas": [1], "epochs": 3, "codec": {"latent_channels": 8}},
           "heads": {"cls": {"type": "classification", "kwargs": {"hidden_channels": 48, "temperature": 4.0}},
                     "seg": {"type": "segmentation", "optim": {"lr": 2e-3}}}}
    es = Config.from_dict({**cfg, "recipe": "entropic-student"})
    b = es.bottleneck
    assert (b.codec, b.reduction, b.entropy_lr, b.aux_lr, b.epochs) == (
        {"latent_channels": 8, "encoder": "es"}, "sum", None, 1e-3, 3)
    assert b.optim == OptimSpec(name="adam", lr=1e-3, weight_decay=0.0, schedule="multistep", milestones=(0.5, 0.8),
                                warmup=0.0)
    cls = es.heads["cls"]
    assert cls.kwargs == {"hidden_channels": 48, "temperature": 1.0, "alpha": 0.5} and cls.distill is True
    assert cls.optim == OptimSpec(name="sgd", lr=1e-3, weight_decay=5e-4, schedule="multistep", milestones=(0.5,),
                                  warmup=0.0, nesterov=False)
    assert es.heads["seg"] == Config.from_dict(cfg).heads["seg"]  # heads of other types keep the config's recipe
    assert Config.from_dict(es.to_dict()) == es
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path, ["recipe=entropic-student", "bottleneck.betas=[2]"]).bottleneck.betas == [2.0]
    with pytest.raises(ValueError, match="--set heads.cls.optim.lr: recipe 'entropic-student' fixes "
                                         "heads.cls.optim.lr; drop the --set"):
        load_config(path, ["recipe=entropic-student", "heads.cls.optim.lr=0.1"])
    with pytest.raises(ValueError, match=r"unknown recipe 'es'; choose from \['entropic-student'\]"):
        Config.from_dict({**cfg, "recipe": "es"})
    with pytest.raises(ValueError, match="bottleneck.reduction must be one of"):
        Config.from_dict({**cfg, "bottleneck": {"betas": [1], "reduction": "max"}})
    with pytest.raises(ValueError, match="data.generate.hue must be one of class, independent, got 'hues'"):
        Config.from_dict({**cfg, "data": {"root": "d", "generate": {"hue": "hues"}}})


def test_settings_added_later_stay_out_of_artifact_keys_at_their_default():
    from mtfc.config import BottleneckConfig

    assert "reduction" not in BottleneckConfig().what_it_makes()
    assert BottleneckConfig(reduction="sum").what_it_makes()["reduction"] == "sum"
    assert "milestones" not in BottleneckConfig().what_it_makes()["optim"]
