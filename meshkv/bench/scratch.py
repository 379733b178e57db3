"""The working directory of a benchmark run that starts processes (logs, SSD tiers, sockets).

With ``--workdir`` it is the caller's and is kept. Without, the run gets a temporary
directory that is removed when the run passes (exit status 0) and kept when it does not,
with a line on stderr saying where: its logs are what explains the failure. (Kept always,
a fault run left 0.2-1.6 GB in ``/tmp`` each time.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

WORKDIR_HELP = (
    "logs, SSD tiers and sockets go here and stay; without it, a temporary directory "
    "removed if the run passes%(default).0s"
)
"""Help of ``--workdir`` (the ``%(default).0s`` keeps argparse from adding "(default: None)")."""


def run_in_scratch(
    run: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    *,
    prefix: str,
    command: str,
    attr: str = "workdir",
) -> int:
    """``run(args)`` with ``args.<attr>`` set to a temporary directory when not given."""
    given = getattr(args, attr, None)
    if given:
        flag = "--" + attr.replace("_", "-")
        if Path(given).exists() and not Path(given).is_dir():
            print(f"{command}: {flag} {given} exists and is not a directory", file=sys.stderr)
            return 2
        return run(args)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    setattr(args, attr, str(path))
    rc = 1
    try:
        rc = run(args)
        return rc
    finally:
        setattr(args, attr, None)
        if rc == 0 or not any(path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"{command}: the run did not pass; its logs are kept in {path}", file=sys.stderr)
