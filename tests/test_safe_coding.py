"""Memory-safe entropy coding (mtfc.entropy_coding) and finite input: forged streams with valid CRCs,
old-format streams, values beyond the prior's tables, NaN/inf images — in process and on the ONNX encoder."""
import struct
import zlib

import numpy as np
import pytest
import torch

from mtfc import bitstream
from mtfc.codec import save_codec
from mtfc.deploy.encoder import Encoder
from mtfc.deploy.export import export_onnx
from mtfc.entropy_coding import ESCAPE_LIMIT
from mtfc.fuzz import KINDS, forge, fuzz_decoder

from conftest import tiny_codec


def repack(stream: bytes, payloads: list[bytes]) -> bytes:
    """``stream`` with other payloads, and a valid CRC: what a forger sends."""
    return bitstream.pack(bitstream.unpack(stream)[0], payloads)


def answer(codec, stream: bytes) -> tuple:
    try:
        return "ok", codec.decode([stream]).numpy().tobytes()
    except bitstream.BitstreamError as e:
        return type(e).__name__, str(e)


def medians(codec) -> torch.Tensor:
    return codec.latent_codec.entropy_bottleneck.quantiles[:, 0, 1].reshape(1, -1, 1, 1)


def test_forged_streams_with_valid_crcs_are_rejected(frozen_codec):
    """CompressAI's rANS decoder (format version 1) decoded every one of these, to values up to ±2**30, or
    crashed the process."""
    result = fuzz_decoder(frozen_codec, 2000, seed=0)
    # an announcement beyond bitstream.MAX_PIXELS is refused as such (a CorruptStreamError too)
    assert result["outcomes"] == {**{kind: {"CorruptStreamError": 400} for kind in KINDS},
                                  "oversized": {"CorruptStreamError": 307, "ImageTooLargeError": 93}}
    assert result["inconsistent"] == 0


def test_forged_streams_against_the_hyperprior():
    result = fuzz_decoder(tiny_codec("hyperprior"), 400, seed=1)
    assert result["outcomes"] == {"random": {"CorruptStreamError": 80}, "truncated": {"CorruptStreamError": 80},
                                  "oversized": {"CorruptStreamError": 60, "ImageTooLargeError": 20},
                                  "bitflip": {"CorruptStreamError": 80}, "level": {"CorruptStreamError": 80}}
    assert result["non_finite"] == 0 and result["inconsistent"] == 0


def test_a_forged_stream_gets_the_same_answer_whatever_was_decoded_before(frozen_codec, images):
    legit = frozen_codec.encode(images)
    rng = np.random.default_rng(0)
    forged = [forge(legit[0], kind, rng) for kind in ("random", "bitflip") for _ in range(10)]
    first = [answer(frozen_codec, s) for s in forged]
    for other in legit:
        frozen_codec.decode([other])
    assert [answer(frozen_codec, s) for s in reversed(forged)] == first[::-1]


@pytest.mark.parametrize("cut", [1, 4, 8])
def test_a_payload_cut_short_is_rejected(codec, images, cut):
    stream = codec.encode(images[:1])[0]
    payloads = bitstream.unpack(stream)[1]
    with pytest.raises(bitstream.CorruptStreamError, match="payload"):
        codec.decode([repack(stream, [payloads[0][:-cut], *payloads[1:]])])


@pytest.mark.parametrize("extra", [b"\x00\x00\x00\x00", b"\x01\x00\x00\x00", b"\xff"])
def test_a_payload_with_bytes_after_its_end_is_rejected(codec, images, extra):
    stream = codec.encode(images[:1])[0]
    payloads = bitstream.unpack(stream)[1]
    with pytest.raises(bitstream.CorruptStreamError, match="payload"):
        codec.decode([repack(stream, [payloads[0] + extra, *payloads[1:]])])


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_stream_is_refused_with_the_fix(frozen_codec, images, version):
    body = b"MTFC" + bytes([version]) + frozen_codec.encode(images[:1])[0][1:-2]
    old = body + struct.pack(">I", zlib.crc32(body))
    with pytest.raises(bitstream.UnsupportedVersionError, match=f"bitstream format version {version}; this mtfc reads "
                                                                "version 3 only: re-encode the image with this mtfc"):
        frozen_codec.decode([old])


