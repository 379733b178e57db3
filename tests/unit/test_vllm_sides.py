"""The connector's scheduler side on its own, against a fake agent.

No engine: vLLM's objects are replaced by the few attributes the side reads (a request's
ids and tokens, the KV cache manager's block ids, a scheduler output), the agent by a fake
of ``SchedulerAgent``. The worker side: ``test_vllm_worker_side.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import pytest

from meshkv.chunk import ChunkKey, NamespaceId
from meshkv.client import LookupReply, TransferRef
from meshkv.errors import AgentUnavailable, ConfigError
from meshkv.integrations.vllm.connector import off_step_reason
from meshkv.integrations.vllm.layout import EngineLayout, drafter_identity, eagle_block_drop
from meshkv.integrations.vllm.scheduler import SchedulerSide
from meshkv.integrations.vllm.stats import ConnectorCounters
from meshkv.integrations.vllm.transfer import parse_consumer, parse_producer
from tests.helpers.vllm_sides import CHUNK, LAYOUT, config, tokens


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    cache_salt: str | None = None
    lora_request: Any = None
    skip_reading_prefix_cache: bool = False
    num_preemptions: int = 0
    mm_features: list[Any] = field(default_factory=list)
    prompt_embeds: Any = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids


@dataclass
class FakeSchedulerAgent:
    """Answers lookups from ``tiers`` (key → tier) and records them."""

    tiers: dict[bytes, str] = field(default_factory=dict)
    down: bool = False
    lookups: list[tuple[list[ChunkKey], TransferRef | None]] = field(default_factory=list)
    probes: list[list[ChunkKey]] = field(default_factory=list)
    ranks: list[list[tuple[NamespaceId, list[ChunkKey]]]] = field(default_factory=list)
    """The other tensor-parallel ranks named by each lookup and probe, in order."""
    transfer_calls: list[tuple[list[tuple[str, str]], list[tuple[str, str]], float]] = field(
        default_factory=list
    )
    """``transfers`` calls: (renew, abandon, renew_s)."""

    def lookup(
        self,
        keys: list[ChunkKey],
        transfer: TransferRef | None,
        *,
        probe: bool = False,
        ranks: Sequence[tuple[NamespaceId, list[ChunkKey]]] = (),
    ) -> LookupReply:
        if self.down:
            raise AgentUnavailable("agent gone")
        if probe:
            self.probes.append(keys)
        else:
            self.lookups.append((keys, transfer))
        self.ranks.append(list(ranks))
        found = [self.tiers.get(k) for k in keys]
        for _, other in ranks:  # a position only where every rank has its chunk
            found = [t if self.tiers.get(k) else None for t, k in zip(found, other, strict=True)]
        if transfer is not None:
            found = [t or "peer" for t in found]
        prefix = found.index(None) if None in found else len(found)
        return LookupReply(prefix, found)

    def node_id(self) -> str | None:
        return None if self.down else "node-a"

    def transfers(
        self,
        *,
        renew: Sequence[tuple[str, str]] = (),
        abandon: Sequence[tuple[str, str]] = (),
        renew_s: float = 0.0,
    ) -> bool:
        if self.down:
            raise AgentUnavailable("agent gone")
        self.transfer_calls.append((list(renew), list(abandon), renew_s))
        return True

    def close(self) -> None:
        pass


class Blocks:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self) -> tuple[list[int]]:
        return (self.ids,)


class Manager:
    def __init__(self) -> None:
        self.blocks: dict[str, list[int]] = {}

    def get_block_ids(self, req_id: str) -> tuple[list[int]]:
        return (self.blocks[req_id],)


def step_output(new: list[tuple[str, int, int]]) -> Any:
    """A scheduler output with new requests ``(req_id, computed, scheduled)``."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=c) for r, c, _ in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], num_computed_tokens=[]),
        num_scheduled_tokens={r: s for r, _, s in new},
    )


def scheduler(
    agent: FakeSchedulerAgent,
    in_step_loads: bool = True,
    layout: EngineLayout = LAYOUT,
    drop_last_block: bool = False,
    **kw: Any,
) -> tuple[SchedulerSide, Manager]:
    side = SchedulerSide(
        config(**kw), layout, ConnectorCounters(), agent, load_enabled=True, save_enabled=True,
        in_step_loads=in_step_loads, drop_last_block=drop_last_block,
    )  # fmt: skip
    manager = Manager()
    side.bind_kv_cache_manager(manager)  # type: ignore[arg-type]
    return side, manager


