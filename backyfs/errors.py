"""Exceptions shared by every layer. They carry a one-line message; the edges (CLI, NBD, FUSE) map them
to exit codes and errno values."""


class BackyfsError(Exception):
    """Base class: anything a user can cause or fix. The CLI prints str(exc) on one line."""


class ConfigError(BackyfsError):
    pass


class NotFound(BackyfsError):
    """An unknown version, volume, object or overlay."""


class ObjectMissing(NotFound):
    """A stored object that should exist does not."""


class CorruptObject(BackyfsError):
    """A stored object that cannot be decoded or whose content does not match its digest."""


class StoreUnavailable(BackyfsError):
    """The store cannot be reached (network, permissions, full disk)."""


class SourceError(BackyfsError):
    """The backup source cannot be read."""


class StateError(BackyfsError):
    """The operation is not allowed in the current state (protected version, pending parent...)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, systemctl stop), raised like Ctrl-C's KeyboardInterrupt so that work in
    progress is cleaned up the same way: a restore removes its partial file, a backup stops its
    snapshot commands and leaves its version pending, to resume."""


class AlreadyRunning(StateError):
    """Another run holds the lock this one needs (a backup of the same volume)."""
