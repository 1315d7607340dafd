import struct
import zlib

import pytest
import torch

import mtfc
from mtfc import bitstream
from mtfc.codec import Codec, load_codec, save_codec

from conftest import tiny_codec


def test_decode_returns_exactly_the_quantized_latent(codec, images):
    streams = codec.encode(images)
    latent = codec.decode(streams)
    assert torch.equal(latent, codec.quantize(images))
    assert latent.shape == (3, 8, 8, 12)
    assert torch.equal(latent, latent.round()) or codec.kind == "hyperprior"  # factorized: integers + medians


def test_bpp_counts_every_byte(codec, images):
    streams = codec.encode(images)
    for s in streams:
        header, payloads = bitstream.unpack(s)
        overhead = len(s) - sum(map(len, payloads))
        assert 15 <= overhead <= 30  # magic, version, fingerprint, sizes, lengths, CRC
        assert header.image_size == (32, 48) and header.latent_shape == (8, 8, 12)


def test_streams_are_deterministic(codec, images):
    assert codec.encode(images) == codec.encode(images)


@pytest.mark.parametrize("mutate, error", [
    (lambda s: b"JUNK" + s[4:], bitstream.NotAStreamError),
    (lambda s: s[:4] + bytes([9]) + s[5:], bitstream.UnsupportedVersionError),
    (lambda s: s[: len(s) // 2], bitstream.TruncatedStreamError),
    (lambda s: s[:10], bitstream.TruncatedStreamError),
    (lambda s: s[:-6] + bytes([s[-6] ^ 0xFF]) + s[-5:], bitstream.CorruptStreamError),
    (lambda s: s + b"\x00", bitstream.CorruptStreamError),
    (lambda s: b"", bitstream.NotAStreamError),
])
def test_bad_streams_raise_clear_errors(codec, images, mutate, error):
    stream = codec.encode(images[:1])[0]
    with pytest.raises(error):
        codec.decode([mutate(stream)])
    assert issubclass(error, mtfc.BitstreamError)


def test_every_single_byte_flip_is_rejected(images):
    codec = tiny_codec()
    stream = codec.encode(images[:1])[0]
    for i in range(len(stream)):
        bad = bytearray(stream)
        bad[i] ^= 0x01
        with pytest.raises(mtfc.BitstreamError):
            codec.decode([bytes(bad)])


def test_forged_header_with_valid_checksum_is_rejected(images):
    codec = tiny_codec()
    stream = codec.encode(images[:1])[0]
    header, payloads = bitstream.unpack(stream)
    forged = bitstream.pack(bitstream.Header(header.fingerprint, (64, 64), header.latent_shape), payloads)
    with pytest.raises(bitstream.CorruptStreamError, match="does not match"):
        codec.decode([forged])


def test_stream_from_another_codec_is_rejected(images):
    a, b = tiny_codec(seed=0), tiny_codec(seed=1)
    assert a.fingerprint != b.fingerprint
    with pytest.raises(bitstream.CodecMismatchError, match="encoded by codec"):
        b.decode(a.encode(images[:1]))


def test_bad_images_raise_clear_errors(codec):
    with pytest.raises(ValueError, match="multiple of"):
        codec.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        codec.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        codec.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_unfrozen_codec_refuses_to_encode(images):
    with pytest.raises(RuntimeError, match="freeze"):
        Codec(latent_channels=8, hidden_channels=16).encode(images)


def test_artifact_roundtrip_weights_only(codec, images, tmp_path):
    codec.meta = {"beta": 0.5}
    path = save_codec(codec, tmp_path / "codec.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["fingerprint"] == codec.fingerprint
    loaded = load_codec(path)
    assert loaded.fingerprint == codec.fingerprint and loaded.meta == {"beta": 0.5}
    assert loaded.encode(images) == codec.encode(images)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_artifact_errors(tmp_path, images):
    with pytest.raises(mtfc.CheckpointError, match=f"codec artifact {tmp_path / 'missing.pt'} does not exist; "
                                                   "`mtfc train-bottleneck CONFIG`"):
        load_codec(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(mtfc.CheckpointError, match=f"cannot read {tmp_path / 'junk.pt'}: truncated, corrupt"):
        load_codec(tmp_path / "junk.pt")
    codec = tiny_codec()
    path = save_codec(codec, tmp_path / "codec.pt")
    art = torch.load(path, weights_only=True)
    art["state_dict"]["g_a.0.weight"] += 1
    torch.save(art, tmp_path / "tampered.pt")
    with pytest.raises(mtfc.CheckpointError, match=f"{tmp_path / 'tampered.pt'} is corrupt: its weights do not "
                                                   f"match its fingerprint {codec.fingerprint}"):
        load_codec(tmp_path / "tampered.pt")


def test_varint_header_sizes():
    header = bitstream.Header(b"abcd", (4000, 300), (24, 1000, 75))
    stream = bitstream.pack(header, [b"x" * 200, b"y"])
    assert bitstream.unpack(stream) == (header, [b"x" * 200, b"y"])
    body = stream[:-4]
    assert struct.unpack(">I", stream[-4:])[0] == zlib.crc32(body)
