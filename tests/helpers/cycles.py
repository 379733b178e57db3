"""Running a test with Python's cycle collector off: what must be freed by reference
counting alone (a closed connection, a dead peer's link) then stays alive if it is held
in a reference cycle, and the test's weak reference sees it."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any


def run_without_cycle_collector(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    gc.collect()
    gc.disable()
    try:
        asyncio.run(main())
    finally:
        gc.enable()
