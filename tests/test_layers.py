"""The architecture and style gates: import-linter's layer contract (pyproject.toml) and ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_layers_hold() -> None:
    proc = run(str(BIN / "lint-imports"), "--no-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" in proc.stdout and "0 broken" in proc.stdout, proc.stdout


def test_ruff_clean() -> None:
    proc = run(str(BIN / "ruff"), "check", "--no-cache", "backyfs", "tests", "scripts", "scripts/bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr
