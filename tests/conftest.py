"""Shared fixtures: a fresh data directory per test, a CLI runner (subprocess or in-process), and images.

Helpers that are not fixtures (write_image, files_equal, ...) are imported by the tests directly:
``from conftest import write_image``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

BS = 4 << 20  # the default block size
BACKYFS = str(Path(sys.executable).with_name("backyfs"))

# Block kinds for write_image: what each block of an image holds.
#   hole   never written (a hole of the sparse file)
#   zero   written zeros (allocated, but must not be stored)
#   rand   random data, different in every block
#   dup    the same random block every time (deduplicates)
#   text   compressible text
#   half   first half zeros (a hole), second half random
KINDS = ("hole", "zero", "rand", "dup", "text", "half")


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


class RepoEnv:
    """A fresh repository in tmp_path. run() starts the real CLI; call() runs main(argv) in-process."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp_path
        self.data_dir = tmp_path / "data"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
        self.env["BACKYFS_DATA_DIR"] = str(self.data_dir)
        monkeypatch.delenv("BACKYFS_CONFIG", raising=False)
        monkeypatch.setenv("BACKYFS_DATA_DIR", str(self.data_dir))
        self._monkeypatch = monkeypatch

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "backyfs.sqlite"

    def use_config(self, text: str) -> Path:
        """Write a TOML config (data_dir is added) and make every later run use it."""
        path = self.tmp / "backyfs.toml"
        path.write_text(f'data_dir = "{self.data_dir}"\n{text}')
        self.env["BACKYFS_CONFIG"] = str(path)
        self._monkeypatch.setenv("BACKYFS_CONFIG", str(path))
        return path

    def popen(self, *args: object, **kwargs: object) -> subprocess.Popen:
        return subprocess.Popen([BACKYFS, *map(str, args)], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]

    def run(self, *args: object, timeout: float = 120) -> Result:
        proc = subprocess.run([BACKYFS, *map(str, args)], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def call(self, *args: object) -> Result:
        from backyfs.cli.main import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as exc:  # argparse usage errors
                rc = exc.code if isinstance(exc.code, int) else 1
        gc.collect()  # close the run's SQLite connection (it sits in a cycle), as a process exit would
        return Result(rc, out.getvalue(), err.getvalue())

    def ok(self, *args: object, subprocess_: bool = False) -> Result:
        """call() (or run()) and fail the test with the CLI's stderr unless it exits 0."""
        res = self.run(*args) if subprocess_ else self.call(*args)
        assert res.rc == 0, f"backyfs {' '.join(map(str, args))} exited {res.rc}: {res.err}"
        return res

    def backup(self, source: Path, volume: str, *args: object) -> dict:
        return self.ok("backup", source, volume, "--json", *args).json()  # type: ignore[return-value]

    def versions(self, volume: str | None = None) -> list[dict]:
        if not self.db_path.exists():  # no repository yet (ls refuses a data dir without one)
            return []
        return self.ok("ls", "--json", *([volume] if volume else [])).json()  # type: ignore[return-value]

    def stats(self) -> dict:
        return self.ok("stats", "--json").json()  # type: ignore[return-value]

    def block_object(self, data: bytes) -> Path:
        """The store file that holds a block with this plaintext."""
        hexd = hashlib.blake2b(data, digest_size=32).hexdigest()
        return self.store_dir / "blocks" / hexd[:2] / hexd


@pytest.fixture
def nobody_can_run_cli() -> Iterator[None]:
    """Let user nobody reach the venv and the checkout for tests that run the CLI unprivileged. CI may
    clone into a 0700 directory (mktemp -d): this adds o+x (traverse) to the checkout's ancestors and
    o+rx to the checkout itself where missing (the editable install puts the checkout on sys.path,
    and Python lists a path entry to find modules in it), and puts their modes back afterwards."""
    top = Path(__file__).resolve().parent.parent
    changed = []
    for directory in (top, *top.parents):
        mode = directory.stat().st_mode & 0o7777
        needed = 0o005 if directory == top else 0o001
        if mode & needed != needed:
            os.chmod(directory, mode | needed)
            changed.append((directory, mode))
    try:
        yield
    finally:
        for directory, mode in reversed(changed):
            os.chmod(directory, mode)


@pytest.fixture
def repo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RepoEnv:
    return RepoEnv(tmp_path, monkeypatch)


def block_content(kind: str, idx: int, block_size: int, rng: random.Random) -> bytes | None:
    """The bytes of one block of kind KIND (None for a hole)."""
    if kind == "hole":
        return None
    if kind == "zero":
        return bytes(block_size)
    if kind == "rand":
        return rng.randbytes(block_size)
    if kind == "dup":
        return random.Random(0xD0B).randbytes(block_size)
    if kind == "text":
        line = f"block {idx}: the quick brown fox jumps over the lazy dog\n".encode()
        return (line * (block_size // len(line) + 1))[:block_size]
    if kind == "half":
        return bytes(block_size // 2) + rng.randbytes(block_size - block_size // 2)
    raise ValueError(kind)


def write_image(path: Path, kinds: Sequence[str], *, block_size: int = BS, tail: int = 0,
                seed: int = 1) -> Path:
    """A sparse image, one block per entry of KINDS, plus TAIL random bytes (a partial last block)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(len(kinds) * block_size + tail)
        for idx, kind in enumerate(kinds):
            data = block_content(kind, idx, block_size, rng)
            if data is None:
                continue
            if kind == "half":  # leave the zero half a hole
                f.seek(idx * block_size + block_size // 2)
                f.write(data[block_size // 2 :])
            else:
                f.seek(idx * block_size)
                f.write(data)
        if tail:
            f.seek(len(kinds) * block_size)
            f.write(rng.randbytes(tail))
    return path


def overwrite_blocks(path: Path, indices: Sequence[int], *, block_size: int = BS, seed: int = 99) -> None:
    """Give blocks INDICES new random content."""
    rng = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for idx in indices:
            f.seek(idx * block_size)
            f.write(rng.randbytes(min(block_size, size - idx * block_size)))


def read_block(path: Path, idx: int, block_size: int = BS) -> bytes:
    with open(path, "rb") as f:
        f.seek(idx * block_size)
        return f.read(block_size)


def hints_for(path: Path, indices: Sequence[int], block_size: int = BS) -> Path:
    """An `rbd diff --format json` file naming blocks INDICES as changed."""
    extents = [{"offset": i * block_size, "length": block_size, "exists": "true"} for i in indices]
    path.write_text(json.dumps(extents))
    return path


def file_chunks(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(chunk):
            yield data


def files_equal(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return all(x == y for x, y in zip(file_chunks(a), file_chunks(b), strict=True))


def first_difference(a: Path, b: Path, chunk: int = 1 << 20) -> int | None:
    """Byte offset of the first difference between two files (or where the shorter ends), None if equal."""
    offset = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                n = min(len(x), len(y))
                return offset + next((i for i in range(n) if x[i] != y[i]), n)
            if not x:
                return None
            offset += len(x)


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def block_files(store_dir: Path) -> list[Path]:
    return [p for p in (store_dir / "blocks").glob("*/*") if ".tmp." not in p.name]


@contextlib.contextmanager
def tmpfs_mount(mnt: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at MNT (made here) with OPTIONS, unmounted after; skips the test without root."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
