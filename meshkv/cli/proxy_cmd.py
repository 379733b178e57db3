"""``meshkv proxy``: an OpenAI-compatible front for vLLM engines (P/D or aggregated)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from meshkv.config import LOG_LEVELS, parse_host_port
from meshkv.errors import ConfigError
from meshkv.loop import loop_factory
from meshkv.paths import check_private_file


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "proxy",
        help="OpenAI-compatible proxy: prefill/decode disaggregation or routing over engines",
        description="Serve an OpenAI-compatible API in front of vLLM engines that use meshkv "
        "(completions, chat, and vLLM's Anthropic Messages and Responses APIs). "
        "Disaggregated: --prefill URL... --decode URL... (each request is prefilled on one "
        "engine, its KV goes to a decode engine through the mesh). Aggregated: --engines "
        "URL... with a routing policy.",
    )
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8000",
                   help="address to serve on (default: 127.0.0.1:8000)")  # fmt: skip
    p.add_argument("--prefill", nargs="+", action="extend", metavar="URL", default=[],
                   help="prefill engines' base URLs (disaggregated mode)")  # fmt: skip
    p.add_argument("--decode", nargs="+", action="extend", metavar="URL", default=[],
                   help="decode engines' base URLs (disaggregated mode)")  # fmt: skip
    p.add_argument("--engines", nargs="+", action="extend", metavar="URL", default=[],
                   help="engines' base URLs (aggregated mode)")  # fmt: skip
    p.add_argument("--routing", default="least_loaded", metavar="POLICY",
                   help="aggregated mode: least_loaded, round_robin, random, sticky or "
                   "cache_aware (default: least_loaded)")  # fmt: skip
    p.add_argument("--agents", nargs="+", action="extend", metavar="URL", default=[],
                   help="cache_aware: each engine's meshkv agent admin URL (http://HOST:PORT), "
                   "in the order of --engines")  # fmt: skip
    p.add_argument("--load-weight", type=float, default=1.0, metavar="W",
                   help="cache_aware: cost of one request in flight, in prompts "
                   "(default: 1)")  # fmt: skip
    p.add_argument("--balance-slack", type=float, default=0.25, metavar="E",
                   help="cache_aware: no engine takes more than (1+E) x its fair share of the "
                   "requests in flight, nor of the last --balance-window requests "
                   "(default: 0.25)")  # fmt: skip
    p.add_argument("--balance-window", type=int, default=64, metavar="N",
                   help="cache_aware: the recent requests whose share is bounded too; 0 bounds "
                   "only requests in flight (default: 64)")  # fmt: skip
    p.add_argument("--prefix-timeout", type=float, default=0.05, metavar="S",
                   help="cache_aware: longest wait for an agent's prefix answer "
                   "(default: 0.05)")  # fmt: skip
    p.add_argument("--prefill-timeout", type=float, default=120.0, metavar="S",
                   help="the whole prefill leg of a request (default: 120)")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="longest an upstream may stay silent (default: 600)")  # fmt: skip
    p.add_argument("--health-interval", type=float, default=2.0, metavar="S",
                   help="period of the upstreams' /health checks (default: 2)")  # fmt: skip
    p.add_argument("--batch-prefills", type=int, default=16, metavar="N",
                   help="disaggregated: prefill legs of one batch request's prompts run at "
                   "once; each prompt's decode starts when its prefill answers "
                   "(default: 16)")  # fmt: skip
    p.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long requests in flight may take to finish "
                   "(default: 30)")  # fmt: skip
    p.add_argument("--upstream-api-key-file", metavar="PATH",
                   help="file holding the engines' API key (vLLM's --api-key), for the "
                   "proxy's own requests to them; client requests carry the client's "
                   "Authorization header (the file must be private: chmod 600)")  # fmt: skip
    p.add_argument("--no-prefill-fallback", action="store_true",
                   help="a failed prefill is an error for the client (default: the decode "
                   "engine computes the prompt)")  # fmt: skip
    p.add_argument("--log-level", default="info", metavar="LEVEL",
                   help=f"one of {', '.join(LOG_LEVELS)} (default: info)")  # fmt: skip
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    from meshkv.proxy.config import ProxyConfig

    host, port = parse_host_port(args.listen, what="--listen")
    if args.log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    loop_factory()  # a bad MESHKV_EVENT_LOOP fails here, with the other settings
    return ProxyConfig(
        host=host,
        port=port,
        prefill=tuple(args.prefill),
        decode=tuple(args.decode),
        engines=tuple(args.engines),
        routing=args.routing,
        agents=tuple(a.rstrip("/") for a in args.agents),
        load_weight=args.load_weight,
        balance_slack=args.balance_slack,
        balance_window=args.balance_window,
        prefix_timeout_s=args.prefix_timeout,
        prefill_timeout_s=args.prefill_timeout,
        request_timeout_s=args.request_timeout,
        health_interval_s=args.health_interval,
        drain_s=args.drain_seconds,
        batch_prefills=args.batch_prefills,
        prefill_fallback=not args.no_prefill_fallback,
        upstream_api_key=read_api_key(args.upstream_api_key_file),
    )


def read_api_key(path: str | None) -> str | None:
    """The key in ``--upstream-api-key-file`` (None without the flag)."""
    if path is None:
        return None
    try:
        check_private_file(Path(path), "--upstream-api-key-file")
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read --upstream-api-key-file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--upstream-api-key-file {path} is not text: {exc}") from exc
    if not key or any(c.isspace() for c in key):
        raise ConfigError(
            f"--upstream-api-key-file {path} must hold one key with no spaces, got "
            f"{'an empty file' if not key else 'whitespace inside the key'}"
        )
    return key


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"meshkv proxy: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from meshkv.proxy.serve import run_proxy

    try:
        run_proxy(config)
    except ConfigError as exc:  # what fails only when serving starts (the port is taken)
        print(f"meshkv proxy: error: {exc}", file=sys.stderr)
        return 1
    return 0
