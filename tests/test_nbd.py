"""The nbdkit plugin and `backyfs serve` on real parts: nbdkit, nbdcopy, nbdinfo and qemu-io against
versions backed up into a fresh data dir."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import nbd_helpers as nh
except ImportError:  # tests/ imported as a package
    from tests import nbd_helpers as nh

# Skipped on a machine without nbdkit's tools; in CI (scripts/setup installs them) they must run.
pytestmark = pytest.mark.skipif(bool(nh.missing_tools()) and not os.environ.get("CI"),
                                reason=f"missing {nh.missing_tools()}")

BS = nh.BS
LAYOUT = "HRZRTHPR"  # holes, random, written zeros, text, a half-hole block
TAIL = 1_500_000  # the last block is partial: the size is not a multiple of 4 MiB
HOLE = 3  # nbdinfo's type for hole|zero
EPERM, EIO = 1, 5  # NBD's error numbers


@pytest.fixture
def bk(tmp_path: Path) -> Iterator[nh.Backyfs]:
    env = nh.Backyfs(tmp_path)
    yield env
    for pid_file in (env.data_dir / "run").glob("*.pid"):  # a background server a failed test left
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return nh.make_image(tmp_path / "disk.img", LAYOUT, tail=TAIL)


@pytest.fixture
def uid(bk: nh.Backyfs, image: Path) -> str:
    return bk.backup(image, "vm1")


def _hole_blocks(extents: list[dict]) -> set[int]:
    return {i for e in extents if e["type"] == HOLE
            for i in range(e["offset"] // BS, (e["offset"] + e["length"]) // BS)}


def _read(bk: nh.Backyfs, name: str, out: Path, *params: str) -> Path:
    bk.nbdkit(f'nbdcopy "nbd+unix:///{name}?socket=$unixsocket" {out}', *params)
    return out


# --- reads through nbdkit -python directly ------------------------------------------------------
def test_read_by_uid_and_volume_matches_image(bk, image, uid, tmp_path):
    assert nh.same_bytes(_read(bk, uid, tmp_path / "a.img"), image)
    assert nh.same_bytes(_read(bk, "vm1", tmp_path / "b.img"), image)
    assert nh.same_bytes(_read(bk, uid[:6], tmp_path / "c.img"), image)  # a unique uid prefix


def test_map_reports_holes(bk, uid):
    proc = bk.nbdkit(f'nbdinfo --map --json "nbd+unix:///{uid}?socket=$unixsocket"')
    extents = json.loads(proc.stdout)
    assert sum(e["length"] for e in extents) == len(LAYOUT) * BS + TAIL
    # H and Z blocks are not stored: holes. R, T, P and the tail are data.
    assert _hole_blocks(extents) == {0, 2, 5}
    assert {e["type"] for e in extents} == {0, HOLE}


def test_list_exports_and_default(bk, image, uid, tmp_path):
    script = 'nbdinfo --list --json "$uri"; nbdinfo --size "nbd+unix:///?socket=$unixsocket"'
    proc = bk.nbdkit(script)
    listing, size = proc.stdout.rsplit("\n", 2)[0], proc.stdout.split()[-1]
    names = {e["export-name"] for e in json.loads(listing[: listing.rindex("}") + 1])["exports"]}
    assert names == {uid, "vm1"}
    assert int(size) == image.stat().st_size  # one volume: the default export is its latest version

    other = bk.backup(nh.make_image(tmp_path / "o.img", "R"), "vm2")
    proc = bk.nbdkit('nbdinfo --size "nbd+unix:///?socket=$unixsocket"', check=False)
    assert proc.returncode != 0, "two volumes: no default export"
    proc = bk.nbdkit('nbdinfo --list --json "$uri"', f"exports=vm2,{uid}")
    names = {e["export-name"] for e in json.loads(proc.stdout)["exports"]}
    assert names == {uid, other, "vm2"}
    proc = bk.nbdkit('nbdinfo --size "nbd+unix:///vm1?socket=$unixsocket"', "exports=vm2", check=False)
    assert proc.returncode != 0 and "No such file" in proc.stdout + proc.stderr
    proc = bk.nbdkit('nbdinfo --size "nbd+unix:///?socket=$unixsocket"', "exports=vm2")
    assert int(proc.stdout) == BS  # one allowed name: it is the default


def test_more_exports_than_nbdkit_lists(bk, image, uid):
    """nbdkit lists at most 10,000 exports and lists none at all past that: backyfs lists the
    volumes first, then the newest versions; an older version still opens by its uid."""
    import secrets

    from backyfs.metadata.db import MetadataDB, Version

    db = MetadataDB(str(bk.data_dir / "backyfs.sqlite"))
    old = db.get_version(uid)
    newer = [Version(uid=secrets.token_hex(6), volume="bulk", created=old.created + 1 + i, size=old.size,
                     block_size=old.block_size, state="valid") for i in range(10_000)]
    for version in newer:
        db.add_version(version)
    db.close()
    # libnbd's own listing (nbdinfo --list would also open all 10,000 exports, one by one).
    lister = ("import json, nbd, sys; h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(sys.argv[1]); "
              "names = []; h.opt_list(lambda name, desc: names.append(name)); print(json.dumps(names))")
    proc = bk.nbdkit(f"/usr/bin/python3 -c '{lister}' \"$uri\"")  # Debian's python3-libnbd
    names = json.loads(proc.stdout)
    assert len(names) == 10_000 and names[:2] == ["bulk", "vm1"]
    assert names[2] == newer[-1].uid and uid not in names
    proc = bk.nbdkit(f'nbdinfo --size "nbd+unix:///{uid}?socket=$unixsocket"')
    assert int(proc.stdout) == image.stat().st_size


def test_parallel_connections_match(bk, image, uid, tmp_path):
    outs = [tmp_path / f"p{i}.img" for i in range(3)]
    script = " & ".join(f'nbdcopy --connections=4 "nbd+unix:///{uid}?socket=$unixsocket" {o}' for o in outs)
    bk.nbdkit(f"{script} & wait")
    for out in outs:
        assert nh.same_bytes(out, image)


def test_plugin_imports_the_venvs_packages_not_debians(tmp_path):
    """nbdkit's embedded Python searches Debian's dist-packages first, where an old boto3 and
    _cffi_backend live on this machine; the plugin must put backyfs's venv ahead of them."""
    import sysconfig

    probe = tmp_path / "probe.py"
    probe.write_text(f"exec(open({str(nh.PLUGIN)!r}).read())\n"
                     "import sys, boto3, _cffi_backend, zstandard\n"
                     "for m in (boto3, _cffi_backend, zstandard):\n"
                     "    sys.stderr.write(f'PROBE {m.__name__} {m.__file__}\\n')\n")
    env = {**os.environ, "BACKYFS_SITE": sysconfig.get_paths()["purelib"]}
    proc = subprocess.run(["nbdkit", "python", str(probe), "--dump-plugin"], env=env,
                          capture_output=True, text=True, timeout=60)
    found = dict(line.split()[1:3] for line in proc.stderr.splitlines() if line.startswith("PROBE "))
    assert set(found) == {"boto3", "_cffi_backend", "zstandard"}, proc.stderr
    for name, path in found.items():
        assert path.startswith(sysconfig.get_paths()["purelib"]), (name, path)


