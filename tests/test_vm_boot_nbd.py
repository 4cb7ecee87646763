"""The test VM boots from a backup served writable over NBD; its writes land in the overlay, which
commits to a new version, and never in the backup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    import nbd_helpers as nh
    import vmboot
except ImportError:  # tests/ imported as a package
    from tests import nbd_helpers as nh
    from tests import vmboot

GUEST_FILE = "/guest-wrote.txt"


@pytest.mark.slow
@pytest.mark.skipif(bool(nh.missing_tools()) and not os.environ.get("CI"),
                    reason=f"missing {nh.missing_tools()}")
def test_boot_from_nbd_export(tmp_path: Path) -> None:
    artifacts = vmboot.build_artifacts()
    expected = (artifacts / "payload.sha256").read_text().strip()
    bk = nh.Backyfs(tmp_path)
    uid = bk.backup(artifacts / "disk.img", "testvm")

    srv = nh.serve(bk, "--writable", uid)
    try:
        url = srv.url(uid)
        assert url == f"nbd+unix:///{uid}?socket={bk.socket}"
        result = vmboot.boot(f"file={url},format=raw,if=virtio", artifacts)
    finally:
        rc, err = srv.stop()
    print(f"boot over NBD: {result.seconds:.1f} s")
    assert rc == 0, err
    assert result.initrd_error is None, result.tail()
    assert not result.timed_out, result.tail()
    assert result.marker_sha256 == expected, result.tail()
    assert result.done and result.returncode == 0, result.tail()

    new_uid = bk.ok("overlay", "commit", uid, "--label", "booted=1").split()[0]
    booted = bk.restore(new_uid, tmp_path / "booted.img")
    wrote = vmboot.read_guest_file(booted, GUEST_FILE)
    assert wrote == f"written by guest backyfs-testvm sha256={expected}\n".encode()

    original = bk.restore(uid, tmp_path / "original.img")
    assert nh.same_bytes(original, artifacts / "disk.img")
    with pytest.raises(FileNotFoundError):
        vmboot.read_guest_file(original, GUEST_FILE)