def prefilled_params(side: SchedulerSide, manager: Manager) -> dict[str, Any] | None:
    """A 150-token prefill with ``do_remote_decode`` on ``side``: the parameters it returns."""
    req_p = Request("p1", tokens(150), {"do_remote_decode": True})
    side.get_num_new_matched_tokens(req_p, 0)  # type: ignore[arg-type]
    manager.blocks["p1"] = list(range(10))
    side.build_connector_meta(step_output([("p1", 0, 150)]))  # type: ignore[arg-type]
    _, params = side.request_finished(req_p, [])  # type: ignore[arg-type]
    return params


def keys_of(side: SchedulerSide, request: Request, partial: bool = False) -> list[ChunkKey]:
    return [k[0] for k in side._keys_for(request, request.prompt_token_ids, partial=partial)]  # type: ignore[arg-type]


# --- scheduler side -----------------------------------------------------------------------


def test_local_hits_are_whole_chunks_and_loads_map_blocks() -> None:
    agent = FakeSchedulerAgent()
    side, _ = scheduler(agent)
    req = Request("r1", tokens(200))
    full = keys_of(side, req)
    assert len(full) == 3
    agent.tiers = {full[0]: "cpu", full[1]: "cpu"}
    assert side.get_num_new_matched_tokens(req, 0) == (128, False)  # type: ignore[arg-type]
    side.update_state_after_alloc(req, Blocks(list(range(100, 113))), 128)  # type: ignore[arg-type]
    meta = side.build_connector_meta(step_output([]))  # type: ignore[arg-type]
    (spec,) = meta.loads
    assert not spec.is_async and [c.keys[0] for c in spec.chunks] == full[:2]
    assert spec.wait_s == 0.0  # in memory: nothing to wait for inside the step
    assert spec.chunks[1].blocks == ((0, 104), (1, 105), (2, 106), (3, 107))
    assert len(agent.lookups) == 1 and agent.lookups[0][1] is None
    assert side.request_finished(req, []) == (False, None)  # type: ignore[arg-type]


def test_an_eagle_engine_s_hits_leave_their_last_block_to_compute() -> None:
    """As vLLM's prefix cache does for EAGLE: the drafter's KV at a hit's last position was
    computed from the token that followed it then. The load covers the blocks before."""
    agent = FakeSchedulerAgent()
    side, _ = scheduler(agent, drop_last_block=True)
    req = Request("r1", tokens(200))
    agent.tiers = {k: "cpu" for k in keys_of(side, req)[:2]}
    block = LAYOUT.block_size
    assert side.get_num_new_matched_tokens(req, 0) == (2 * CHUNK - block, False)  # type: ignore[arg-type]
    side.update_state_after_alloc(req, Blocks(list(range(100, 113))), 2 * CHUNK - block)  # type: ignore[arg-type]
    (spec,) = side.build_connector_meta(step_output([])).loads  # type: ignore[arg-type]
    per_chunk = CHUNK // block
    assert [len(c.blocks) for c in spec.chunks] == [per_chunk, per_chunk - 1]
    # A local prefix hit that already reaches the shortened hit leaves nothing to load.
    other = Request("r2", tokens(200))
    assert side.get_num_new_matched_tokens(other, 2 * CHUNK - block) == (0, False)  # type: ignore[arg-type]
    assert eagle_block_drop(SimpleNamespace(speculative_config=None)) is False
    eagle = SimpleNamespace(use_eagle_block_drop=lambda: True)
    assert eagle_block_drop(SimpleNamespace(speculative_config=eagle)) is True


def test_a_tensor_parallel_lookup_names_every_rank_s_keys() -> None:
    """TP=2: the lookup carries rank 1's keys with the namespace its worker stores under,
    and a chunk only rank 0 holds is not promised (rank 1's load would fail); the block
    probe names rank 1's cuts too."""
    agent = FakeSchedulerAgent()
    side, _ = scheduler(agent, layout=replace(LAYOUT, tp_size=2))
    req = Request("r1", tokens(200))
    per_rank = side._keys_for(req, req.prompt_token_ids)  # type: ignore[arg-type]
    rank0, rank1 = [k[0] for k in per_rank], [k[1] for k in per_rank]
    assert set(rank0).isdisjoint(rank1)
    agent.tiers = {rank0[0]: "cpu", rank0[1]: "cpu", rank1[0]: "cpu"}  # rank 1 lacks chunk 1
    assert side.get_num_new_matched_tokens(req, 0) == (64, False)  # type: ignore[arg-type]
    ((ns, keys),) = agent.ranks[0]
    assert keys == rank1 and ns == replace(LAYOUT, tp_size=2).namespace(1).digest()
    # The probe after the hit asks both ranks' cuts of chunk 1.
    (probe,) = agent.probes
    ((probe_ns, probe_keys),) = agent.ranks[1]
    assert probe_ns == ns and len(probe_keys) == len(probe) and set(probe_keys).isdisjoint(probe)


