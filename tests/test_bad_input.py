"""Bad input of every kind: one line on stderr starting with "backyfs:", a non-zero exit, no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BACKYFS,
    BS,
    RepoEnv,
    Result,
    block_files,
    files_equal,
    read_block,
    tmpfs_mount,
    write_image,
)


def assert_one_line_error(res: Result, *, rc: int | None = None, contains: str = "") -> None:
    assert res.rc != 0, f"exit 0 for bad input; stdout: {res.out}"
    if rc is not None:
        assert res.rc == rc, res.err
    assert "Traceback" not in res.err, res.err
    assert len(res.err_lines) == 1, f"expected one line on stderr, got:\n{res.err}"
    assert res.err_lines[0].startswith("backyfs:"), res.err
    assert contains.lower() in res.err.lower(), f"{contains!r} not in {res.err!r}"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return write_image(tmp_path / "img", ["rand", "hole", "text"], tail=10)


@pytest.fixture
def with_version(repo_env: RepoEnv, image: Path) -> str:
    return repo_env.backup(image, "vm")["uid"]


@pytest.mark.parametrize("args", [
    ["restore", "0123456789ab", "{tmp}/out"],
    ["restore", "no-such-volume", "{tmp}/out"],
    ["restore", "ffff", "{tmp}/out"],
    ["show", "0123456789ab"],
    ["rm", "0123456789ab"],
    ["protect", "nothing"],
    ["label", "abcdef123456", "a=b"],
    ["deep-scrub", "0123456789ab"],
], ids=lambda a: "-".join(a[:2]))
def test_unknown_version(repo_env: RepoEnv, with_version: str, tmp_path: Path, args: list[str]) -> None:
    res = repo_env.run(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(res, rc=1, contains="unknown version")
    assert not (tmp_path / "out").exists()


def test_missing_source(repo_env: RepoEnv, tmp_path: Path) -> None:
    res = repo_env.run("backup", tmp_path / "nope.img", "vm")
    assert_one_line_error(res, rc=1, contains="No such file")
    assert repo_env.versions() == []


def test_directory_as_source(repo_env: RepoEnv, tmp_path: Path) -> None:
    res = repo_env.run("backup", tmp_path, "vm")
    assert_one_line_error(res, rc=1, contains="neither a regular file nor a block device")


def test_fifo_as_source_does_not_hang(repo_env: RepoEnv, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    res = repo_env.run("backup", fifo, "vm", timeout=20)
    assert_one_line_error(res, rc=1, contains="neither a regular file")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="backyfs-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_unreadable_source(shared_dir: Path, nobody_can_run_cli: None) -> None:
    img = write_image(shared_dir / "img", ["rand"])
    img.chmod(0)
    data = shared_dir / "data"
    data.mkdir(mode=0o777)
    data.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
    env["BACKYFS_DATA_DIR"] = str(data)
    # Root reads anything: run as nobody, with nobody's group and no supplementary (root) groups.
    drop = {"user": 65534, "group": 65534, "extra_groups": []} if os.geteuid() == 0 else {}
    proc = subprocess.run([BACKYFS, "backup", str(img), "vm"], env=env, capture_output=True, text=True,
                          timeout=60, cwd="/", **drop)
    assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), rc=1,
                          contains="Permission denied")


def test_corrupt_store_object(repo_env: RepoEnv, image: Path, with_version: str, tmp_path: Path) -> None:
    obj = repo_env.block_object(read_block(image, 0))
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    res = repo_env.run("restore", with_version, tmp_path / "out")
    assert_one_line_error(res, rc=3, contains="block 0 at offset 0")
    assert "corrupt" in res.err


@pytest.mark.parametrize(("config", "message"), [
    ("block_size = [unclosed\n", "not valid TOML"),
    ("colour = 'blue'\n", "unknown setting(s) colour"),
    ("block_size = '3MiB'\n", "power of two"),
    ("block_size = '32KiB'\n", "power of two"),
    ("block_size = 'lots'\n", "bad size"),
    ("threads = 0\n", "threads"),
    ("threads = 'many'\n", "threads"),
    ("[store]\ntype = 'tape'\n", "store type"),
    ("[store]\ntype = 'fs'\ncolour = 'blue'\n", "[store]"),
    ("[limits]\nread_mb_s = 'fast'\n", "[limits]: read_mb_s must be a number, not 'fast'"),
    ("threads = true\n", "threads must be an integer, not True"),
    ("compression_level = 99\n", "compression_level must be from 0 to 22, not 99"),
    ("[cache]\nmemory_mbb = 512\n", "[cache]: unknown setting(s) memory_mbb"),
    ("[cache]\ndisk_mb = -1\n", "[cache]: disk_mb must be at least 0, not -1"),
    ("cache = 5\n", "cache must be a table, not 5"),
    ("[store]\ntype = 's3'\nendpoint_url = 'http://127.0.0.1:1'\n", "[store] of type s3 needs bucket"),
    ("[store]\ntype = 's3'\nbucket = 'b'\npath_style = 'yes'\n", "path_style must be true or false"),
    ("[store]\ntype = 's3'\nbucket = 'b'\nsecret_key = 31415926\n",
     "secret_key must be a string, not an integer"),
    ("[store]\ntype = ['s3']\n", "store type must be fs, s3 or rados, not ['s3']"),
    ("[store]\ntype = 's3'\nbucket = 'Bad_Bucket!'\nendpoint_url = 'http://127.0.0.1:1'\n",
     "Invalid bucket name \"Bad_Bucket!\" (a bucket name is letters, digits, '.', '-' and '_')"),
    ("[store]\ntype = 's3'\nbucket = 'b'\nendpoint_url = '127.0.0.1:9000'\n",
     "endpoint_url must be http://HOST[:PORT] or https://HOST[:PORT], not '127.0.0.1:9000'"),
    ("[store]\ntype = 's3'\nbucket = 'b'\nendpoint_url = 'http://127.0.0.1 :9000'\n",
     "endpoint_url must be http://HOST[:PORT] or https://HOST[:PORT], not 'http://127.0.0.1 :9000'"),
    ("[store]\ntype = 's3'\nbucket = 'b'\nendpoint_url = 'http://[::1'\n", "not 'http://[::1'"),
    ("[store]\ntype = 's3'\nbucket = 'b'\nendpoint_url = 'http://minio_1:9000'\n", "not 'http://minio_1:9000'"),
    ("[store]\ntype = 's3'\nbucket = 'b'\nendpoint_url = 'https://admin:31415926@127.0.0.1:1'\n",
     "without credentials in it: use access_key and secret_key"),
    ("[store]\ntype = 's3'\nbucket = 'b'\nsecret_key = '31415926'\nendpoint_url = 'http://127.0.0.1:1'\n",
     "needs both access_key and secret_key, or neither"),
    ("[jobs.a]\nsource = 5\n", "[jobs.a]: source must be a string, not 5"),
    ("[jobs.a]\nsource = '/x'\nkeep = { lastt = 3 }\n", "[jobs.a] keep: unknown setting(s) lastt"),
], ids=["bad-toml", "unknown-key", "block-size-3MiB", "block-size-small", "block-size-word",
        "threads-0", "threads-word", "store-type", "store-key", "limit-word", "threads-bool",
        "compression-99", "cache-typo", "cache-negative", "cache-not-table", "s3-no-bucket",
        "s3-path-style-word", "s3-secret-not-echoed", "store-type-list", "s3-bad-bucket-name",
        "s3-endpoint-no-scheme", "s3-endpoint-space", "s3-endpoint-bracket", "s3-endpoint-underscore",
        "s3-endpoint-password", "s3-secret-without-key", "job-source-int", "job-keep-typo"])
def test_wrong_config(tmp_path: Path, image: Path, config: str, message: str) -> None:
    cfg = tmp_path / "backyfs.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n{config}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
    proc = subprocess.run([BACKYFS, "--config", str(cfg), "backup", str(image), "vm"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), rc=1, contains=message)
    assert "31415926" not in proc.stderr  # the secret of the s3-secret-not-echoed case


def test_a_config_that_is_not_utf8(tmp_path: Path, image: Path) -> None:
    """A config saved in Latin-1 gave a UnicodeDecodeError traceback."""
    cfg = tmp_path / "backyfs.toml"
    cfg.write_bytes(f'data_dir = "{tmp_path / "data"}"\n# caf\xe9\n'.encode("latin-1"))
    proc = subprocess.run([BACKYFS, "--config", str(cfg), "ls"], capture_output=True, text=True, timeout=60)
    assert_one_line_error(Result(proc.returncode, proc.stdout, proc.stderr), rc=1,
                          contains=f"config {cfg} is not UTF-8 text")


def test_the_documented_config_is_accepted(tmp_path: Path) -> None:
    """The example in backyfs/config.py's docstring, which names every setting, loads as written,
    and with its commented S3 and RADOS settings filled in too."""
    import backyfs.config as config

    example = config.__doc__.split("\n\n", 2)[2]
    assert "[store]" in example and "[jobs.vm1-root]" in example
    cfg_path = tmp_path / "example.toml"
    cfg_path.write_text(example)
    cfg = config.load_config(str(cfg_path))
    assert (cfg.threads, cfg.cache_disk_mb, cfg.jobs["vm1-root"]["keep"]["weekly"]) == (4, 4096, 8)
    for kind in ("s3", "rados"):  # the comment's list of each store's settings
        keys = re.search(rf"# {kind}:\s*(.+)", example).group(1).split(", ")
        values = {"path_style": "true", "endpoint_url": repr("http://x")}
        store = "\n".join(f"{k} = {values.get(k, repr('x'))}" for k in keys)
        cfg_path.write_text(f'[store]\ntype = "{kind}"\n{store}\n')
        assert config.load_config(str(cfg_path)).store["type"] == kind


def test_missing_config_file(repo_env: RepoEnv, tmp_path: Path) -> None:
    res = repo_env.run("--config", tmp_path / "nope.toml", "ls")
    assert_one_line_error(res, rc=1, contains="cannot read config")


@pytest.mark.parametrize("name", ["a b", "../etc", "x" * 200, "0123456789ab", "vm/1", "_x", "ümlaut"])
def test_invalid_volume_name(repo_env: RepoEnv, image: Path, name: str) -> None:
    res = repo_env.run("backup", image, name)
    assert_one_line_error(res, rc=1, contains="invalid volume name")
    assert repo_env.versions() == []


def test_restore_onto_existing_file_needs_force(repo_env: RepoEnv, image: Path, with_version: str,
                                                tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    res = repo_env.run("restore", with_version, target)
    assert_one_line_error(res, rc=1, contains="--force")
    assert target.read_bytes() == b"keep me"
    repo_env.ok("restore", with_version, target, "--force")
    assert files_equal(image, target)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_mount(tmp_path / "small", "size=20m") as mnt:
        yield mnt


def test_full_disk(small_tmpfs: Path, tmp_path: Path) -> None:
    img = write_image(tmp_path / "big", ["rand"] * 10)  # 40 MiB of random data into 20 MiB
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
    env["BACKYFS_DATA_DIR"] = str(small_tmpfs / "data")

    def run(*args: str) -> Result:
        proc = subprocess.run([BACKYFS, *args], env=env, capture_output=True, text=True, timeout=120)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    res = run("backup", str(img), "vm")
    assert_one_line_error(res, rc=1, contains="full")
    listing = run("ls", "--json")
    assert listing.rc == 0, listing.err
    assert [v["state"] for v in listing.json()] == ["pending"]  # type: ignore[union-attr]
    assert run("restore", "vm", str(tmp_path / "out")).rc == 1
    assert not any(".tmp." in p.name for p in (small_tmpfs / "data" / "store").rglob("*"))


def test_metadata_on_a_full_or_read_only_filesystem_says_so(small_tmpfs: Path, tmp_path: Path) -> None:
    """SQLite says only "disk I/O error" or "unable to open database file": opening a database even
    to read it creates its write-ahead log beside it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
    env["BACKYFS_DATA_DIR"] = str(small_tmpfs / "data")

    def run(*args: str) -> Result:
        proc = subprocess.run([BACKYFS, *args], env=env, capture_output=True, text=True, timeout=120)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    assert run("backup", str(write_image(tmp_path / "img", ["text"])), "vm").rc == 0
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:  # fill the filesystem to the last byte
        with contextlib.suppress(OSError):
            while True:
                f.write(bytes(1 << 20))
    with contextlib.suppress(OSError):
        with open(filler, "ab") as f:
            while True:
                f.write(bytes(4096))
    assert_one_line_error(run("ls"), rc=1, contains=f"({small_tmpfs / 'data'} is on a full filesystem)")
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    # A repository on read-only media (a backup disk mounted ro) can still be listed and restored.
    assert run("ls").rc == 0
    assert run("restore", "vm", str(tmp_path / "out")).rc == 0
    assert files_equal(tmp_path / "img", tmp_path / "out")
    res = run("backup", str(tmp_path / "img"), "vm")
    assert_one_line_error(res, rc=1, contains="read-only")