def test_hostile_export_names_refused(bk, uid):
    srv = nh.serve(bk)
    try:
        good = nh.nbd_opt_go(bk.socket, uid.encode())
        assert good == nh.NBD_REP_ACK
        for name in (b"../../etc", b"../" + uid.encode(), b"a" * 4096, b"vm1\0x", b"vm 1", b" vm1",
                     b"vm1\n", b"\xff\xfe", b"-rf", b""):
            if name == b"":  # the default export: one volume, so it is vm1; covered elsewhere
                continue
            reply = nh.nbd_opt_go(bk.socket, name)
            assert reply != nh.NBD_REP_ACK and reply & 0x80000000, name
        proc = nh.run("nbdinfo", "nbd+unix:///../../etc?socket=" + str(bk.socket), check=False)
        assert proc.returncode != 0 and "No such file" in proc.stderr
        assert nh.nbd_opt_go(bk.socket, b"vm1") == nh.NBD_REP_ACK  # still serving
    finally:
        rc, err = srv.stop()
    assert rc == 0, err
    assert "Traceback" not in err  # expected errors log one line each


def test_corrupt_block_fails_read_with_eio(bk, image, uid, tmp_path):
    with open(image, "rb") as f:
        f.seek(3 * BS)
        block3, block4 = f.read(BS), f.read(BS)
    obj = bk.store_object(block3)
    assert obj.is_file()
    obj.write_bytes(b"garbage" + obj.read_bytes()[7:])
    script = (f'qemu-io -r -f raw -c "read 0 {BS}" -c "read {BS} 4096" "$uri"; echo rc=$?; '
              f'qemu-io -r -f raw -c "read {3 * BS + 100} 4096" "$uri"; echo rc=$?; '
              # One request in flight: with more, Debian 12's nbdkit 1.32 sometimes aborts (assertion
              # in raw_send_socket) when a client drops the connection while replies are pending.
              f'nbdcopy --connections=1 --requests=1 "$uri" {tmp_path / "x.img"}; echo rc=$?')
    proc = bk.nbdkit(script, f"exports={uid}")
    ok_read, bad_read, copy = proc.stdout.split("rc=")[1:]
    assert ok_read.startswith("0"), proc.stdout  # other blocks still read
    assert not bad_read.startswith("0") and "Input/output error" in proc.stdout + proc.stderr
    assert not copy.startswith("0")
    assert "block 3 at offset 12582912" in proc.stderr  # the core names the block

    srv = nh.serve(bk, uid)  # on the wire: EIO for the bad block, data for the others
    try:
        assert nh.nbd_command(bk.socket, uid, nh.NBD_CMD_READ, 3 * BS + 4096, 4096) == (EIO, b"")
        error, data = nh.nbd_command(bk.socket, uid, nh.NBD_CMD_READ, 4 * BS, 4096)
        assert error == 0 and data == block4[:4096]
    finally:
        assert srv.stop()[0] == 0


