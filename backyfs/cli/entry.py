"""The `backyfs` command's entry point: as little as possible before an interrupt is handled.

Importing the command line takes ~50 ms (argparse, logging, the commands); Ctrl-C in that time gave
a Python traceback instead of the one line and exit code 130 of an interrupted command."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from backyfs.cli.main import main as run
    except KeyboardInterrupt:
        print("backyfs: interrupted", file=sys.stderr)
        return 130
    return run()
