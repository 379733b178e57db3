"""The connector's link to its agent against a real agent that hangs (SIGSTOP) and comes
back: how long the engine's calls are blocked, and that hits return after the agent does."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from meshkv.chunk import Namespace
from meshkv.client import AgentClient
from meshkv.errors import MeshKVError
from meshkv.integrations.vllm.link import AgentLink
from meshkv.integrations.vllm.stats import ConnectorCounters
from meshkv.launch import AgentProcess

pytestmark = pytest.mark.vllm  # imports vllm (the connector's counters)

KEY = b"k" * 16


def wait_until_back(link: AgentLink, timeout: float = 5.0) -> None:
    """Call until the link answers again (its probe heard the agent)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert link.call(lambda c: c.lookup([KEY])).prefix == 0
            return
        except MeshKVError:
            assert time.monotonic() < deadline, "the link never came back"
            time.sleep(0.05)


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
        wait_until_back(link)  # the probe hears the agent and calls go through again
    finally:
        link.close()


def test_a_link_left_hung_without_a_probe_heals_itself(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    """The breaker is open "until the probe hears the agent", but no probe runs (the last
    one was exiting when the agent hung again; or one attempt raised something odd): the
    next call starts a probe, and the probe survives an attempt that raises."""
    agent = agent_factory().start()
    link = AgentLink(agent.socket_path, Namespace("m"), 0.2, 0.2, ConnectorCounters(), 3)
    real = link._new_client
    odd = [RuntimeError("one odd attempt")]

    def flaky() -> AgentClient:
        if odd:
            raise odd.pop()
        return real()

    try:
        assert link.call(lambda c: c.lookup([KEY])).prefix == 0
        link._new_client = flaky  # type: ignore[method-assign]
        link._down_until = float("inf")
        wait_until_back(link)
        assert not odd  # the probe's first attempt raised, and it went on
    finally:
        link.close()


def test_a_slow_agent_at_engine_start_is_waited_for_not_skipped(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    """An agent that answers its first hello late (starved while an engine's workers
    start beside it) is waited for at warm-up, so the first request's lookup reaches it;
    after one 0.2 s deadline it used to count as hung and the first requests found
    nothing until the probe heard it."""
    agent = agent_factory().start()
    counters = ConnectorCounters()
    link = AgentLink(agent.socket_path, Namespace("m"), 0.2, 0.2, counters, 3)
    agent.sigstop()
    resume = threading.Timer(1.0, agent.sigcont)
    resume.start()
    try:
        t0 = time.monotonic()
        assert link.warm_up()
        assert 0.9 < time.monotonic() - t0 < 5.0
        assert link.call(lambda c: c.lookup([KEY])).prefix == 0  # no breaker open
        assert counters.agent_unavailable == 0 and counters.agent_slow == 0
        # The deadline of later calls is the configured one again, not the warm-up's.
        assert link._get_client().timeout == 0.2
    finally:
        resume.cancel()
        agent.sigcont()
        link.close()
