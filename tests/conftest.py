from pathlib import Path

import pytest
import torch

from mtfc.codec import Codec
from mtfc.data import make_dataset

torch.set_num_threads(1)  # pytest -n 2 runs two workers on the two cores

#: The tiny bundled dataset the session shares (:func:`shapes_root`).
SHAPES = {"image_size": 32, "num_classes": 3, "splits": {"train": 96, "val": 48}, "max_objects": 2, "seed": 0}


def tiny_codec(kind: str = "factorized", seed: int = 0) -> Codec:
    """An untrained, frozen codec whose latent still carries the image: the encoder's last layer is
    scaled up so that rounding to integers keeps a few levels per element (a trained codec learns that)."""
    torch.manual_seed(seed)
    codec = Codec(kind=kind, latent_channels=8, hidden_channels=16, out_channels=64)
    with torch.no_grad():
        codec.g_a[-1].weight.mul_(20)
    return codec.freeze()


@pytest.fixture(scope="session")
def frozen_codec() -> Codec:
    """``tiny_codec()``, built once per session: frozen, so no test can change it (tests that train on
    it check that it stays bit-identical)."""
    return tiny_codec()


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """The bundled dataset generated once per session with :data:`SHAPES`; read-only."""
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", **SHAPES)


@pytest.fixture(params=["factorized", "hyperprior"])
def codec(request) -> Codec:
    return tiny_codec(request.param)


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 32, 48, generator=g)
