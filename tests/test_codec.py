"""The object codec: header, zstd only where it pays, and detection of damaged objects."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backyfs.errors import CorruptObject
from backyfs.storage import codec
from backyfs.storage.codec import CODEC_RAW, CODEC_ZSTD, HEADER_SIZE, CodecStore, decode, encode, parse_header
from backyfs.storage.fs import FilesystemStore

TEXT = b"the quick brown fox jumps over the lazy dog\n" * 20_000


def test_random_data_is_stored_raw() -> None:
    data = os.urandom(1 << 20)
    obj = encode(data)
    assert parse_header(obj) == (CODEC_RAW, len(data), len(data))
    assert len(obj) == HEADER_SIZE + len(data)
    assert obj[HEADER_SIZE:] == data
    assert decode(obj) == data


def test_compressible_data_is_zstd_and_smaller() -> None:
    obj = encode(TEXT)
    kind, plain, payload = parse_header(obj)
    assert (kind, plain) == (CODEC_ZSTD, len(TEXT))
    assert payload == len(obj) - HEADER_SIZE
    assert len(obj) < len(TEXT) // 10
    assert decode(obj) == TEXT


@pytest.mark.parametrize("data", [b"", b"x", b"a" * 511, bytes(100)])
def test_small_data_round_trips_raw(data: bytes) -> None:
    obj = encode(data)
    assert parse_header(obj)[0] == CODEC_RAW
    assert decode(obj) == data


def test_level_zero_stores_raw() -> None:
    obj = encode(TEXT, level=0)
    assert parse_header(obj)[0] == CODEC_RAW
    assert decode(obj) == TEXT


def test_barely_compressible_data_stays_raw() -> None:
    # ~1% compressible: saving less than MIN_SAVING, so the raw form is kept.
    rng = random.Random(5)
    data = bytearray(rng.randbytes(1 << 20))
    data[: len(data) // 100] = bytes(len(data) // 100)
    assert parse_header(encode(bytes(data)))[0] == CODEC_RAW


def test_memoryview_input() -> None:
    assert decode(encode(memoryview(TEXT))) == TEXT


@pytest.mark.parametrize("make", [lambda: os.urandom(70_000), lambda: TEXT])
def test_truncated_or_extended_objects_are_corrupt(make) -> None:
    obj = encode(make())
    cuts = (obj[:-1], obj[: HEADER_SIZE + 10], obj[:HEADER_SIZE], obj[: HEADER_SIZE - 1], b"", obj + b"\0")
    for bad in cuts:
        with pytest.raises(CorruptObject):
            decode(bad, "blocks/xx/yy")


@pytest.mark.parametrize("make", [lambda: os.urandom(70_000), lambda: TEXT])
@pytest.mark.parametrize("pos", range(HEADER_SIZE))
def test_any_flipped_header_byte_is_caught_or_harmless(make, pos: int) -> None:
    """A damaged header never decodes to different data silently."""
    data = make()
    obj = bytearray(encode(data))
    obj[pos] ^= 0x10
    try:
        back = decode(bytes(obj))
    except CorruptObject:
        return
    assert back == data, f"header byte {pos} flipped: decoded to different data without an error"
    assert pos in range(5, 8), f"header byte {pos} flipped without an error"  # reserved bytes only


def test_flipped_payload_byte_in_zstd_object_never_decodes_to_the_same_data() -> None:
    obj = bytearray(encode(TEXT))
    obj[HEADER_SIZE + len(obj) // 3] ^= 0xFF
    try:
        back = decode(bytes(obj))
    except CorruptObject:
        return
    assert back != TEXT  # the digest check above the codec catches it


def test_error_names_the_key() -> None:
    with pytest.raises(CorruptObject, match="blocks/ab/abcd"):
        decode(b"BKY", "blocks/ab/abcd")


def test_parallel_encode_decode_uses_per_thread_contexts() -> None:
    blocks = [TEXT[i:] + bytes([i]) for i in range(64)]

    def round_trip(data: bytes) -> bool:
        return decode(encode(data, 3)) == data

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, blocks))


def test_codec_store_writes_encoded_objects(tmp_path: Path) -> None:
    inner = FilesystemStore(str(tmp_path / "s"), fsync=False)
    store = CodecStore(inner, level=1)
    store.put("a/b", TEXT)
    raw = inner.get("a/b")
    assert raw[:3] == codec.MAGIC
    assert len(raw) < len(TEXT)
    assert store.get("a/b") == TEXT
    (tmp_path / "s" / "a" / "b").write_bytes(raw[:-5])
    with pytest.raises(CorruptObject, match="a/b"):
        store.get("a/b")


def test_block_digest_is_blake2b_256_as_hashlib_computes_it() -> None:
    import hashlib

    from backyfs.repository.repo import _hashlib_digest, block_digest

    for data in (b"", b"x", os.urandom(4096), os.urandom(4 << 20), memoryview(os.urandom(5000))[7:]):
        assert block_digest(data) == _hashlib_digest(data) == hashlib.blake2b(data, digest_size=32).digest()


def test_a_compressed_frame_larger_than_its_header_says_is_corrupt_not_decompressed():
    """python-zstandard trusts a frame's own content size over max_output_size: a 2 KiB object
    whose header says 4096 bytes once decompressed to 64 MiB (and one claiming 2^44 bytes was a
    MemoryError traceback)."""
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    assert len(bomb) < 4096
    obj = codec.HEADER.pack(codec.MAGIC, codec.FORMAT_VERSION, CODEC_ZSTD, 4096, len(bomb)) + bomb
    with pytest.raises(CorruptObject, match="holds 67108864 bytes, header says 4096"):
        decode(obj)
    huge = codec.HEADER.pack(codec.MAGIC, codec.FORMAT_VERSION, CODEC_ZSTD, 2**32 - 1, len(bomb)) + bomb
    with pytest.raises(CorruptObject, match="more than any block"):
        decode(huge)
