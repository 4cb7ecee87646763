"""Rate limits: the token bucket's accounting (on a fake clock and on the real one) and the CLI's
--read-limit / --write-limit measured as bytes over wall time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import BS, RepoEnv, files_equal, write_image

from backyfs.storage import ratelimit
from backyfs.storage.fs import FilesystemStore
from backyfs.storage.ratelimit import RateLimitedStore, TokenBucket

MB = 1_000_000


class FakeClock:
    """Stands in for the time module inside backyfs.storage.ratelimit: sleep() advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        self.slept += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(ratelimit, "time", fake)
    return fake


def test_bucket_allows_one_second_burst_then_the_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(10 * MB)
    for _ in range(10):  # the first second's worth passes at once
        bucket.consume(MB)
    assert clock.slept == 0
    for _ in range(40):
        bucket.consume(MB)
    assert clock.slept == pytest.approx(4.0)  # 40 MB more at 10 MB/s


def test_bucket_refills_while_idle_but_not_beyond_capacity(clock: FakeClock) -> None:
    bucket = TokenBucket(MB)
    bucket.consume(MB)
    clock.now += 100  # idle: the bucket refills to one second's worth, not 100
    bucket.consume(2 * MB)
    assert clock.slept == pytest.approx(1.0)


def test_request_larger_than_the_bucket_goes_into_debt(clock: FakeClock) -> None:
    bucket = TokenBucket(MB)
    bucket.consume(4 * MB)  # one 4 MB block under 1 MB/s: waits 3 s, not forever
    assert clock.slept == pytest.approx(3.0)
    bucket.consume(MB)
    assert clock.slept == pytest.approx(4.0)


def test_rate_zero_is_unlimited(clock: FakeClock) -> None:
    bucket = TokenBucket(0)
    for _ in range(100):
        bucket.consume(1 << 30)
    assert clock.slept == 0


def test_store_wrapper_counts_puts_and_gets_separately(clock: FakeClock, tmp_path: Path) -> None:
    inner = FilesystemStore(str(tmp_path / "s"), fsync=False)
    store = RateLimitedStore(inner, write_bytes_s=2 * MB, read_bytes_s=5 * MB)
    payload = bytes(MB)
    for i in range(10):
        store.put(f"k/{i}", payload)
    assert clock.slept == pytest.approx(4.0)  # (10 MB - 2 MB burst) / 2 MB/s
    for i in range(10):
        assert store.get(f"k/{i}") == payload
    assert clock.slept == pytest.approx(4.0 + 1.0)  # (10 MB - 5 MB burst) / 5 MB/s
    assert store.exists("k/0") and store.size("k/0") == MB


def test_bucket_shared_by_threads_holds_the_rate_in_real_time() -> None:
    rate = 4 * MB
    bucket = TokenBucket(rate)
    bucket.consume(rate)  # drain the initial burst: from here on only the rate counts
    chunk, per_thread, threads = 64 * 1024, 16, 4
    total = chunk * per_thread * threads  # ~4.2 MB: about one second

    def worker() -> None:
        for _ in range(per_thread):
            bucket.consume(chunk)

    started = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - started
    assert total / elapsed <= 1.1 * rate
    assert elapsed <= 2.5 * total / rate  # and it does not serialise into something much slower


# --- through the CLI -------------------------------------------------------------------------------
# A burst of one second passes at once, so each run moves about six seconds' worth of data: then the
# average rate stays under 1.3x the limit only if the limit holds.

def check_rate(nbytes: int, seconds: float, limit_mb_s: float) -> None:
    limit = limit_mb_s * MB
    assert nbytes / seconds <= 1.3 * limit, f"{nbytes / seconds / MB:.2f} MB/s over a {limit_mb_s} MB/s limit"
    assert seconds >= 0.7 * nbytes / limit


def test_read_limit(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand"] * 6)
    limit = 6 * BS / MB / 6  # six seconds' worth
    started = time.monotonic()
    res = repo_env.run("backup", img, "vm", "--json", "--read-limit", limit)
    wall = time.monotonic() - started
    assert res.rc == 0, res.err
    st = res.json()
    assert st["bytes_read"] == 6 * BS
    check_rate(st["bytes_read"], wall, limit)
    check_rate(st["bytes_read"], st["seconds"], limit)


def test_write_limit(repo_env: RepoEnv, tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", ["rand"] * 6 + ["hole"] * 4)
    limit = 6 * BS / MB / 6
    started = time.monotonic()
    res = repo_env.run("backup", img, "vm", "--json", "--write-limit", limit)
    wall = time.monotonic() - started
    assert res.rc == 0, res.err
    st = res.json()
    assert st["bytes_stored"] >= 6 * BS  # random data: stored raw
    check_rate(st["bytes_stored"], wall, limit)
    check_rate(st["bytes_stored"], st["seconds"], limit)
    out = tmp_path / "restored"
    repo_env.ok("restore", st["uid"], out)
    assert files_equal(img, out)