@pytest.mark.parametrize(
    ("scheduler_config", "v2", "reason"),
    [
        ({"async_scheduling": False}, False, None),
        ({"async_scheduling": True}, False, "async scheduling"),
        ({"async_scheduling": False}, True, "model runner V2"),
        ({}, False, None),  # a vLLM without the setting
    ],
)
def test_engines_that_cannot_roll_back_a_running_request_load_off_the_step(
    scheduler_config: dict[str, Any], v2: bool, reason: str | None
) -> None:
    vllm_config = SimpleNamespace(
        scheduler_config=SimpleNamespace(**scheduler_config), use_v2_model_runner=v2
    )
    assert off_step_reason(vllm_config) == reason  # type: ignore[arg-type]


def test_memory_hits_load_off_the_step_where_the_engine_requires_it() -> None:
    agent = FakeSchedulerAgent()
    side, _ = scheduler(agent, in_step_loads=False)
    req = Request("r1", tokens(200))
    agent.tiers = {k: "cpu" for k in keys_of(side, req)[:2]}
    assert side.get_num_new_matched_tokens(req, 0) == (128, True)  # type: ignore[arg-type]
    side.update_state_after_alloc(req, Blocks(list(range(100, 113))), 128)  # type: ignore[arg-type]
    (spec,) = side.build_connector_meta(step_output([])).loads  # type: ignore[arg-type]
    assert spec.is_async and spec.wait_s == config().load_timeout_s


def test_a_preempted_request_loads_again_and_a_failed_load_is_computed() -> None:
    """vLLM asks again about a request it preempted (its blocks are gone, its KV is still
    in the agent): a fresh lookup and load, not a recompute — at most ``MAX_RELOADS``
    times. A request whose load failed (a block in ``invalid_block_ids``, or the request in
    ``failed_recving``) is computed when asked again, preempted or not."""
    from meshkv.integrations.vllm.scheduler import MAX_RELOADS

    agent = FakeSchedulerAgent()
    side, _ = scheduler(agent)
    req = Request("r1", tokens(200))
    full = keys_of(side, req)
    agent.tiers = {full[0]: "cpu", full[1]: "cpu"}

    def ask_and_load(blocks: list[int]) -> tuple[int | None, bool]:
        answer = side.get_num_new_matched_tokens(req, 0)  # type: ignore[arg-type]
        if answer[0]:
            side.update_state_after_alloc(req, Blocks(blocks), answer[0])  # type: ignore[arg-type]
            side.build_connector_meta(step_output([]))  # type: ignore[arg-type]
        return answer

    assert ask_and_load(list(range(100, 113))) == (128, False)
    assert ask_and_load([]) == (0, False)  # asked again, not preempted: a failed load
    for n in range(1, MAX_RELOADS + 1):
        req.num_preemptions = n
        assert ask_and_load(list(range(200 + 20 * n, 213 + 20 * n))) == (128, False)
        assert len(agent.lookups) == 1 + n  # looked up afresh
    assert side._counters.reloads == MAX_RELOADS
    req.num_preemptions += 1
    assert ask_and_load([]) == (0, False)  # the bound

    # a failed block of the load: computed when asked again, even after a preemption
    req2 = Request("r2", tokens(200))
    assert side.get_num_new_matched_tokens(req2, 0) == (128, False)  # type: ignore[arg-type]
    side.update_state_after_alloc(req2, Blocks(list(range(300, 313))), 128)  # type: ignore[arg-type]
    side.load_failures((), {999})  # another request's block: not this one's
    side.load_failures((), {305})
    req2.num_preemptions = 1
    assert side.get_num_new_matched_tokens(req2, 0) == (0, False)  # type: ignore[arg-type]
    # an asynchronous load reported failed by request id
    agent.tiers[full[1]] = "peer"
    req3 = Request("r3", tokens(200))
    assert side.get_num_new_matched_tokens(req3, 0) == (128, True)  # type: ignore[arg-type]
    side.update_state_after_alloc(req3, Blocks(list(range(400, 413))), 128)  # type: ignore[arg-type]
    side.load_failures({"r3"}, set())
    req3.num_preemptions = 1
    assert side.get_num_new_matched_tokens(req3, 0) == (0, False)  # type: ignore[arg-type]


