"""The test VM boots from its raw disk, reads its payload right and writes to the disk.

This proves scripts/build-test-vm's artifacts; tests that boot the same disk through NBD build on it.
"""

import os
from pathlib import Path

import pytest

try:
    import vmboot
except ImportError:  # tests/ imported as a package (rootdir on sys.path instead of tests/)
    from tests import vmboot


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["vmlinux", "vmlinuz"])
def test_boot_raw_disk(tmp_path: Path, kernel: str) -> None:
    artifacts = vmboot.build_artifacts()
    if not (artifacts / kernel).is_file():
        missing = f"build-test-vm made no {kernel} for this kernel"
        (pytest.fail if os.environ.get("CI") else pytest.skip)(missing)
    disk = vmboot.copy_disk(artifacts / "disk.img", tmp_path / "disk.img")

    result = vmboot.boot(f"file={disk},format=raw,if=virtio", artifacts, kernel=artifacts / kernel)
    print(f"boot with {kernel}: {result.seconds:.1f} s")

    assert result.initrd_error is None, result.tail()
    assert not result.timed_out, result.tail()
    expected = (artifacts / "payload.sha256").read_text().strip()
    assert result.marker_sha256 == expected, result.tail()
    assert result.done, result.tail()
    assert result.returncode == 0, result.tail()

    wrote = vmboot.read_guest_file(disk, "/guest-wrote.txt")
    assert wrote == f"written by guest backyfs-testvm sha256={expected}\n".encode()
    assert vmboot.read_guest_file(disk, "/data/hello.txt") == b"hello from backyfs\n"
    # The pristine image is untouched: tests must boot copies.
    with pytest.raises(FileNotFoundError):
        vmboot.read_guest_file(artifacts / "disk.img", "/guest-wrote.txt")
