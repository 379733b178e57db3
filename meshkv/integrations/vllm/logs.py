"""The connector's log records in the engine's log (no vLLM import: the GPU stand-in tests
and the unit tests import the worker side without a real vLLM)."""

from __future__ import annotations

import logging


def share_vllm_logging() -> None:
    """Send meshkv's log records through vLLM's handlers (its format, its level), unless
    the user's logging configuration already gives ``meshkv`` a handler. Without this the
    connector's INFO and WARNING lines (a save skipped, a transfer ignored) never appear
    in an engine's log: vLLM configures only its own logger."""
    ours, theirs = logging.getLogger("meshkv"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.getEffectiveLevel())
    ours.propagate = False
