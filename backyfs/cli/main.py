"""backyfs command line entry point: builds the parser from the command modules, maps errors to exits.

Exit codes: 0 success, 1 error, 2 usage error, 3 data problems found (restore incomplete, scrub
found bad blocks), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM; cleaned up as after Ctrl-C),
141 the reader of stdout went away (`backyfs ls | head`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from backyfs import __version__
from backyfs.cli import commands
from backyfs.errors import BackyfsError, Terminated

EXIT_ERROR, EXIT_USAGE, EXIT_DATA, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it

DESCRIPTION = """\
Block-based, deduplicating backups of VM disks (image files, block devices, Ceph RBD images).
Every version can be restored, scrubbed, served as a block device over NBD, or mounted.

Versions are named by their uid (12 hex digits, or a unique prefix of 4+), or by a volume name,
which means that volume's latest valid version."""

EPILOG = """\
configuration: --config FILE, else $BACKYFS_CONFIG, else the embedded default: everything in
$BACKYFS_DATA_DIR (default /var/lib/backyfs as root, ~/.local/share/backyfs otherwise).
Run 'backyfs COMMAND --help' for the options of a command."""

# Command modules each add their subcommands; later fronts (serve, mount) append themselves here.
COMMAND_MODULES = [commands]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with the command word of the argv to parse, only the modules needed for
    it: a backup imports neither the NBD nor the FUSE front (start-up time is most of a small
    incremental backup's). An unknown word gets the whole parser, and so the usual help and errors."""
    parser = argparse.ArgumentParser(prog="backyfs", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: $BACKYFS_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    parser.add_argument("--version", action="version", version=f"backyfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    if command is not None and command in sub.choices:
        return parser
    for module_name in ("backyfs.cli.serve", "backyfs.cli.mount", "backyfs.cli.files",
                        "backyfs.cli.overlay", "backyfs.cli.jobs"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def _command_word(argv: list[str]) -> str | None:
    """The first argument that is not a global option or --config's value (a guess: see build_parser)."""
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):  # the top-level help lists every command
            return None
        if arg == "--config":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _terminate(signum: int, frame: object) -> None:
    # By default SIGTERM ended the process on the spot; serve and mount install their own handlers.
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a process of its own, not a test calling main() in-process
        signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser(_command_word(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except BrokenPipeError as exc:  # `backyfs --help | head`
        return _broken_pipe(exc)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="backyfs: %(levelname)s: %(message)s")
    for chatty in ("botocore", "boto3", "s3transfer", "urllib3"):  # -v is about backyfs, and their
        logging.getLogger(chatty).setLevel(logging.WARNING)  # debug output names credentials
    try:
        rc = args.func(args) or 0
        sys.stdout.flush()  # here, not at exit: a reader that went away is handled below
        return rc
    except commands.DataProblem as exc:
        print(f"backyfs: {exc}", file=sys.stderr)
        return EXIT_DATA
    except commands.UsageError as exc:
        print(f"backyfs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BackyfsError as exc:
        print(f"backyfs: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"backyfs: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except BrokenPipeError as exc:
        return _broken_pipe(exc)
    except UnicodeEncodeError as exc:  # a name that is not UTF-8 (SQLite and the store keys need it)
        print(f"backyfs: error: not valid UTF-8 text: {ascii(exc.object)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"backyfs: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        # Errors of SQLite (disk full, locked past the timeout) and of librados/librbd (permission,
        # a lost cluster) by module, not by class: commands that use neither need not import them.
        what = {"sqlite3": "metadata database", "rados": "Ceph", "rbd": "Ceph RBD"}.get(type(exc).__module__)
        if what is None:
            raise
        hint = ""
        if "malformed" in str(exc):  # SQLITE_CORRUPT: the store holds what rebuild-db needs
            hint = "; move it aside and run 'backyfs rebuild-db'"
        print(f"backyfs: error: {what}: {exc or type(exc).__name__}{hint}", file=sys.stderr)
        return EXIT_ERROR


def _broken_pipe(exc: BrokenPipeError) -> int:
    if not _stdout_reader_gone():
        print(f"backyfs: error: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    # `backyfs ls | head`: the reader has what it wanted; end quietly, as cat and ls do.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return EXIT_BROKEN_PIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reading end is closed (poll reports an error)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
