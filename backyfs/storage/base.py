"""The object store interface every backend implements.

Keys are '/'-separated strings such as ``blocks/ab/abcdef...`` or ``versions/<uid>.json``. Values are bytes.
A put is atomic (a reader sees the whole old value, the whole new one, or nothing) and idempotent, which is
what lets many hosts share one content-addressed store.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator


class ObjectStore(abc.ABC):
    """Backend contract. Raise ObjectMissing from get() for an absent key, StoreUnavailable when the
    backend cannot be reached, and never return partial data."""

    #: a short description for messages, e.g. "file:/var/lib/backyfs/store" (never with secrets)
    url: str = ""

    @abc.abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store data under key, atomically and durably, replacing any previous value."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the value of key or raise ObjectMissing."""

    def exists(self, key: str) -> bool:
        """True if key is stored. The default asks size(); backends with a cheaper test override it."""
        from backyfs.errors import ObjectMissing

        try:
            self.size(key)
        except ObjectMissing:
            return False
        return True

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; deleting an absent key is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key starting with prefix, in no particular order."""

    def size(self, key: str) -> int:
        """Stored size in bytes of key (raise ObjectMissing). Backends override this with a cheap stat."""
        return len(self.get(key))

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, size) for every key starting with prefix. The default asks size() per key (one
        request each); backends whose listing carries sizes (S3) override it."""
        from backyfs.errors import ObjectMissing

        for key in self.list(prefix):
            try:
                yield key, self.size(key)
            except ObjectMissing:  # deleted since the listing
                continue

    def get_split(self, key: str, head: int) -> tuple[bytes, bytes | memoryview]:
        """The value of key as (first `head` bytes, the rest). Backends that can read the two parts
        separately override this, so a caller needing just the rest gets it without a copy."""
        data = self.get(key)
        return data[:head], memoryview(data)[head:]

    def put_split(self, key: str, head: bytes, rest: bytes | memoryview) -> None:
        """put(key, head + rest). Backends that can write the two parts as they are override this,
        so a caller with a header to prepend to a large value does not copy the value."""
        self.put(key, head + rest)

    def will_need(self, keys: list[str]) -> None:
        """A hint that keys will be read soon. Backends that can start those reads in the background
        for free do (the filesystem: kernel readahead); the default does nothing. Wrappers inherit
        the no-op rather than forward it: a rate limit must see every byte read."""

    def flush(self) -> None:
        """Make every put so far durable. Backends whose put is durable on return do nothing."""

    def sweep_temporary(self, older_than_s: float) -> int:
        """Remove what puts killed midway left (a filesystem's temporary files) and that is older
        than older_than_s; returns how many. Backends whose puts leave nothing do nothing."""
        return 0

    def close(self) -> None:
        """Release connections. The default has nothing to release."""


class StoreWrapper(ObjectStore):
    """Base for wrappers: forwards every call to the inner store."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list_sizes(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        return self.inner.list_sizes(prefix)

    def flush(self) -> None:
        self.inner.flush()

    def sweep_temporary(self, older_than_s: float) -> int:
        return self.inner.sweep_temporary(older_than_s)

    def close(self) -> None:
        self.inner.close()