# --- writes --------------------------------------------------------------------------------------
def _writes(url: str) -> None:
    nh.qemu_io(url, f"write -P 0x5a {BS - 1000} 3000",  # partial, across a block boundary
               "write -P 0x66 100 50", "read -P 0x66 100 50",  # again into a block now in the overlay
               f"read -P 0x5a {BS - 1000} 3000",
               f"write -P 0x33 {4 * BS} {BS}",  # a whole block
               f"write -z -u {3 * BS} {BS}",  # a whole zero block that may be unmapped: trimmed
               f"write -z {7 * BS} {BS}",  # without -u qemu asks NO_HOLE: zeros stored, no hole
               f"discard {6 * BS} {BS}",  # trimmed
               f"write -P 0x77 {len(LAYOUT) * BS + 10} 20",  # in the partial last block
               "flush")


def test_volume_name_keeps_its_version_while_the_server_runs(bk, image, uid, tmp_path):
    """A client reconnecting by volume name after a newer backup must find the same disk with its
    writes, not the new version with an empty overlay (qemu reconnects; its guest would see its
    flushed writes vanish)."""
    srv = nh.serve(bk, "--writable", "vm1")
    try:
        nh.qemu_io(srv.url("vm1"), "write -P 0x42 0 4096", "flush")
        newer = bk.backup(nh.make_image(tmp_path / "new.img", "RRRR", seed=9), "vm1")
        assert newer != uid
        nh.qemu_io(srv.url("vm1"), "read -P 0x42 0 4096")  # a new connection: the same disk
        size = nh.run("nbdinfo", "--size", srv.url("vm1")).stdout
        assert int(size) == image.stat().st_size
        listing = nh.run("nbdinfo", "--list", "--json", srv.url("vm1")).stdout
        assert uid in listing
    finally:
        assert srv.stop()[0] == 0
    srv = nh.serve(bk, "vm1")  # a new server: the latest version
    try:
        assert int(nh.run("nbdinfo", "--size", srv.url("vm1")).stdout) == 4 * BS
    finally:
        assert srv.stop()[0] == 0


