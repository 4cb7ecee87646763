"""Filesystem helpers shared by every layer."""

from __future__ import annotations

import os


def makedirs_private(path: str) -> None:
    """os.makedirs(path, 0o700, exist_ok=True), except that every directory it creates is 0700:
    os.makedirs gives the intermediate ones the umask's mode (0755, or 0777 under umask 000), which
    let other users list block digests and version uids, or rename a store's directories away.
    Directories that exist already keep their mode (the operator may have chosen it)."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # made meanwhile by another process, or not a directory
            if not os.path.isdir(directory):
                raise
