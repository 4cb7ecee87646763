"""A version's block map in the store, in parts when it is large.

A block map takes 40 bytes per allocated block. One object per map stops working for large volumes:
Ceph refuses a single write above `osd_max_write_size` (90 MiB by default, about 2.3 million
blocks, 9 TiB at 4 MiB blocks), and no object decodes to more than codec.MAX_PLAIN (64 MiB).
So a map larger than PART_BYTES is stored as parts `versions/<uid>/blockmap.<n>` (n from 1),
written first, and an index at `versions/<uid>/blockmap`, written last, that names each part's
stored length and BLAKE2b digest. The map is in the store once its index is; a part that a later
save of the same version (a resumed backup) was rewriting when it crashed fails its digest check
instead of being read as part of the map. A smaller map stays one object, as it always was.

The object at `versions/<uid>/blockmap` is sealed: it names its version's uid and the BLAKE2b
digest of what follows, so a damaged map, or another version's, is refused instead of restoring
the wrong data after a rebuild-db (zstd frames carry no checksum, and a raw one none at all).
Maps written before sealing are still read (deep-scrub rewrites them sealed).
"""

from __future__ import annotations

import hashlib
import json

from backyfs.errors import CorruptObject
from backyfs.storage import codec
from backyfs.storage.base import ObjectStore

PART_BYTES = 32 << 20
_INDEX_MAGIC = b"BKYPARTS"
_SEAL_MAGIC = b"BKYSEAL1"  # then: uid length (1 byte), uid, BLAKE2b-256 of the rest


def map_key(uid: str) -> str:
    return f"versions/{uid}/blockmap"


def _part_key(uid: str, n: int) -> str:
    return f"{map_key(uid)}.{n}"


def _part_digest(obj: bytes) -> str:
    return hashlib.blake2b(obj, digest_size=32).hexdigest()


def _seal(uid: str, inner: bytes) -> bytes:
    name = uid.encode()
    return _SEAL_MAGIC + bytes([len(name)]) + name + hashlib.blake2b(inner, digest_size=32).digest() + inner


def _unseal(key: str, uid: str, obj: bytes) -> tuple[bytes, bool]:
    """(what the seal covers, True), or (obj, False) for a map written before maps were sealed."""
    if not obj.startswith(_SEAL_MAGIC):
        return obj, False
    pos = len(_SEAL_MAGIC)
    name_len = obj[pos] if len(obj) > pos else 0
    name, digest = obj[pos + 1 : pos + 1 + name_len], obj[pos + 1 + name_len : pos + 33 + name_len]
    inner = obj[pos + 33 + name_len :]
    if name != uid.encode():
        raise CorruptObject(f"{key}: holds the block map of version {name.decode(errors='replace')!r}")
    if hashlib.blake2b(inner, digest_size=32).digest() != digest:
        raise CorruptObject(f"{key}: damaged (it does not match its digest)")
    return inner, True


def put_map(store: ObjectStore, uid: str, data: bytes) -> None:
    """Store a serialized block map: its parts first, then the object that makes it visible."""
    if len(data) <= PART_BYTES:
        store.put(map_key(uid), codec.encode(_seal(uid, data)))
        _delete_parts(store, uid, first=1)  # a larger map of an earlier attempt
        return
    parts = []
    for n, start in enumerate(range(0, len(data), PART_BYTES), 1):
        obj = codec.encode(data[start : start + PART_BYTES])
        store.put(_part_key(uid, n), obj)
        parts.append([len(obj), _part_digest(obj)])
    index = json.dumps({"size": len(data), "parts": parts}).encode()
    store.flush()  # the parts are durable before the index names them
    store.put(map_key(uid), codec.encode(_seal(uid, _INDEX_MAGIC + index)))
    _delete_parts(store, uid, first=len(parts) + 1)


def get_map(store: ObjectStore, uid: str) -> bytes:
    """The serialized block map (ObjectMissing, CorruptObject)."""
    return read_map(store, uid)[0]


def read_map(store: ObjectStore, uid: str) -> tuple[bytes, bool]:
    """The serialized block map, and whether it was sealed (ObjectMissing, CorruptObject)."""
    key = map_key(uid)
    head, sealed = _unseal(key, uid, codec.decode(store.get(key), key))
    if not head.startswith(_INDEX_MAGIC):
        return head, sealed
    try:
        index = json.loads(head[len(_INDEX_MAGIC) :])
        size, parts = int(index["size"]), [(int(length), str(digest)) for length, digest in index["parts"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptObject(f"{key}: bad part index ({exc})") from None
    chunks = []
    for n, (length, digest) in enumerate(parts, 1):
        part_key = _part_key(uid, n)
        obj = store.get(part_key)
        if len(obj) != length or _part_digest(obj) != digest:
            raise CorruptObject(f"{part_key}: does not match the block map's part index")
        chunks.append(codec.decode(obj, part_key))
    data = b"".join(chunks)
    if len(data) != size:
        raise CorruptObject(f"{key}: parts hold {len(data)} bytes, the index says {size}")
    return data, sealed


def delete_map(store: ObjectStore, uid: str) -> None:
    """Remove a version's map: the object naming it first, then any parts (also those of a map
    whose index is gone: they are found by probing from blockmap.1)."""
    store.delete(map_key(uid))
    _delete_parts(store, uid, first=1)


def _delete_parts(store: ObjectStore, uid: str, first: int) -> None:
    n = first
    while store.exists(_part_key(uid, n)):
        store.delete(_part_key(uid, n))
        n += 1