def test_a_failed_load_plans_its_saves_and_transfer_hold_again() -> None:
    """A prefill request whose load fails: the worker skips that step's saves and hold (the
    blocks are not valid), so the scheduler plans them again for the recomputed blocks.
    Before, the loaded chunks counted as stored and the hold as sent: the chunks computed
    after the failure were never saved and the decode engine computed them again."""
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent, block_hits=False)
    req = Request("p1", tokens(150), {"do_remote_decode": True})
    full = keys_of(side, req)
    agent.tiers = {full[0]: "cpu"}
    assert side.get_num_new_matched_tokens(req, 0) == (CHUNK, False)  # type: ignore[arg-type]
    side.update_state_after_alloc(req, Blocks(list(range(10))), CHUNK)  # type: ignore[arg-type]
    manager.blocks["p1"] = list(range(10))
    meta = side.build_connector_meta(step_output([("p1", CHUNK, 150 - CHUNK)]))  # type: ignore[arg-type]
    (load,) = meta.loads
    (save,) = meta.saves
    assert [c.index for c in save.chunks] == [1, 2] and save.hold is not None  # 1 + the tail
    transfer_id = save.hold.transfer_id
    side.load_failures((), {load.chunks[0].blocks[0][1]})  # its first block was not loaded
    # vLLM computes the request again from that block
    meta = side.build_connector_meta(step_output([("p1", 0, 150)]))  # type: ignore[arg-type]
    (save,) = meta.saves
    assert [c.index for c in save.chunks] == [0, 1, 2]
    assert save.hold is not None and save.hold.transfer_id == transfer_id
    # a load that did not fail changes nothing: the next step saves nothing more
    assert side.build_connector_meta(step_output([("p1", 150, 1)])).saves == []  # type: ignore[arg-type]


def test_ssd_hits_load_inside_the_step_unless_ssd_sync_wait_is_zero() -> None:
    for wait, is_async, wait_s in ((0.25, False, 0.25), (0.0, True, 2.0)):
        agent = FakeSchedulerAgent()
        side, _ = scheduler(agent, ssd_sync_wait_s=wait, load_timeout_s=2.0)
        req = Request("r1", tokens(200))
        full = keys_of(side, req)
        agent.tiers = {full[0]: "cpu", full[1]: "ssd"}
        assert side.get_num_new_matched_tokens(req, 0) == (128, is_async)  # type: ignore[arg-type]
        side.update_state_after_alloc(req, Blocks(list(range(13))), 128)  # type: ignore[arg-type]
        (spec,) = side.build_connector_meta(step_output([])).loads  # type: ignore[arg-type]
        assert spec.is_async is is_async and spec.wait_s == wait_s
    with pytest.raises(ConfigError, match="ssd_sync_wait_s must be >= 0"):
        config(ssd_sync_wait_s=-1.0)


def test_never_the_whole_prompt_and_agent_down_is_zero_hits() -> None:
    agent = FakeSchedulerAgent()
    side, _ = scheduler(agent)
    req = Request("r1", tokens(128))  # exactly two chunks: the last token must be computed
    agent.tiers = dict.fromkeys(keys_of(side, req), "cpu")
    assert side.get_num_new_matched_tokens(req, 0) == (64, False)  # type: ignore[arg-type]
    agent.down = True
    assert side.get_num_new_matched_tokens(Request("r2", tokens(300)), 0) == (0, False)  # type: ignore[arg-type]


def test_a_request_that_reads_no_cache_asks_nothing_and_still_saves() -> None:
    """vLLM sets ``skip_reading_prefix_cache`` for prompt logprobs (every prompt token's
    logits are needed) and then ignores any hit: no lookup (it would only cost a round
    trip and start pulls), but what the request computes is saved for others."""
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent)
    req = Request("r1", tokens(200), skip_reading_prefix_cache=True)
    agent.tiers = dict.fromkeys(keys_of(side, req), "cpu")
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    assert agent.lookups == [] and agent.probes == []
    side.update_state_after_alloc(req, Blocks([]), 0)  # type: ignore[arg-type]
    manager.blocks["r1"] = list(range(13))
    meta = side.build_connector_meta(step_output([("r1", 0, 200)]))  # type: ignore[arg-type]
    assert meta.loads == [] and [c.num_tokens for c in meta.saves[0].chunks] == [64, 64, 64]
    # The same request reading the cache hits its chunks (the control).
    assert side.get_num_new_matched_tokens(Request("r2", tokens(200)), 0) == (192, False)  # type: ignore[arg-type]


