"""Backup sources and restore targets: files, block devices, and RBD images (``rbd:POOL/IMAGE``)."""

from __future__ import annotations

from typing import Any


def open_source(spec: str) -> Any:
    """A source from a command-line spec: a path, or rbd:POOL/IMAGE."""
    if spec.startswith("rbd:"):
        from backyfs.sources.rbd import RbdSource

        return RbdSource.from_spec(spec)
    from backyfs.sources.file import FileSource

    return FileSource(spec)


def open_target(spec: str, size: int, *, force: bool, sparse: bool) -> Any:
    if spec.startswith("rbd:"):
        from backyfs.sources.rbd import RbdTarget

        return RbdTarget.from_spec(spec, size, force=force)
    from backyfs.sources.file import FileTarget

    return FileTarget(spec, size, force=force, sparse=sparse)
