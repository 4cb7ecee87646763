"""Input checks found by an audit: each bad input ends with one line on stderr and a non-zero exit,
and leaves nothing behind (no hidden restore file, no stuck process)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BACKYFS, RepoEnv, Result, tmpfs_mount, write_image
from test_bad_input import assert_one_line_error
from test_ratelimit import FakeClock

from backyfs.errors import BackyfsError
from backyfs.sources.file import FileTarget
from backyfs.storage import ratelimit
from backyfs.storage.ratelimit import TokenBucket, WaitCancelled, cancel_waits_on


def _restoring(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.backyfs-restore-*"))


@pytest.fixture
def uid(repo_env: RepoEnv, tmp_path: Path) -> str:
    return repo_env.backup(write_image(tmp_path / "img", ["rand", "hole", "text"]), "vm")["uid"]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_mount(tmp_path / "ro", "ro,size=1m") as mnt:
        yield mnt


def test_restore_target_that_appears_meanwhile_is_kept_and_named(repo_env: RepoEnv, uid: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another program creating the target while the restore runs: its file stays, the error says
    so (not 'Bad file descriptor'), and no full-size hidden file is left."""
    from backyfs.repository import restore as restore_module

    out = tmp_path / "out.img"
    real_restore = restore_module.restore

    def racing(*args: object, **kwargs: object) -> object:
        out.write_text("theirs")
        return real_restore(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(restore_module, "restore", racing)
    res = repo_env.call("restore", uid, out)
    assert_one_line_error(res, rc=1, contains=f"restore target {out} appeared during the restore")
    assert "removed the restored image" in res.err
    assert out.read_text() == "theirs" and _restoring(out) == []


def test_abandon_after_a_failed_finish_closes_nothing_else(tmp_path: Path) -> None:
    """finish() closed the fd before failing: abandon() must not close that number again (another
    file may have it by then)."""
    out = tmp_path / "out.img"
    target = FileTarget(str(out), 4096)
    target.pwrite(0, b"x" * 4096)
    out.write_text("theirs")
    with pytest.raises(BackyfsError, match="appeared during the restore"):
        target.finish()
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)  # likely the number just freed
    try:
        assert target.abandon() == "removed the restored image"
        os.fstat(other)  # still open
    finally:
        os.close(other)
    assert out.read_text() == "theirs" and _restoring(out) == []


def test_restore_to_an_empty_target_is_a_usage_error(repo_env: RepoEnv, uid: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    res = repo_env.call("restore", uid, "")
    assert_one_line_error(res, rc=2, contains="TARGET is empty")
    assert set(os.listdir(tmp_path)) == before


def test_restore_onto_a_read_only_filesystem_names_the_target(repo_env: RepoEnv, uid: str,
                                                              read_only_dir: Path) -> None:
    out = read_only_dir / "x.img"
    res = repo_env.run("restore", uid, out)
    assert_one_line_error(res, rc=1, contains=f"cannot open restore target {out}: Read-only file system")
    assert "backyfs-restore" not in res.err


# --- rate-limited work stops promptly -------------------------------------------------------------

def test_a_cancelled_wait_ends_at_once_and_leaves_no_debt() -> None:
    """A wait of hours (a tiny limit's debt) ends within a slice of its thread's stop being set."""
    bucket, stop = TokenBucket(1.0), threading.Event()  # one byte per second
    outcome: list[object] = []

    def worker() -> None:
        cancel_waits_on(stop)
        try:
            bucket.consume(4 << 20)
        except WaitCancelled as exc:
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.3)
    stopped = time.monotonic()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive() and isinstance(outcome[0], WaitCancelled)
    assert time.monotonic() - stopped < 2 * ratelimit.WAIT_SLICE_S + 0.2
    assert bucket.tokens > 0  # the bytes that never passed are not the next waiter's debt


def test_a_cancellable_wait_keeps_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sleeping in slices changes nothing of the accounting: 4 MB at 1 MB/s still waits 3 s."""
    clock = FakeClock()
    monkeypatch.setattr(ratelimit, "time", clock)
    bucket = TokenBucket(1e6)
    cancel_waits_on(threading.Event())
    try:
        bucket.consume(4_000_000)
        assert clock.slept == pytest.approx(3.0)
        bucket.consume(1_000_000)
        assert clock.slept == pytest.approx(4.0)
    finally:
        cancel_waits_on(None)


@pytest.mark.parametrize(("limit", "sig"), [("--read-limit", signal.SIGTERM), ("--read-limit", signal.SIGINT),
                                            ("--write-limit", signal.SIGTERM)],
                         ids=["read-SIGTERM", "read-SIGINT", "write-SIGTERM"])
def test_a_rate_limited_backup_stops_promptly(repo_env: RepoEnv, tmp_path: Path, limit: str,
                                              sig: signal.Signals) -> None:
    """Ctrl-C or SIGTERM under a tiny limit: out within a second or so (the workers waited out their
    whole debt, forever at 1e-9 MB/s), the version pending, and a re-run resumes it."""
    img = write_image(tmp_path / "img", ["rand"] * 4)
    proc = repo_env.popen("backup", img, "vm", limit, "1e-9")
    time.sleep(1.5)  # every worker is waiting for the limit by now
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
    assert time.monotonic() - sent < 3, "the backup waited for its rate limit after the signal"
    assert [v["state"] for v in repo_env.versions("vm")] == ["pending"]
    assert "resumed" in repo_env.ok("backup", img, "vm").err
    assert [v["state"] for v in repo_env.versions("vm")] == ["valid"]


def test_a_rate_limited_restore_stops_promptly(repo_env: RepoEnv, tmp_path: Path) -> None:
    """The restore's pool waited for its workers' read-limit waits after SIGTERM, as the backup's did."""
    img = write_image(tmp_path / "img", ["rand"] * 4)
    repo_env.backup(img, "vm")
    repo_env.use_config("[limits]\nread_mb_s = 1e-9\n")
    proc = repo_env.popen("restore", "vm", tmp_path / "out")
    time.sleep(1.5)  # every worker is waiting for the limit by now
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert time.monotonic() - sent < 3, "the restore waited for its rate limit after the signal"
    assert not list(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()


# --- --hints ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "message"), [
    (b'[{"offset": Infinity, "length": 1}]', "entry 0: offset must be an integer, not Infinity"),
    (b'[{"offset": 1e400, "length": 1}]', "entry 0: offset must be an integer"),
    (b'[{"offset": 0, "length": NaN}]', "entry 0: length must be an integer, not NaN"),
    (b'[{"offset": 0, "length": 1}, {"offset": "4096", "length": 1}]',
     'entry 1: offset must be an integer, not "4096"'),
    (b'[{"offset": true, "length": 1}]', "entry 0: offset must be an integer, not true"),
    (b'[{"offset": 0.5, "length": 1}]', "entry 0: offset must be an integer, not 0.5"),
    (b'[{"offset": 0, "length": 1e30}]', "entry 0: length must be an integer, not 1e+30"),
    (b'[{"offset": 9223372036854775807, "length": 1}]', "entry 0 ends past the largest possible offset"),
    (b'[{"offset": 0, "length": 1' + b"0" * 5000 + b"}]", "a number has too many digits"),
    (b"[" * 100_000, "nested too deeply"),
    (b"\xff\xfe[", "is not UTF-8 text (byte 0)"),
    (b"[7]", "entry 0 needs integer offset and length"),
], ids=["infinity", "1e400", "nan", "string", "bool", "fraction", "float-length", "past-2^63", "digits",
        "nested", "not-utf8", "not-an-object"])
def test_bad_hints_entries(repo_env: RepoEnv, tmp_path: Path, content: bytes, message: str) -> None:
    image = write_image(tmp_path / "img", ["rand", "hole", "text"])
    uid = repo_env.backup(image, "vm")["uid"]
    hints = tmp_path / "hints.json"
    hints.write_bytes(content)
    res = repo_env.run("backup", image, "vm", "--hints", hints)
    assert_one_line_error(res, rc=1, contains=f"hints file {hints}")
    assert message.lower() in res.err.lower(), res.err
    assert [v["uid"] for v in repo_env.versions()] == [uid]


def test_good_hints_still_load(tmp_path: Path) -> None:
    from backyfs.repository.extents import Extent, load_hints

    hints = tmp_path / "hints.json"
    hints.write_text('[{"offset": 0, "length": 4096, "exists": "true"}, {"offset": 8192, "length": 0,'
                     ' "exists": "false"}]')
    assert load_hints(str(hints)) == [Extent(0, 4096), Extent(8192, 0, False)]


# --- the config ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("toml", "message"), [
    ('data_dir = "x\\u0000y"\n', "data_dir must not contain a NUL character"),
    ('[store]\npath = "a\\u0000b"\n', "store.path must not contain a NUL character"),
    ('[jobs.X]\nsource = "a\\u0000b"\n', "jobs.X.source must not contain a NUL character"),
    ('[jobs.X]\nsource = "a"\nargs = ["--read-limit", "1\\u0000"]\n', "jobs.X.args[1] must not contain"),
    ('[jobs.X]\nsource = "a"\nlabels = { "t\\u0000" = "x" }\n', "the name 'jobs.X.labels.t\\x00' must not"),
    ('[jobs.X]\nsource = "a"\nmax_age_hours = nan\n', "max_age_hours must be a finite number, not nan"),
    ("[limits]\nread_mb_s = nan\n", "read_mb_s must be a finite number, not nan"),
    ("[limits]\nwrite_mb_s = inf\n", "write_mb_s must be a finite number, not inf"),
    ('[store]\ntype = "s3"\nbucket = "b"\nread_timeout = -inf\n', "read_timeout must be a finite number"),
], ids=["data-dir-nul", "store-path-nul", "job-source-nul", "job-args-nul", "label-name-nul",
        "max-age-nan", "read-limit-nan", "write-limit-inf", "s3-timeout-inf"])
def test_bad_config_values(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
    env["BACKYFS_DATA_DIR"] = str(tmp_path / "data")
    for args in (["--config", str(config), "jobs"], ["--config", str(config), "backup", str(config), "v"]):
        proc = subprocess.run([BACKYFS, *args], env=env, capture_output=True, text=True, timeout=60)
        assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), rc=1,
                              contains=f"config {config}: ")
        assert message.lower() in proc.stderr.lower(), proc.stderr


def test_non_finite_numbers_are_out_of_every_range() -> None:
    from backyfs.config import _in_range
    from backyfs.errors import ConfigError

    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ConfigError, match="must be at least 0"):
            _in_range("config x", "read_mb_s", value, 0)
    _in_range("config x", "read_mb_s", 2.5, 0)


def test_an_empty_config_path_is_an_error(repo_env: RepoEnv, uid: str) -> None:
    """Not the embedded default in silence: `--config "$CONF"` of an unset variable."""
    assert_one_line_error(repo_env.run("--config", "", "ls"), rc=1, contains="--config is empty")
    repo_env.env["BACKYFS_CONFIG"] = ""
    assert_one_line_error(repo_env.run("ls"), rc=1, contains="$BACKYFS_CONFIG is set but empty")
    del repo_env.env["BACKYFS_CONFIG"]
    assert repo_env.run("ls").rc == 0
