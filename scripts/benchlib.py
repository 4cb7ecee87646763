"""Helpers shared by the benchmark scripts (scripts/bench and its bench_* section modules)."""

from __future__ import annotations

import os
import random
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


def make_image(path: Path, size_gib: float, seed: int, block_size: int = 4 << 20) -> Path:
    """Like a used VM disk: in 32 MiB runs, 25% holes, 50% random, 25% compressible text."""
    nblocks = int(size_gib * (1 << 30)) // block_size
    rng = random.Random(seed)
    text = b"".join(b"%08x the quick brown fox jumps over the lazy dog\n" % i for i in range(90000))
    with open(path, "wb") as f:
        f.truncate(nblocks * block_size)
        for run in range(0, nblocks, 8):
            kind = rng.choices(["hole", "rand", "text"], [1, 2, 1])[0]
            for idx in range(run, min(run + 8, nblocks)):
                if kind != "hole":
                    start = rng.randrange(len(text) - block_size)
                    data = rng.randbytes(block_size) if kind == "rand" else text[start : start + block_size]
                    os.pwrite(f.fileno(), data, idx * block_size)
    return path
