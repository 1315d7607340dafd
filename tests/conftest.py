import pytest
import torch

from mtfc.codec import Codec

torch.set_num_threads(1)  # pytest -n 2 runs two workers on the two cores


def tiny_codec(kind: str = "factorized", seed: int = 0) -> Codec:
    """An untrained, frozen codec whose latent still carries the image: the encoder's last layer is
    scaled up so that rounding to integers keeps a few levels per element (a trained codec learns that)."""
    torch.manual_seed(seed)
    codec = Codec(kind=kind, latent_channels=8, hidden_channels=16, out_channels=64)
    with torch.no_grad():
        codec.g_a[-1].weight.mul_(20)
    return codec.freeze()


@pytest.fixture(params=["factorized", "hyperprior"])
def codec(request) -> Codec:
    return tiny_codec(request.param)


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 32, 48, generator=g)
