"""The mtfc bitstream container: what crosses the network for one image.

Layout (format version 2; integers marked *varint* are unsigned LEB128, 1 byte below 128)::

    offset  size      field
    0       4         magic  b"MTFC"
    4       1         format version (2)
    5       4         codec fingerprint: first 4 bytes of ``Codec.fingerprint``
    9       varint    input height H      (pixels)
            varint    input width  W
            varint    latent channels C
            varint    latent height h
            varint    latent width  w
            1         number of payloads n (1: factorized prior; 2: y and z of the hyperprior)
            varint×n  payload lengths
            ...       payloads: constriction ANS words (little-endian) coding CompressAI's tables, in
                      that order (see :mod:`mtfc.entropy_coding`)
    end-4   4         CRC-32 (zlib) of every byte before it, big-endian

bpp counts every byte of it: ``8 * len(stream) / (H * W)``. Version 1 had the same layout with
CompressAI's rANS strings as payloads; its decoder read past forged payloads, so version 1 is refused.
An image has at most :data:`MAX_PIXELS` pixels: the decoder's work and memory grow with the size a
header announces, whatever the payload's length.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"MTFC"
VERSION = 2
FINGERPRINT_BYTES = 4
MAX_PIXELS = 4096 * 4096
_MIN_LEN = len(MAGIC) + 1 + FINGERPRINT_BYTES + 5 + 1 + 1 + 4


class BitstreamError(ValueError):
    """Base class of every error raised while decoding a bitstream."""


class NotAStreamError(BitstreamError):
    """The bytes do not start with the mtfc magic."""


class UnsupportedVersionError(BitstreamError):
    """The stream uses a container version this mtfc cannot read."""


class CodecMismatchError(BitstreamError):
    """The stream was produced by a different codec (fingerprint mismatch)."""


class TruncatedStreamError(BitstreamError):
    """The stream ends before the data its header announces."""


class CorruptStreamError(BitstreamError):
    """The checksum or the header's values do not hold."""


class ImageTooLargeError(CorruptStreamError):
    """The header announces more than :data:`MAX_PIXELS` pixels."""


@dataclass(frozen=True)
class Header:
    fingerprint: bytes
    image_size: tuple[int, int]
    latent_shape: tuple[int, int, int]


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError(f"varint must be non-negative, got {n}")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise TruncatedStreamError("stream ends inside its header")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 35:
            raise CorruptStreamError("header integer is too long")


def pack(header: Header, payloads: list[bytes]) -> bytes:
    """Serialize one image's header and entropy-coded payloads."""
    if len(header.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError("fingerprint must be 4 bytes")
    body = bytearray(MAGIC)
    body.append(VERSION)
    body += header.fingerprint
    for v in (*header.image_size, *header.latent_shape):
        body += _varint(v)
    body.append(len(payloads))
    for p in payloads:
        body += _varint(len(p))
    for p in payloads:
        body += p
    return bytes(body) + struct.pack(">I", zlib.crc32(body))


def unpack(stream: bytes, fingerprint: bytes | None = None) -> tuple[Header, list[bytes]]:
    """Validate and parse a stream; raise a :class:`BitstreamError` subclass on any problem.

    ``fingerprint``: the receiving codec's fingerprint prefix; a stream from another codec is rejected.
    """
    if not isinstance(stream, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"a bitstream must be bytes, got {type(stream).__name__}")
    stream = bytes(stream)
    if not stream or stream[: len(MAGIC)] != MAGIC[: len(stream)]:
        raise NotAStreamError("not an mtfc bitstream (wrong magic bytes)")
    if len(stream) < _MIN_LEN:
        raise TruncatedStreamError(f"stream is {len(stream)} bytes, shorter than the smallest valid stream")
    if stream[4] != VERSION:
        raise UnsupportedVersionError(f"bitstream format version {stream[4]}; this mtfc reads version {VERSION} only: "
                                      "re-encode the image with this mtfc")
    fp = stream[5 : 5 + FINGERPRINT_BYTES]
    if fingerprint is not None and fp != fingerprint[:FINGERPRINT_BYTES]:
        raise CodecMismatchError(
            f"stream was encoded by codec {fp.hex()}, this codec is {fingerprint[:FINGERPRINT_BYTES].hex()}")
    pos = 5 + FINGERPRINT_BYTES
    fields = []
    for _ in range(5):
        v, pos = _read_varint(stream, pos)
        fields.append(v)
    if pos >= len(stream):
        raise TruncatedStreamError("stream ends inside its header")
    n = stream[pos]
    pos += 1
    lengths = []
    for _ in range(n):
        v, pos = _read_varint(stream, pos)
        lengths.append(v)
    end = pos + sum(lengths)
    if end + 4 > len(stream):
        raise TruncatedStreamError(f"stream announces {end + 4} bytes but has {len(stream)}")
    if end + 4 < len(stream):
        raise CorruptStreamError(f"{len(stream) - end - 4} unexpected bytes after the payload")
    (crc,) = struct.unpack(">I", stream[end:])
    if zlib.crc32(stream[:end]) != crc:
        raise CorruptStreamError("checksum mismatch: the stream was altered in transit")
    payloads = []
    for length in lengths:
        payloads.append(stream[pos : pos + length])
        pos += length
    H, W, C, h, w = fields
    if min(fields) == 0 or n == 0:
        raise CorruptStreamError(f"invalid header: image {H}x{W}, latent {C}x{h}x{w}, {n} payloads")
    if H * W > MAX_PIXELS:
        raise ImageTooLargeError(f"header announces a {H}x{W} image; a stream holds at most {MAX_PIXELS} pixels")
    return Header(fp, (H, W), (C, h, w)), payloads