def _expected(image: Path, out: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", image, out], check=True)
    nh.patch(out, BS - 1000, b"\x5a" * 3000)
    nh.patch(out, 100, b"\x66" * 50)
    nh.patch(out, 4 * BS, b"\x33" * BS)
    nh.patch(out, 3 * BS, bytes(BS))
    nh.patch(out, 6 * BS, bytes(BS))
    nh.patch(out, 7 * BS, bytes(BS))
    nh.patch(out, len(LAYOUT) * BS + 10, b"\x77" * 20)
    return out


def test_writes_land_in_overlay_not_backup(bk, image, uid, tmp_path):
    expected = _expected(image, tmp_path / "expected.img")
    srv = nh.serve(bk, "--writable", uid)
    try:
        url = srv.url(uid)
        _writes(url)
        nh.run("nbdcopy", url, tmp_path / "after.img")
        extents = nh.nbd_map(url)
    finally:
        assert srv.stop()[0] == 0
    assert nh.same_bytes(tmp_path / "after.img", expected)
    # Zeroed with may-unmap (3) and discarded (6) blocks are holes; 0 was written, 7 zeroed NO_HOLE.
    assert _hole_blocks(extents) == {2, 3, 5, 6}

    assert nh.same_bytes(bk.restore(uid, tmp_path / "backup.img"), image)  # the backup is unchanged
    scrub = bk.run("deep-scrub", uid)
    assert scrub.returncode == 0
    assert re.search(r"checked [1-9]\d* objects of 1 version\(s\), 0 bad", scrub.stdout), scrub.stdout
    overlays = json.loads(bk.ok("overlay", "ls", "--json"))
    assert [(o["version"], o["name"]) for o in overlays] == [(uid, "default")]
    assert overlays[0]["dirty_blocks"] == 5 and overlays[0]["trimmed_blocks"] == 2

    again = nh.copy_out(bk, uid, tmp_path / "again.img", "--writable")  # the overlay survives a restart
    assert nh.same_bytes(again, expected)


def test_commit_overlay_from_parallel_writes(bk, image, uid, tmp_path):
    new = nh.make_image(tmp_path / "new.img", "RHRRZTRH", tail=TAIL, seed=7)
    srv = nh.serve(bk, "--writable", "vm1")
    try:  # four connections writing into one overlay
        nh.run("nbdcopy", "--connections=4", new, srv.url("vm1"))
        with nh.nbd_connected(bk.socket, uid):
            proc = bk.run("overlay", "commit", uid)
        assert proc.returncode != 0 and "in use" in proc.stderr  # not while a client has it open
    finally:
        srv.stop()
    out = bk.ok("overlay", "commit", uid, "--label", "why=test")
    new_uid = out.split()[0]
    assert new_uid != uid and f"of {uid}" in out
    assert nh.same_bytes(bk.restore(new_uid, tmp_path / "r.img"), new)
    assert nh.same_bytes(bk.restore(uid, tmp_path / "orig.img"), image)
    info = json.loads(bk.ok("show", new_uid, "--json"))
    assert info["parent"] == uid and info["labels"]["why"] == "test"
    assert json.loads(bk.ok("overlay", "ls", "--json")) == []  # committed overlays are dropped
    scrub = bk.run("deep-scrub", "--all")
    assert scrub.returncode == 0
    assert re.search(r"checked [1-9]\d* objects of \d+ version\(s\), 0 bad", scrub.stdout), scrub.stdout


def test_discard_overlay(bk, image, uid, tmp_path):
    srv = nh.serve(bk, "--writable", "--overlay", "scratch", uid)
    try:
        nh.qemu_io(srv.url(uid), f"write -P 0x11 0 {2 * BS}", "flush")
        with nh.nbd_connected(bk.socket, uid):
            proc = bk.run("overlay", "discard", uid, "--name", "scratch")
        assert proc.returncode != 0 and "in use" in proc.stderr
    finally:
        srv.stop()
    assert bk.run("overlay", "discard", uid).returncode != 0  # no overlay named default
    assert "discarded" in bk.ok("overlay", "discard", uid, "--name", "scratch")
    assert json.loads(bk.ok("overlay", "ls", "--json")) == []
    copied = nh.copy_out(bk, uid, tmp_path / "r.img", "--writable", "--overlay", "scratch")
    assert nh.same_bytes(copied, image)


def test_read_only_server_refuses_writes(bk, image, uid, tmp_path):
    srv = nh.serve(bk, uid)
    try:
        url = srv.url(uid)
        assert nh.qemu_io(url, "write -P 1 0 4096", check=False).returncode != 0
        proc = nh.run("nbdcopy", image, url, check=False)
        assert proc.returncode != 0 and "read-only" in proc.stderr.lower()
        assert json.loads(nh.run("nbdinfo", "--json", url).stdout)["exports"][0]["is_read_only"] is True
        # A client that writes anyway gets EPERM (nbdkit sends EROFS as NBD's EPERM).
        assert nh.nbd_command(bk.socket, uid, nh.NBD_CMD_WRITE, 0, 512, b"x" * 512)[0] == EPERM
    finally:
        srv.stop()
    assert not (bk.data_dir / "overlays").exists()


# --- serve ---------------------------------------------------------------------------------------
def test_serve_background_prints_url_and_stops_clean(bk, image, uid, tmp_path):
    out = bk.ok("serve", "vm1")
    url = f"nbd+unix:///vm1?socket={bk.socket}"
    assert url in out
    assert f"-drive file={url},format=raw,if=virtio" in out  # the qemu line
    pid = int(bk.pid_file.read_text())
    assert nh.pid_alive(pid) and f"kill {pid}" in out
    assert oct(bk.socket.stat().st_mode & 0o777) == "0o600"
    nh.run("nbdcopy", url, tmp_path / "r.img")
    assert nh.same_bytes(tmp_path / "r.img", image)
    proc = bk.run("serve", "vm1")
    assert proc.returncode != 0 and "already runs" in proc.stderr  # one server per socket
    os.kill(pid, signal.SIGTERM)
    assert nh.wait_gone([bk.socket, bk.pid_file])
    deadline = time.monotonic() + 10
    while nh.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not nh.pid_alive(pid)


def test_serve_foreground_sigint_and_stale_socket(bk, uid):
    srv = nh.serve(bk, "--socket", bk.tmp / "s.sock")
    assert set(srv.urls) == {"vm1"}
    assert (bk.tmp / "s.sock").exists() and (bk.tmp / "s.pid").exists()
    rc, err = srv.stop(signal.SIGINT)
    assert rc == 0, err
    assert not (bk.tmp / "s.sock").exists() and not (bk.tmp / "s.pid").exists()

    srv = nh.serve(bk)  # a server killed hard leaves a socket; the next one clears it
    srv.proc.kill()
    srv.proc.wait()
    assert bk.socket.exists()
    srv = nh.serve(bk)
    assert nh.nbd_opt_go(bk.socket, uid.encode()) == nh.NBD_REP_ACK
    assert srv.stop()[0] == 0 and not bk.socket.exists()


def test_serve_unknown_export_is_one_line_error(bk, uid):
    for name in ("nope", "../../etc"):
        proc = bk.run("serve", uid, name)
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1 and "cannot serve" in proc.stderr
    assert not bk.socket.exists() and not bk.pid_file.exists()
    assert bk.run("serve", "--overlay", "x", uid).returncode != 0  # --overlay needs --writable
    assert bk.run("serve", "--listen", "99999", uid).returncode != 0


def test_serve_tcp_with_tls_psk(bk, image, uid, tmp_path):
    psk, port = tmp_path / "keys.psk", nh.free_port()
    srv = nh.serve(bk, "--listen", f"127.0.0.1:{port}", "--tls-psk", psk, uid)
    try:
        user, key = psk.read_text().strip().split(":")
        assert user == "backyfs" and len(key) >= 32 and psk.stat().st_mode & 0o077 == 0
        url = srv.url(uid)
        assert url == f"nbds://backyfs@127.0.0.1:{port}/{uid}?tls-psk-file={psk}"
        nh.run("nbdcopy", url, tmp_path / "r.img")
        assert nh.same_bytes(tmp_path / "r.img", image)
        plain = nh.run("nbdinfo", f"nbd://127.0.0.1:{port}/{uid}", check=False)
        assert plain.returncode != 0  # TLS is required
        wrong = tmp_path / "wrong.psk"
        wrong.write_text("backyfs:" + "00" * 32 + "\n")
        bad = nh.run("nbdinfo", f"nbds://backyfs@127.0.0.1:{port}/{uid}?tls-psk-file={wrong}", check=False)
        assert bad.returncode != 0
        # The printed qemu arguments work (qemu-img takes the same -object and drive options).
        obj, drive = re.search(r"-object (\S+) -drive (\S+)", srv.out).groups()
        drive = drive.replace(",format=raw,if=virtio,snapshot=on", ",driver=raw")
        info = nh.run("qemu-img", "info", "--output=json", "--object", obj, "--image-opts", drive)
        assert json.loads(info.stdout)["virtual-size"] == -(-image.stat().st_size // 512) * 512  # sectors
    finally:
        _, err = srv.stop()
    assert "warning" not in err
    psk.chmod(0o644)  # a key others can read guards nothing: refused, as ssh refuses such keys
    proc = bk.run("serve", "--listen", f"127.0.0.1:{port}", "--tls-psk", psk, uid)
    assert proc.returncode == 1 and f"chmod 600 {psk}" in proc.stderr


def test_serve_tcp_without_tls_warns_that_every_local_user_can_read(bk, image, uid, tmp_path):
    """Loopback TCP is reachable by every user of the machine, unlike the 0600 unix socket."""
    port = nh.free_port()
    srv = nh.serve(bk, "--listen", f"127.0.0.1:{port}", uid)
    try:
        nh.run("nbdcopy", srv.url(uid), tmp_path / "r.img")
        assert nh.same_bytes(tmp_path / "r.img", image)
    finally:
        _, err = srv.stop()
    assert "warning: TCP without --tls-psk: every user of this machine can read these exports" in err


def test_help_texts():
    proc = nh.run(nh.BACKYFS, "serve", "--help")
    for word in ("--writable", "--tls-psk", "nbd.sock", "overlay", "EIO", "SIGTERM"):
        assert word in proc.stdout
    for action in ("ls", "discard", "commit"):
        assert nh.run(nh.BACKYFS, "overlay", action, "--help").returncode == 0


def test_serve_refuses_a_socket_path_that_is_a_file_and_open_tcp_without_tls(bk, uid, tmp_path):
    """A --socket that names an existing file (a typo for an image, say) is refused, not deleted as
    a stale socket; TCP on a non-loopback address needs TLS."""
    victim = tmp_path / "vm.img"
    victim.write_bytes(b"precious")
    proc = bk.run("serve", "--socket", victim, uid)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"backyfs: error: cannot serve on {victim}: it exists and is not a socket"), proc.stderr
    assert victim.read_bytes() == b"precious"
    for listen in ("0.0.0.0:10809", "[::]:10809", "backup-host:10809"):
        proc = bk.run("serve", "--listen", listen, uid)
        assert proc.returncode == 2 and "without --tls-psk" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_serve_kills_nbdkit_that_ignores_the_stop_signal(monkeypatch):
    """`serve` stopping: nbdkit stuck in a request (e.g. on a dead store) gets STOP_TIMEOUT to exit,
    then is killed. The wait once began before the signal and was resumed without a timeout."""
    import sys
    import threading

    from backyfs.cli import serve as serve_mod

    monkeypatch.setattr(serve_mod, "STOP_TIMEOUT", 1.0)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        sup = serve_mod.Supervisor([])
        sup.proc = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                     "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        time.sleep(0.5)  # the child has set up its handler
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.monotonic()
        assert sup.wait() == 0
        assert time.monotonic() - started < 5 and sup.proc.returncode == -signal.SIGKILL
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_serve_foreground_whose_reader_goes_away_leaves_nothing(bk, uid):
    """`backyfs serve --foreground | true`: printing the URLs fails with a broken pipe; serve ends
    (exit 141, quietly) and takes nbdkit, its pid file and its socket with it."""
    proc = subprocess.run(f"{nh.BACKYFS} serve --foreground {uid} | true", shell=True, env=bk.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # the pipeline's status is true's
    assert not bk.socket.exists() and not bk.pid_file.exists()
    assert "Traceback" not in proc.stderr


def test_the_url_of_a_server_on_every_address_names_this_host():
    """nbds://backyfs@0.0.0.0:PORT/... is no address a client can use."""
    import socket

    from backyfs.cli.serve import Endpoint

    for host, shown in (("0.0.0.0", socket.gethostname()), ("::", socket.gethostname()),
                        ("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")):
        endpoint = Endpoint(host=host, port=10809, tls_user="backyfs", psk_file="/k.psk")
        assert endpoint.url("vm") == f"nbds://backyfs@{shown}:10809/vm?tls-psk-file=/k.psk"


def test_a_stopping_server_removes_only_its_own_socket_and_pid_file(tmp_path):
    """Server A, stopping, removed the socket and pid file of server B, started on the same socket
    meanwhile (seen once by an audit): B kept running with neither."""
    import signal as signal_mod

    from backyfs.cli.serve import Supervisor

    mine, theirs = tmp_path / "a.pid", tmp_path / "s.sock"
    for path in (mine, theirs):
        path.write_text("A")
    handlers = {sig: signal_mod.getsignal(sig) for sig in (signal_mod.SIGTERM, signal_mod.SIGINT,
                                                           signal_mod.SIGHUP)}
    try:
        sup = Supervisor([str(mine), str(theirs)])
    finally:
        for sig, handler in handlers.items():
            signal_mod.signal(sig, handler)
    for path in (mine, theirs):
        st = path.stat()
        sup.made[str(path)] = (st.st_dev, st.st_ino, st.st_ctime_ns)
    theirs.rename(tmp_path / "gone")  # kept, so that B's cannot reuse its inode here
    theirs.write_text("B")  # B's, made after A recorded its own
    sup._cleanup()
    assert not mine.exists() and theirs.read_text() == "B"


def test_a_second_serve_on_the_same_socket_is_refused_and_harms_nothing(bk, uid):
    """Two serve commands started together on one socket both found it free; the one whose nbdkit
    lost removed the winner's socket and pid file (found by a review). The first now claims it."""
    srv = nh.serve(bk, uid)
    try:
        second = bk.run("serve", "--foreground", uid, timeout=60)
        assert second.returncode == 1 and "a backyfs server already runs (or starts)" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert int(nh.run("nbdinfo", "--size", srv.url(uid)).stdout) > 0  # the first still serves
    finally:
        assert srv.stop()[0] == 0
