"""Device-encoder variants (``mtfc.codec.ENCODERS``): round trips, sizes, and the legacy-config rule."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from mtfc.benchmark import encoder_complexity
from mtfc.codec import DEFAULT_ENCODER, ENCODERS, LEGACY_ENCODER, Codec, load_codec, save_codec

N, C = 8, 4  # hidden, latent channels of the small config whose sizes are computed by hand below
LEGACY = {"kind": "factorized", "latent_channels": C, "hidden_channels": N, "out_channels": 64}

# Parameters: conv = in·out·k² + out; GDN(c) = c² + c.
#   es:      conv(3,8,5) 608 + GDN(8) 72 + conv(8,8,5) 1608 + GDN(8) 72 + conv(8,4,3) 292
#   light:   conv(3,4,5) 304 + GDN(4) 20 + conv(4,8,5)  808 + GDN(8) 72 + conv(8,4,3) 292
#   light3:  conv(3,4,5) 304 + GDN(4) 20 + conv(4,8,3)  296 + GDN(8) 72 + conv(8,4,3) 292
#   lightdw: conv(3,4,5) 304 + GDN(4) 20 + dwconv(4,5) 104 + conv(4,8,1) 40 + GDN(8) 72 + conv(8,4,3) 292
PARAMS = {"es": 2652, "light": 1496, "light3": 984, "lightdw": 832}
# MACs per input pixel: stride-2 layers run on 1/4 of the pixels, stride-4 ones on 1/16; a conv costs
# in/groups·out·k², a GDN(c) c·(c+1) per position.
MACS_PER_PIXEL = {
    "es": (3 * 8 * 25 + 8 * 9) / 4 + (8 * 8 * 25 + 8 * 9 + 8 * 4 * 9) / 16,  # 290.5
    "light": (3 * 4 * 25 + 4 * 5) / 4 + (4 * 8 * 25 + 8 * 9 + 8 * 4 * 9) / 16,  # 152.5
    "light3": (3 * 4 * 25 + 4 * 5) / 4 + (4 * 8 * 9 + 8 * 9 + 8 * 4 * 9) / 16,  # 120.5
    "lightdw": (3 * 4 * 25 + 4 * 5) / 4 + (4 * 25 + 4 * 8 + 8 * 9 + 8 * 4 * 9) / 16,  # 110.75
}


def small_codec(encoder: str, kind: str = "factorized", seed: int = 0) -> Codec:
    """Untrained and frozen; the last conv scaled up so that the rounded latent keeps a few levels."""
    torch.manual_seed(seed)
    codec = Codec(kind=kind, latent_channels=C, hidden_channels=N, encoder=encoder)
    with torch.no_grad():
        codec.g_a[-1].weight.mul_(20)
    return codec.freeze()


def test_the_variants_and_the_default():
    assert set(ENCODERS) == {"es", "light", "light3", "lightdw"}
    assert DEFAULT_ENCODER == "light" and LEGACY_ENCODER == "es"
    codec = Codec()
    assert codec.encoder == "light" and codec.config["encoder"] == "light"


@pytest.mark.parametrize("kind", ["factorized", "hyperprior"])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_each_variant_round_trips_bit_exactly(encoder, kind):
    codec = small_codec(encoder, kind)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)
    streams = codec.encode(images)
    y_hat = codec.decode(streams)
    assert y_hat.shape == (2, C, 8, 8)
    assert torch.equal(y_hat, codec.quantize(images))  # the server's latent is the one heads train on
    assert y_hat.abs().sum() > 0
    assert codec.encode(images) == streams


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_parameter_and_mac_counts_match_the_hand_computed_ones(encoder):
    codec = Codec(latent_channels=C, hidden_channels=N, encoder=encoder)
    got = encoder_complexity(codec.g_a, size=16)
    assert got["params"] == PARAMS[encoder]
    assert got["kmac_per_pixel"] == pytest.approx(MACS_PER_PIXEL[encoder] / 1000)
    assert codec.g_a(torch.zeros(1, 3, 20, 28)).shape == (1, C, 5, 7)  # stride 4, same latent shape


def test_the_class_default_sizes():
    """At the class defaults (hidden 96, latent 24) ``light`` halves ``es``'s MACs (20.4 → 10.6 kMAC/pixel)."""
    es, light = (encoder_complexity(Codec(encoder=e).g_a) for e in ("es", "light"))
    assert es["params"] == 277_176 and light["params"] == 151_368
    assert es["kmac_per_pixel"] == pytest.approx(20.406) and light["kmac_per_pixel"] == pytest.approx(10.566)


