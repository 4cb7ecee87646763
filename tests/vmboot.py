"""Boot the test VM built by scripts/build-test-vm under qemu (TCG) and read back what the guest wrote.

A helper module, not a test file: tests/test_vm_boot.py proves the artifacts on a plain raw disk, and
later tests boot the same disk through an NBD export of a backup by passing another -drive argument.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-test-vm"
DEFAULT_ARTIFACTS = REPO / ".cache" / "testvm"
PARTITION_OFFSET = 1 << 20

# Each of these trims TCG boot time; none changes what the guest does with its disk.
KERNEL_CMDLINE = " ".join(
    [
        "console=ttyS0 root=/dev/vda1 panic=-1 quiet",
        "mitigations=off",  # no speculation workarounds to emulate
        "cryptomgr.notests",  # crypto self-tests are slow under TCG
        "tsc=reliable no_timer_check nowatchdog",  # skip clock checks that assume real hardware
        "i8042.noaux i8042.nokbd i8042.nopnp 8250.nr_uarts=1",  # probe no PS/2, only one UART
        "random.trust_cpu=on audit=0",
    ]
)

_MARKER = re.compile(r"^BACKYFS-MARKER sha256=([0-9a-f]{64})\s*$", re.MULTILINE)
_DONE = re.compile(r"^BACKYFS-DONE\s*$", re.MULTILINE)
_INITRD_ERROR = re.compile(r"^BACKYFS-INITRD-ERROR (.*)$", re.MULTILINE)


@dataclass
class BootResult:
    output: str  # serial console, \r\n folded to \n
    seconds: float  # wall time from starting qemu until it exited or was killed
    marker_sha256: str | None  # from the guest's "BACKYFS-MARKER sha256=<hex>" line
    done: bool  # the guest printed BACKYFS-DONE (it wrote /guest-wrote.txt and synced)
    returncode: int | None  # qemu's exit status; None when it was killed on timeout
    timed_out: bool = False
    initrd_error: str | None = None  # text of a BACKYFS-INITRD-ERROR line, if the initrd gave up

    @property
    def ok(self) -> bool:
        return self.done and self.marker_sha256 is not None and self.returncode == 0

    def tail(self, lines: int = 40) -> str:
        """The end of the console output, for assertion messages."""
        return "\n".join(self.output.splitlines()[-lines:])


def build_artifacts(outdir: Path | None = None) -> Path:
    """Run scripts/build-test-vm (a no-op when its cache is current) and return the artifact directory."""
    out = Path(outdir) if outdir is not None else DEFAULT_ARTIFACTS
    proc = subprocess.run([str(BUILD_SCRIPT), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return out


def copy_disk(src: Path, dst: Path) -> Path:
    """Copy a raw image keeping it sparse (shutil.copyfile would write out every hole)."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def kernel_for(artifacts: Path) -> Path:
    """The PVH vmlinux when the build could unpack one (~4 s faster under TCG), else the bzImage."""
    vmlinux = artifacts / "vmlinux"
    return vmlinux if vmlinux.is_file() else artifacts / "vmlinuz"


def qemu_command(drive: str, artifacts: Path, kernel: Path | None = None, kernel_args: str = "") -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", "256",
        # -nodefaults: no VGA, floppy, CD-ROM or default NIC to emulate and probe; the serial line is
        # then stdio alone (no monitor muxed in, unlike -nographic).
        "-nodefaults",
        "-display", "none",
        "-serial", "stdio",
        "-nic", "none",
        "-no-reboot",
        "-kernel", str(kernel or kernel_for(artifacts)),
        "-initrd", str(artifacts / "initrd.img"),
        "-append", f"{KERNEL_CMDLINE} {kernel_args}".strip(),
        "-drive", drive,
    ]  # fmt: skip


def boot(
    drive: str,
    artifacts: Path,
    timeout: float = 240,
    *,
    kernel: Path | None = None,
    kernel_args: str = "",
    extra_args: Sequence[str] = (),
) -> BootResult:
    """Boot the test kernel and initrd with `drive` as the full -drive argument, e.g.
    "file=/x/disk.img,format=raw,if=virtio" or "file=nbd+unix:///EXPORT?socket=/tmp/s,format=raw,if=virtio".

    The guest powers off by itself on success and on initrd failure; qemu is killed after `timeout`.
    `kernel_args` are appended to the command line (the initrd reads root= and rootwait=SECONDS, default
    30); `extra_args` to qemu's (e.g. "-snapshot", a second -drive).
    """
    cmd = qemu_command(drive, artifacts, kernel, kernel_args) + list(extra_args)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timed_out = False
    try:
        raw, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        raw, _ = proc.communicate()  # what was printed before the kill
    seconds = time.monotonic() - start
    output = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    marker = _MARKER.search(output)
    initrd_error = _INITRD_ERROR.search(output)
    return BootResult(
        output=output,
        seconds=seconds,
        marker_sha256=marker.group(1) if marker else None,
        done=_DONE.search(output) is not None,
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        initrd_error=initrd_error.group(1).strip() if initrd_error else None,
    )


def read_guest_file(disk_image: Path, path: str, partition_offset: int = PARTITION_OFFSET) -> bytes:
    """Read a file from the ext4 partition of a raw image with debugfs: no mount, no root needed.

    debugfs does not replay the journal; the guest remounts / read-only before powering off, which
    checkpoints it, so its writes are visible here.
    """
    if shutil.which("debugfs") is None:
        raise RuntimeError("debugfs not found (apt-get install e2fsprogs)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "file"
        proc = subprocess.run(
            ["debugfs", "-R", f'dump -p "{path}" "{out}"', f"{disk_image}?offset={partition_offset}"],
            capture_output=True,
            text=True,
        )
        # debugfs exits 0 even when the file is missing: the dump not appearing is the real signal.
        if not out.exists():
            raise FileNotFoundError(f"{path} in {disk_image}: {proc.stderr.strip()}")
        return out.read_bytes()
