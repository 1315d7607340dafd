import binascii
import re

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
        # format byte, 2-byte fingerprint, H and W (1 byte each), the first payload's length (hyperprior), CRC-16
        assert overhead == 7 + (len(bitstream._varint(len(payloads[0]))) if codec.kind == "hyperprior" else 0)
        assert header.image_size == header.original_size == (32, 48)


def test_streams_are_deterministic(codec, images):
    assert codec.encode(images) == codec.encode(images)


@pytest.mark.parametrize("mutate, error", [
    (lambda s: b"JUNK" + s[4:], bitstream.NotAStreamError),
    (lambda s: b"MTFC\x02" + s[1:], bitstream.UnsupportedVersionError),
    (lambda s: bytes([s[0] | 0x08]) + s[1:], bitstream.CorruptStreamError),  # a level flag the CRC does not cover
    # the last payload runs to the checksum, so only the hyperprior's first payload can be seen to be cut short
    (lambda s: s[: len(s) // 2], {"factorized": bitstream.CorruptStreamError,
                                  "hyperprior": bitstream.TruncatedStreamError}),
    (lambda s: s[:6], bitstream.TruncatedStreamError),
    (lambda s: s[:-4] + bytes([s[-4] ^ 0xFF]) + s[-3:], bitstream.CorruptStreamError),
    (lambda s: s + b"\x00", bitstream.CorruptStreamError),
    (lambda s: b"", bitstream.NotAStreamError),
])
def test_bad_streams_raise_clear_errors(codec, images, mutate, error):
    error = error[codec.kind] if isinstance(error, dict) else error
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
    forged = bitstream.pack(header, [*payloads, b"z"])
    with pytest.raises(bitstream.CorruptStreamError, match=r"^header does not match this codec: 2 payloads \(this "
                                                           r"codec sends 1\)$"):
        codec.decode([forged])


def test_the_stream_carries_the_content_and_the_codec_derives_the_coded_size(codec, images):
    """A stream's size is the picture's: the codec coded it padded to its divisibility (4, or 16 with the
    hyperprior), which costs no header bytes; a stream of a multiple of it (every stream before content
    sizes existed) is its own coded size."""
    d = codec.size_divisibility
    coded = (32, 48)
    content = (coded[0] - d + 1, coded[1] - 1)          # the smallest content coded at 32x48
    streams = codec.encode(images[:1].expand(2, -1, -1, -1), original_sizes=[(57, 96), coded],
                           content_sizes=[content, coded])
    latent, headers = codec.decode_with_headers(streams)
    assert [(h.image_size, h.original_size) for h in headers] == [(content, (57, 96)), (coded, coded)]
    assert [codec.coded_size(h) for h in headers] == [coded, coded]
    assert torch.equal(latent, codec.decode(codec.encode(images[:1])).expand(2, -1, -1, -1))
    assert bitstream.padded_size((29, 47), 4) == (32, 48) and bitstream.padded_size((17, 16), 16) == (32, 16)
    with pytest.raises(ValueError, match=rf"^content size {coded[0] - d}x47 is coded at {coded[0] - d}x48 \(padded to "
                                         rf"multiples of {d}\), not at the input's 32x48$"):
        codec.encode(images[:1], content_sizes=[(coded[0] - d, 47)])


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


def test_varint_header_sizes_and_the_original_size():
    header = bitstream.Header(b"ab", (4000, 300), (5000, 375))
    stream = bitstream.pack(header, [b"x" * 200, b"y"])
    assert bitstream.unpack(stream) == (header, [b"x" * 200, b"y"])
    assert stream[:13] == bytes([0xB3]) + b"ab" + bytes([0xA0, 0x1F, 0xAC, 0x02, 0x88, 0x27, 0xF7, 0x02, 0xC8, 0x01])
    assert int.from_bytes(stream[-2:], "big") == binascii.crc_hqx(stream[:-2], 0)


def test_the_smallest_stream_byte_for_byte():
    """Pinned bytes of version 3: a 32x32 image, one payload, no original size — 7 bytes besides the payload."""
    stream = bitstream.pack(bitstream.Header(b"\x12\x34", (32, 32)), [b"abc"])
    assert stream.hex() == "b01234202061626367c4"
    assert bitstream.unpack(stream) == (bitstream.Header(b"\x12\x34", (32, 32)), [b"abc"])


def test_the_original_size_travels_and_is_bounded(codec, images):
    streams = codec.encode(images[:1].expand(2, -1, -1, -1), original_sizes=[(30, 45), (32, 48)])
    _, headers = codec.decode_with_headers(streams)
    assert [(h.image_size, h.original_size) for h in headers] == [((32, 48), (30, 45)), ((32, 48), (32, 48))]
    assert len(streams[0]) == len(streams[1]) + 2
    forged = bitstream.pack(bitstream.Header(headers[0].fingerprint, (32, 48), (8192, 4096)),
                            bitstream.unpack(streams[0])[1])
    with pytest.raises(bitstream.ImageTooLargeError, match="original size of 8192x4096; at most 16777216 pixels"):
        codec.decode([forged])
