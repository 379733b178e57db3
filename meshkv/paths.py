"""Where the agent's files live by default (the one rule the CLI and the connector share).

Nothing here reads the environment: the callers are the process edges (the CLI, the vLLM
connector inside an engine) and pass what they read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SOCKET_NAME = "agent.sock"


def default_socket_path(environ: Mapping[str, str], uid: int | None = None) -> str:
    """``$XDG_RUNTIME_DIR/meshkv/agent.sock``, else ``/tmp/meshkv-<uid>/agent.sock``."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "meshkv", SOCKET_NAME)
    return os.path.join(f"/tmp/meshkv-{os.getuid() if uid is None else uid}", SOCKET_NAME)