def test_an_image_over_the_size_limit_is_refused(frozen_codec, images):
    stream = frozen_codec.encode(images[:1])[0]
    header, payloads = bitstream.unpack(stream)
    huge = bitstream.pack(bitstream.Header(header.fingerprint, (8192, 4096)), payloads)
    with pytest.raises(bitstream.CorruptStreamError, match="a 8192x4096 image; a stream holds at most 16777216 pixels"):
        frozen_codec.decode([huge])
    big = torch.zeros(1, 3, 1, 1).expand(1, 3, 4100, 4100)  # a view: nothing is allocated
    with pytest.raises(ValueError, match="image size 4100x4100 is over the 16777216 pixels a stream holds"):
        frozen_codec.encode(big)


def test_values_beyond_the_tables_are_escape_coded_and_clamped(frozen_codec, images):
    codec = frozen_codec
    y = codec.g_a(torch.zeros(1, 3, 32, 48))
    m = medians(codec)
    y[0, 0, 0, 0] = m[0, 0, 0, 0] + 1e9  # CompressAI's encoder never returns on this one
    y[0, 1, 0, 0] = m[0, 1, 0, 0] - 1e5
    y[0, 2, 0, 0] = m[0, 2, 0, 0] + 300
    y[0, 3, 0, 0] = m[0, 3, 0, 0] - ESCAPE_LIMIT
    y_hat = codec.coder.decompress(codec.compress_latent(y), (8, 12))
    assert torch.equal(y_hat, codec.coder.quantize(y))
    assert (y_hat - m)[0, :4, 0, 0].tolist() == [ESCAPE_LIMIT, -ESCAPE_LIMIT, 300, -ESCAPE_LIMIT]


def test_an_escape_beyond_the_limit_is_rejected(frozen_codec):
    tables = frozen_codec.coder.bottleneck.tables
    indexes = np.arange(8)
    values = np.zeros(8, dtype=np.int64)
    assert np.array_equal(tables.decode(tables.encode(values, indexes), indexes), values)
    values[3] = ESCAPE_LIMIT + 1000  # what no encoder writes: quantize() clamps first
    with pytest.raises(bitstream.CorruptStreamError, match="escapes to a value beyond ±32768"):
        tables.decode(tables.encode(values, indexes), indexes)


@pytest.mark.parametrize("value, counts", [(float("nan"), "1 NaN and 0 infinite"),
                                           (float("inf"), "0 NaN and 1 infinite"),
                                           (float("-inf"), "0 NaN and 1 infinite")])
def test_non_finite_pixels_are_refused(codec, value, counts):
    images = torch.rand(2, 3, 32, 32)
    images[1, 2, 5, 7] = value
    for method in (codec.encode, codec.quantize):
        with pytest.raises(ValueError, match=f"images have {counts} pixel values; replace them"):
            method(images)


def test_a_latent_that_overflows_is_refused(codec):
    with pytest.raises(ValueError, match=r"cannot code a latent with 512 NaN or infinite values"):
        codec.encode(torch.full((1, 3, 32, 32), 1e38))  # finite pixels, but normalize() overflows float32


def test_the_onnx_encoder_refuses_non_finite_input_and_packs_like_the_codec(frozen_codec, images, tmp_path):
    encoder = Encoder(export_onnx(save_codec(frozen_codec, tmp_path / "codec.pt"), tmp_path / "export"))
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images have 1 NaN and 0 infinite pixel values"):
        encoder.encode(bad)
    with pytest.raises(ValueError, match="cannot code a latent with 512 NaN or infinite values"):
        encoder.encode(torch.full((1, 3, 32, 32), 1e38))
    y = encoder.latent(images)
    assert encoder.encode(images) == frozen_codec.pack_latent(y, (32, 48))
