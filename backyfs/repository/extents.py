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


MAX_END = (1 << 63) - 1  # the largest file offset (off_t): no volume reaches past it


def load_hints(path: str) -> list[Extent]:
    """Parse `rbd diff --format json` output: [{"offset": N, "length": N, "exists": "true"}, ...]."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise BackyfsError(f"hints file {path}: expected a JSON list of extents")
    return [_hint(path, n, item) for n, item in enumerate(data)]


def _read_json(path: str) -> object:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        raise BackyfsError(f"cannot read hints file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise BackyfsError(f"hints file {path} is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BackyfsError(f"hints file {path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    except ValueError:  # the only other: an integer of thousands of digits (Python's int limit)
        raise BackyfsError(f"hints file {path}: a number has too many digits") from None
    except RecursionError:
        raise BackyfsError(f"hints file {path}: JSON nested too deeply") from None


def _hint(path: str, n: int, item: object) -> Extent:
    """Entry N of a hints file. Only JSON integers: int() would take "4096", true, 0.5 (as 0) and
    1e30, and fail with a traceback on Infinity."""
    where = f"hints file {path}: entry {n}"
    if not isinstance(item, dict) or "offset" not in item or "length" not in item:
        raise BackyfsError(f"{where} needs integer offset and length")
    offset, length = item["offset"], item["length"]
    for key, value in (("offset", offset), ("length", length)):
        if type(value) is not int:  # not bool, a subclass of int
            raise BackyfsError(f"{where}: {key} must be an integer, not {json.dumps(value)[:40]}")
    if offset < 0 or length < 0:
        raise BackyfsError(f"{where} has a negative offset or length")
    if offset + length > MAX_END:
        raise BackyfsError(f"{where} ends past the largest possible offset ({offset} + {length} bytes)")
    exists = str(item.get("exists", "true")).lower() in ("true", "1")
    return Extent(offset, length, exists)