def test_a_cleanly_closed_repository_on_read_only_media_is_listed_and_restored(small_tmpfs: Path,
                                                                                 tmp_path: Path) -> None:
    """A WAL database without its -shm file (every cleanly closed one) could not be opened on a
    read-only filesystem at all; the test above left -shm behind by failing first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
    env["BACKYFS_DATA_DIR"] = str(small_tmpfs / "data")

    def run(*args: str) -> Result:
        proc = subprocess.run([BACKYFS, *args], env=env, capture_output=True, text=True, timeout=120)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    assert run("backup", str(write_image(tmp_path / "img", ["text", "rand"])), "vm").rc == 0
    assert not list((small_tmpfs / "data").glob("*-shm"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    listing = run("ls", "--json")
    assert listing.rc == 0, listing.err
    assert [v["state"] for v in listing.json()] == ["valid"]  # type: ignore[union-attr]
    assert run("restore", "vm", str(tmp_path / "out")).rc == 0
    assert files_equal(tmp_path / "img", tmp_path / "out")
    assert_one_line_error(run("backup", str(tmp_path / "img"), "vm"), rc=1, contains="read-only")


def test_restore_onto_a_full_disk_removes_what_it_created(repo_env: RepoEnv, small_tmpfs: Path,
                                                          tmp_path: Path) -> None:
    """A restore that stops part-way leaves no full-size file that looks complete: one it created is
    removed; one it was told to overwrite (--force) is kept and called incomplete."""
    img = write_image(tmp_path / "big", ["rand"] * 10)  # 40 MiB into a 20 MiB tmpfs
    uid = repo_env.backup(img, "vm")["uid"]
    new = small_tmpfs / "new.img"
    res = repo_env.run("restore", uid, new)
    assert_one_line_error(res, rc=1, contains=f"removed the incomplete {new}")
    assert "No space left" in res.err and not new.exists()

    old = small_tmpfs / "old.img"
    old.write_bytes(b"old")
    res = repo_env.run("restore", uid, old, "--force")
    assert_one_line_error(res, rc=1, contains=f"{old} is incomplete")
    assert old.exists()


def test_interrupted_restore_removes_what_it_created(repo_env: RepoEnv, tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM (a timeout, systemctl stop) during a restore into a new file: exit 130 or
    143, and the partial file is gone (SIGTERM left it); after kill -9, a later restore removes it."""
    repo_env.use_config("[limits]\nread_mb_s = 16\n")  # 32 MiB of blocks take ~2 s to read
    uid = repo_env.backup(write_image(tmp_path / "img", ["rand"] * 8), "vm")["uid"]
    out = tmp_path / "out.img"
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        proc = repo_env.popen("restore", uid, out)
        deadline = time.monotonic() + 30
        while not _restoring(out) and time.monotonic() < deadline:  # the restore has begun writing
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert not out.exists()  # a killed restore never leaves a file that looks complete
        if sig != signal.SIGKILL:
            assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
            assert f"removed the incomplete {out}" in err and not _restoring(out)
    partial, = _restoring(out)  # after kill -9: the hidden partial file, named for what it is
    repo_env.ok("restore", uid, out)
    assert files_equal(tmp_path / "img", out)
    assert _restoring(out) == [partial]  # young: maybe a live restore of another PID namespace
    os.utime(partial, (time.time() - 3600, time.time() - 3600))
    out.unlink()
    repo_env.ok("restore", uid, out)
    assert _restoring(out) == []  # a dead process's, untouched for an hour: removed


