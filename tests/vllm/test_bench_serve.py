"""``meshkv bench serve`` end to end on the tiny model: the SSD arm (a real agent whose CPU
tier is half the working set, a real SSD directory, a real OpenAI server), both
workloads, closed loop. What the benchmark reports must be what happened: every request
answered, chat rounds that grow by the model's real answers, long-document questions
served from the connector, a large part of them read back from disk, with 128-token chunks
(``--chunk-tokens``), and the engine's occupancy sampled while the run lasted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshkv.bench import serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_bench_serve_ssd_arm_reads_the_working_set_back_from_disk(
    tiny_model: str, tmp_path: Path
) -> None:
    out = tmp_path / "serve.json"
    code = serve.main(
        [
            "--model", tiny_model, "--arms", "meshkv_ssd", "--workloads", "chat,longdoc",
            "--concurrency", "2", "--rates", "", "--chunk-tokens", "128",
            "--docs", "8", "--doc-tokens", "500-600", "--questions", "2",
            "--users", "12", "--rounds", "3", "--system-tokens", "300", "--answer-tokens", "8",
            "--json", str(out), "--plot-dir", str(tmp_path), "--workdir", str(tmp_path / "w"),
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    results = {r["name"]: r for r in report["results"]}
    assert results["failed_requests"]["value"] == 0
    assert report["meta"]["arm_errors"] == {}
    runs = {r["workload"]: r for r in report["meta"]["runs"]}

    chat = runs["chat"]
    assert chat["summary"]["completed"] == 12 * 3  # every round of every user
    # Round r is the previous round's prompt + its 8-token answer (the token ids the model
    # generated) + a new 150-token question: 450, 608 and 766 tokens for each user.
    assert chat["summary"]["prompt_tokens"] == 12 * (450 + 608 + 766)
    # Rounds 2 and 3 repeat the conversation so far: some of it is not computed again.
    tokens = chat["tokens"]
    assert tokens["prefix_cache"] + tokens["connector"] > 0

    doc = runs["longdoc"]
    assert doc["summary"]["completed"] == 8 * 2
    assert doc["warmup"]["completed"] == 8
    tokens = doc["tokens"]
    # The engine holds a quarter of the documents and the CPU tier half: cycling over them,
    # most reused tokens come through the connector, a large part of them from the SSD tier
    # (how much depends on what eviction kept in the CPU tier: half in some runs).
    assert tokens["connector"] >= 0.5 * tokens["prompt"], tokens
    assert tokens["ssd"] >= 0.25 * tokens["connector"], tokens
    assert tokens["demoted_chunks"] > 0
    # One engine block per chunk: the connector of the arm's server was configured so.
    log = (tmp_path / "w" / "longdoc" / "meshkv_ssd" / "server.log").read_text()
    assert "chunk 128 tokens" in log
    # The engine's occupancy was sampled while the questions ran: two in flight at most.
    # The run lasts ~1 s, so one or two samples: one may catch both requests waiting for
    # their loads from the connector (a fresh-clone CI run sampled running 0, waiting 1).
    engine = doc["engine"]
    assert engine["samples"] > 0, engine
    assert engine["running_mean"] + engine["waiting_mean"] > 0, engine
    assert engine["running_max"] <= 2.0, engine
    assert engine["preemptions"] >= 0, engine
    assert (tmp_path / "serve-longdoc.png").stat().st_size > 0
    assert (tmp_path / "serve-chat.png").stat().st_size > 0
