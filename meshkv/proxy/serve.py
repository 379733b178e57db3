"""Serving ``meshkv proxy``: the aiohttp runner (handlers cancelled when their client
leaves; the drain budget on shutdown) and the process's main loop until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from meshkv.errors import ConfigError
from meshkv.loop import run_main
from meshkv.proxy.app import build_app
from meshkv.proxy.config import ProxyConfig
from meshkv.proxy.drain import DRAIN_GRACE_S

logger = logging.getLogger(__name__)


def make_runner(app: web.Application, drain_s: float) -> web.AppRunner:
    """The proxy's runner: a handler whose client hangs up is cancelled, so the upstream
    request it was waiting on is closed and the engine stops generating for nobody; on
    shutdown, requests in flight get ``drain_s`` to finish, and those cut off then get
    ``DRAIN_GRACE_S`` more for their answer to go out."""
    return web.AppRunner(
        app, access_log=None, handler_cancellation=True, shutdown_timeout=drain_s + DRAIN_GRACE_S
    )


def run_proxy(config: ProxyConfig) -> None:
    """Serve until SIGTERM/SIGINT (uvloop when installed)."""
    run_main(_serve(build_app(config), config))


async def _serve(app: web.Application, config: ProxyConfig) -> None:
    import signal

    runner = make_runner(app, config.drain_s)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:  # the port is taken, the address is not this host's, ...
        await runner.cleanup()  # closes the upstream sessions that startup opened
        raise ConfigError(
            f"cannot serve on {config.host}:{config.port}: {exc.strerror or exc}; "
            "pass a free --listen HOST:PORT"
        ) from exc
    mode = "disaggregated" if config.disaggregated else f"aggregated, {config.routing}"
    where = f"[{config.host}]" if ":" in config.host else config.host
    logger.info("meshkv proxy serving on http://%s:%d (%s)", where, config.port, mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
