"""A real vLLM engine on agent A stores a prompt; a fresh engine on agent B loads it via the mesh.

Three real agent processes (LOCAL preset, mesh secret, TCP) form one mesh. Engine 1 talks
only to agent A, engine 2 (a new process, started after engine 1 exited) only to agent B,
which has its own arena and never saw the chunks: B's lookup finds them through the keys'
homes, B pulls them from A over TCP, and engine 2 loads them from B's arena.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshkv.chunk import Namespace, chunk_keys
from meshkv.launch import AgentProcess
from tests.helpers.logs import kept_logs
from tests.helpers.mesh import metric, start_mesh, wait_converged, wait_for, write_secret
from tests.vllm.engines import EngineRun, Prompts

pytestmark = pytest.mark.vllm

CHUNK_TOKENS = 256


@pytest.fixture
def mesh_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., AgentProcess]]:
    """Build (not start) mesh agents with an SSD directory each; all cleaned up after."""
    made: list[AgentProcess] = []

    def make(**kwargs: Any) -> AgentProcess:
        kwargs.setdefault("ssd_dir", tmp_path / f"ssd-{len(made)}")
        Path(kwargs["ssd_dir"]).mkdir(exist_ok=True)
        agent = AgentProcess(**kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.cleanup(kept_logs(request, tmp_path))


def test_engine_on_b_loads_what_an_engine_on_a_stored_through_the_mesh(
    engine: Callable[..., EngineRun],
    mesh_factory: Callable[..., AgentProcess],
    prompts: Prompts,
    baseline: dict[str, list[int]],
    tmp_path: Path,
) -> None:
    agents = start_mesh(mesh_factory, 3, write_secret(tmp_path), cpu_bytes=128 << 20)
    wait_converged(agents)
    a, b, _ = agents

    producer = engine([prompts.a], connector={"socket": a.socket_path}).result()
    (cold,) = producer["outputs"]
    assert cold["cached_tokens"] == 0
    assert cold["tokens"] == baseline["a"]
    assert producer["counters"]["saved_chunks"] == 3

    namespace = Namespace(**producer["namespaces"]["scheduler"])
    # Two full chunks and the first block of the third, cut (block_hits).
    cut = 2 * CHUNK_TOKENS + 128
    keys = chunk_keys(namespace.digest(), prompts.a[:cut], CHUNK_TOKENS, include_partial=True)
    assert len(keys) == 3
    with a.client(namespace=namespace) as client:
        assert client.lookup(keys).tiers == ["cpu", "cpu", "cpu"]
        assert client.stats()["tiers"]["cpu"]["chunks"] == 3
    # The keys' homes learn that A holds them (announcements are batched, flushed every
    # 50 ms). Asked through B's admin API: a directory query, it pulls nothing (a lookup
    # on B would already start the pulls).
    for key in keys:
        wait_for(
            "the homes to know A holds the chunks",
            lambda key=key: b.get_json(f"/v1/owners/{key.hex()}")["holders"] == ["a"],
        )
    with b.client(namespace=namespace) as client:
        assert client.stats()["tiers"]["cpu"]["chunks"] == 0  # B's own arena has nothing
    assert metric(b, "meshkv_peer_pulls_total") == 0

    consumer = engine([prompts.a], connector={"socket": b.socket_path}).result()
    (warm,) = consumer["outputs"]
    # Both full chunks and the cut came from agent A through agent B (never the whole
    # prompt).
    assert warm["cached_tokens"] == cut
    assert warm["tokens"] == baseline["a"]
    counters = consumer["counters"]
    assert counters["hit_tokens"] == cut
    assert counters["loaded_chunks"] == 3
    assert counters["async_loads"] >= 1  # peer chunks are loaded asynchronously
    assert counters["load_errors"] == 0
    assert counters["saved_chunks"] == 0  # already in B's arena: nothing new to store
    # The bytes crossed the mesh: B pulled all three from a peer and now holds them.
    assert metric(b, "meshkv_peer_pulls_total") == 3
    assert metric(b, "meshkv_peer_pull_bytes_total") > 0
    assert metric(b, "meshkv_peer_pull_failures_total") == 0
    assert metric(a, "meshkv_peer_pulls_total") == 0
    with b.client(namespace=namespace) as client:
        assert client.lookup(keys).tiers == ["cpu", "cpu", "cpu"]
        assert client.stats()["tiers"]["cpu"]["chunks"] == 3