def test_a_transfer_consumer_that_reads_no_cache_still_asks_to_end_the_hold() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent)
    params = prefilled_params(side, manager)
    req_d = Request("d1", tokens(150), params, skip_reading_prefix_cache=True)
    side.get_num_new_matched_tokens(req_d, 0)  # type: ignore[arg-type]
    keys, ref = agent.lookups[-1]  # the lookup with the transfer is what releases the hold
    assert ref is not None and ref.producer == "node-a"
    # vLLM's answer for such a request: nothing to load
    side.update_state_after_alloc(req_d, Blocks([]), 0)  # type: ignore[arg-type]
    assert side.build_connector_meta(step_output([])).loads == []  # type: ignore[arg-type]


def test_prefill_saves_the_partial_tail_holds_and_returns_params() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent, transfer_hold_s=30.0)
    params = {"do_remote_decode": True, "do_remote_prefill": False, "meshkv_push_to": "node-d"}
    req = Request("p1", tokens(150), params)  # 2 full chunks + 22 tokens (2 blocks)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    manager.blocks["p1"] = list(range(10, 20))
    meta = side.build_connector_meta(step_output([("p1", 0, 150)]))  # type: ignore[arg-type]
    (spec,) = meta.saves
    assert [c.num_tokens for c in spec.chunks] == [64, 64, 22]
    assert spec.transfer  # the worker waits transfer_save_timeout_s for its reserve
    assert spec.chunks[2].block_ids == (18, 19)
    every = keys_of(side, req, partial=True)
    assert [c.keys[0] for c in spec.chunks] == every
    assert spec.hold is not None and spec.hold.push_to == "node-d" and spec.hold.hold_s == 30.0
    assert [k[0] for k in spec.hold.keys] == every
    delay, out = side.request_finished(req, [])  # type: ignore[arg-type]
    assert delay is False and out is not None
    assert out["do_remote_prefill"] is True and out["do_remote_decode"] is False
    consumer = parse_consumer(out)
    assert consumer is not None and consumer.producer == "node-a" and consumer.tokens == 150
    assert consumer.last_key == every[-1] and consumer.chunk_tokens == CHUNK
    assert consumer.transfer_id == spec.hold.transfer_id


def test_decode_loads_the_whole_prompt_from_the_transfer() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent, transfer_timeout_s=4.0)
    params = prefilled_params(side, manager)
    decode, _ = scheduler(agent, transfer_timeout_s=4.0)
    req_d = Request("d1", tokens(150), params)
    assert decode.get_num_new_matched_tokens(req_d, 0) == (150, True)  # type: ignore[arg-type]
    keys, ref = agent.lookups[-1]
    assert ref is not None and ref.producer == "node-a" and ref.wait_s == 4.0
    assert keys == keys_of(decode, req_d, partial=True)
    decode.update_state_after_alloc(req_d, Blocks(list(range(50, 60))), 150)  # type: ignore[arg-type]
    (spec,) = decode.build_connector_meta(step_output([])).loads  # type: ignore[arg-type]
    assert spec.is_async and spec.wait_s == 4.0
    assert [c.num_blocks for c in spec.chunks] == [4, 4, 2]
    assert spec.chunks[2].blocks == ((0, 58), (1, 59))
    # Preempted on the decode engine: the transfer brought the chunks into this node's
    # agent, so they are looked up there (no transfer named) and loaded again.
    agent.tiers.update(dict.fromkeys(keys, "cpu"))
    req_d.num_preemptions = 1
    assert decode.get_num_new_matched_tokens(req_d, 0) == (150, True)  # type: ignore[arg-type]
    assert agent.lookups[-1] == (keys, None)
    assert decode.request_finished(req_d, []) == (False, {"meshkv_node": "node-a"})  # type: ignore[arg-type]


def test_decode_of_another_prompt_ignores_the_transfer() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent)
    params = prefilled_params(side, manager)
    other = Request("d1", tokens(149) + [5], params)  # same length, last token differs
    assert side.get_num_new_matched_tokens(other, 0) == (0, False)  # type: ignore[arg-type]
    assert agent.lookups[-1][1] is None  # a plain lookup of its own full chunks


