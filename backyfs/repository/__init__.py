"""The repository: content-addressed blocks in a store, versions and block maps in the metadata DB."""

from __future__ import annotations

from typing import Any

__all__ = ["Repository"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a light submodule (extents) does not load zstd, libsodium and SQLite.
    if name == "Repository":
        from backyfs.repository.repo import Repository

        return Repository
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
