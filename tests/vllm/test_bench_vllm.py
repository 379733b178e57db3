"""``meshkv bench vllm`` end to end on the tiny model: the meshkv arm with a real agent.

Three engines through the benchmark's own harness: the main job, a fresh second engine that
must be served from the agent with the same first tokens, and the in-process engine whose
connector hooks are timed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import vllm_ttft as bench

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TINY = bench.Sizes(
    docs=1, questions=2, doc_tokens=600, question_tokens=20,
    conversations=1, rounds=2, system_tokens=300, user_tokens=50, reply_tokens=20,
    unique=1, unique_tokens=300, warmup=1, gap_s=0.0, engine_timeout_s=240.0,
)  # fmt: skip


def test_meshkv_arm_serves_a_fresh_engine_from_the_agent(tiny_model: str, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    # A generous lookup deadline: this test checks the plumbing, and the suite runs beside
    # other engines on two cores.
    args = parser.parse_args(["--meshkv-extra", json.dumps({"lookup_timeout_s": 2.0})])
    plan = bench.Plan.build(TINY, seed=3, vocab=1000)
    env = bench._engine_env(args)
    out = bench._run_arm("meshkv", args, TINY, plan, tiny_model, env, tmp_path)
    assert out.error is None, out.error
    assert out.main is not None and out.fresh is not None
    main = {t["rid"]: t for t in out.main["timings"]}
    fresh = {t["rid"]: t for t in out.fresh["timings"]}
    # doc0-q1 repeats the 600-token document: two 256-token chunks come from the agent.
    assert main["doc0-q0"]["cached_tokens"] == 0
    assert main["doc0-q1"]["cached_tokens"] == 512
    assert main["chat0-r1"]["cached_tokens"] == 256  # the 350-token first round: one chunk
    assert main["unique0"]["cached_tokens"] == 0
    # The fresh engine never saw doc0-q0, yet gets its chunks from the agent.
    assert fresh["doc0-q0-fresh"]["cached_tokens"] == 512
    assert fresh["doc0-q0-fresh"]["first_token"] == main["doc0-q0"]["first_token"]
    assert all(t["ttft_s"] > 0 for t in main.values())
    store = (out.service_status or {}).get("store", {})
    assert store.get("lookups", 0) >= len(plan.main) + len(plan.fresh)
    # The in-process profiled engine timed the connector's hooks on every request.
    assert out.profile is not None
    profiled = out.profile["timings"]
    assert len(profiled) == len(plan.profile)
    for t in profiled:
        assert 0 < t["connector_s"] < t["ttft_s"]
        assert "get_num_new_matched_tokens" in t["connector_calls"]
    warm = [t for t in profiled if t["phase"] == "warm"]
    assert warm and all(t["cached_tokens"] == 512 for t in warm)
    assert all(t["connector_calls"].get("start_load_kv", 0) > 0 for t in warm)
