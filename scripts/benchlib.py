"""Helpers shared by the benchmark scripts (scripts/bench and its bench_* section modules)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
BACKYFS = str(TOP / ".venv" / "bin" / "backyfs")


def drop_caches() -> bool:
    """Empty the page cache for a cold measurement; False when not allowed (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def backyfs_env(data_dir: Path, config: Path | None = None) -> dict[str, str]:
    """The environment for a backyfs command on DATA_DIR, free of the caller's BACKYFS_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKYFS_")}
    env["BACKYFS_DATA_DIR"] = str(data_dir)
    if config is not None and config.exists():
        env["BACKYFS_CONFIG"] = str(config)
    return env


def run_backyfs(who: str, env: dict[str, str], *args: object) -> str:
    """Run the backyfs CLI; stop the benchmark with its one-line error if it fails."""
    proc = subprocess.run([BACKYFS, *map(str, args)], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{who}: backyfs {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc.stdout