def _restoring(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.backyfs-restore-*"))


@pytest.mark.parametrize("size", [100, 4096, "half"])
def test_truncated_metadata_db(repo_env: RepoEnv, image: Path, with_version: str, tmp_path: Path,
                               size: int | str) -> None:
    db = repo_env.db_path
    assert not Path(f"{db}-wal").exists()
    os.truncate(db, db.stat().st_size // 2 if size == "half" else int(size))
    for args in (["ls"], ["show", with_version], ["restore", with_version, tmp_path / "out"],
                 ["backup", image, "vm"], ["scrub", "--all"], ["rebuild-db"]):
        res = repo_env.run(*args)
        assert_one_line_error(res, rc=1, contains="metadata database")


def test_metadata_db_truncated_to_nothing_is_rebuilt(repo_env: RepoEnv, image: Path, with_version: str,
                                                     tmp_path: Path) -> None:
    os.truncate(repo_env.db_path, 0)  # an empty file is an empty database ...
    assert repo_env.versions() == []
    assert_one_line_error(repo_env.run("show", with_version), rc=1, contains="unknown version")
    repo_env.ok("rebuild-db", subprocess_=True)  # ... which rebuild-db fills from the store
    assert [v["uid"] for v in repo_env.versions()] == [with_version]
    repo_env.ok("restore", with_version, tmp_path / "out")
    assert files_equal(image, tmp_path / "out")


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not JSON"),
    ('{"offset": 0}', "expected a JSON list"),
    ('[{"length": 4096}]', "entry 0 needs integer offset and length"),
    ('[{"offset": 0, "length": 10}, {"offset": "x", "length": 1}]', "entry 1"),
    ('[{"offset": -4096, "length": 4096}]', "negative"),
    (None, "cannot read hints file"),
], ids=["not-json", "not-a-list", "no-offset", "bad-offset", "negative", "missing-file"])
def test_bad_hints_file(repo_env: RepoEnv, image: Path, with_version: str, tmp_path: Path,
                        content: str | None, message: str) -> None:
    hints = tmp_path / "hints.json"
    if content is not None:
        hints.write_text(content)
    res = repo_env.run("backup", image, "vm", "--hints", hints)
    assert_one_line_error(res, rc=1, contains=message)
    assert [v["uid"] for v in repo_env.versions()] == [with_version]


