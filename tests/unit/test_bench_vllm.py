"""``meshkv bench vllm`` pieces that need no engine: workloads, plan, statistics, report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import vllm_ttft as bench
from benchmarks import workloads
from benchmarks.vllm_runner import JOB_VERSION, Job

VOCAB = 1024


def test_long_document_qa_shares_exactly_the_document() -> None:
    prompts = workloads.long_document_qa(
        seed=7, vocab_size=VOCAB, docs=3, questions=3, doc_tokens=500, question_tokens=40
    )
    assert [p.phase for p in prompts] == ["cold", "warm", "warm"] * 3
    for d in range(3):
        group = prompts[3 * d : 3 * d + 3]
        docs = {p.tokens[:500] for p in group}
        assert len(docs) == 1, "every question of a document repeats the same document"
        assert len({p.tokens[500:] for p in group}) == 3, "questions differ"
        assert all(len(p.tokens) == 540 for p in group)
        assert [p.reusable_tokens for p in group] == [0, 500, 500]
    # Documents differ from each other, and ids stay in range and skip special tokens.
    assert len({p.tokens[:500] for p in prompts}) == 3
    flat = [t for p in prompts for t in p.tokens]
    assert min(flat) >= workloads.FIRST_TOKEN and max(flat) < VOCAB


def test_workloads_are_deterministic_per_seed() -> None:
    def make(seed: int) -> list[workloads.Prompt]:
        return workloads.multi_round_chat(
            seed=seed, vocab_size=VOCAB, conversations=2, rounds=3, system_tokens=100,
            user_tokens=30, reply_tokens=20,
        )  # fmt: skip

    assert make(1) == make(1)
    assert make(1) != make(2)


def test_multi_round_chat_extends_the_previous_round() -> None:
    prompts = workloads.multi_round_chat(
        seed=0, vocab_size=VOCAB, conversations=2, rounds=3, system_tokens=100,
        user_tokens=30, reply_tokens=20,
    )  # fmt: skip
    # Sent round by round: c0r0, c1r0, c0r1, c1r1, ...
    assert [p.rid for p in prompts[:4]] == ["chat0-r0", "chat1-r0", "chat0-r1", "chat1-r1"]
    by_id = {p.rid: p for p in prompts}
    for c in range(2):
        for r in range(1, 3):
            prev, cur = by_id[f"chat{c}-r{r - 1}"], by_id[f"chat{c}-r{r}"]
            assert cur.phase == "warm"
            assert cur.tokens[: len(prev.tokens)] == prev.tokens
            assert cur.reusable_tokens == len(prev.tokens)
            assert len(cur.tokens) == len(prev.tokens) + 20 + 30
    assert by_id["chat0-r0"].tokens[:100] != by_id["chat1-r0"].tokens[:100]


def test_unique_prompts_share_no_chunk() -> None:
    prompts = workloads.unique_prompts(seed=0, vocab_size=VOCAB, count=4, tokens=512)
    assert all(p.phase == "cold" for p in prompts)
    assert len({p.tokens[:256] for p in prompts}) == 4


@pytest.mark.parametrize("bad", [{"docs": 0}, {"doc_tokens": -1}])
def test_bad_sizes_are_rejected(bad: dict[str, int]) -> None:
    sizes = {"docs": 1, "questions": 1, "doc_tokens": 10, "question_tokens": 1, **bad}
    with pytest.raises(ValueError, match="must be positive"):
        workloads.long_document_qa(seed=0, vocab_size=VOCAB, **sizes)


def test_plan_and_job_round_trip() -> None:
    plan = bench.Plan.build(bench.QUICK, seed=0, vocab=VOCAB)
    q = bench.QUICK
    assert len(plan.fresh) == q.docs
    assert all(p.phase == "warm" and p.workload == "fresh" for p in plan.fresh)
    assert len(plan.main) == q.unique + q.docs * q.questions + q.conversations * q.rounds
    assert plan.max_len() % 256 == 0 and plan.max_len() > max(len(p.tokens) for p in plan.main)
    # Warm-up prompts never overlap the measured prompts (nothing is pre-cached).
    measured = {p.tokens[:256] for p in plan.main + plan.fresh}
    assert not measured & {p.tokens[:256] for p in plan.warmup + plan.warmup_fresh}
    job = bench._job(plan, "/m", False, None, "main", q, "bfloat16")
    parsed = Job.from_json(json.loads(json.dumps(job)))
    assert parsed.version == JOB_VERSION
    assert [r.rid for r in parsed.requests] == [p.rid for p in plan.main]
    assert parsed.engine.dtype == "bfloat16" and not parsed.engine.prefix_caching
    profiled = bench._job(plan, "/m", False, {"kv_connector": "X"}, "profile", q, "bfloat16")
    assert profiled["engine"]["profile_connector"]
    assert len(profiled["requests"]) == q.unique + 2 * q.questions
    assert not {r["rid"] for r in profiled["requests"]} & {p.rid for p in plan.main}
    with pytest.raises(ValueError, match="job version"):
        Job.from_json({**job, "version": JOB_VERSION + 1})


def _timings(arm: str, plan: bench.Plan, cold_ms: float, warm_ms: float) -> bench.ArmOutcome:
    def rows(prompts: list[workloads.Prompt]) -> list[dict[str, object]]:
        return [
            {
                "rid": p.rid,
                "workload": p.workload,
                "phase": p.phase,
                "prompt_tokens": len(p.tokens),
                "ttft_s": (warm_ms if p.phase == "warm" and arm != "none" else cold_ms) / 1e3,
                "cached_tokens": p.reusable_tokens // 256 * 256 if arm != "none" else 0,
                "first_token": len(p.tokens) % 7,
            }
            for p in prompts
        ]

    out = bench.ArmOutcome(main={"timings": rows(plan.main), "engine_start_s": 9.0})
    if arm in ("meshkv", "lmcache"):
        out.fresh = {"timings": rows(plan.fresh), "engine_start_s": 8.0}
    return out


def test_report_names_ratios_and_failed_arms(tmp_path: Path) -> None:
    plan = bench.Plan.build(bench.QUICK, seed=0, vocab=VOCAB)
    outcomes = {
        "none": _timings("none", plan, 800.0, 800.0),
        "prefix": _timings("prefix", plan, 800.0, 30.0),
        "meshkv": _timings("meshkv", plan, 810.0, 40.0),
        "lmcache": bench.ArmOutcome(error="engine job lmcache failed (exit 1): python -m ..."),
    }
    report = bench.build_report(outcomes, bench.QUICK, plan)
    by_name = {r.name: r for r in report.results}
    assert by_name["ttft_cold"].value == pytest.approx(810.0)
    assert by_name["ttft_cold"].ratio == pytest.approx(810.0 / 800.0)
    assert by_name["warm_over_cold"].value == pytest.approx(40.0 / 810.0)
    assert by_name["ttft_warm_vs_prefix_cache"].ratio == pytest.approx(40.0 / 30.0)
    assert by_name["zero_overlap_overhead"].value == pytest.approx(810.0 / 800.0)
    assert by_name["first_token_agreement"].value == 1.0
    # LMCache failed: its baselines are absent, never invented.
    assert by_name["ttft_warm"].baseline_value is None and by_name["ttft_warm"].ratio is None
    assert "ttft_warm_lmcache" not in by_name
    assert report.meta["arms"]["lmcache"]["error"].startswith("engine job lmcache failed")
    assert report.meta["short_hits"]["meshkv"] == []
    # A warm request that found nothing (e.g. a lookup timed out) is flagged.
    assert outcomes["meshkv"].fresh is not None
    outcomes["meshkv"].fresh["timings"][0]["cached_tokens"] = 0
    short = bench.short_hits(outcomes["meshkv"], plan, "meshkv")
    assert short == ["doc0-q0-fresh:0/1024"]
    table = bench.detail_table(outcomes)
    assert "FAILED" in table and "fresh" in table
    report.write(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["results"]


def test_cli_rejects_unknown_arm(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--arms", "none,bogus", "--quick"])
    args.json = None
    assert bench.run(args) == 2
    assert "bogus" in capsys.readouterr().out
