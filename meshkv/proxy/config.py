"""``meshkv proxy``'s settings (``ProxyConfig``), each refused by its flag's name when it
cannot work."""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass, field

from meshkv.errors import ConfigError


@dataclass(slots=True)
class ProxyConfig:
    """Settings of one ``meshkv proxy``."""

    host: str = "127.0.0.1"
    """Address to serve on."""
    port: int = 8000
    prefill: tuple[str, ...] = ()
    """Prefill engines' base URLs (disaggregated mode)."""
    decode: tuple[str, ...] = ()
    """Decode engines' base URLs (disaggregated mode)."""
    engines: tuple[str, ...] = ()
    """Engines' base URLs (aggregated mode)."""
    agents: tuple[str, ...] = ()
    """Aggregated mode: the admin URL of each engine's meshkv agent, in the order of
    ``engines`` (cache-aware routing asks them what they hold)."""
    routing: str = "least_loaded"
    """Aggregated mode: ``least_loaded``, ``round_robin``, ``random``, ``sticky``,
    ``cache_aware`` (needs ``agents``)."""
    load_weight: float = 1.0
    """cache_aware: cost of one request in flight, in prompts (see ``routing.py``)."""
    balance_slack: float = 0.25
    """cache_aware: an engine takes no request while it has more than ``(1 + slack)`` times
    its fair share of the requests in flight (plus this one)."""
    balance_window: int = 64
    """cache_aware: also bound each engine's share of the last this many routed requests
    to ``(1 + balance_slack)`` times the fair share (0: bound only requests in flight)."""
    ssd_weight: float = 0.75
    """cache_aware: an SSD-held token counts as this fraction of a CPU-held one."""
    prefix_timeout_s: float = 0.05
    """cache_aware: longest wait for an agent's prefix answer (then it counts as a miss)."""
    connect_timeout_s: float = 5.0
    """Opening a connection to an upstream."""
    request_timeout_s: float = 600.0
    """Longest an upstream may go without sending a byte of its answer."""
    prefill_timeout_s: float = 120.0
    """The whole prefill leg of a disaggregated request."""
    health_interval_s: float = 2.0
    """Period of the upstreams' ``/health`` checks."""
    prefill_fallback: bool = True
    """A failed prefill leg: let the decode engine compute the prompt (else: an error)."""
    affinity_slack: int = 2
    """A conversation stays on its engine while that one has at most this many more
    requests in flight than the least loaded."""
    batch_prefills: int = 16
    """A batch of prompts in disaggregated mode: how many of its prompts' prefill legs run
    at once (each prompt's decode leg starts as soon as its own prefill answered)."""
    max_body_bytes: int = 64 << 20
    """Largest request body accepted."""
    drain_s: float = 30.0
    """On SIGTERM: stop accepting, and give requests in flight this long to finish (then
    they are cut off). Kubernetes' default grace period is 30 s; keep this below yours."""
    upstream_api_key: str | None = field(default=None, repr=False)
    """The engines' API key (vLLM's ``--api-key``) for the proxy's own requests to them
    (which agent an engine uses, its model name). Client requests carry the client's own
    ``Authorization`` header, never this key."""

    def __post_init__(self) -> None:
        pd = bool(self.prefill or self.decode)
        if pd and self.engines:
            raise ConfigError("give either --prefill/--decode (disaggregated) or --engines")
        if pd and not (self.prefill and self.decode):
            raise ConfigError("disaggregated mode needs both --prefill and --decode URLs")
        if not pd and not self.engines:
            raise ConfigError("give --prefill URL... --decode URL... or --engines URL...")
        for flag, urls in (("--prefill", self.prefill), ("--decode", self.decode),
                           ("--engines", self.engines), ("--agents", self.agents)):  # fmt: skip
            for url in urls:
                check_base_url(flag, url)
        for flag, urls in (("--prefill", self.prefill), ("--decode", self.decode),
                           ("--engines", self.engines), ("--agents", self.agents)):  # fmt: skip
            seen = [u.rstrip("/") for u in urls]
            twice = sorted({u for u in seen if seen.count(u) > 1})
            if twice:  # one engine would take two shares of the traffic
                raise ConfigError(f"{flag} names {', '.join(twice)} more than once")
        if self.agents and len(self.agents) != len(self.engines):
            raise ConfigError(
                f"--agents must name one agent per engine ({len(self.engines)}), "
                f"got {len(self.agents)}"
            )
        from meshkv.proxy.routing import POLICIES

        if self.routing not in POLICIES:
            raise ConfigError(
                f"--routing must be one of {', '.join(POLICIES)}, got {self.routing!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for name in ("connect_timeout_s", "request_timeout_s", "prefill_timeout_s",
                     "health_interval_s", "prefix_timeout_s"):  # fmt: skip
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ConfigError(f"{FLAGS.get(name, name)} must be a positive number of "
                                  f"seconds, got {value}")  # fmt: skip
        if not 0 <= self.drain_s < math.inf:
            raise ConfigError(f"--drain-seconds must be a finite number >= 0, got {self.drain_s}")
        if self.affinity_slack < 0:
            raise ConfigError("proxy: affinity_slack must be >= 0")
        if self.batch_prefills < 1:
            raise ConfigError(f"--batch-prefills must be >= 1, got {self.batch_prefills}")
        if self.balance_window < 0:
            raise ConfigError(f"--balance-window must be >= 0, got {self.balance_window}")
        if self.routing == "cache_aware" and not self.agents:
            raise ConfigError(
                "--routing cache_aware needs --agents URL... (each engine's meshkv agent "
                "admin URL, in the order of --engines)"
            )
        if self.agents and not self.engines:
            raise ConfigError("--agents goes with --engines (aggregated mode)")
        for name in ("load_weight", "balance_slack", "ssd_weight"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ConfigError(f"{FLAGS.get(name, name)} must be a finite number >= 0, "
                                  f"got {value}")  # fmt: skip

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill)


def check_base_url(flag: str, url: str) -> None:
    """Refuse what cannot be a server's base URL, naming the flag: no http(s) scheme, no
    host, a port that is not a number in 1..65535, a query or fragment, or a path that
    ends in ``/v1`` (OpenAI clients take ``.../v1``; the proxy adds it to every route)."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{flag}: upstream URL must start with http:// or https://: {url!r}")
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ConfigError(f"{flag}: {url!r} names no host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (parts.netloc.endswith(":") and port is None):
        raise ConfigError(f"{flag}: {url!r} has a bad port (a number in 1..65535)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ConfigError(f"{flag}: {url!r} must be a base URL, without a ?query or #fragment")
    if parts.path.rstrip("/").endswith("/v1"):
        base = url[: url.rstrip("/").rfind("/v1")]
        raise ConfigError(
            f"{flag}: {url!r} ends in /v1; give the server's base URL ({base!r}): the proxy "
            "adds /v1/... to each route"
        )


FLAGS = {
    "request_timeout_s": "--request-timeout",
    "prefill_timeout_s": "--prefill-timeout",
    "health_interval_s": "--health-interval",
    "prefix_timeout_s": "--prefix-timeout",
    "load_weight": "--load-weight",
    "balance_slack": "--balance-slack",
}
"""The command-line flag of a setting, for error messages."""
