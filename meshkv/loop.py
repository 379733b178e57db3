"""The event loop the agent and the proxy run on: uvloop when installed, asyncio's own
otherwise, or the one ``MESHKV_EVENT_LOOP`` names (``uvloop`` or ``asyncio``): the way
to take uvloop out of the picture when a problem might be its own (a memory trend, a
behaviour that differs between the two) without uninstalling it."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from meshkv.errors import ConfigError

T = TypeVar("T")
ENV = "MESHKV_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")

logger = logging.getLogger(__name__)


def loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The loop's name and its factory (``None``: asyncio's default)."""
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted and wanted not in CHOICES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    if wanted == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError as exc:
        if wanted == "uvloop":
            raise ConfigError(f"{ENV}=uvloop but uvloop is not installed ({exc})") from exc
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def run_main(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh event loop (``loop_factory``'s)."""
    try:
        name, factory = loop_factory()
    except ConfigError:
        main.close()  # never awaited: say so quietly instead of a RuntimeWarning
        raise
    logger.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
