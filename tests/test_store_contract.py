"""One contract, every backend: the same tests run against FilesystemStore, RadosStore and S3Store.

The Ceph backends use the cluster of scripts/ceph-test-cluster (see ceph_env); each test gets a store
under a fresh prefix, so runs against the same cluster do not see each other.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ceph_env
import pytest

from backyfs.errors import ObjectMissing, StoreUnavailable
from backyfs.storage.base import ObjectStore
from backyfs.storage.fs import FilesystemStore

S3_BUCKET = "backyfs-test"
MiB = 1 << 20


@dataclass
class Backend:
    store: ObjectStore
    #: writes bytes under a key through the backend's own API, behind the store's back
    raw_put: Callable[[str, bytes], None]


@contextlib.contextmanager
def _fs_backend(tmp_path: Path) -> Iterator[Backend]:
    root = tmp_path / "store"
    store = FilesystemStore(str(root), fsync=False)

    def raw_put(key: str, data: bytes) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    yield Backend(store, raw_put)


@contextlib.contextmanager
def _rados_backend(tmp_path: Path) -> Iterator[Backend]:
    from backyfs.storage.rados import RadosStore

    env = ceph_env.cluster()
    pool, prefix = env["BACKYFS_TEST_RADOS_POOL"], f"test-{uuid.uuid4().hex}"
    with ceph_env.rados_ioctx(env, pool) as ioctx:
        store = RadosStore(pool, env["CEPH_CONF"], prefix=prefix)
        yield Backend(store, lambda key, data: ioctx.write_full(f"{prefix}/{key}", data))


@contextlib.contextmanager
def _s3_backend(tmp_path: Path) -> Iterator[Backend]:
    from backyfs.storage.s3 import S3Store

    env = ceph_env.cluster()
    prefix = f"test-{uuid.uuid4().hex}"
    store = S3Store(S3_BUCKET, prefix, create_bucket=True, **ceph_env.s3_options(env))
    client = ceph_env.s3_client(env)

    def raw_put(key: str, data: bytes) -> None:
        client.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/{key}", Body=data)

    yield Backend(store, raw_put)


BACKENDS = {"fs": _fs_backend, "rados": _rados_backend, "s3": _s3_backend}


@pytest.fixture(
    params=["fs", pytest.param("rados", marks=pytest.mark.ceph), pytest.param("s3", marks=pytest.mark.ceph)]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with BACKENDS[request.param](tmp_path) as made:
        yield made
        for key in list(made.store.list()):
            made.store.delete(key)
        made.store.close()


@pytest.fixture
def store(backend: Backend) -> ObjectStore:
    return backend.store


@pytest.mark.parametrize("size", [0, 1, 4096, 4 * MiB], ids=["empty", "1B", "4KiB", "4MiB"])
def test_round_trip(store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    store.put("blocks/ab/abcdef", data)
    assert store.get("blocks/ab/abcdef") == data
    assert store.size("blocks/ab/abcdef") == size
    head, rest = store.get_split("blocks/ab/abcdef", 16)
    assert bytes(head) == data[:16] and bytes(rest) == data[16:]


@pytest.mark.parametrize("size", [0, 4096, 4 * MiB], ids=["empty", "4KiB", "4MiB"])
def test_put_split_writes_head_then_rest(store: ObjectStore, size: int) -> None:
    head, rest = b"H" * 16, os.urandom(size)
    store.put_split("blocks/ab/split", head, memoryview(rest))  # a view, as the writer passes blocks
    assert store.get("blocks/ab/split") == head + rest
    assert store.size("blocks/ab/split") == 16 + size


def test_get_split_of_a_missing_key_raises(store: ObjectStore) -> None:
    with pytest.raises(ObjectMissing):
        store.get_split("blocks/ab/absent", 16)


def test_put_accepts_memoryview(store: ObjectStore) -> None:
    data = bytearray(os.urandom(1000))
    store.put("k", memoryview(data)[100:600])
    assert store.get("k") == bytes(data[100:600])


def test_overwrite_replaces_the_whole_value(store: ObjectStore) -> None:
    store.put("versions/v.json", b"a much longer first value")
    store.put("versions/v.json", b"short")
    assert store.get("versions/v.json") == b"short"
    assert store.size("versions/v.json") == 5


def test_exists(store: ObjectStore) -> None:
    assert not store.exists("a/b")
    store.put("a/b", b"x")
    assert store.exists("a/b")
    assert not store.exists("a")  # a "directory" is not a key
    assert not store.exists("a/bc")


def test_delete(store: ObjectStore) -> None:
    store.put("a/b", b"x")
    store.delete("a/b")
    assert not store.exists("a/b")
    with pytest.raises(ObjectMissing):
        store.get("a/b")
    store.delete("a/b")  # absent: not an error
    store.delete("never/was")


def test_list_by_prefix(store: ObjectStore) -> None:
    keys = {"blocks/ab/1", "blocks/ab/2", "blocks/cd/3", "versions/v1.json", "versions2/x", "top"}
    for key in keys:
        store.put(key, key.encode())
    assert set(store.list()) == keys
    assert set(store.list("")) == keys
    assert set(store.list("blocks/")) == {"blocks/ab/1", "blocks/ab/2", "blocks/cd/3"}
    assert set(store.list("blocks/ab/")) == {"blocks/ab/1", "blocks/ab/2"}
    assert set(store.list("blocks/a")) == {"blocks/ab/1", "blocks/ab/2"}
    assert set(store.list("versions/")) == {"versions/v1.json"}
    assert set(store.list("versions")) == {"versions/v1.json", "versions2/x"}
    assert set(store.list("nothing/")) == set()
    assert sorted(store.list()) == sorted(keys)  # each key once
    assert dict(store.list_sizes("blocks/")) == {k: len(k) for k in keys if k.startswith("blocks/")}


def test_missing_key(store: ObjectStore) -> None:
    with pytest.raises(ObjectMissing, match="no/such"):
        store.get("no/such")
    with pytest.raises(ObjectMissing):
        store.size("no/such")


def test_concurrent_puts(store: ObjectStore) -> None:
    values = {f"blocks/{i:02x}/{i}": os.urandom(64 * 1024 + i) for i in range(64)}
    contenders = [bytes([i]) * (100_000 + i) for i in range(16)]
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        start.wait()
        for n, (key, data) in enumerate(values.items()):
            if n % 8 == worker:
                store.put(key, data)
            if n < 8:
                store.put("same", contenders[(worker + n) % len(contenders)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert set(store.list("blocks/")) == set(values)
    for key, data in values.items():
        assert store.get(key) == data
    assert store.get("same") in contenders  # one whole value, never a mix


def test_corrupt_object_is_returned_as_stored(backend: Backend) -> None:
    """The store hands back whatever the backend holds; detecting corruption is the codec's job."""
    backend.store.put("blocks/ab/abcdef", b"the real block")
    garbage = os.urandom(333)
    backend.raw_put("blocks/ab/abcdef", garbage)
    assert backend.store.get("blocks/ab/abcdef") == garbage
    assert backend.store.size("blocks/ab/abcdef") == len(garbage)


