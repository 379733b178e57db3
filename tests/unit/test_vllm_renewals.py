"""The scheduler side's decode requests queued before vLLM looks at them: their producers'
holds renewed every ``transfer_renew_s``, abandoned when they end in the queue or cannot be
used (``meshkv.integrations.vllm.renewals``; the real-engine test is in
``tests/vllm/test_pd_async.py``)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from meshkv.integrations.vllm import renewals
from meshkv.integrations.vllm.scheduler import SchedulerSide
from tests.helpers.vllm_sides import tokens
from tests.unit.test_vllm_sides import (
    FakeSchedulerAgent,
    Request,
    prefilled_params,
    scheduler,
    step_output,
)


class Clock:
    """``time`` for the scheduler module: a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def time() -> float:
        return time.time()

    @staticmethod
    def perf_counter() -> float:
        return time.perf_counter()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(renewals, "time", fake)
    return fake


def _queued_decode(
    clock: Clock, hold_s: float = 60.0, **kw: Any
) -> tuple[SchedulerSide, FakeSchedulerAgent, Request, tuple[str, str]]:
    """A prefill's parameters (its hold: ``hold_s``) and a decode engine (``kw``) that has
    just queued the decode request."""
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent, transfer_hold_s=hold_s)
    params = prefilled_params(side, manager)
    assert params is not None
    decode, _ = scheduler(agent, **kw)
    req = Request("d1", tokens(150), params)
    decode.on_new_request(req)  # type: ignore[arg-type]
    return decode, agent, req, ("node-a", params["meshkv"]["transfer"])


def _step(side: SchedulerSide) -> None:
    side.build_connector_meta(step_output([]))  # type: ignore[arg-type]


def test_a_queued_decode_request_renews_its_hold_until_vllm_looks_at_it(clock: Clock) -> None:
    """All running slots taken: vLLM does not look at the queued request, so nothing pulls
    its transfer; its engine renews the producer's hold every ``transfer_renew_s`` (for three
    times that), one agent call per step at most, and stops once the request's lookup has
    named the transfer (the agent tells the producer when its pulls end)."""
    side, agent, req, ref = _queued_decode(clock, transfer_renew_s=10.0)
    counters = side._counters
    for at in (0.0, 5.0, 9.9):
        clock.now = 1000.0 + at
        _step(side)
    assert agent.transfer_calls == []
    clock.now = 1010.0
    _step(side)
    _step(side)  # the same step time: renewed already
    assert agent.transfer_calls == [([ref], [], 30.0)]
    clock.now = 1015.0
    _step(side)
    clock.now = 1020.5
    _step(side)
    assert len(agent.transfer_calls) == 2 and counters.transfer_renewals == 2
    assert side.get_num_new_matched_tokens(req, 0) == (150, True)  # type: ignore[arg-type]
    assert agent.lookups[-1][1] is not None  # the transfer named
    clock.now = 1100.0
    _step(side)
    assert len(agent.transfer_calls) == 2
    side.request_finished(req, [])  # type: ignore[arg-type]
    assert len(agent.transfer_calls) == 2 and counters.transfers_abandoned == 0


def test_a_short_hold_is_renewed_before_half_of_it_has_passed(clock: Clock) -> None:
    side, agent, _, ref = _queued_decode(clock, hold_s=4.0, transfer_renew_s=10.0)
    clock.now = 1001.9
    _step(side)
    assert agent.transfer_calls == []
    clock.now = 1002.1
    _step(side)
    assert agent.transfer_calls == [([ref], [], 30.0)]


def test_a_decode_request_aborted_in_the_queue_abandons_its_transfer(clock: Clock) -> None:
    side, agent, req, ref = _queued_decode(clock)
    assert side.request_finished(req, []) == (False, None)  # type: ignore[arg-type]
    assert agent.transfer_calls == [([], [ref], 0.0)]
    assert side._counters.transfers_abandoned == 1
    clock.now = 2000.0
    _step(side)  # nothing left to renew
    assert len(agent.transfer_calls) == 1


def test_a_transfer_the_decode_engine_cannot_use_is_abandoned_when_looked_at(
    clock: Clock,
) -> None:
    side, agent, req, ref = _queued_decode(clock)
    other = Request("d1", tokens(149) + [5], req.kv_transfer_params)  # another prompt
    assert side.get_num_new_matched_tokens(other, 0) == (0, False)  # type: ignore[arg-type]
    assert agent.transfer_calls == [([], [ref], 0.0)]


def test_renewals_off_still_abandon_and_a_gone_agent_fails_nothing(clock: Clock) -> None:
    side, agent, req, _ = _queued_decode(clock, transfer_renew_s=0)
    clock.now = 5000.0
    _step(side)
    assert agent.transfer_calls == []
    agent.down = True
    side.request_finished(req, [])  # type: ignore[arg-type]
    assert side._counters.transfers_abandoned == 0
    side, agent, req, _ = _queued_decode(clock)
    agent.down = True
    clock.now += 100
    _step(side)  # the renewal fails quietly: the request goes on
    assert side._counters.transfer_renewals == 0
    agent.down = False
    clock.now += 10
    _step(side)
    assert side._counters.transfer_renewals == 1


def test_many_queued_requests_renew_in_batches(clock: Clock) -> None:
    side, agent, first, _ = _queued_decode(clock)
    for i in range(renewals.RENEW_BATCH + 8):  # other requests, the same transfer
        request = Request(f"q{i}", tokens(150), first.kv_transfer_params)
        side.on_new_request(request)  # type: ignore[arg-type]
    clock.now += 100
    _step(side)
    sizes = [len(renew) for renew, _, _ in agent.transfer_calls]
    assert sizes == [renewals.RENEW_BATCH, 9]
    assert side._counters.transfer_renewals == renewals.RENEW_BATCH + 9