def test_hints_without_a_parent(repo_env: RepoEnv, image: Path, tmp_path: Path) -> None:
    hints = tmp_path / "hints.json"
    hints.write_text(f'[{{"offset": 0, "length": {BS}}}]')
    res = repo_env.run("backup", image, "vm", "--hints", hints)
    assert_one_line_error(res, rc=1, contains="no valid version to diff against")


@pytest.mark.parametrize("args", [["scrub"], ["deep-scrub", "--all", "--percent", "0"],
                                  ["label", "vm", "novalue"], ["backup", "{img}", "vm", "--label", "=x"],
                                  ["serve", "--listen", "127.0.0.1:99999", "vm"],
                                  ["serve", "--overlay", "x", "vm"], ["prune"],
                                  ["mount", "--overlay", "x", "{tmp}"], ["backup", "{img}", "cafe"],
                                  ["scrub", "nosuch", "--all"], ["backup", "{img}", "vm", "--full", "--hints",
                                                                 "{img}"]],
                         ids=["scrub-nothing", "percent-0", "bad-label", "bad-backup-label", "serve-port",
                              "overlay-read-only", "prune-no-rule", "mount-overlay-read-only",
                              "hex-volume-name", "scrub-version-and-all", "full-with-hints"])
def test_usage_errors(repo_env: RepoEnv, with_version: str, image: Path, tmp_path: Path,
                      args: list[str]) -> None:
    """A command line that asks for something impossible: exit 2, as argparse's own errors."""
    res = repo_env.run(*[a.format(img=image, tmp=tmp_path) for a in args])
    assert_one_line_error(res, rc=2)


