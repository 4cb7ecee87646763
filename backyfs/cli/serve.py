"""`backyfs serve`: nbdkit with the backyfs plugin, supervised, on a unix socket or loopback."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from backyfs.cli.commands import UsageError
from backyfs.config import Config, load_config
from backyfs.errors import BackyfsError, NotFound
from backyfs.export.overlay import check_overlay_name
from backyfs.fsutil import makedirs_private

PLUGIN_ENV = "BACKYFS_NBD_PLUGIN"  # overrides where the plugin script is looked for
# nbdkit threads per connection. Every request needs the GIL, and a thread whose 4 MiB reply waits
# for the connection's socket finds its buffer gone from the CPU cache when its turn comes (the send
# then costs ~3x): measured with nbdcopy (4 connections, interleaved runs), 2 threads read cached
# data 15% faster than 4 (and 4 was 1.8x faster than nbdkit's default 16); cold reads (fetches and
# digests mostly run in the readahead pool) were 1% slower, and a VM boot (one connection) the same.
NBDKIT_THREADS = 2
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def plugin_path() -> Path:
    """The nbdkit plugin script: $BACKYFS_NBD_PLUGIN, else nbd_plugin/ next to the package."""
    if os.environ.get(PLUGIN_ENV):
        path = Path(os.environ[PLUGIN_ENV])
    else:
        path = Path(__file__).resolve().parents[2] / "nbd_plugin" / "backyfs_nbd.py"
    if not path.is_file():
        raise BackyfsError(f"nbdkit plugin not found at {path} (set ${PLUGIN_ENV})")
    return path


# --- where the server listens ------------------------------------------------------------------
@dataclass
class Endpoint:
    socket: str | None = None  # a unix socket path, or
    host: str | None = None  # a TCP address and port
    port: int | None = None
    tls_user: str | None = None
    psk_file: str | None = None

    def nbdkit_args(self) -> list[str]:
        if self.socket:
            return ["-U", self.socket]
        return ["-i", self.host or "127.0.0.1", "-p", str(self.port)]

    def url(self, export: str) -> str:
        scheme = "nbds" if self.psk_file else "nbd"
        user = f"{self.tls_user}@" if self.psk_file else ""
        query = [f"tls-psk-file={self.psk_file}"] if self.psk_file else []
        if self.socket:
            query.insert(0, f"socket={self.socket}")
            return f"{scheme}+unix://{user}/{export}?{'&'.join(query)}"
        host = self.host or ""
        if host in ("0.0.0.0", "::"):  # every address: a client needs one of them
            host = socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{user}{host}:{self.port}/{export}" + (f"?{query[0]}" if query else "")

    def qemu_args(self, export: str, writable: bool) -> str:
        """qemu's -drive for EXPORT (a copy-on-write snapshot when the server is read-only)."""
        tail = ",format=raw,if=virtio" + ("" if writable else ",snapshot=on")
        if not self.psk_file:
            return f"-drive file={self.url(export)}{tail}"
        # qemu takes no TLS options in an NBD URL; it reads DIR/keys.psk.
        psk_dir = os.path.dirname(self.psk_file)
        if os.path.basename(self.psk_file) != "keys.psk":
            psk_dir = f"<DIR holding a copy of {self.psk_file} named keys.psk>"
        server = (f"file.server.type=unix,file.server.path={self.socket}" if self.socket else
                  f"file.server.type=inet,file.server.host={self.host},file.server.port={self.port}")
        return (f"-object tls-creds-psk,id=tls0,endpoint=client,username={self.tls_user},dir={psk_dir} "
                f"-drive file.driver=nbd,{server},file.export={export},file.tls-creds=tls0{tail}")

    def listening(self) -> bool:
        """An NBD server answers here. A clean handshake (options, then NBD_OPT_ABORT), so the
        server logs no error about a client that vanished."""
        family = socket.AF_UNIX if self.socket else (socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            try:
                sock.connect(self.socket or (self.host, self.port))
                greeting = _recv_exact(sock, 18)
                if greeting[:16] != b"NBDMAGIC" + _IHAVEOPT:
                    return False
                sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
                sock.sendall(_IHAVEOPT + struct.pack(">II", _NBD_OPT_ABORT, 0))
                _recv_exact(sock, 20)  # the server's ack (or error) to the abort
            except OSError:
                return False
        return True

    def describe(self) -> str:
        return f"unix socket {self.socket}" if self.socket else f"{self.host} port {self.port}"


_IHAVEOPT = b"IHAVEOPT"
_NBD_OPT_ABORT = 2


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def parse_listen(text: str) -> tuple[str, int]:
    """PORT (loopback), HOST:PORT or [V6]:PORT."""
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]:|([^:\[\]]+):)?(\d{1,5})", text.strip())
    if not match or not 0 < int(match.group(3)) < 65536:
        raise UsageError(f"bad --listen {text!r}: use PORT, HOST:PORT or [IPV6]:PORT")
    return match.group(1) or match.group(2) or "127.0.0.1", int(match.group(3))


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def ensure_psk(path: str, user: str = "backyfs") -> str:
    """Create a PSK file (username:hexkey, mode 0600) if missing; return its username."""
    if not os.path.exists(path):
        makedirs_private(os.path.dirname(os.path.abspath(path)))
        if shutil.which("psktool"):
            subprocess.run(["psktool", "-u", user, "-p", path], check=True, capture_output=True)
            os.chmod(path, 0o600)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{user}:{secrets.token_hex(32)}\n")
    mode = os.stat(path).st_mode
    if mode & 0o077:  # as ssh does with private keys: the key is the only thing guarding the exports
        raise BackyfsError(f"{path} can be read by other users (mode {stat.S_IMODE(mode):o}): "
                           f"chmod 600 {path}")
    with open(path) as f:
        first = f.readline().strip()
    name, sep, key = first.partition(":")
    if not sep or not name or not re.fullmatch(r"[0-9a-fA-F]{32,}", key):
        raise BackyfsError(f"{path} is not a PSK file (a line username:hexkey)")
    return name


