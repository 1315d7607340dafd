"""Learned-image-codec baselines: the container, the config section, and their artifacts' keys."""
import re
from pathlib import Path

import pytest
import torch

from mtfc.checkpoint import load_checkpoint
from mtfc.config import Config
from mtfc.data import make_dataset
from mtfc.evaluation.learned import ALIGN, build_model, compress, decompress, load_learned_codec, pack, unpack
from mtfc.pipeline import Pipeline


def test_container_layout_is_sizes_then_length_prefixed_strings_but_the_last():
    data = pack((300, 64), [b"zz", b"yyy"])
    assert data == bytes([0xAC, 0x02, 64, 2]) + b"zz" + b"yyy"  # 300 = LEB128 AC 02
    assert unpack(data, 2) == ((300, 64), [b"zz", b"yyy"])
    assert pack((16, 16), [b"abc"]) == bytes([16, 16]) + b"abc"
    with pytest.raises(ValueError, match="ends inside a string of 9 bytes"):
        unpack(bytes([16, 16, 9]) + b"ab", 2)


@pytest.mark.parametrize("arch", ["bmshj2018-factorized", "mbt2018-mean"])
def test_compress_decompress_through_the_container_is_the_models_own_coding(arch):
    torch.manual_seed(0)
    model = build_model(arch, 8, 8).eval()
    model.update(force=True)
    images = torch.rand(2, 3, 16, 16)
    containers = compress(model, arch, images)
    pad = -16 % ALIGN[arch]  # the hyperprior's z needs a multiple of 64
    out = model.compress(torch.nn.functional.pad(images, (0, pad, 0, pad), mode="replicate"))
    for i, data in enumerate(containers):
        strings = [s[i] for s in out["strings"]]
        assert unpack(data, len(strings)) == ((16, 16), strings)  # bit-exact, nothing else in it
        assert len(data) == 2 + sum(len(s) for s in strings) + (len(strings) - 1)  # every string < 128 bytes
    decoded = decompress(model, arch, containers)
    x_hat = model.decompress(out["strings"], out["shape"])["x_hat"][..., :16, :16]
    assert torch.equal(decoded, x_hat.clamp(0, 1).mul(255).round().div(255))


def learned_config(root: Path, out: Path, **section) -> dict:
    spec = {"lambdas": [0.01, 0.1], "N": 8, "M": 8, "steps": 2, "finetune_steps": 1, "batch_size": 4, **section}
    return {"out_dir": str(out), "seed": 0, "device": "cpu", "data": {"type": "bundled", "root": str(root)},
            "teacher": {"arch": "resnet10"}, "bottleneck": {"betas": [0.1]},
            "evaluation": {"learned_baselines": {"bmshj2018-factorized": spec}}}


@pytest.mark.parametrize("section, message", [
    ({"bmshj2018-factorised": {"lambdas": [0.1]}},
     "unknown config key evaluation.learned_baselines.bmshj2018-factorised: did you mean 'bmshj2018-factorized'?"),
    ({"mbt2018-mean": {"lambda": [0.1]}},
     "unknown config key evaluation.learned_baselines.mbt2018-mean.lambda: did you mean 'lambdas'?"),
    ({"mbt2018-mean": {}}, "config lacks the required key evaluation.learned_baselines.mbt2018-mean.lambdas"),
    ({"mbt2018-mean": {"lambdas": [0.1, 0.1]}},
     "evaluation.learned_baselines.mbt2018-mean.lambdas must be distinct positive numbers, got [0.1, 0.1]"),
    ({"mbt2018-mean": {"lambdas": [0.1], "N": 0}}, "evaluation.learned_baselines.mbt2018-mean.N must be >= 1, got 0"),
])
def test_config_errors_are_one_line_and_name_the_key(tmp_path, section, message):
    cfg = learned_config(tmp_path, tmp_path)
    cfg["evaluation"]["learned_baselines"] = section
    with pytest.raises((KeyError, ValueError)) as e:
        Config.from_dict(cfg)
    assert e.value.args[0] == message


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("learned") / "data", image_size=32, num_classes=3,
                        splits={"train": 8, "val": 4}, max_objects=1, seed=0)


def trained_at(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "learned" / "bmshj2018-factorized").glob("*/codec.pt")
            if ".stale-" not in p.parent.name}


def test_artifacts_are_reused_and_retrained_when_their_lambda_or_data_change(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    paths = Pipeline(learned_config(tiny_data, out)).train_learned_baselines()
    assert sorted(paths) == [("bmshj2018-factorized", 0.01), ("bmshj2018-factorized", 0.1)]
    low = load_checkpoint(paths[("bmshj2018-factorized", 0.01)])
    assert low["history"]["global_step"] == 1 and low["init"] == str(paths[("bmshj2018-factorized", 0.1)])
    model, meta = load_learned_codec(paths[("bmshj2018-factorized", 0.1)])
    assert meta["history"]["global_step"] == 2 and meta["lambda"] == 0.1 and "psnr" in meta["history"]["val"]
    first = trained_at(out)
    capsys.readouterr()

    Pipeline(learned_config(tiny_data, out)).train_learned_baselines()
    assert trained_at(out) == first and capsys.readouterr().out.count("exists, skipped") == 2

    Pipeline(learned_config(tiny_data, out, lambdas=[0.01, 0.2])).train_learned_baselines()
    now = trained_at(out)  # a new highest λ: it trains, and the lower one fine-tuned from it is stale
    assert set(now) == {"lambda_0.01", "lambda_0.1", "lambda_0.2"} and now["lambda_0.1"] == first["lambda_0.1"]
    assert now["lambda_0.01"] != first["lambda_0.01"]
    aside = sorted(re.sub(r"\.stale-\d{8}-\d{6}$", ".stale", p.name) for p in out.rglob("*.stale-*"))
    assert aside == ["lambda_0.01.stale"]

    other = make_dataset(tmp_path / "other", image_size=32, num_classes=3, splits={"train": 8, "val": 4},
                         max_objects=1, seed=1)
    Pipeline(learned_config(other, out, lambdas=[0.01, 0.2])).train_learned_baselines()
    assert all(trained_at(out)[k] != now[k] for k in ("lambda_0.01", "lambda_0.2"))