def _legacy_fingerprint(codec: Codec) -> str:
    """The fingerprint exactly as mtfc computed it before the ``encoder`` key existed."""
    h = hashlib.sha256(json.dumps(LEGACY, sort_keys=True).encode())
    state = codec.state_dict()
    for key in sorted(k for k in state if k.startswith(("g_a.", "latent_codec."))):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_a_config_without_the_encoder_key_rebuilds_the_legacy_encoder_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    codec = Codec.from_config(LEGACY).freeze()
    assert codec.encoder == "es" and codec.config == LEGACY  # the config, hence the fingerprint, is unchanged
    shapes = {k: tuple(p.shape) for k, p in codec.g_a.named_parameters()}
    assert shapes == {"0.weight": (8, 3, 5, 5), "0.bias": (8,), "1.beta": (8,), "1.gamma": (8, 8),
                      "2.weight": (8, 8, 5, 5), "2.bias": (8,), "3.beta": (8,), "3.gamma": (8, 8),
                      "4.weight": (4, 8, 3, 3), "4.bias": (4,)}  # mtfc's g_a before the variants
    assert codec.fingerprint == _legacy_fingerprint(codec)
    torch.manual_seed(0)
    assert Codec(encoder="es", **LEGACY).freeze().fingerprint == codec.fingerprint
    # an artifact written with the legacy config loads as "es" with the same fingerprint
    path = save_codec(codec, tmp_path / "codec.pt")
    assert "encoder" not in torch.load(path, weights_only=True)["config"]
    loaded = load_codec(path)
    assert loaded.encoder == "es" and loaded.fingerprint == codec.fingerprint


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_every_variant_saves_and_loads(tmp_path, encoder):
    codec = small_codec(encoder)
    loaded = load_codec(save_codec(codec, tmp_path / "codec.pt"))
    assert loaded.encoder == encoder and loaded.config == codec.config and loaded.fingerprint == codec.fingerprint
    assert Codec.from_config(codec.config).encoder == encoder
    images = torch.rand(1, 3, 16, 16)
    assert loaded.encode(images) == codec.encode(images)


def _legacy_artifacts() -> list[Path]:
    """Codec artifacts written before the ``encoder`` key: ``$MTFC_LEGACY_CODEC`` or the checkout's runs/."""
    env = os.environ.get("MTFC_LEGACY_CODEC")
    paths = [Path(env)] if env else sorted(Path(__file__).parents[1].glob("runs/*/bottleneck/*/codec.pt"))
    return [p for p in paths if p.is_file() and "encoder" not in torch.load(p, weights_only=True)["config"]]


@pytest.mark.skipif(not _legacy_artifacts(), reason="no pre-variant codec artifact (set MTFC_LEGACY_CODEC)")
def test_a_trained_legacy_artifact_loads_as_es_with_its_stored_fingerprint():
    for path in _legacy_artifacts():
        art = torch.load(path, weights_only=True)
        codec = load_codec(path)  # recomputes the fingerprint and checks it against the stored one
        assert codec.encoder == "es" and codec.config == art["config"] and codec.fingerprint == art["fingerprint"]


def test_an_unknown_encoder_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown codec encoder 'resnet'; choose from \('light', 'es', 'light3', 'lightdw'\)"):
        Codec(encoder="resnet")
    with pytest.raises(ValueError, match="unknown codec encoder 'ES'"):
        Codec.from_config({**LEGACY, "encoder": "ES"})


@pytest.mark.parametrize("kind", ["factorized", "hyperprior"])
def test_the_safe_coder_decodes_compressais_latent_in_no_more_bytes(kind):
    """mtfc's coder (mtfc.entropy_coding) codes CompressAI's own tables: the same ŷ, bit for bit, in as
    many bytes or fewer (the hyperprior's untrained scales send most values to the escape code, which
    costs less than CompressAI's)."""
    codec = small_codec("light", kind)
    y = codec.g_a(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    theirs = codec.latent_codec.compress(y)
    ours = codec.compress_latent(y)
    assert torch.equal(codec.coder.decompress(ours, (8, 8)), theirs["y_hat"])
    assert [len(p) for p in ours] == {"factorized": [176], "hyperprior": [484, 28]}[kind]
    assert [len(s[0]) for s in theirs["strings"]] == {"factorized": [176], "hyperprior": [504, 28]}[kind]


def test_the_encoder_table_has_every_variant_and_the_trained_codec():
    from mtfc.benchmark import encoder_table, format_encoder_table

    trained = small_codec("es")
    rows = encoder_table({"beta 1": trained}, torch.rand(2, 3, 16, 16), sizes=(16,), repeats=1)
    assert [(r["encoder"], r["weights"]) for r in rows] == [
        *((name, "untrained, calibrated") for name in ENCODERS), ("es", "trained (beta 1)")]
    assert [r["params"] for r in rows] == [*(PARAMS[name] for name in ENCODERS), PARAMS["es"]]
    assert all(set(r["ms"]["16"]) == {"network", "entropy", "encode"} for r in rows)
    assert "| lightdw | untrained, calibrated | 4/8 | 832 |" in format_encoder_table(rows)
