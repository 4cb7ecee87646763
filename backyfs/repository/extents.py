"""Extent arithmetic shared by backups: which blocks a list of byte ranges touches."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from backyfs.errors import BackyfsError


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    exists: bool = True  # False: the range was discarded/zeroed (rbd diff "exists": "false")


def blocks_touched(extents: Iterable[Extent], block_size: int, size: int) -> set[int]:
    """Indices of blocks overlapping any extent, clipped to the volume."""
    last_block = -(-size // block_size) - 1
    out: set[int] = set()
    for ext in extents:
        if ext.length <= 0:
            continue
        first = ext.offset // block_size
        last = min((ext.offset + ext.length - 1) // block_size, last_block)
        out.update(range(first, last + 1))
    return out


def load_hints(path: str) -> list[Extent]:
    """Parse `rbd diff --format json` output: [{"offset": N, "length": N, "exists": "true"}, ...]."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise BackyfsError(f"cannot read hints file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise BackyfsError(f"hints file {path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, list):
        raise BackyfsError(f"hints file {path}: expected a JSON list of extents")
    extents = []
    for n, item in enumerate(data):
        try:
            offset, length = int(item["offset"]), int(item["length"])
            exists = str(item.get("exists", "true")).lower() in ("true", "1")
        except (KeyError, TypeError, ValueError):
            raise BackyfsError(f"hints file {path}: entry {n} needs integer offset and length") from None
        if offset < 0 or length < 0:
            raise BackyfsError(f"hints file {path}: entry {n} has a negative offset or length")
        extents.append(Extent(offset, length, exists))
    return extents
