"""Retention: which versions of a volume a keep-policy keeps (like restic's forget --keep-*)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from backyfs.metadata.db import Version


@dataclass
class Policy:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def empty(self) -> bool:
        return not (self.last or self.daily or self.weekly or self.monthly)


def _bucket(created: float, kind: str) -> str:
    t = time.localtime(created)
    if kind == "daily":
        return time.strftime("%Y-%m-%d", t)
    if kind == "weekly":
        return time.strftime("%G-W%V", t)
    return time.strftime("%Y-%m", t)


def versions_to_remove(versions: list[Version], policy: Policy) -> list[Version]:
    """Valid, unprotected versions the policy does not keep. Newest first in each rule: the last
    `last`, then the newest version of each of the last `daily` days, `weekly` weeks, `monthly` months.
    Pending and invalid versions are never selected (a running or failed backup is not pruned here)."""
    if policy.empty():
        return []
    valid = sorted((v for v in versions if v.state == "valid"), key=lambda v: v.created, reverse=True)
    keep = {v.uid for v in valid[: policy.last]}
    for kind, count in (("daily", policy.daily), ("weekly", policy.weekly), ("monthly", policy.monthly)):
        seen: list[str] = []
        for v in valid:
            bucket = _bucket(v.created, kind)
            if bucket not in seen:
                if len(seen) == count:
                    break
                seen.append(bucket)
                keep.add(v.uid)
    return [v for v in valid if v.uid not in keep and not v.protected]
