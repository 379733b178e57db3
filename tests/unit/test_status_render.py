"""``meshkv status``'s human view of a ``/v1/status`` document (the live agent's output is
checked in tests/integration/test_agent_http.py; these cover the states a healthy test
agent never reaches: a node id conflict, a Redis tier that is down, a section this
version of the CLI does not know)."""

from __future__ import annotations

from typing import Any

from meshkv.cli.ring_cmd import render_status
from meshkv.cli.status_cmd import fmt_bytes, render


def _doc(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node_id": "node-a",
        "version": "0.1.0",
        "uptime_s": 3725.0,
        "store": {
            "tiers": {"cpu": {"chunks": 3, "usage_bytes": 6 << 20, "capacity_bytes": 1 << 30}},
            "pinned_chunks": 2,
            "checksums_pending": 0,
        },
        "process": {
            "pid": 41,
            "tasks": 9,
            "open_fds": 30,
            "vmrss_bytes": 300 << 20,
            "malloc_in_use_bytes": 20 << 20,
            "malloc_free_bytes": 3 << 20,
        },
        "local": {
            "socket": "/run/meshkv/agent.sock",
            "connections": 2,
            "arena_name": "meshkv-41",
            "lookups": 10,
            "lookup_hit_chunks": {"cpu": 6, "peer": 2},
            "lookup_miss_chunks": 2,
            "lookup_hit_rate": 0.8,
            "protocol_errors": 0,
        },
        "mesh": {
            "address": "10.0.0.1:7470",
            "transport": "tcp",
            "alive_members": 3,
            "ring_digest": "90a43be141746a0a36164c8cf863aa61",
            "incarnation": 1,
            "replicas": 2,
            "directory_keys": 17,
            "id_conflicts": [],
        },
    }
    doc.update(sections)
    return doc


def test_a_healthy_agent_reads_as_one_line_per_section() -> None:
    text = render(_doc())
    lines = text.splitlines()
    assert lines[0] == "node      node-a  (meshkv 0.1.0, up 1h02m05s, pid 41)"
    assert "lookups   10 lookups, chunk hit rate 80.0% (hits: cpu 6, peer 2; 2 missed)" in text
    assert "mesh      10.0.0.1:7470 over tcp, 3 members alive, ring 90a43be14174," in text
    assert "process   9 tasks, 30 open fds, rss 300.0 MiB" in text
    assert "malloc 20.0 MiB in use, 3.0 MiB freed but kept" in text
    assert "cpu   3       6.0 MiB      1.00 GiB" in text  # the tier table, sizes readable
    assert "pinned_chunks      2" in text
    assert "CONFLICT" not in text and "remote" not in text
    assert "{" not in text  # no raw JSON left in the human view


def test_prefill_decode_transfers_read_as_one_line() -> None:
    transfers = {"held": 2, "pins": 9, "released": 40, "expired": 1, "evicted": 0,
                 "renewals": 6, "received": 3, "incomplete": 0, "abandoned": 1}  # fmt: skip
    text = render(_doc(transfers=transfers))
    assert (
        "transfers 2 held for decode nodes (9 chunks pinned; ended: 40 released, 1 expired, "
        "0 evicted; 6 renewals); 3 received (0 incomplete), 1 abandoned"
    ) in text.splitlines()


def test_a_node_id_conflict_is_the_first_thing_said() -> None:
    conflict = {"message": "node-b at 10.0.0.2:7470 also calls itself node-a", "at_s": 12.4}
    doc = _doc()
    doc["mesh"]["id_conflicts"] = [conflict]
    first = render(doc).splitlines()[0]
    assert first == (
        "NODE ID CONFLICT (12 s after start): node-b at 10.0.0.2:7470 also calls itself node-a"
    )


