"""Object encoding: a small header plus a payload, zstd-compressed only where that saves space.

Header (16 bytes, little endian): magic b"BKY", format version (1), codec (0 raw, 1 zstd), 3 reserved
bytes, plaintext length (u32), payload length (u32). The lengths let a scrub check an object's size
and catch truncation without decompressing it.
"""

from __future__ import annotations

import struct
import threading

import zstandard

from backyfs.errors import CorruptObject
from backyfs.storage.base import ObjectStore, StoreWrapper

MAGIC = b"BKY"
FORMAT_VERSION = 1
CODEC_RAW = 0
CODEC_ZSTD = 1
HEADER = struct.Struct("<3sBB3xII")
HEADER_SIZE = HEADER.size
MAX_PLAIN = 64 << 20  # the largest block size: no object decodes to more
# Keep a compressed payload only if it saves at least this fraction: random data stays raw and
# reads back without a decompression pass.
MIN_SAVING = 0.03

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread, reused across blocks.
    key = f"c{level}"
    ctx = getattr(_local, key, None)
    if ctx is None:
        ctx = zstandard.ZstdCompressor(level=level)
        setattr(_local, key, ctx)
    return ctx


def _decompressor() -> zstandard.ZstdDecompressor:
    ctx = getattr(_local, "d", None)
    if ctx is None:
        ctx = _local.d = zstandard.ZstdDecompressor()
    return ctx


# Blocks larger than this are first probed: compressing this much of each end tells random data
# (most of a VM disk's non-zero blocks) from compressible data for a fraction of the full cost.
PROBE_SIZE = 64 * 1024


def _worth_compressing(data: bytes | memoryview, level: int) -> bool:
    if len(data) <= 4 * PROBE_SIZE:
        return True
    view = memoryview(data)
    ctx = _compressor(level)
    for probe in (view[:PROBE_SIZE], view[-PROBE_SIZE:]):
        if len(ctx.compress(probe)) <= PROBE_SIZE * (1 - MIN_SAVING):
            return True
    return False


def encode(data: bytes | memoryview, level: int = 1) -> bytes:
    header, payload = encode_split(data, level)
    return header + payload


def encode_split(data: bytes | memoryview, level: int = 1) -> tuple[bytes, bytes | memoryview]:
    """The object as (header, payload); a raw payload is `data` itself, not a copy."""
    plain_len = len(data)
    if level > 0 and plain_len >= 512 and _worth_compressing(data, level):
        packed = _compressor(level).compress(data)
        if len(packed) <= plain_len * (1 - MIN_SAVING):
            return HEADER.pack(MAGIC, FORMAT_VERSION, CODEC_ZSTD, plain_len, len(packed)), packed
    return HEADER.pack(MAGIC, FORMAT_VERSION, CODEC_RAW, plain_len, plain_len), data


def parse_header(obj: bytes, key: str = "object", total_len: int | None = None) -> tuple[int, int, int]:
    """Return (codec, plain_len, payload_len) after checking magic, version and total length.
    obj may be the whole object or just its header, with total_len the whole object's length."""
    total = len(obj) if total_len is None else total_len
    if len(obj) < HEADER_SIZE:
        raise CorruptObject(f"{key}: truncated header ({len(obj)} bytes)")
    magic, version, codec, plain_len, payload_len = HEADER.unpack_from(obj)
    if magic != MAGIC or version != FORMAT_VERSION or codec not in (CODEC_RAW, CODEC_ZSTD):
        raise CorruptObject(f"{key}: bad header")
    if total != HEADER_SIZE + payload_len:
        raise CorruptObject(f"{key}: length {total} does not match header ({HEADER_SIZE + payload_len})")
    if codec == CODEC_RAW and plain_len != payload_len:
        raise CorruptObject(f"{key}: raw object with plaintext length {plain_len} != payload {payload_len}")
    return codec, plain_len, payload_len


def decode(obj: bytes, key: str = "object") -> bytes:
    data = decode_split(obj[:HEADER_SIZE], memoryview(obj)[HEADER_SIZE:], key)
    return data if type(data) is bytes else bytes(data)


def decode_split(header: bytes, payload: bytes | memoryview, key: str = "object") -> bytes | memoryview:
    """Decode an object read as header and payload. A raw payload is returned as it is, a view
    included: no copy of the block on the export's cold-read path."""
    codec, plain_len, _ = parse_header(header, key, HEADER_SIZE + len(payload))
    if codec == CODEC_RAW:
        return payload
    if plain_len > MAX_PLAIN:
        raise CorruptObject(f"{key}: header claims {plain_len} bytes, more than any block")
    try:
        # The frame's own content size beats max_output_size in python-zstandard: check it first,
        # or a damaged (or hostile) object could decompress to gigabytes.
        frame_size = zstandard.get_frame_parameters(payload).content_size
        if frame_size not in (plain_len, zstandard.CONTENTSIZE_UNKNOWN):
            raise CorruptObject(f"{key}: compressed frame holds {frame_size} bytes, header says {plain_len}")
        plain = _decompressor().decompress(payload, max_output_size=plain_len)
    except zstandard.ZstdError as exc:
        raise CorruptObject(f"{key}: cannot decompress: {exc}") from None
    if len(plain) != plain_len:
        raise CorruptObject(f"{key}: decompressed to {len(plain)} bytes, header says {plain_len}")
    return plain


class CodecStore(StoreWrapper):
    """Wraps a store so values are written with the header and compressed where it pays."""

    def __init__(self, inner: ObjectStore, level: int = 1) -> None:
        super().__init__(inner)
        self.level = level

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.inner.put(key, encode(data, self.level))

    def get(self, key: str) -> bytes:
        return decode(self.inner.get(key), key)