# --- the nbdkit process ------------------------------------------------------------------------
def nbdkit_command(endpoint: Endpoint, args: argparse.Namespace, exports: list[str]) -> list[str]:
    if shutil.which("nbdkit") is None:
        raise BackyfsError("nbdkit not found (apt-get install nbdkit nbdkit-plugin-python)")
    cmd = ["nbdkit", "--foreground", "--exit-with-parent", f"--threads={NBDKIT_THREADS}",
           *endpoint.nbdkit_args()]
    if not args.writable:
        cmd.append("--readonly")
    if endpoint.psk_file:
        cmd += ["--tls=require", f"--tls-psk={endpoint.psk_file}"]
    cmd += ["python", str(plugin_path())]
    if args.config:
        cmd.append(f"config={os.path.abspath(args.config)}")
    if args.writable:
        cmd += ["writable=1", f"overlay={args.overlay}"]
    if exports:
        cmd.append(f"exports={','.join(exports)}")
    return cmd


def plugin_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    # nbdkit embeds Debian's python3 without our venv: the plugin adds this site dir to find backyfs.
    env["BACKYFS_SITE"] = sysconfig.get_paths()["purelib"]
    env["BACKYFS_DATA_DIR"] = cfg.data_dir  # the plugin must see the same data dir as we do
    return env


