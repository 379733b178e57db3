"""Where the agent's files live by default (the one rule the CLI and the connector share),
and the check that credential files are private.

Nothing here reads the environment: the callers are the process edges (the CLI, the vLLM
connector inside an engine) and pass what they read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from meshkv.errors import ConfigError

SOCKET_NAME = "agent.sock"


def default_socket_path(environ: Mapping[str, str], uid: int | None = None) -> str:
    """``$XDG_RUNTIME_DIR/meshkv/agent.sock``, else ``/tmp/meshkv-<uid>/agent.sock``."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "meshkv", SOCKET_NAME)
    return os.path.join(f"/tmp/meshkv-{os.getuid() if uid is None else uid}", SOCKET_NAME)


def check_private_file(path: Path, what: str) -> None:
    """Refuse a credential file that the group or others may read or write (as ssh does
    with private keys): whoever can read it can join the mesh or clear the cache."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ConfigError(
            f"{what} {str(path)!r} is accessible by group or others (mode {mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
