"""A store in a RADOS pool through librados: one object per key, named prefix + key.

The `rados` module is Ceph's (python3-rados on Debian) and is imported only when a RadosStore is made, so
the rest of backyfs works without it. One Rados handle and one Ioctx serve every thread: librados I/O on
an io context is thread-safe, only changing its settings (namespace, locator, snap context) is not, and
this store sets those once, before any I/O. The Python binding releases the GIL during each call.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

from backyfs.errors import ConfigError, ObjectMissing, StoreUnavailable
from backyfs.storage.base import ObjectStore
from backyfs.storage.fs import check_key


class RadosStore(ObjectStore):
    def __init__(
        self,
        pool: str,
        conffile: str | None = None,
        prefix: str = "",
        *,
        cluster_name: str = "ceph",
        client_name: str = "client.admin",
        namespace: str = "",
        connect_timeout: int = 10,
        op_timeout: int = 60,
    ) -> None:
        """conffile None reads Ceph's usual places ($CEPH_CONF, /etc/ceph/$cluster.conf). A non-empty
        prefix gets a trailing '/'. Timeouts are whole seconds (librados takes no fractions);
        op_timeout bounds every operation, so a dead OSD fails a backup instead of hanging it."""
        try:
            import rados
        except ImportError:
            raise ConfigError("the RADOS store needs Ceph's Python module rados (python3-rados)") from None
        self._rados_mod = rados
        self.pool = pool
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        cluster = "" if cluster_name == "ceph" else f"{cluster_name}:"
        self.url = f"rados:{cluster}{pool}/{self.prefix}".rstrip("/")
        self._cluster: Any = None
        self._ioctx: Any = None
        where = conffile or f"Ceph cluster {cluster_name}"
        try:
            self._cluster = rados.Rados(
                clustername=cluster_name,
                name=client_name,
                conffile=conffile or "",  # "" reads the default places, None would read none
                conf={
                    "client_mount_timeout": str(connect_timeout),
                    "rados_mon_op_timeout": str(op_timeout),
                    "rados_osd_op_timeout": str(op_timeout),
                },
            )
        except rados.ObjectNotFound:
            raise ConfigError(f"cannot read the Ceph configuration {where}") from None
        except rados.Error as exc:
            raise ConfigError(f"bad Ceph configuration {where}: {_reason(exc)}") from None
        try:
            self._cluster.connect(timeout=connect_timeout)
            self._ioctx = self._cluster.open_ioctx(pool)
            self._ioctx.set_namespace(namespace)
        except rados.ObjectNotFound:
            self.close()
            raise StoreUnavailable(f"cannot open {self.url}: pool {pool} does not exist") from None
        except rados.Error as exc:
            self.close()
            raise StoreUnavailable(f"cannot connect to the Ceph cluster of {where}: {_reason(exc)}") from None

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _unavailable(self, action: str, key: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"cannot {action} {key} in {self.url}: {_reason(exc)}")

    def put(self, key: str, data: bytes | memoryview) -> None:
        name = self._name(key)
        try:
            # write_full replaces the object in one OSD transaction: readers never see a mix.
            self._ioctx.write_full(name, data if isinstance(data, bytes) else bytes(data))
        except self._rados_mod.Error as exc:
            raise self._unavailable("write", key, exc) from None

    def get(self, key: str) -> bytes:
        name = self._name(key)
        rados = self._rados_mod
        try:
            while True:
                size, _mtime = self._ioctx.stat(name)
                # One read op is atomic against write_full. Asking for one byte more than the stat
                # reported tells a complete value from one that grew in between (then read again).
                data = self._ioctx.read(name, size + 1)
                if len(data) <= size:
                    return data
        except rados.ObjectNotFound:
            raise ObjectMissing(f"object {key} is missing from {self.url}") from None
        except rados.Error as exc:
            raise self._unavailable("read", key, exc) from None

    def size(self, key: str) -> int:
        name = self._name(key)
        try:
            return int(self._ioctx.stat(name)[0])
        except self._rados_mod.ObjectNotFound:
            raise ObjectMissing(f"object {key} is missing from {self.url}") from None
        except self._rados_mod.Error as exc:
            raise self._unavailable("stat", key, exc) from None

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self._ioctx.remove_object(name)
        except self._rados_mod.ObjectNotFound:
            pass
        except self._rados_mod.Error as exc:
            raise self._unavailable("delete", key, exc) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        # RADOS cannot list by name prefix: this walks every object of the pool (in our namespace), so
        # stores sharing a pool pay for each other's objects. A namespace per store avoids that.
        want = self.prefix + prefix
        skip = len(self.prefix)
        try:
            for obj in self._ioctx.list_objects():
                if obj.key.startswith(want):
                    yield obj.key[skip:]
        except self._rados_mod.Error as exc:
            raise StoreUnavailable(f"cannot list {self.url}: {_reason(exc)}") from None

    def close(self) -> None:
        ioctx, cluster = self._ioctx, self._cluster
        self._ioctx = self._cluster = None
        if ioctx is not None:
            ioctx.close()
        if cluster is not None:
            cluster.shutdown()

    def __repr__(self) -> str:
        return f"RadosStore({self.url!r})"


def _reason(exc: Exception) -> str:
    """One line for a librados error; ENOSPC and EDQUOT get the words a user acts on."""
    code = getattr(exc, "errno", None)
    if code is not None and abs(code) in (errno.ENOSPC, errno.EDQUOT):
        return "store is full"
    return " ".join(str(exc).split()) or type(exc).__name__