class Supervisor:
    """Runs nbdkit as a child. SIGTERM/SIGINT/SIGHUP stop it, from the moment this exists (a
    handler, not SIG_IGN, which nbdkit would inherit); the socket and pid file are removed."""

    def __init__(self, leftovers: list[str]) -> None:
        self.leftovers = leftovers
        self.made: dict[str, tuple[int, int, int]] = {}  # path -> the file we made (dev, inode, ctime)
        self.proc: subprocess.Popen | None = None
        self.stopping = False
        self.stop_deadline = float("inf")  # set by the first stop signal
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            self.stop_deadline = time.monotonic() + STOP_TIMEOUT
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def start(self, plan: Plan) -> None:
        self.proc = subprocess.Popen(plan.cmd, env=plan.env, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready(plan.endpoint)
            if plan.endpoint.socket:  # nbdkit makes it 0755 whatever our umask; its dir is 0700 anyway
                os.chmod(plan.endpoint.socket, 0o600)
            with open(os.open(plan.pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
                      "w") as f:
                f.write(f"{os.getpid()}\n")
            for path in self.leftovers:
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    self.made[path] = (st.st_dev, st.st_ino, st.st_ctime_ns)
        except BaseException:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._cleanup()
            raise

    def _wait_ready(self, endpoint: Endpoint, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            if self.proc.poll() is not None:
                raise BackyfsError(f"nbdkit exited with status {self.proc.returncode} before serving")
            if (not endpoint.socket or os.path.exists(endpoint.socket)) and endpoint.listening():
                return
            time.sleep(0.05)
        raise BackyfsError("interrupted" if self.stopping else
                           f"nbdkit did not listen on {endpoint.describe()} within {timeout:.0f} s")

    def wait(self) -> int:
        """Until nbdkit exits: 0 when a signal stopped it, 1 when it died by itself."""
        try:
            # Short waits, not one long one: a wait begun before the signal would be resumed after
            # its handler with no timeout, and nbdkit stuck in a request would keep us forever.
            while self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if time.monotonic() > self.stop_deadline:  # stuck in a client's request
                        self.proc.kill()
        finally:
            self._cleanup()
        if self.stopping:
            return 0
        print(f"backyfs: error: nbdkit exited with status {self.proc.returncode}", file=sys.stderr)
        return 1

    def stop(self) -> None:
        """Stop nbdkit now (the caller gives up serving) and remove the pid file and socket."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        """Remove our socket and pid file, and only ours: a server started on the same socket while
        this one was stopping has made its own by now (its files were deleted under it)."""
        for path in self.leftovers:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if self.made.get(path) == (st.st_dev, st.st_ino, st.st_ctime_ns):  # never another's
                _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- serve -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything `serve` decided before starting nbdkit."""

    cmd: list[str]
    env: dict[str, str]
    endpoint: Endpoint
    pid_file: str
    log_file: str
    names: list[str]  # what to print URLs for
    writable: bool


def check_exports(cfg: Config, names: list[str]) -> list[tuple[str, str]]:
    """(name, uid) of each EXPORT argument, or of each volume when none are named."""
    from backyfs.config import require_repository
    from backyfs.export.service import ExportService

    require_repository(cfg)
    service = ExportService(cfg)
    try:
        if names:
            return [(name, service.resolve(name).uid) for name in names]
        latest = {v.volume: v.uid for v in service.repo.db.versions(state="valid")}
        return sorted(latest.items())
    except NotFound as exc:
        raise BackyfsError(f"cannot serve: {exc}") from None
    finally:
        service.close()


def make_plan(args: argparse.Namespace) -> Plan:
    cfg = load_config(args.config)
    if args.overlay != "default" and not args.writable:
        raise UsageError("--overlay needs --writable")
    check_overlay_name(args.overlay)  # before nbdkit starts, which would only fail at the first client
    args.exports = list(dict.fromkeys(args.exports))  # `serve vm1 vm1` serves vm1 once
    exports = check_exports(cfg, args.exports)
    run_dir = os.path.join(cfg.data_dir, "run")
    if args.listen:
        host, port = parse_listen(args.listen)
        if not args.tls_psk and not _is_loopback(host):
            raise UsageError(f"serving on {host} without --tls-psk would give every backup to the "
                               "network: add --tls-psk FILE, or listen on loopback")
        if not args.tls_psk:
            print("backyfs: warning: TCP without --tls-psk: every user of this machine can read these "
                  f"exports{' and write their overlays' if args.writable else ''}; the default unix "
                  "socket (mode 0600) or --tls-psk FILE keeps them yours", file=sys.stderr)
        endpoint = Endpoint(host=host, port=port)
        base = os.path.join(run_dir, f"nbd-tcp-{port}")
    else:
        endpoint = Endpoint(socket=os.path.abspath(args.socket or os.path.join(run_dir, "nbd.sock")))
        base = re.sub(r"\.sock$", "", endpoint.socket)
        if args.socket and not os.path.isdir(os.path.dirname(endpoint.socket)):
            raise BackyfsError(f"cannot serve on {endpoint.socket}: its directory does not exist")
    if args.tls_psk:
        endpoint.psk_file = os.path.abspath(args.tls_psk)
        endpoint.tls_user = ensure_psk(endpoint.psk_file)
    makedirs_private(run_dir)
    return Plan(nbdkit_command(endpoint, args, args.exports), plugin_env(cfg), endpoint,
                f"{base}.pid", f"{base}.log", [name for name, _uid in exports], args.writable)


def claim_endpoint(plan: Plan) -> int:
    """An exclusive flock on the server's base name (its pid file's, plus .lock), kept open for the
    server's life: two serve commands started at once on one socket both found it free, and the one
    whose nbdkit lost removed the winner's socket and pid file."""
    lock_file = f"{plan.pid_file[: -len('.pid')]}.lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BackyfsError(f"a backyfs server already runs (or starts) on {plan.endpoint.describe()} "
                           f"(pid file {plan.pid_file})") from None
    return fd


def check_free(plan: Plan) -> None:
    """Refuse a socket a live server listens on; clear a stale one left by a killed server."""
    sock = plan.endpoint.socket
    if sock and os.path.lexists(sock):
        if not stat.S_ISSOCK(os.lstat(sock).st_mode):  # a typo must not delete someone's file
            raise BackyfsError(f"cannot serve on {sock}: it exists and is not a socket")
        if plan.endpoint.listening():
            raise BackyfsError(f"a server already listens on {sock}")
        _unlink(sock)
    if not sock and plan.endpoint.listening():
        raise BackyfsError(f"{plan.endpoint.describe()} is in use")


def report(plan: Plan, pid: int) -> None:
    mode = "read-write (writes go to an overlay)" if plan.writable else "read-only"
    print(f"serving {mode} on {plan.endpoint.describe()}, pid {pid} (pid file {plan.pid_file})")
    if not plan.names:
        print("no valid versions yet: export names are version uids or volume names")
    width = max([len(n) for n in plan.names] + [1])
    for name in plan.names:
        print(f"  {name:<{width}}  {plan.endpoint.url(name)}")
    if plan.names:
        qemu = plan.endpoint.qemu_args(plan.names[0], plan.writable)
        print(f"boot it with:\n  qemu-system-x86_64 -m 2G {qemu}")
    print(f"stop it with: kill {pid}")
    sys.stdout.flush()


def cmd_serve(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    claim_endpoint(plan)  # held for the server's life (a daemon inherits it)
    check_free(plan)
    leftovers = [plan.pid_file] + ([plan.endpoint.socket] if plan.endpoint.socket else [])
    if args.foreground:
        supervisor = Supervisor(leftovers)
        supervisor.start(plan)
        try:
            report(plan, os.getpid())
            sys.stdout.flush()
        except BaseException:  # e.g. stdout's reader gone: stop nbdkit, leave no pid file or socket
            supervisor.stop()
            raise
        return supervisor.wait()
    return daemonize(plan, leftovers)


def daemonize(plan: Plan, leftovers: list[str]) -> int:
    """Fork a supervisor into the background; report once nbdkit listens (or why it did not)."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            status = pipe.read().decode(errors="replace")
        if status != "ok":
            tail = _tail(plan.log_file)
            raise BackyfsError(status or "the server died while starting" + (f": {tail}" if tail else ""))
        report(plan, pid)
        return 0
    os.close(read_fd)
    rc = 1
    try:
        os.setsid()
        _detach_stdio(plan.log_file)
        supervisor = Supervisor(leftovers)
        supervisor.start(plan)
        try:
            os.write(write_fd, b"ok")
        except OSError:  # `serve` was killed before it could print the URLs: nobody knows of us
            supervisor.stop()
            raise
        os.close(write_fd)
        rc = supervisor.wait()
    except BaseException as exc:  # reported to the waiting parent; never return into its code
        tail = _tail(plan.log_file)
        msg = f"{exc}" + (f" ({tail})" if tail else "")
        try:
            os.write(write_fd, msg.encode())
        except OSError:
            pass
    finally:
        os._exit(rc)


def _detach_stdio(log_file: str) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# --- parser ------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("serve", help="serve versions as NBD block devices (nbdkit)", description=SERVE_HELP,
                       formatter_class=fmt)
    p.set_defaults(func=cmd_serve)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help="unix socket to listen on (default DATA/run/nbd.sock)")
    where.add_argument("--listen", metavar="[HOST:]PORT",
                       help="listen on TCP instead; HOST defaults to 127.0.0.1 (loopback only)")
    p.add_argument("--writable", action="store_true",
                   help="accept writes; they go to a copy-on-write overlay, never to the backup")
    p.add_argument("--overlay", metavar="NAME", default="default",
                   help="name of the overlay writes go to (default 'default'; needs --writable)")
    p.add_argument("--tls-psk", metavar="FILE",
                   help="require TLS with this pre-shared key file (username:hexkey), created if missing")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground; Ctrl-C stops")
    p.add_argument("exports", metavar="EXPORT", nargs="*",
                   help="serve only these versions or volumes (default: all valid versions)")


SERVE_HELP = """\
Serve backup versions as NBD block devices with nbdkit, so qemu, qemu-img, nbdcopy or the kernel's
nbd-client can boot, inspect or copy any version without restoring it first.

Each valid version is an export named by its uid; a volume name exports that volume's latest valid
version at the server's first use of that name, and that version stays while the server runs:
a client that reconnects finds the same disk (and its writes), never a newer backup. Restart the
server to serve a newer one. EXPORT arguments limit the server to those (unknown names are an
error); without them every valid version is served.

Blocks are fetched from the store on demand, checked against their digests and cached in memory
(and, for S3 and RADOS stores, in DATA/cache), with readahead for sequential reads. A block that
is missing or corrupt fails that read with EIO (the server log names its index and offset); the
rest of the disk stays readable.

By default the server listens on the unix socket DATA/run/nbd.sock (mode 0600), forks into the
background and prints the NBD URLs and a qemu command line. --foreground keeps it attached. Stop
it with SIGTERM or SIGINT (kill PID, Ctrl-C): the socket and pid file are removed. A background
server logs beside its socket (DATA/run/nbd.log; SOCKET without .sock plus .log with --socket;
DATA/run/nbd-tcp-PORT.log with --listen).

--listen serves TCP, on 127.0.0.1 unless a HOST is given: any other address exposes the backups
to the network, so it needs --tls-psk, which requires TLS with a pre-shared key. A missing
PSK file is created (psktool when installed, else 32 random bytes) with mode 0600; clients name it
in the URL (nbds://USER@HOST:PORT/EXPORT?tls-psk-file=FILE) or, for qemu, as DIR/keys.psk.

--writable accepts writes. They go to a copy-on-write overlay in DATA/overlays/UID/NAME, never to
the backup; the overlay survives restarts and is shared by every connection of the server, so a
flush on one connection covers all. Keep, commit or discard it with 'backyfs overlay'.

examples:
  backyfs serve web01                      # read-only, latest version of volume web01
  backyfs serve --writable --foreground 5f0c2a9e41b7
  backyfs serve --listen 10809 --tls-psk /etc/backyfs/nbd.psk"""
