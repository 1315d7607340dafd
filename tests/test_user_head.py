"""The README's user head, run verbatim: from Python, and under `mtfc run` with nothing edited in the repository."""
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from mtfc.cli import main
from mtfc.codec import save_codec

from conftest import tiny_codec

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def example(name: str, lang: str) -> str:
    return re.search(rf"<!-- example: {name} -->\n```{lang}\n(.*?)```", README, re.S).group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shapes_root) -> Path:
    """A directory holding the README's ``my_heads.py`` (importable) and the session's bundled dataset."""
    root = tmp_path_factory.mktemp("user")
    (root / "my_heads.py").write_text(example("user-head-module", "python"))
    (root / "runs/demo").mkdir(parents=True)
    (root / "runs/demo/data").symlink_to(shapes_root)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


def test_from_python(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    save_codec(tiny_codec("step", levels=5), "runs/demo/bottleneck/levels/codec.pt")  # the demo's kind
    scope: dict = {"__name__": "readme_example"}
    exec(compile(example("user-head", "python"), "README.md:user-head", "exec"), scope)
    assert set(scope["history"]["val"]) == {"mae"}
    assert scope["history"]["val"]["mae"] < 2.0
    assert Path("runs/count/count.pt").is_file()


def test_under_mtfc_run(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    cfg = {"out_dir": "runs/user", "seed": 0,
           "data": {"type": "bundled", "root": "runs/demo/data", "image_size": 32},
           "teacher": {"arch": "resnet18", "epochs": 1, "batch_size": 32},
           "bottleneck": {"betas": [0.1], "codec": {"latent_channels": 8, "hidden_channels": 16}, "epochs": 1,
                          "batch_size": 32},
           **yaml.safe_load(example("user-head-config", "yaml"))}
    Path("user.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", "user.yaml", "--set", "device=cpu"]) == 0
    rows = json.loads(Path("runs/user/report/results.json").read_text())["rows"]
    assert {(r["method"], r["task"], r["metric_name"]) for r in rows} == {
        ("mtfc", "count", "mae"), ("uncompressed", "count", "mae")}
    assert Path("runs/user/heads/beta_0.1/count/head.pt").is_file() and Path("runs/user/reference/count/head.pt").is_file()


def test_unknown_head_names_the_fix(tmp_path):
    from mtfc.head import HEADS

    with pytest.raises(KeyError, match="imports"):
        HEADS.get("no_such_head")


def test_a_forward_only_head_still_works_with_a_deprecation_warning():
    import torch

    from mtfc.head import Head

    class Old(Head):
        def forward(self, latent, targets=None):
            return {"loss_x": latent.sum()} if self.training else list(latent.mean((1, 2, 3)))

    head, latent = Old(), torch.ones(2, 3, 4, 4)
    with pytest.warns(DeprecationWarning, match="implement loss\\(\\) and predict\\(\\)"):
        assert head.train().loss(latent, [{}, {}]) == {"loss_x": 96.0}
    with pytest.warns(DeprecationWarning):
        assert [float(p) for p in head.eval().predict(latent)] == [1.0, 1.0]
    with pytest.raises(NotImplementedError, match="neither loss"):
        Head().loss(latent, [])
