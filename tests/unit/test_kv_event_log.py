"""``EventLog``: a saved chunk's event is published once every TP rank confirmed it; a
published chunk a lookup finds gone is published as removed, once."""

from __future__ import annotations

import pickle

import pytest
from vllm.distributed.kv_events import BlockRemoved, BlockStored

from meshkv.chunk import ChunkKey
from meshkv.integrations.vllm.events import EventLog, SavedChunks


def _event(n: int) -> BlockStored:
    return BlockStored(
        block_hashes=[n], parent_block_hash=None, token_ids=[n] * 4, block_size=4,
        lora_id=None, medium="CPU", lora_name=None, ownership="meshkv",
    )  # fmt: skip


def _key(n: int) -> ChunkKey:
    return ChunkKey(n.to_bytes(16, "big"))


def test_published_only_after_every_rank_confirmed_in_any_step() -> None:
    log = EventLog(ranks=2)
    log.plan("r", 0, _event(0), _key(0))
    log.plan("r", 1, _event(1), _key(1))
    log.confirm(SavedChunks([("r", 0)]))  # rank 0, this step
    assert list(log.take()) == []
    log.confirm(SavedChunks([("r", 0), ("r", 1), ("x", 9)]))  # rank 1 later; unknown ignored
    assert [e.block_hashes for e in log.take()] == [[0]]
    log.confirm(SavedChunks([("r", 1)]))
    assert [e.block_hashes for e in log.take()] == [[1]]
    log.confirm(SavedChunks([("r", 1), ("r", 1)]))  # already published: nothing twice
    assert list(log.take()) == []


def test_unconfirmed_plans_are_bounded_and_reports_cross_processes() -> None:
    log = EventLog()
    for i in range(EventLog.MAX_PLANNED + 10):
        log.plan("r", i, _event(i), _key(i))
    log.confirm(SavedChunks([("r", 0), ("r", EventLog.MAX_PLANNED + 9)]))
    assert [e.block_hashes for e in log.take()] == [[EventLog.MAX_PLANNED + 9]]  # oldest gone
    saved = pickle.loads(pickle.dumps(SavedChunks([("r", 3)], workers=2)))
    assert saved.get_all_events() == [("r", 3)] and saved.get_number_of_workers() == 2


def test_a_published_chunk_found_gone_is_reported_removed_once() -> None:
    log = EventLog()
    log.plan("r", 0, _event(0), _key(0))
    log.plan("r", 1, _event(1), _key(1))
    log.gone([_key(0)])  # not published yet: nothing to take back
    assert list(log.take()) == []
    log.confirm(SavedChunks([("r", 0), ("r", 1)]))
    assert len(list(log.take())) == 2
    log.gone([_key(1), _key(7)])  # 7: never published here
    (removed,) = log.take()
    assert isinstance(removed, BlockRemoved)
    assert removed.block_hashes == [1] and removed.medium == "CPU"
    assert removed.ownership == "meshkv"
    log.gone([_key(1)])  # reported once
    assert list(log.take()) == []
    for i in range(2, EventLog.MAX_PUBLISHED + 3):  # the memory of published chunks is bounded
        log.plan("r", i, _event(i), _key(i))
        log.confirm(SavedChunks([("r", i)]))
    list(log.take())
    log.gone([_key(0), _key(EventLog.MAX_PUBLISHED + 2)])
    assert [e.block_hashes for e in log.take()] == [[EventLog.MAX_PUBLISHED + 2]]


def test_a_published_chunk_that_moves_tier_is_republished_in_its_new_medium() -> None:
    log = EventLog()
    log.plan("r", 0, _event(0), _key(0))
    log.confirm(SavedChunks([("r", 0)]))
    assert [e.medium for e in log.take()] == ["CPU"]
    log.seen(_key(0), "cpu")  # where it was published: nothing to say
    log.seen(_key(0), "peer")  # on a peer or in the remote tier: keeps its medium
    log.seen(_key(0), "remote")
    log.seen(_key(9), "ssd")  # never published here
    assert list(log.take()) == []
    log.seen(_key(0), "ssd")  # demoted to SSD
    removed, stored = log.take()
    assert isinstance(removed, BlockRemoved) and removed.medium == "CPU"
    assert isinstance(stored, BlockStored) and stored.medium == "STORAGE"
    assert removed.block_hashes == stored.block_hashes == [0]
    assert stored.token_ids == [0] * 4 and stored.ownership == "meshkv"
    log.seen(_key(0), "ssd")
    assert list(log.take()) == []
    log.seen(_key(0), "cpu")  # promoted back
    assert [(type(e).__name__, e.medium) for e in log.take()] == [
        ("BlockRemoved", "STORAGE"),
        ("BlockStored", "CPU"),
    ]
    log.gone([_key(0)])  # and its removal names the medium it was last published in
    assert [e.medium for e in log.take()] == ["CPU"]


def test_the_engine_is_kept_stepping_until_the_commits_come_or_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CI run BV: the last request's chunks were committed after its last step, and an idle
    engine takes no more steps, so their events waited for the next request. ``awaiting``
    (vLLM's ``has_pending_push_work``) keeps it stepping until every rank confirmed, or
    ``AWAIT_S`` passed (a skipped save never confirms)."""
    now = [100.0]
    monkeypatch.setattr("meshkv.integrations.vllm.events.time.monotonic", lambda: now[0])
    log = EventLog(ranks=2)
    assert not log.awaiting()
    log.plan("r", 0, _event(0), _key(0))
    log.plan("r", 1, _event(1), _key(1))
    log.confirm(SavedChunks([("r", 0), ("r", 1)]))  # one rank of two
    assert log.awaiting()
    log.confirm(SavedChunks([("r", 0), ("r", 1)]))
    assert not log.awaiting() and len(list(log.take())) == 2
    log.plan("s", 0, _event(2), _key(2))  # its save is skipped: no confirmation comes
    now[0] += EventLog.AWAIT_S - 0.1
    log.plan("s", 1, _event(3), _key(3))
    assert log.awaiting()
    now[0] += 0.2
    assert log.awaiting()  # ("s", 1) is still young
    now[0] += EventLog.AWAIT_S
    assert not log.awaiting()
    log.confirm(SavedChunks([("s", 1)] * 2))  # a late commit still publishes
    assert [e.block_hashes for e in log.take()] == [[3]]
