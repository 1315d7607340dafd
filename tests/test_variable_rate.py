"""Variable-rate codecs (issue 21): one encoder and entropy model, K rate levels chosen per image."""
import subprocess
import sys

import pytest
import torch
from compressai.entropy_models.entropy_models_vbr import EntropyBottleneckVbr

from mtfc import bitstream
from mtfc.codec import Codec, load_codec, save_codec
from mtfc.fuzz import small_codec
from mtfc.priors import StepBottleneck, initial_steps
from mtfc.teacher import build_teacher
from mtfc.train import BottleneckTask, HeadTask, bits_per_pixel_each, mixed_levels

from conftest import metric

LEVELS = 3


@pytest.fixture(scope="module", params=["step", "gain"])
def vr_codec(request) -> Codec:
    return small_codec(request.param, levels=LEVELS)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def test_every_level_decodes_to_exactly_the_quantized_latent(vr_codec, images):
    sizes = []
    for level in range(LEVELS):
        streams = vr_codec.encode(images, level=level)
        latent, headers = vr_codec.decode_with_headers(streams)
        assert torch.equal(latent, vr_codec.quantize(images, level=level))
        assert [h.level for h in headers] == [level] * 4
        sizes.append(sum(map(len, streams)))
    mixed = [2, 0, 1, 0]
    assert torch.equal(vr_codec.decode(vr_codec.encode(images, level=mixed)), vr_codec.quantize(images, level=mixed))
    if vr_codec.kind == "step":  # untrained: only the steps differ between levels (1/16, 1/2, 4)
        assert sizes[0] > sizes[1] > sizes[2]


def test_the_level_costs_one_byte_in_the_header(vr_codec, images):
    stream = vr_codec.encode(images[:1], level=2)[0]
    header, payloads = bitstream.unpack(stream)
    assert header.level == 2 and stream[0] == 0b1011_1000
    assert len(stream) - len(payloads[0]) == 8  # format byte, fingerprint, level, H, W, CRC-16


def test_level_bytes_are_pinned():
    stream = bitstream.pack(bitstream.Header(b"\x12\x34", (32, 32), level=4), [b"abc"])
    assert stream.hex() == "b81234042020616263ec9b"
    assert bitstream.unpack(stream) == (bitstream.Header(b"\x12\x34", (32, 32), None, 4), [b"abc"])


def test_a_stream_whose_level_does_not_fit_the_codec_is_refused(vr_codec, images):
    header, payloads = bitstream.unpack(vr_codec.encode(images[:1], level=0)[0])
    fp = header.fingerprint
    for level, message in [(LEVELS, f"rate level {LEVELS} \\(this codec codes levels 0..{LEVELS - 1}\\)"),
                           (None, "rate level None \\(this codec codes levels 0..2\\)")]:
        forged = bitstream.pack(bitstream.Header(fp, (32, 48), level=level), payloads)
        with pytest.raises(bitstream.CorruptStreamError, match=f"^header does not match this codec: {message}$"):
            vr_codec.decode([forged])
    fixed = small_codec("factorized")
    header, payloads = bitstream.unpack(fixed.encode(images[:1])[0])
    forged = bitstream.pack(bitstream.Header(header.fingerprint, (32, 48), level=0), payloads)
    with pytest.raises(bitstream.CorruptStreamError,
                       match=r"^header does not match this codec: rate level 0 \(this codec has one rate and sends no level\)$"):
        fixed.decode([forged])


def test_level_arguments_are_checked(vr_codec, images):
    with pytest.raises(ValueError, match=r"^level must be one of 0..2 \(0: the highest rate\), for the batch or per "
                                         r"image; got 3 for 4 images$"):
        vr_codec.encode(images, level=3)
    with pytest.raises(ValueError, match=r"got \[0, 1\] for 4 images$"):
        vr_codec.quantize(images, level=[0, 1])
    assert torch.equal(vr_codec.quantize(images), vr_codec.quantize(images, level=1))  # default: the middle level
    with pytest.raises(ValueError, match="^this codec has one rate; level= is for variable-rate codecs"):
        small_codec("factorized").encode(images, level=0)
    with pytest.raises(ValueError, match=r"^codec kind 'step' needs levels > 0 \(its number of rate levels\)$"):
        Codec(kind="step")
    with pytest.raises(ValueError, match="^codec kind 'factorized' has one rate; levels=3 is for 'step' or 'gain'$"):
        Codec(kind="factorized", levels=3)


def test_levels_decode_bit_exactly_in_another_process_with_one_thread(vr_codec, images, tmp_path):
    path = save_codec(vr_codec, tmp_path / "codec.pt")
    streams = [s for level in range(LEVELS) for s in vr_codec.encode(images, level=level)]
    (tmp_path / "streams.pt").write_bytes(b"".join(len(s).to_bytes(4, "big") + s for s in streams))
    expected = torch.cat([load_codec(path).decode([s]) for s in streams])
    script = f"""
import torch
torch.set_num_threads(1)
from mtfc.codec import load_codec
codec, data, streams = load_codec({str(path)!r}), open({str(tmp_path / 'streams.pt')!r}, 'rb').read(), []
while data:
    n = int.from_bytes(data[:4], 'big'); streams.append(data[4:4 + n]); data = data[4 + n:]
torch.save(torch.cat([codec.decode([s]) for s in streams]), {str(tmp_path / 'out.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_the_step_bottleneck_trains_its_density_and_step():
    """compressai 1.2.8's EntropyBottleneckVbr.forward passes qs as stop_gradient; ours scores the step."""
    torch.manual_seed(0)
    ours = StepBottleneck(3)
    theirs = EntropyBottleneckVbr(3)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 4, 5) * 2
    ours.eval(), theirs.eval()
    for a, b in zip(ours(x, torch.tensor(1.0)), theirs(x, qs=torch.tensor(1.0))):
        assert torch.equal(a, b)
    ours.train()
    qs = torch.tensor(2.0, requires_grad=True)
    _, likelihoods = ours(x, qs)
    (-likelihoods.log2().sum()).backward()
    assert qs.grad is not None and float(qs.grad) != 0 and float(ours._matrix0.grad.abs().sum()) > 0


