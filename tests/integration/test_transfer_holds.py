"""A producer's hold on a prefill/decode transfer, between two real agents: it ends at its
deadline when nobody renews it, lives on while the consumer's agent renews it (a decode
request queued longer than the hold), never past the producer's cap, and ends at once when
the consumer abandons it (a decode request aborted while queued) or has pulled it.

The engines' part (``SchedulerSide`` sends the renewals and abandons) is unit-tested in
``tests/unit/test_vllm_sides.py``; this is the agents' part, over real sockets."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkv.client import AgentClient, TransferHold, TransferRef
from meshkv.launch import AgentProcess
from tests.helpers.mesh import metric, start_mesh, wait_converged, wait_for, write_secret

CHUNKS = 3


def _ended(agent: AgentProcess, how: str) -> float:
    return metric(agent, "meshkv_transfers_ended_total", f'how="{how}"')


def _held(client: AgentClient, transfer_id: str, hold_s: float) -> list[bytes]:
    """Store ``CHUNKS`` chunks through ``client`` and hold them for ``transfer_id``."""
    keys = [os.urandom(16) for _ in range(CHUNKS)]
    for key in keys:
        assert client.put(key, os.urandom(256 << 10), num_tokens=256)
    assert client.hold(keys, TransferHold(transfer_id, hold_s)) == CHUNKS
    return keys


@pytest.fixture
def pair(agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> list[AgentProcess]:
    agents = start_mesh(agent_factory, 2, write_secret(tmp_path), names=["prefill", "decode"])
    wait_converged(agents)
    return agents


def test_renewed_hold_outlives_its_deadline_and_ends_when_pulled(
    pair: list[AgentProcess],
) -> None:
    producer, consumer = pair
    with producer.client() as cp, consumer.client() as cc:
        keys = _held(cp, "queued", 1.5)
        assert metric(producer, "meshkv_transfer_pins") == CHUNKS
        # The decode request waits in its engine's queue for 4 s, more than twice the
        # hold: its engine renews it through its agent (here every 0.5 s, for 1.5 s more).
        until = time.monotonic() + 4.0
        while time.monotonic() < until:
            assert cc.transfers(renew=[("prefill", "queued")], renew_s=1.5)
            time.sleep(0.5)
        assert metric(producer, "meshkv_transfer_pins") == CHUNKS
        assert _ended(producer, "expired") == 0
        renewed = metric(producer, "meshkv_transfer_renewals_total", 'result="renewed"')
        assert renewed >= 5, renewed  # one-way messages: all 8 sent, most arrive in time
        assert metric(consumer, "meshkv_peer_transfer_renewals_sent_total") >= renewed
        # vLLM looks at the request at last: its lookup names the transfer, the decode
        # agent pulls the chunks, and the producer hears that it may let go.
        reply = cc.lookup(keys, transfer=TransferRef("queued", "prefill", 5.0))
        assert reply.prefix == CHUNKS
        wait_for("the producer to release", lambda: _ended(producer, "released") == 1, 10)
        assert metric(producer, "meshkv_transfer_pins") == 0
        assert _ended(producer, "expired") == 0
        # A renewal that comes after the release is counted, and renews nothing.
        assert cc.transfers(renew=[("prefill", "queued")], renew_s=1.5)
        wait_for(
            "the late renewal to arrive",
            lambda: metric(producer, "meshkv_transfer_renewals_total", 'result="unknown"') == 1,
            10,
        )
        assert metric(producer, "meshkv_transfer_pins") == 0


def test_unrenewed_hold_expires_and_an_abandoned_one_ends_at_once(
    pair: list[AgentProcess],
) -> None:
    producer, consumer = pair
    with producer.client() as cp, consumer.client() as cc:
        # Control: the same hold, nobody renews it: it ends at its deadline.
        _held(cp, "forgotten", 1.0)
        wait_for("the hold to expire", lambda: _ended(producer, "expired") == 1, 10)
        assert metric(producer, "meshkv_transfer_pins") == 0
        # A decode request aborted while queued: its engine abandons the transfer, and the
        # producer lets go long before the hold's 60 s.
        _held(cp, "aborted", 60.0)
        assert metric(producer, "meshkv_transfer_pins") == CHUNKS
        assert cc.transfers(abandon=[("prefill", "aborted")])
        wait_for("the producer to release", lambda: _ended(producer, "released") == 1, 10)
        assert metric(producer, "meshkv_transfer_pins") == 0
        assert metric(consumer, "meshkv_transfers_abandoned_total") == 1
        status = producer.get_json("/v1/status")
        assert status["store"]["leases_open"] == 0, status["store"]
        # What `meshkv status` shows on each side.
        held = status["transfers"]
        assert (held["held"], held["pins"], held["released"], held["expired"]) == (0, 0, 1, 1)
        assert consumer.get_json("/v1/status")["transfers"]["abandoned"] == 1


def test_a_transfer_between_engines_beside_one_agent_is_released_and_renewed_there(
    agent: AgentProcess,
) -> None:
    """Prefill and decode engines on one node share its agent (no mesh): the decode side's
    lookup ends the hold at once, renewals and abandons reach the agent's own holds."""
    node = agent.get_json("/v1/status")["node_id"]
    with agent.client() as prefill, agent.client() as decode:
        keys = _held(prefill, "beside", 60.0)
        reply = decode.lookup(keys, transfer=TransferRef("beside", node, 5.0))
        assert reply.tiers == ["cpu"] * CHUNKS
        wait_for("the hold to be released", lambda: _ended(agent, "released") == 1, 10)
        assert metric(agent, "meshkv_transfer_pins") == 0
        _held(prefill, "queued", 1.0)
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            assert decode.transfers(renew=[(node, "queued")], renew_s=1.0)
            time.sleep(0.3)
        assert metric(agent, "meshkv_transfer_pins") == CHUNKS and _ended(agent, "expired") == 0
        assert decode.transfers(abandon=[(node, "queued")])
        assert _ended(agent, "released") == 2 and metric(agent, "meshkv_transfer_pins") == 0