def test_a_decode_engine_unlike_its_prefill_engine_says_what_differs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A misconfigured pair (here: another drafter, another KV dtype on the decode side)
    loses every transfer; the decode side names the fields, once, and counts each request."""
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent)
    params = prefilled_params(side, manager)
    assert params is not None and params["meshkv"]["engine"]["dtype"] == LAYOUT.dtype
    unlike = replace(LAYOUT, dtype="uint8", drafter="eagle:/models/eagle")
    decode, _ = scheduler(agent, layout=unlike)
    with caplog.at_level("INFO", logger="meshkv.integrations.vllm.scheduler"):
        for i in range(3):
            req = Request(f"d{i}", tokens(150), params)
            assert decode.get_num_new_matched_tokens(req, 0) == (0, False)  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "prefill node node-a" in warnings[0]
    assert f"dtype: {LAYOUT.dtype!r} (prefill) != 'uint8' (here)" in warnings[0]
    assert "extra.drafter: None (prefill) != 'eagle:/models/eagle' (here)" in warnings[0]
    assert decode._counters.transfer_mismatches == 3
    # The same engine with another prompt is a request's matter: no warning, no count.
    caplog.clear()
    same, _ = scheduler(agent)
    with caplog.at_level("INFO", logger="meshkv.integrations.vllm.scheduler"):
        other = Request("d9", tokens(149) + [5], params)
        assert same.get_num_new_matched_tokens(other, 0) == (0, False)  # type: ignore[arg-type]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert same._counters.transfer_mismatches == 0


@pytest.mark.parametrize(
    "engine",
    ["x", {"model": ["a"]}, {"model": "m" * 600}, {str(i): i for i in range(40)},
     {"extra": {"drafter": {"nested": 1}}}, {7: "seven"}],
)  # fmt: skip
def test_a_malformed_engine_field_is_dropped_not_the_transfer(engine: Any) -> None:
    ours = {"v": 1, "producer": "p", "transfer": "t", "tokens": 10, "chunk_tokens": 64,
            "last_key": "00" * 16, "expires": 1.0, "engine": engine}  # fmt: skip
    consumer = parse_consumer({"do_remote_prefill": True, "meshkv": ours})
    assert consumer is not None and consumer.engine is None


def test_block_hits_save_a_tail_cut_to_blocks_that_a_longer_prompt_loads() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent)
    doc = Request("a", tokens(170))  # 2 full chunks + 42 tokens: 2 whole blocks (32)
    assert side.get_num_new_matched_tokens(doc, 0) == (0, False)  # type: ignore[arg-type]
    assert agent.probes == []  # nothing hit: no second round trip
    manager.blocks["a"] = list(range(10, 21))
    (spec,) = side.build_connector_meta(step_output([("a", 0, 170)])).saves  # type: ignore[arg-type]
    assert [c.num_tokens for c in spec.chunks] == [64, 64, 32]
    assert spec.chunks[2].block_ids == (18, 19) and spec.chunks[2].index == 2
    cut = Request("cut", tokens(160))  # the same start, ending on the tail's last block
    assert [c.keys[0] for c in spec.chunks] == keys_of(side, cut, partial=True)
    # Saved once: the next step of the same request plans nothing more.
    assert side.build_connector_meta(step_output([("a", 170, 1)])).saves == []  # type: ignore[arg-type]
    agent.tiers = dict.fromkeys((c.keys[0] for c in spec.chunks), "cpu")

    # A question about the same document: its third chunk is full of other tokens, so
    # whole chunks hit two; the probe finds the document's two blocks after them.
    question = Request("q", tokens(170) + tokens(30, seed=2))  # 200 tokens
    assert side.get_num_new_matched_tokens(question, 0) == (160, False)  # type: ignore[arg-type]
    (probe,) = agent.probes
    # Cut at 3 and 2 blocks: a cut holds at least half a chunk.
    assert len(probe) == 2 and probe[1] == spec.chunks[2].keys[0]
    side.update_state_after_alloc(question, Blocks(list(range(100, 113))), 160)  # type: ignore[arg-type]
    manager.blocks["q"] = list(range(100, 113))
    meta = side.build_connector_meta(step_output([("q", 160, 40)]))  # type: ignore[arg-type]
    (load,) = meta.loads
    assert [c.num_blocks for c in load.chunks] == [4, 4, 2]  # the tail holds two
    assert load.chunks[2].blocks == ((0, 108), (1, 109)) and not load.is_async
    # It saves its own third chunk (now computed), and no tail: 8 tokens are not a block.
    (save,) = meta.saves
    assert [(c.index, c.num_tokens) for c in save.chunks] == [(2, 64)]
    assert save.chunks[0].block_ids == (108, 109, 110, 111)


def test_block_hits_leave_a_token_to_compute_and_can_be_turned_off() -> None:
    agent = FakeSchedulerAgent()
    side, manager = scheduler(agent)
    doc = Request("a", tokens(170))
    side.get_num_new_matched_tokens(doc, 0)  # type: ignore[arg-type]
    manager.blocks["a"] = list(range(11))
    (spec,) = side.build_connector_meta(step_output([("a", 0, 170)])).saves  # type: ignore[arg-type]
    agent.tiers = dict.fromkeys((c.keys[0] for c in spec.chunks), "cpu")
    # The same prompt again: 128 + 32 tokens hit, 10 are computed.
    assert side.get_num_new_matched_tokens(Request("again", tokens(170)), 0) == (160, False)  # type: ignore[arg-type]
    # A prompt that ends on the tail's last block: at most one block may be promised
    # there, less than half a chunk: not asked for.
    probes = len(agent.probes)
    assert side.get_num_new_matched_tokens(Request("cut", tokens(160)), 0) == (128, False)  # type: ignore[arg-type]
    assert len(agent.probes) == probes
    # Nor saved: 22 tokens after two chunks make one block, less than half a chunk.
    manager.blocks["short"] = list(range(10))
    side.get_num_new_matched_tokens(Request("short", tokens(150, seed=5)), 0)  # type: ignore[arg-type]
    (short,) = side.build_connector_meta(step_output([("short", 0, 150)])).saves  # type: ignore[arg-type]
    assert [c.num_tokens for c in short.chunks] == [64, 64]
    # A tail on a peer makes the load asynchronous; on this node's SSD it is loaded inside
    # the step, which waits for its promotion (``ssd_sync_wait_s``).
    agent.tiers[spec.chunks[2].keys[0]] = "peer"
    assert side.get_num_new_matched_tokens(Request("s", tokens(190)), 0) == (160, True)  # type: ignore[arg-type]
    agent.tiers[spec.chunks[2].keys[0]] = "ssd"
    req_ssd = Request("s2", tokens(190))
    assert side.get_num_new_matched_tokens(req_ssd, 0) == (160, False)  # type: ignore[arg-type]
    side.update_state_after_alloc(req_ssd, Blocks(list(range(500, 512))), 160)  # type: ignore[arg-type]
    (load,) = side.build_connector_meta(step_output([])).loads  # type: ignore[arg-type]
    assert not load.is_async and load.wait_s == config().ssd_sync_wait_s

    off = FakeSchedulerAgent(tiers=dict(agent.tiers))
    plain, manager = scheduler(off, block_hits=False)
    assert plain.get_num_new_matched_tokens(Request("q", tokens(190)), 0) == (128, False)  # type: ignore[arg-type]
    assert off.probes == []
    manager.blocks["b"] = list(range(11))
    plain.get_num_new_matched_tokens(Request("b", tokens(170, seed=3)), 0)  # type: ignore[arg-type]
    (spec,) = plain.build_connector_meta(step_output([("b", 0, 170)])).saves  # type: ignore[arg-type]
    assert [c.num_tokens for c in spec.chunks] == [64, 64]


@pytest.mark.parametrize(
    "params",
    [
        None,
        {"do_remote_prefill": True},
        {"do_remote_prefill": True, "meshkv": "x"},
        {"do_remote_prefill": True, "meshkv": {"v": 2}},
        {"do_remote_prefill": "yes", "meshkv": {"v": 1}},
        {"do_remote_prefill": True, "meshkv": {"v": 1, "producer": "p", "transfer": "t",
                                               "tokens": -1, "chunk_tokens": 64,
                                               "last_key": "00" * 16, "expires": 1.0}},
        {"do_remote_prefill": True, "meshkv": {"v": 1, "producer": "p", "transfer": "t",
                                               "tokens": 10, "chunk_tokens": 64,
                                               "last_key": "zz" * 16, "expires": 1.0}},
    ],
)  # fmt: skip
def test_malformed_transfer_params_are_ignored(params: Any) -> None:
    assert parse_consumer(params) is None
    assert parse_producer({"do_remote_decode": True, "meshkv_push_to": 7}) is not None


def test_revision_and_quantization_isolate_the_namespace() -> None:
    base = LAYOUT.namespace(0).digest()
    assert replace(LAYOUT, revision="").namespace(0).digest() == base
    other_rev = replace(LAYOUT, revision="abc123").namespace(0).digest()
    quantized = replace(LAYOUT, quantization="awq").namespace(0).digest()
    assert len({base, other_rev, quantized}) == 3


def _speculative(method: str, uses_kv: bool, model: str = "", revision: str = "") -> Any:
    draft = SimpleNamespace(model=model, revision=revision or None) if model else None
    spec = SimpleNamespace(method=method, draft_model_config=draft)
    spec.uses_draft_kv_cache = lambda: uses_kv
    return SimpleNamespace(speculative_config=spec)


def test_a_drafter_that_keeps_kv_is_part_of_the_namespace() -> None:
    assert drafter_identity(SimpleNamespace(speculative_config=None), config()) == ""
    ngram = _speculative("ngram", uses_kv=False, model="target")
    assert drafter_identity(ngram, config()) == ""  # no KV of its own: shares with plain engines
    eagle = _speculative("eagle3", uses_kv=True, model="org/drafter", revision="r1")
    assert drafter_identity(eagle, config()) == "eagle3:org/drafter@r1"
    assert drafter_identity(eagle, config(draft_model_id="drafter")) == "eagle3:drafter@r1"
    plain = LAYOUT.namespace(0)
    drafted = replace(LAYOUT, drafter="eagle3:org/drafter@r1").namespace(0)
    assert drafted.extra == {"drafter": "eagle3:org/drafter@r1"}
    assert drafted.digest() != plain.digest()
    assert replace(LAYOUT, drafter="").namespace(0).digest() == plain.digest()


@pytest.mark.parametrize("bad", [0, -1.0, "2s", True])
def test_transfer_save_timeout_must_be_positive_seconds(bad: Any) -> None:
    with pytest.raises(ConfigError, match="transfer_save_timeout_s"):
        config(transfer_save_timeout_s=bad)


@pytest.mark.parametrize("bad", [-1.0, "10s", True])
def test_transfer_renew_must_be_seconds_or_zero(bad: Any) -> None:
    with pytest.raises(ConfigError, match="transfer_renew_s"):
        config(transfer_renew_s=bad)
    assert config(transfer_renew_s=0).transfer_renew_s == 0


def _image(identifier: str, offset: int, length: int) -> SimpleNamespace:
    """A request's multimodal input as vLLM's ``MultiModalFeatureSpec`` carries it."""
    position = SimpleNamespace(offset=offset, length=length)
    return SimpleNamespace(identifier=identifier, mm_position=position, modality="image")


def test_prompts_with_equal_tokens_and_different_images_never_share_keys() -> None:
    """An image's placeholder tokens are the same for every image: without the image's
    hash in the key, a second picture would load the first one's KV (wrong output, no
    error). The chunks before the image are still shared; those it touches and all after
    it depend on the image, as vLLM's own block hashes do."""
    side, _ = scheduler(FakeSchedulerAgent())
    prompt = tokens(200)  # chunks of 64: the image's tokens 70..109 lie in chunk 1
    cat = keys_of(side, Request("cat", prompt, mm_features=[_image("cat", 70, 40)]))
    dog = keys_of(side, Request("dog", prompt, mm_features=[_image("dog", 70, 40)]))
    cat_again = keys_of(side, Request("c2", prompt, mm_features=[_image("cat", 70, 40)]))
    moved = keys_of(side, Request("c3", prompt, mm_features=[_image("cat", 80, 30)]))
    text = keys_of(side, Request("text", prompt))
    assert cat == cat_again  # the same picture in the same place: shared
    assert cat[0] == dog[0] == moved[0] == text[0]  # before the image: shared
    for other in (dog, moved, text):
        assert set(cat[1:]).isdisjoint(other[1:])
    # The tail and a block-cut probe of the image's chunk carry the image too.
    tail = side._keys_for(
        Request("t", prompt, mm_features=[_image("cat", 70, 40)]), prompt, partial=True
    )  # type: ignore[arg-type]
    tail_dog = side._keys_for(
        Request("u", prompt, mm_features=[_image("dog", 70, 40)]), prompt, partial=True
    )  # type: ignore[arg-type]
    assert tail[-1] != tail_dog[-1]
    state_cat = side._state(Request("p1", prompt, mm_features=[_image("cat", 70, 40)]))  # type: ignore[arg-type]
    state_dog = side._state(Request("p2", prompt, mm_features=[_image("dog", 70, 40)]))  # type: ignore[arg-type]
    assert side._partials(state_cat, 1, [2])[0].keys != side._partials(state_dog, 1, [2])[0].keys


def test_prompt_embeddings_are_in_the_keys() -> None:
    """Requests given as embeddings carry placeholder token ids; the embeddings' hash per
    chunk keeps two of them apart."""
    torch = pytest.importorskip("torch")
    side, _ = scheduler(FakeSchedulerAgent())
    prompt = [0] * 130
    first = torch.arange(130 * 8, dtype=torch.bfloat16).reshape(130, 8)
    second = first.clone()
    second[100, 0] = -1.0  # differs in chunk 1 only
    a = keys_of(side, Request("a", prompt, prompt_embeds=first))
    b = keys_of(side, Request("b", prompt, prompt_embeds=second))
    again = keys_of(side, Request("c", prompt, prompt_embeds=first.clone()))
    assert a == again and a[0] == b[0] and a[1] != b[1]
    assert set(a).isdisjoint(keys_of(side, Request("d", prompt)))
