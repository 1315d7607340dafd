from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from mtfc.codec import Codec
from mtfc.data import make_dataset
from mtfc.fuzz import small_codec as tiny_codec  # untrained, frozen; its latent still carries the image

torch.set_num_threads(1)  # pytest -n 2 runs two workers on the two cores

#: The tiny bundled dataset the session shares (:func:`shapes_root`).
SHAPES = {"image_size": 32, "num_classes": 3, "splits": {"train": 96, "val": 48}, "max_objects": 2, "seed": 0}


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


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text ``text`` (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0
