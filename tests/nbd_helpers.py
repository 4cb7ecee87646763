"""Helpers for the NBD tests: images, the backyfs CLI in a fresh data dir, nbdkit and `backyfs serve`
as real processes, the libnbd tools, and a raw NBD handshake for names no URL can carry."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "nbd_plugin" / "backyfs_nbd.py"
BACKYFS = str(Path(sys.executable).with_name("backyfs"))
BS = 4 << 20
TOOLS = ("nbdkit", "nbdcopy", "nbdinfo", "qemu-io")


def missing_tools() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    probe = subprocess.run(["nbdkit", "python", "--version"], capture_output=True) if not missing else None
    if probe is not None and probe.returncode != 0:
        missing.append("nbdkit-plugin-python")
    return missing


# --- images ------------------------------------------------------------------------------------
def make_image(path: Path, layout: str, *, tail: int = 0, seed: int = 1, block_size: int = BS) -> Path:
    """A sparse image, one block per letter of LAYOUT plus TAIL random bytes:
    H hole, Z written zeros, R random, T text (compressible), P partly a hole (first half)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(len(layout) * block_size + tail)
        for idx, kind in enumerate(layout):
            start = idx * block_size
            if kind == "H":
                continue
            if kind == "Z":
                data = bytes(block_size)
            elif kind == "R":
                data = rng.randbytes(block_size)
            elif kind == "T":
                line = f"block {idx}: the quick brown fox\n".encode()
                data = (line * (block_size // len(line) + 1))[:block_size]
            elif kind == "P":
                start, data = start + block_size // 2, rng.randbytes(block_size // 2)
            else:
                raise ValueError(kind)
            f.seek(start)
            f.write(data)
        if tail:
            f.seek(len(layout) * block_size)
            f.write(rng.randbytes(tail))
    return path


def same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- the CLI in a fresh data dir ---------------------------------------------------------------
class Backyfs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
        self.env["BACKYFS_DATA_DIR"] = str(self.data_dir)
        self.env["BACKYFS_SITE"] = sysconfig.get_paths()["purelib"]  # for nbdkit run directly

    @property
    def socket(self) -> Path:
        return self.data_dir / "run" / "nbd.sock"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "run" / "nbd.pid"

    def run(self, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([BACKYFS, *map(str, args)], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def ok(self, *args: object) -> str:
        proc = self.run(*args)
        assert proc.returncode == 0, f"backyfs {' '.join(map(str, args))}: {proc.returncode} {proc.stderr}"
        return proc.stdout

    def backup(self, image: Path, volume: str) -> str:
        return json.loads(self.ok("backup", image, volume, "--json"))["uid"]

    def restore(self, version: str, target: Path) -> Path:
        self.ok("restore", version, target, "--force")
        return target

    def store_object(self, plaintext: bytes) -> Path:
        hexd = hashlib.blake2b(plaintext, digest_size=32).hexdigest()
        return self.data_dir / "store" / "blocks" / hexd[:2] / hexd

    def nbdkit(self, script: str, *params: str, check: bool = True) -> subprocess.CompletedProcess:
        """nbdkit with the plugin on a private socket, running SCRIPT ($uri, $unixsocket) against it."""
        cmd = ["nbdkit", "-U", "-", "python", str(PLUGIN), *params, "--run", script]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)
        if check:
            assert proc.returncode == 0, f"{script}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc


# --- backyfs serve -----------------------------------------------------------------------------
@dataclass
class Served:
    proc: subprocess.Popen
    out: str
    urls: dict[str, str]  # export name -> URL as printed

    def url(self, name: str) -> str:
        return self.urls[name]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"serve did not stop on signal {sig}: {err}") from None
        return self.proc.returncode, err


_URL_LINE = re.compile(r"^\s+(\S+)\s+(nbds?(?:\+unix)?://\S+)$", re.MULTILINE)


def serve(bk: Backyfs, *args: object, timeout: float = 30) -> Served:
    """`backyfs serve --foreground ARGS` until it printed its URLs."""
    proc = subprocess.Popen([BACKYFS, "serve", "--foreground", *map(str, args)], env=bk.env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            _, err = proc.communicate()
            raise AssertionError(f"serve exited {proc.returncode}: {''.join(lines)}{err}")
        lines.append(line)
        if line.startswith("stop it with"):
            out = "".join(lines)
            return Served(proc, out, dict(_URL_LINE.findall(out)))
    proc.kill()
    raise AssertionError(f"serve printed no URLs in {timeout} s: {''.join(lines)}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(paths: Sequence[Path], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(p.exists() for p in paths):
            return True
        time.sleep(0.05)
    return False


# --- clients -----------------------------------------------------------------------------------
def copy_out(bk: Backyfs, export: str, dest: Path, *serve_args: object) -> Path:
    """Serve EXPORT (`backyfs serve SERVE_ARGS EXPORT`), copy it to DEST with nbdcopy, stop."""
    srv = serve(bk, *serve_args, export)
    try:
        run("nbdcopy", srv.url(export), dest)
    finally:
        srv.stop()
    return dest


def run(*cmd: object, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))}: {proc.returncode}\n{proc.stderr}"
    return proc


def nbd_map(url: str) -> list[dict]:
    return json.loads(run("nbdinfo", "--map", "--json", url).stdout)


def qemu_io(url: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return run(*args, url, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NBD_REP_ACK = 1
NBD_OPT_GO = 7


def nbd_opt_go(sock_path: Path, name: bytes) -> int:
    """Negotiate export NAME (any bytes) with NBD_OPT_GO; return the final reply type:
    NBD_REP_ACK, or an error type (bit 31 set)."""
    with socket.socket(socket.AF_UNIX) as s:
        return _opt_go(s, sock_path, name)


@contextlib.contextmanager
def nbd_connected(sock_path: Path, name: str) -> Iterator[None]:
    """A client connected to export NAME (the server has it open) for the duration."""
    with socket.socket(socket.AF_UNIX) as s:
        assert _opt_go(s, sock_path, name.encode()) == NBD_REP_ACK
        yield


NBD_CMD_READ, NBD_CMD_WRITE = 0, 1


def nbd_command(sock_path: Path, name: str, cmd: int, offset: int, length: int,
                payload: bytes = b"") -> tuple[int, bytes]:
    """One raw request (simple replies, so no client-side checks stand in the way): the NBD error
    number the server sent (0, or e.g. 1 EPERM, 5 EIO) and the data of a successful read."""
    with socket.socket(socket.AF_UNIX) as s:
        assert _opt_go(s, sock_path, name.encode()) == NBD_REP_ACK
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, cmd, 7, offset, length) + payload)
        magic, error, handle = struct.unpack(">IIQ", _recv(s, 16))
        assert magic == 0x67446698 and handle == 7
        return error, _recv(s, length) if cmd == NBD_CMD_READ and error == 0 else b""


def _opt_go(s: socket.socket, sock_path: Path, name: bytes) -> int:
    s.settimeout(30)
    s.connect(str(sock_path))
    greeting = _recv(s, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
    s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", NBD_OPT_GO, len(payload)) + payload)
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", _recv(s, 20))
        _recv(s, length)
        if rtype == NBD_REP_ACK or rtype & 0x80000000:
            return rtype


def _recv(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"server closed after {len(data)} of {n} bytes")
        data += chunk
    return data