@pytest.mark.parametrize("args", [["serve", "--socket", "/nonexistent/dir/s.sock", "vm"],
                                  ["serve", "--writable", "--overlay", "../x", "vm"],
                                  ["mount", "{nonempty}"], ["ls", "\udcff"], ["label", "vm", "\udcff=1"]],
                         ids=["serve-socket-dir", "serve-overlay-name", "mount-not-empty",
                              "not-utf8-volume", "not-utf8-label"])
def test_bad_arguments(repo_env: RepoEnv, with_version: str, image: Path, tmp_path: Path,
                       args: list[str]) -> None:
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "file").touch()
    args = [a.format(img=image, nonempty=nonempty) for a in args]
    res = repo_env.run(*args)
    assert_one_line_error(res, rc=1)


def test_help_to_a_reader_that_goes_away_ends_quietly(repo_env: RepoEnv) -> None:
    """`backyfs --help | head -1`: 141 and no traceback, as for any other output."""
    for args in (["--help"], ["backup", "--help"], ["--version"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run([BACKYFS, *args], env=repo_env.env, stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        assert (proc.returncode, proc.stderr) == (141, ""), args


def test_a_reader_that_goes_away_ends_output_quietly(repo_env: RepoEnv, image: Path) -> None:
    """`backyfs ls | head -1`: the closed pipe ends the command with 141 (as SIGPIPE would) and no
    message, not an error or a traceback."""
    for i in range(3):
        repo_env.backup(image, f"vm{i}")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([BACKYFS, "ls"], env=repo_env.env, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_a_reader_that_leaves_after_part_of_a_long_output_gets_141(repo_env: RepoEnv, image: Path) -> None:
    """`backyfs label ... | head -c1` with over 64 KiB to print: the one large write was cut short
    without an error, and the command exited 0 with its output truncated."""
    uid = repo_env.backup(image, "vm")["uid"]
    labels = [f"k{i}={'v' * 30_000}" for i in range(4)]
    proc = subprocess.run(f"{BACKYFS} label {uid} {' '.join(labels)} | head -c1 >/dev/null; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", env=repo_env.env,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_labels_with_control_characters_are_refused(repo_env: RepoEnv, image: Path) -> None:
    uid = repo_env.backup(image, "vm")["uid"]
    assert_one_line_error(repo_env.run("label", uid, "k=a\nfake-row"), rc=2, contains="control characters")


def test_every_command_explains_itself() -> None:
    """--help of every command has a description beyond its one-line summary, and every argument and
    option of every command (subcommands included) says what it is."""
    import argparse

    from backyfs.cli.main import build_parser

    def arguments(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.Action]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from arguments(sub, f"{name} {sub_name}")
            elif not isinstance(action, argparse._HelpAction):
                yield name, action

    commands = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    summaries = {choice.dest: choice.help for choice in commands._choices_actions}
    for name, parser in commands.choices.items():
        assert parser.description and parser.description != summaries[name], name
        assert len(parser.description.splitlines()) >= 2 or len(parser.description) > 100, name
        for where, action in arguments(parser, name):
            assert action.help, f"{where}: {action.option_strings or action.dest} has no help"


def test_the_parser_loads_only_what_a_command_needs() -> None:
    """A core command's run builds a parser without the NBD/FUSE modules (start-up time); anything
    else, the top-level help included, gets every command."""
    from backyfs.cli.main import _command_word, build_parser

    def commands(argv: list[str]) -> set[str]:
        parser = build_parser(_command_word(argv))
        return set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]

    every = commands([])
    assert {"backup", "serve", "mount", "overlay", "jobs"} <= every
    assert "serve" not in commands(["--config", "serve", "-v", "backup", "rbd:p/i", "vm"])
    for argv in (["serve", "vm"], ["-h", "backup"], ["--help"], ["--verbose"], ["nonsense"]):
        assert commands(argv) == every, argv


def test_a_metadata_database_error_is_one_line(repo_env: RepoEnv, image: Path, monkeypatch) -> None:
    """SQLite failing (a full disk, a lock held past the timeout) is an error line, not a traceback."""
    import sqlite3

    from backyfs.metadata.db import MetadataDB

    def full(self, version) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(MetadataDB, "add_version", full)
    res = repo_env.call("backup", image, "vm")
    expected = ["backyfs: error: metadata database: database or disk is full"]
    assert res.rc == 1 and res.err_lines == expected, res.err


def test_restore_does_not_write_through_a_dangling_symlink(repo_env: RepoEnv, image: Path,
                                                           with_version: str, tmp_path: Path) -> None:
    """A symlink at the target path pointing nowhere is an existing target: without --force the
    restore refuses it instead of creating the file it points at (which a failed restore would
    then leave behind, full-size, while removing the link)."""
    link, pointee = tmp_path / "t.img", tmp_path / "elsewhere.img"
    link.symlink_to(pointee)
    res = repo_env.run("restore", with_version, link)
    assert res.rc == 1 and "exists; use --force" in res.err, res.err
    assert not pointee.exists() and link.is_symlink()


@pytest.mark.parametrize("args, message", [
    (["--read-limit", "-5"], "argument --read-limit: must be 0 (no limit) or more, not -5"),
    (["--write-limit", "fast"], "argument --write-limit: must be a number, not 'fast'"),
    (["--verify-sample", "200"], "argument --verify-sample: must be a percentage from 0 to 100, not 200"),
])
def test_out_of_range_backup_options_are_usage_errors(repo_env: RepoEnv, image: Path, args: list[str],
                                                      message: str) -> None:
    res = repo_env.call("backup", image, "vm", *args)
    assert res.rc == 2 and res.err_lines[-1] == f"backyfs backup: error: {message}", res.err


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"), reason="needs root for a loop device")
def test_restore_refuses_a_mounted_device(repo_env: RepoEnv, image: Path, with_version: str,
                                          tmp_path: Path) -> None:
    """--force overwrites a device, but not one in use: the device is opened O_EXCL, which the
    kernel refuses while a filesystem on it is mounted."""
    disk = tmp_path / "loop.img"
    subprocess.run(["truncate", "-s", str(image.stat().st_size + (1 << 20)), str(disk)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(disk)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(disk)], capture_output=True, text=True,
                         check=True).stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            res = repo_env.run("restore", with_version, dev, "--force")
            assert res.rc == 1 and "is in use (mounted" in res.err, res.err
            assert (mnt / "lost+found").is_dir()  # the filesystem is untouched
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        repo_env.ok("restore", with_version, dev, "--force")  # unmounted, it may be overwritten
        with open(dev, "rb") as f:
            assert f.read(image.stat().st_size) == image.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_data_dir_without_a_repository_is_an_error_not_an_empty_one(tmp_path: Path) -> None:
    """A typo in $BACKYFS_DATA_DIR must not look like a repository whose backups are gone, nor
    create one; an empty variable is not the default."""
    typo = tmp_path / "no-such-repo"
    env = {**os.environ, "BACKYFS_DATA_DIR": str(typo)}
    env.pop("BACKYFS_CONFIG", None)
    for args in (["ls"], ["show", "vm"], ["serve", "vm"], ["stats"], ["restore-file", "vm", "/", "x"]):
        proc = subprocess.run([BACKYFS, *args], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert f"no repository in {typo}" in proc.stderr
    assert not typo.exists()
    proc = subprocess.run([BACKYFS, "ls"], env={**env, "BACKYFS_DATA_DIR": ""}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "BACKYFS_DATA_DIR is set but empty" in proc.stderr


def test_a_relative_data_dir_is_relative_to_the_config_file(tmp_path: Path, image: Path) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "backyfs.toml").write_text('data_dir = "repo"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
    env["BACKYFS_CONFIG"] = str(conf_dir / "backyfs.toml")
    subprocess.run([BACKYFS, "backup", str(image), "vm"], env=env, cwd="/", check=True,
                   capture_output=True, timeout=120)
    assert (conf_dir / "repo" / "backyfs.sqlite").is_file()


def test_an_overlay_on_a_full_disk_can_be_reopened_zeroed_and_committed(small_tmpfs: Path,
                                                                        tmp_path: Path) -> None:
    """The overlay's disk fills up (something else wrote to it): its writes must still come out.
    Reopening once rewrote meta.json through a new file (ENOSPC); a zero whose partial head came
    before the whole blocks it trims failed, though trimming first frees the space it needs."""
    from backyfs.config import Config
    from backyfs.export.service import ExportService, commit_overlay
    from backyfs.repository.writer import BackupWriter
    from backyfs.sources.file import FileSource

    bs = 64 * 1024
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(8 * bs))
    cfg = Config(data_dir=str(tmp_path / "data"), block_size=bs)
    os.makedirs(cfg.data_dir)
    os.symlink(small_tmpfs, cfg.overlay_dir)
    service = ExportService(cfg)
    try:
        source = FileSource(str(image))
        version = BackupWriter(service.repo, source, "vol", block_size=bs).run()
        source.close()
        device = service.open(version.uid, writable=True)
        device.pwrite(b"\x01" * bs, 2 * bs)  # block 2 in the overlay
        device.flush()
        with open(small_tmpfs / "filler", "wb") as filler:  # the disk is full now
            with pytest.raises(OSError):
                while True:
                    filler.write(os.urandom(1 << 20))
                    filler.flush()
        device.close()
        device = service.open(version.uid, writable=True)
        assert device.pread(2 * bs, 4) == b"\x01" * 4
        device.zero(2 * bs - 10, bs + 10)  # block 1's tail (copied in: needs space), all of block 2
        device.close()
        expected = bytearray(image.read_bytes())
        expected[2 * bs - 10 : 3 * bs] = bytes(bs + 10)
        new = commit_overlay(service, version.uid)
        assert service.open(new.uid).pread(0, new.size) == bytes(expected)
    finally:
        service.close()


def test_rebuild_db_from_an_empty_store_is_an_error(repo_env: RepoEnv) -> None:
    """A mistyped bucket, pool or prefix finds nothing: that must not look like a rebuilt, empty
    repository (and leave one behind)."""
    res = repo_env.run("rebuild-db")
    assert_one_line_error(res, rc=1, contains="holds no backyfs versions")
    assert not repo_env.db_path.exists()


def test_rebuild_db_from_a_store_of_another_program_indexes_nothing(repo_env: RepoEnv) -> None:
    """A bucket that is not backyfs's, holding an object named like a block: rebuild-db reported
    success, and gc then deleted that object."""
    foreign = repo_env.store_dir / "blocks" / "ab" / ("ab" * 32)
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"someone else's")
    repo_env.ok("init")
    res = repo_env.run("rebuild-db")
    assert_one_line_error(res, rc=1, contains="holds no backyfs versions (1 objects named like blocks)")
    for _ in range(2):
        repo_env.ok("gc")
    assert foreign.read_bytes() == b"someone else's"


def test_ctrl_c_while_the_command_line_loads_is_one_line(monkeypatch, capsys) -> None:
    """Ctrl-C in the ~50 ms the command line takes to import gave a Python traceback."""
    import sys

    from backyfs.cli import entry

    class Interrupted:
        def find_spec(self, name, path=None, target=None):
            if name == "backyfs.cli.main":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "backyfs.cli.main", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    assert entry.main() == 130
    assert capsys.readouterr().err == "backyfs: interrupted\n"


def test_commands_that_read_a_repository_do_not_make_one(repo_env: RepoEnv) -> None:
    """`jobs` made an empty database in a mistyped data dir (after which `ls` showed no backups
    instead of "no repository"), and `overlay ls` listed nothing there with success."""
    repo_env.use_config('[jobs.web]\nsource = "/dev/null"\n')
    res = repo_env.run("jobs")
    assert res.rc == 3 and "never run" in res.out, res
    assert not repo_env.db_path.exists()
    assert_one_line_error(repo_env.run("overlay", "ls"), rc=1, contains="no repository")
    assert_one_line_error(repo_env.run("ls"), rc=1, contains="no repository")


def test_a_repository_this_user_may_not_read_is_not_called_missing(repo_env: RepoEnv, tmp_path: Path) -> None:
    """Another user's repository (here: owned by nobody, mode 0700, read by root without the
    capabilities that override file modes) was reported as "no repository", advising init."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    repo_env.ok("init")
    for path in (repo_env.data_dir, *repo_env.data_dir.rglob("*")):
        os.chown(path, 65534, 65534, follow_symlinks=False)
    os.chmod(repo_env.data_dir, 0o700)
    proc = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", BACKYFS, "ls"],
                          env=repo_env.env, capture_output=True, text=True, timeout=60)
    res = Result(proc.returncode, proc.stdout, proc.stderr)
    assert_one_line_error(res, rc=1, contains="permission denied")


def test_restore_json_reports_an_incomplete_restore_too(repo_env: RepoEnv, tmp_path: Path) -> None:
    """restore --json printed nothing when a block was bad (exit 3): a script then had no result."""
    img = write_image(tmp_path / "img", ["rand", "rand"])
    uid = repo_env.backup(img, "vm")["uid"]
    victim = block_files(repo_env.store_dir)[0]
    victim.write_bytes(victim.read_bytes()[:100])
    res = repo_env.run("restore", uid, tmp_path / "out", "--json")
    assert res.rc == 3, res.err
    report = json.loads(res.out)
    assert report["uid"] == uid and len(report["errors"]) == 1 and "offset" in report["errors"][0]
    shown = repo_env.ok("show", uid).out
    assert f"size: {2 * BS} bytes (8.0MiB)" in shown, shown
