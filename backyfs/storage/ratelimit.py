"""Byte-rate limits: a token bucket shared by threads, and a store wrapper that applies one to puts."""

from __future__ import annotations

import threading
import time

from backyfs.storage.base import ObjectStore, StoreWrapper

WAIT_SLICE_S = 0.1  # a cancelled wait ends within this: Ctrl-C must not wait out hours of debt

_scope = threading.local()  # .stop: the Event that cancels this thread's waits (see cancel_waits_on)


class WaitCancelled(Exception):
    """A rate-limit wait ended early because its thread's work is being stopped (Ctrl-C, an error)."""


def cancel_waits_on(stop: threading.Event | None) -> None:
    """Make this thread's rate-limit waits end, raising WaitCancelled, once STOP is set (None: never).
    Per thread, not per bucket: a store's bucket is shared with work that is not being stopped (a
    server's reads while one overlay commit is interrupted). For a pool's initializer."""
    _scope.stop = stop


class TokenBucket:
    """Allows `rate` bytes per second on average, with bursts of up to one second's worth."""

    def __init__(self, rate_bytes_s: float) -> None:
        self.rate = float(rate_bytes_s)
        self.capacity = max(self.rate, 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def consume(self, nbytes: int) -> None:
        """Block until nbytes may pass. Requests larger than the bucket go into debt, so a 4 MiB block
        under a 1 MB/s limit waits about 4 s instead of forever."""
        if self.rate <= 0:
            return
        stop: threading.Event | None = getattr(_scope, "stop", None)
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= nbytes
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
            # Sleeping under the lock serialises waiters, which is what keeps the average rate honest.
            deadline = now + wait
            while wait > 0:
                if stop is not None and stop.is_set():
                    self.tokens += nbytes  # they never pass: the debt is not the next waiter's
                    raise WaitCancelled("rate-limit wait cancelled")
                time.sleep(min(wait, WAIT_SLICE_S) if stop is not None else wait)
                wait = deadline - time.monotonic()


class RateLimitedStore(StoreWrapper):
    def __init__(self, inner: ObjectStore, write_bytes_s: float = 0, read_bytes_s: float = 0) -> None:
        super().__init__(inner)
        self.write_bucket = TokenBucket(write_bytes_s) if write_bytes_s > 0 else None
        self.read_bucket = TokenBucket(read_bytes_s) if read_bytes_s > 0 else None

    def put(self, key: str, data: bytes | memoryview) -> None:
        if self.write_bucket:
            self.write_bucket.consume(len(data))
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        if self.read_bucket:
            self.read_bucket.consume(len(data))
        return data
