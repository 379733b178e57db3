"""The Grafana dashboard asks only for metrics a live agent and a live proxy expose, and
for the ``vllm:meshkv_*`` counters the connector registers on a vLLM server."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from meshkv.launch import AgentProcess, RedisProcess, free_port, http_get
from tests.helpers.mesh import mesh_args, write_secret

DASHBOARD = Path(__file__).parents[2] / "docs" / "deploy" / "grafana" / "meshkv-dashboard.json"
METRIC = re.compile(r"(?<![:\w])meshkv_[a-z0-9_]+")
ENGINE_METRIC = re.compile(r"\bvllm:meshkv_[a-z0-9_]+")


def exposed(text: str) -> set[str]:
    """Every sample name on a /metrics page, and the series names each declared family
    will have (a labelled histogram has no ``_bucket`` lines before its first sample)."""
    suffixes = {"histogram": ("", "_bucket", "_sum", "_count"), "counter": ("", "_total")}
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()[:4]
            base = family.removesuffix("_total")
            names.update(base + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def connector_metrics() -> set[str]:
    """What the connector's ``MeshKVPromMetrics`` exposes, registered the way vLLM does it
    (its metric classes, here bound to a registry of their own)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from meshkv.integrations.vllm.stats import MeshKVPromMetrics

    registry = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry) for cls in (Counter, Gauge, Histogram)}
    prom = MeshKVPromMetrics(
        SimpleNamespace(kv_transfer_config=None),
        types,
        ["engine"],
        {0: ["0"]},  # type: ignore[arg-type]
    )
    prom.observe({"load_errors": 3, "lookups": 1})
    text = generate_latest(registry).decode()
    assert 'vllm:meshkv_load_errors_total{engine="0"} 3.0' in text
    return exposed(text)


def test_every_query_names_a_metric_that_exists(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 10
    wanted: dict[str, str] = {}
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in METRIC.findall(target["expr"]) + ENGINE_METRIC.findall(target["expr"]):
                wanted.setdefault(name, panel["title"])
    for var in dash["templating"]["list"]:
        query = str(var.get("query", ""))
        for name in METRIC.findall(query) + ENGINE_METRIC.findall(query):
            wanted.setdefault(name, f"variable {var['name']}")
    assert any(n.startswith("vllm:") for n in wanted)  # the engines' panel is there

    with RedisProcess() as redis:  # the remote tier's panels need an agent that has one
        agent = agent_factory(args=[*mesh_args(write_secret(tmp_path)), "--remote", redis.url])
        names = exposed(http_get(agent.start().url + "/metrics").decode())
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "meshkv", "proxy", "--engines", "http://127.0.0.1:9",
         "--listen", f"127.0.0.1:{port}", "--health-interval", "60"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                names |= exposed(http_get(f"http://127.0.0.1:{port}/metrics").decode())
                break
            except OSError:
                assert proxy.poll() is None and time.monotonic() < deadline, "proxy never served"
                time.sleep(0.2)
    finally:
        proxy.terminate()
        proxy.wait(10)
    names |= connector_metrics()
    missing = {n: where for n, where in wanted.items() if n not in names}
    assert not missing, f"dashboard queries metrics nobody exposes: {missing}"
    assert len(wanted) >= 25  # the dashboard covers the agent and the proxy, not a corner