@pytest.mark.parametrize("key", ["", "/abs", "trailing/", "a//b", "../up", "a/./b", "a/../b", "nul\0"])
def test_invalid_keys(store: ObjectStore, key: str) -> None:
    # Every backend takes the same keys, so a store can be copied from one backend to another.
    with pytest.raises(ValueError, match="invalid object key"):
        store.put(key, b"x")
    with pytest.raises(ValueError, match="invalid object key"):
        store.get(key)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_closed_port_is_unavailable() -> None:
    from backyfs.storage.s3 import S3Store

    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        S3Store(
            S3_BUCKET, endpoint_url=f"http://127.0.0.1:{port}", access_key="AKSECRETID", secret_key="SeCrEt",
            path_style=True, max_attempts=2, connect_timeout=1, read_timeout=1,
        )  # fmt: skip
    message = str(caught.value)
    assert time.monotonic() - started < 5
    assert "\n" not in message and f"127.0.0.1:{port}" in message
    assert "AKSECRETID" not in message and "SeCrEt" not in message


def test_rados_unreachable_mon_is_unavailable(tmp_path: Path) -> None:
    ceph_env.import_module("rados")
    from backyfs.storage.rados import RadosStore

    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon host = [v2:127.0.0.1:{_closed_port()}]\nauth client required = none\n")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        RadosStore("any", str(conf), connect_timeout=1)
    assert time.monotonic() - started < 10
    assert "\n" not in str(caught.value)


@pytest.mark.ceph
def test_rados_missing_pool_is_unavailable() -> None:
    from backyfs.storage.rados import RadosStore

    env = ceph_env.cluster()
    with pytest.raises(StoreUnavailable, match="pool no-such-pool does not exist"):
        RadosStore("no-such-pool", env["CEPH_CONF"])


@pytest.mark.ceph
def test_s3_missing_bucket_is_unavailable() -> None:
    from backyfs.storage.s3 import S3Store

    env = ceph_env.cluster()
    with pytest.raises(StoreUnavailable, match="bucket no-such-bucket does not exist"):
        S3Store("no-such-bucket", **ceph_env.s3_options(env))


@pytest.mark.ceph
def test_s3_survives_radosgw_restart() -> None:
    """With radosgw down calls fail with StoreUnavailable; once it is back the same store works."""
    from backyfs.storage.s3 import S3Store

    env = ceph_env.cluster()
    options = ceph_env.s3_options(env) | {"max_attempts": 2, "connect_timeout": 1, "read_timeout": 2}
    store = S3Store(S3_BUCKET, f"test-{uuid.uuid4().hex}", create_bucket=True, **options)
    store.put("k", b"before")
    ceph_env.rgw(env, "rgw-stop")
    try:
        with pytest.raises(StoreUnavailable, match="cannot connect to 127.0.0.1") as caught:
            store.get("k")
        assert "\n" not in str(caught.value) and env["BACKYFS_TEST_S3_SECRET_KEY"] not in str(caught.value)
    finally:
        ceph_env.rgw(env, "rgw-start")
    assert store.get("k") == b"before"
    store.delete("k")
    store.close()
