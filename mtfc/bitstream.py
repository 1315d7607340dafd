"""The mtfc bitstream container: what crosses the network for one image.

Layout (format version 3; integers marked *varint* are unsigned LEB128, 1 byte below 128)::

    size      field
    1         format byte 0b1011_lnnf: the high nibble 0xB marks an mtfc version-3 stream,
              l = 1 when a rate level follows the fingerprint (variable-rate codecs),
              nn = number of payloads − 1 (1: factorized prior; 2: y and z of the hyperprior),
              f = 1 when the original image size follows the image size
    2         codec fingerprint: first 2 bytes of ``Codec.fingerprint``
    varint    rate level (only when l = 1): which of the codec's levels coded the latent
    varint    image height H, varint image width W: the picture's size (the content, unpadded); the
              codec coded it padded bottom/right to the next multiples of its ``size_divisibility``,
              which the decoder knows (:func:`padded_size`), so the padding costs no header bytes
    varint×2  original height H0 and width W0 (only when f = 1): the image's size before the device
              resized it, which heads map their predictions back to
    varint×(n−1)  lengths of every payload but the last (the last runs to the checksum)
    ...       payloads: constriction ANS words (little-endian) coding CompressAI's tables, in that
              order (see :mod:`mtfc.entropy_coding`)
    2         CRC-16/CCITT (``binascii.crc_hqx``) of every byte before it, big-endian

The latent's shape is not sent: the receiving codec derives it from (H, W) padded to its divisibility
(a stream written before content sizes existed carried the padded size, a multiple of it, and reads
the same). A factorized stream of a 32×32 image carries 7 bytes besides its payload (version 2
carried 20: 0.16 bpp at 32×32). bpp counts every byte of it over the original image's pixels:
``8 * len(stream) / (H0 * W0)``.

What the checks prove: the checksum catches transmission errors, not forgeries (anyone can compute
one); the 2-byte fingerprint catches a stream sent to the wrong codec (one pair of codecs in 65,536
shares a prefix; such a stream then decodes to noise or fails its end mark). Safety against forged
streams is the decoder's (:mod:`mtfc.entropy_coding`): every byte string either raises a
:class:`BitstreamError` or decodes to a latent within the prior's bounds. An image has at most
:data:`MAX_PIXELS` pixels: the decoder's work and memory grow with the size a header announces,
whatever the payload's length. Versions 1 and 2 (which began with the bytes ``MTFC``) are refused.
"""
from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass
from typing import Sequence

FORMAT_MARK = 0xB0
VERSION = 3
FINGERPRINT_BYTES = 2
MAX_PIXELS = 4096 * 4096
MAX_PAYLOADS = 4
_OLD_MAGIC = b"MTFC"  # versions 1 and 2
_MIN_LEN = 1 + FINGERPRINT_BYTES + 2 + 2


class BitstreamError(ValueError):
    """Base class of every error raised while decoding a bitstream."""


class NotAStreamError(BitstreamError):
    """The bytes do not start with an mtfc format byte."""


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
    """What a stream says about its image: ``image_size`` (H, W), the picture the codec coded (padded to
    its divisibility), and ``original_size``, its size before resizing (defaults to ``image_size``);
    ``level``: the rate level of a variable-rate codec (``None``: a fixed-rate codec's stream)."""

    fingerprint: bytes
    image_size: tuple[int, int]
    original_size: tuple[int, int] | None = None
    level: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(self.image_size))
        object.__setattr__(self, "original_size", tuple(self.original_size or self.image_size))


def padded_size(size: Sequence[int], divisibility: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of ``divisibility``: the size a codec of that
    :attr:`~mtfc.Codec.size_divisibility` codes an image of content ``size`` at."""
    h, w = (-(-int(v) // divisibility) * divisibility for v in size)
    return h, w


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
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes")
    if not 1 <= len(payloads) <= MAX_PAYLOADS:
        raise ValueError(f"a stream holds 1 to {MAX_PAYLOADS} payloads, got {len(payloads)}")
    has_original, has_level = header.original_size != header.image_size, header.level is not None
    body = bytearray([FORMAT_MARK | has_level << 3 | (len(payloads) - 1) << 1 | has_original])
    body += header.fingerprint
    if has_level:
        body += _varint(header.level)
    for v in (*header.image_size, *(header.original_size if has_original else ())):
        body += _varint(v)
    for p in payloads[:-1]:
        body += _varint(len(p))
    for p in payloads:
        body += p
    return bytes(body) + struct.pack(">H", binascii.crc_hqx(body, 0))


def unpack(stream: bytes, fingerprint: bytes | None = None) -> tuple[Header, list[bytes]]:
    """Validate and parse a stream; raise a :class:`BitstreamError` subclass on any problem.

    ``fingerprint``: the receiving codec's fingerprint (or its prefix); a stream from another codec is rejected.
    """
    if not isinstance(stream, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"a bitstream must be bytes, got {type(stream).__name__}")
    stream = bytes(stream)
    if stream[:4] == _OLD_MAGIC:
        version = stream[4] if len(stream) > 4 else "1 or 2"
        raise UnsupportedVersionError(f"bitstream format version {version}; this mtfc reads version {VERSION} only: "
                                      "re-encode the image with this mtfc")
    if not stream or stream[0] & 0xF0 != FORMAT_MARK:
        raise NotAStreamError("not an mtfc bitstream (wrong format byte)")
    if len(stream) < _MIN_LEN:
        raise TruncatedStreamError(f"stream is {len(stream)} bytes, shorter than the smallest valid stream")
    n, has_original, has_level = ((stream[0] >> 1) & 0b11) + 1, stream[0] & 1, stream[0] >> 3 & 1
    fp = stream[1 : 1 + FINGERPRINT_BYTES]
    if fingerprint is not None and fp != fingerprint[:FINGERPRINT_BYTES]:
        raise CodecMismatchError(
            f"stream was encoded by codec {fp.hex()}…, this codec is {fingerprint[:FINGERPRINT_BYTES].hex()}…")
    pos = 1 + FINGERPRINT_BYTES
    level = None
    if has_level:
        level, pos = _read_varint(stream, pos)
    fields = []
    for _ in range(2 + 2 * has_original + n - 1):
        v, pos = _read_varint(stream, pos)
        fields.append(v)
    sizes, lengths = fields[: 2 + 2 * has_original], fields[2 + 2 * has_original :]
    end = len(stream) - 2
    if pos + sum(lengths) > end:
        raise TruncatedStreamError(f"stream announces at least {pos + sum(lengths) + 2} bytes but has {len(stream)}")
    (crc,) = struct.unpack(">H", stream[end:])
    if binascii.crc_hqx(stream[:end], 0) != crc:
        raise CorruptStreamError("checksum mismatch: the stream was altered or cut short in transit")
    payloads = []
    for length in [*lengths, end - pos - sum(lengths)]:
        payloads.append(stream[pos : pos + length])
        pos += length
    H, W = sizes[:2]
    if min(sizes) == 0:
        raise CorruptStreamError(f"invalid header: image {'x'.join(map(str, sizes))}")
    if H * W > MAX_PIXELS:
        raise ImageTooLargeError(f"header announces a {H}x{W} image; a stream holds at most {MAX_PIXELS} pixels")
    if has_original and sizes[2] * sizes[3] > MAX_PIXELS:
        raise ImageTooLargeError(f"header announces an original size of {sizes[2]}x{sizes[3]}; "
                                 f"at most {MAX_PIXELS} pixels")
    return Header(fp, (H, W), tuple(sizes[2:]) or None, level), payloads