def test_initial_steps_span_64x():
    assert torch.allclose(initial_steps(7), torch.tensor([0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0]))
    assert torch.equal(initial_steps(1), torch.ones(1))


def test_mixed_levels_take_turns():
    assert mixed_levels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("kind", ["step", "gain"])
def test_stage_one_weights_each_image_rate_by_its_level(kind):
    torch.manual_seed(0)
    codec = Codec(kind=kind, levels=2, latent_channels=4, hidden_channels=8, out_channels=64)
    teacher = build_teacher("resnet10", 3)
    task = BottleneckTask(codec, teacher, [0.5, 4.0], stages=["layer1"]).eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = task((images, None))
    distill, bpp, _ = task.distill(images, mixed_levels(4, 2))
    assert torch.equal(out["loss"], distill + (torch.tensor([0.5, 4.0, 0.5, 4.0]) * bpp).mean())
    assert torch.equal(out["bpp"], bpp.mean())
    likelihoods = codec(images, mixed_levels(4, 2))["likelihoods"]
    assert torch.equal(bits_per_pixel_each(likelihoods, images).mean() * 4,
                       sum(-torch.log2(p).flatten(1).sum(1) for p in likelihoods.values()).sum() / 1024)
    with pytest.raises(ValueError, match=r"^a codec with 2 rate levels needs 2 rate weights, got \[1.0\]$"):
        BottleneckTask(codec, teacher, [1.0], stages=["layer1"])


def test_a_head_trains_on_every_level_in_turn(vr_codec, images):
    task = HeadTask(small_codec(vr_codec.kind, levels=LEVELS), head=torch.nn.Identity())  # the same codec, afresh
    assert torch.equal(task.inputs(images), vr_codec.quantize(images, level=[0, 1, 2, 0]))
    one = HeadTask(small_codec(vr_codec.kind, levels=LEVELS), head=torch.nn.Identity(), level=2)
    assert torch.equal(one.inputs(images), vr_codec.quantize(images, level=2))


def test_one_server_serves_every_level(tmp_path):
    from fastapi.testclient import TestClient

    from mtfc.deploy.export import synthetic_images
    from mtfc.deploy.loadtest import expected_predictions
    from mtfc.deploy.server import ServerConfig, create_app, load_model
    from mtfc.head import HEADS
    from mtfc.model import save_head

    codec = small_codec("step", levels=LEVELS)
    torch.manual_seed(0)
    head = HEADS.build("classification", latent_channels=codec.latent_channels, arch="resnet18", hidden_channels=16,
                       num_classes=3)
    model = load_model(save_codec(codec, tmp_path / "codec.pt"),
                       {"cla": save_head(head.eval(), tmp_path / "cla.pt", codec.fingerprint)})
    images = synthetic_images(1, 32)
    streams = [model.codec.encode(images, level=level)[0] for level in range(LEVELS)]
    assert len(set(streams)) == LEVELS
    expected = expected_predictions(model, streams)
    with TestClient(create_app(model, ServerConfig(max_wait_ms=1, image_sizes=[(32, 32)]))) as client:
        for level, (stream, want) in enumerate(zip(streams, expected)):
            r = client.post("/predict", content=stream, headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200, r.text
            assert r.json()["level"] == level and r.json()["predictions"] == want
        assert client.post("/predict", content=streams[0], headers={"Content-Type": "application/octet-stream"}).is_success
        scrape = client.get("/metrics").text
    streams_by_level = {str(level): metric(scrape, "mtfc_streams_total", level=str(level)) for level in range(LEVELS)}
    assert streams_by_level == {"0": 2, **{str(level): 1 for level in range(1, LEVELS)}}
    assert [metric(scrape, "mtfc_stream_bytes_total", level=str(level)) for level in range(LEVELS)] == [
        2 * len(streams[0]), *(len(s) for s in streams[1:])]


@pytest.mark.parametrize("kind, bitflip", [("step", {"CorruptStreamError": 100}),
                                           # two flips fell on an escaped value's uniform bits: another bounded latent
                                           ("gain", {"CorruptStreamError": 99, "ok": 1})])
def test_forged_streams_at_every_level_are_rejected(kind, bitflip):
    from mtfc.fuzz import fuzz_decoder

    result = fuzz_decoder(small_codec(kind, levels=5), 500, seed=0)
    oversized = {"step": {"CorruptStreamError": 68, "ImageTooLargeError": 32},
                 "gain": {"CorruptStreamError": 63, "ImageTooLargeError": 37}}[kind]
    assert result["outcomes"] == {"random": {"CorruptStreamError": 100}, "truncated": {"CorruptStreamError": 100},
                                  "oversized": oversized, "bitflip": bitflip, "level": {"CorruptStreamError": 100}}
    assert result["non_finite"] == 0 and result["inconsistent"] == 0
