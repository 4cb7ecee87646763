"""The systemd units: valid for systemd, and every ExecStart is a command line backyfs accepts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from backyfs.cli.main import build_parser

UNITS = Path(__file__).resolve().parent.parent / "systemd"
INSTALLED = "/opt/backyfs/.venv/bin/backyfs"


def _exec_lines() -> list[tuple[str, list[str]]]:
    out = []
    for unit in sorted(UNITS.glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                out.append((unit.name, shlex.split(line.removeprefix("ExecStart="))))
    return out


def test_every_exec_start_parses_as_a_backyfs_command():
    lines = _exec_lines()
    assert len(lines) >= 4
    for unit, argv in lines:
        assert argv[0] == INSTALLED, unit
        args = [a.replace("%i", "vm1") for a in argv[1:]]
        parsed = build_parser().parse_args(args)  # argparse exits (SystemExit) on a bad line
        assert callable(parsed.func), unit


def test_every_oneshot_unit_has_a_start_timeout():
    """systemd gives Type=oneshot units no start timeout: one hung run (a dead store, a stuck
    mount) would block every later run of its timer. Each of ours sets a finite one."""
    oneshots = 0
    for unit in sorted(UNITS.glob("*.service")):
        settings = dict(line.split("=", 1) for line in unit.read_text().splitlines()
                        if "=" in line and not line.startswith("#"))
        if settings.get("Type") != "oneshot":
            continue
        oneshots += 1
        timeout = settings.get("TimeoutStartSec", "")
        assert re.fullmatch(r"\d+(min|h)", timeout), f"{unit.name}: TimeoutStartSec={timeout!r}"
    assert oneshots == 3


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify_cleanly(tmp_path):
    backyfs = str(Path(sys.executable).with_name("backyfs"))
    names = []
    for unit in UNITS.iterdir():
        name = unit.name.replace("@.", "@vm1.")  # verify the template through an instance
        (tmp_path / name).write_text(unit.read_text().replace(INSTALLED, backyfs))
        names.append(str(tmp_path / name))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *names],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