def test_a_remote_tier_that_is_down_says_so() -> None:
    remote = {"url": "redis://cache:6379/0", "up": False, "backed_off_s": 4.0, "queued_bytes": 0}
    text = render(_doc(remote=remote))
    assert "remote    redis://cache:6379/0  DOWN (backing off 4.0 s), 0 B queued" in text
    text = render(_doc(remote={**remote, "up": True, "queued_bytes": 3 << 20}))
    assert "remote    redis://cache:6379/0  up, 3.0 MiB queued" in text


def test_a_section_this_cli_does_not_know_is_shown_flat() -> None:
    text = render(_doc(ucx={"workers": 1, "endpoints": {"open": 2}, "lanes": ["tcp", "sysv"]}))
    assert "ucx       workers 1, endpoints open 2, lanes [tcp, sysv]" in text


def test_a_minimal_document_renders() -> None:
    """An agent without the mesh, the local server or process numbers (all optional)."""
    text = render({"node_id": "x", "version": "0.1.0", "uptime_s": 5, "store": {}})
    assert text == "node      x  (meshkv 0.1.0, up 0h00m05s)"


def test_a_node_that_could_not_join_says_through_which_seed_and_why() -> None:
    doc = _doc()
    doc["mesh"]["alive_members"] = 1
    doc["mesh"]["join_errors"] = {"10.0.0.9:7470": "handshake failed: not a meshkv peer"}
    assert (
        "1 members alive, ring 90a43be14174, incarnation 1, 2 replica(s), 17 keys in its "
        "directory; ALONE, not joined through 10.0.0.9:7470 (handshake failed: not a meshkv "
        "peer)" in render(doc)
    )


def test_status_and_ring_status_print_sizes_alike() -> None:
    """One formatter for both commands: the same arena reads the same in each."""
    assert [fmt_bytes(n) for n in (None, 0, 1023, 1024, 3 << 20, 1 << 30, 5 << 40)] == [
        "-", "0 B", "1023 B", "1.0 KiB", "3.0 MiB", "1.00 GiB", "5.00 TiB",
    ]  # fmt: skip
    member = {
        "id": "a",
        "address": "127.0.0.1:7400",
        "state": "alive",
        "incarnation": 1,
        "ring_share": 1.0,
        "tiers": {"cpu": {"chunks": 3, "bytes": 1 << 30}, "ssd": {"chunks": 0, "bytes": 0}},
    }
    ring = render_status(
        {"self": "a", "members": [member], "ring": {"max_over_mean": 1.0, "digest": "x"}}
    )
    assert "1.00 GiB/0 B" in ring  # as in the tier table of the first test


def test_the_engines_using_the_agent_read_as_one_line_each() -> None:
    """``/v1/status`` → ``namespaces``: one line per engine, its TP ranks folded in."""
    base = {
        "model": "/models/llama", "dtype": "bfloat16", "layout": "vllm-cuda-flash_attn-auto-NHC",
        "block_size": 16, "chunk_tokens": 256, "tp_size": 2, "cache_salt": "",
    }  # fmt: skip
    namespaces = [
        {**base, "id": "aa" * 16, "tp_rank": 0},
        {**base, "id": "bb" * 16, "tp_rank": 1},
        {**base, "id": "cc" * 16, "model": "/models/small", "tp_size": 1, "tp_rank": 0},
        {**base, "id": "dd" * 16, "tp_size": 1, "tp_rank": 0,
         "extra": {"drafter": "eagle:/models/eagle", "quantization": "fp8"}},
    ]  # fmt: skip
    lines = [line for line in render(_doc(namespaces=namespaces)).splitlines() if "engine" in line]
    assert lines == [
        "engine    /models/llama (bfloat16, vllm-cuda-flash_attn-auto-NHC, block 16, "
        "256-token chunks, TP 2 (ranks 0,1 seen))",
        "engine    /models/small (bfloat16, vllm-cuda-flash_attn-auto-NHC, block 16, "
        "256-token chunks)",
        "engine    /models/llama (bfloat16, vllm-cuda-flash_attn-auto-NHC, block 16, "
        "256-token chunks, drafter eagle:/models/eagle, quantization fp8)",
    ]
    assert "namespaces" not in render(_doc(namespaces=[]))
