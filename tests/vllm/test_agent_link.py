"""The connector's link to its agent against a real agent that hangs (SIGSTOP) and comes
back: how long the engine's calls are blocked, and that hits return after the agent does."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from meshkv.chunk import Namespace
from meshkv.errors import MeshKVError
from meshkv.integrations.vllm.link import AgentLink
from meshkv.integrations.vllm.stats import ConnectorCounters
from meshkv.launch import AgentProcess

pytestmark = pytest.mark.vllm  # imports vllm (the connector's counters)

KEY = b"k" * 16


def test_a_hung_agent_costs_the_first_deadlines_only(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory().start()
    counters = ConnectorCounters()
    link = AgentLink(agent.socket_path, Namespace("m"), 0.2, 0.2, counters, 3)
    try:
        assert link.call(lambda c: c.lookup([KEY])).prefix == 0
        agent.sigstop()
        blocked = 0.0
        calls = 0
        end = time.monotonic() + 4.0
        while time.monotonic() < end:  # an engine asking every 10 ms, as requests arrive
            t0 = time.monotonic()
            with pytest.raises(MeshKVError):
                link.call(lambda c: c.lookup([KEY]))
            blocked += time.monotonic() - t0
            calls += 1
            time.sleep(0.01)
        # Three calls miss their 0.2 s deadline and open the breaker; from then on the
        # background probe waits on the agent, not the engine (a retry per 0.2 s interval
        # would have blocked ~2 s of these 4).
        assert blocked < 1.0, (blocked, calls)
        agent.sigcont()
        deadline = time.monotonic() + 5.0
        while True:  # the probe hears the agent and calls go through again
            try:
                assert link.call(lambda c: c.lookup([KEY])).prefix == 0
                break
            except MeshKVError:
                assert time.monotonic() < deadline, "the link never came back"
                time.sleep(0.05)
    finally:
        link.close()
