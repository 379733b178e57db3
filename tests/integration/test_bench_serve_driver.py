"""The load driver of the serving benchmarks (``openai_load.drive``) and the workloads of
``meshkv bench serve`` against a scripted OpenAI server (real sockets, real streaming):
concurrency bounds, the order users are served in, chat rounds built from the answers the
server streamed, open-loop pacing, failures counted. The benchmark against real vLLM
servers is ``tests/vllm/test_bench_serve.py``."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from meshkv.bench import openai_load as load
from meshkv.bench import serve, serve_runs
from meshkv.bench.ssd_raw import measure_raw
from meshkv.launch import free_port


class Scripted:
    """Streams ``answer`` token ids (as vLLM does with ``return_token_ids``)."""

    def __init__(self, delay: float = 0.02, fail_every: int = 0) -> None:
        self.delay = delay
        self.fail_every = fail_every
        self.seen: list[dict[str, Any]] = []
        self.inflight = 0
        self.peak = 0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        if self.fail_every and len(self.seen) % self.fail_every == 0:
            return web.json_response({"error": {"message": "scripted failure"}}, status=500)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            n = body["max_tokens"]
            for i in range(n):
                await asyncio.sleep(self.delay)
                chunk = {"choices": [{"text": f"t{i}", "token_ids": [1000 + i]}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
            await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode()
                             + b"\n\n")  # fmt: skip
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.inflight -= 1


async def _serve(script: Scripted) -> tuple[web.AppRunner, str]:
    return await _site([web.post("/v1/completions", script.completions)])


async def _site(routes: list[web.RouteDef]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


SHAPE = serve.Shape(
    docs=3, doc_tokens=(50, 60), questions=2, question_tokens=5, doc_answer_tokens=2,
    users=4, rounds=3, system_tokens=20, user_tokens=6, answer_tokens=3,
)  # fmt: skip


def test_chat_rounds_grow_by_the_streamed_answer_and_users_interleave() -> None:
    script = Scripted()

    async def main() -> list[Any]:
        runner, url = await _serve(script)
        try:
            users = serve.chat_users(SHAPE, seed=1, vocab=500)
            results, _ = await load.drive(url, users, concurrency=2)
            return results
        finally:
            await runner.cleanup()

    results = asyncio.run(main())
    assert len(results) == 4 * 3 and all(r.ok for r in results)
    assert script.peak <= 2
    by_user: dict[str, list[list[int]]] = {}
    for body in script.seen:
        by_user.setdefault(body["user"], []).append(body["prompt"])
    assert sorted(by_user) == [f"user{u}" for u in range(4)]
    system = script.seen[0]["prompt"][:20]
    for prompts in by_user.values():
        assert [len(p) for p in prompts] == [26, 35, 44]  # + 3 answer + 6 question tokens
        assert all(p[:20] == system for p in prompts)  # one shared system prompt
        for earlier, later in zip(prompts, prompts[1:], strict=False):
            assert later[: len(earlier)] == earlier
            assert later[len(earlier) : len(earlier) + 3] == [1000, 1001, 1002]  # the answer
    # The user served longest ago goes next: the first rounds of all four come first.
    firsts = [b["user"] for b in script.seen[:4]]
    assert sorted(firsts) == [f"user{u}" for u in range(4)]


def test_longdoc_questions_cycle_over_the_documents_after_a_warmup() -> None:
    warm, measured = serve.longdoc_users(SHAPE, seed=2, vocab=500)
    docs = [u.take() for u in warm]
    assert [d.tag for d in docs if d] == ["warmup"] * 3
    asked = [u.take() for u in measured]
    assert [a.rid for a in asked if a] == ["doc0-q0", "doc1-q0", "doc2-q0",
                                           "doc0-q1", "doc1-q1", "doc2-q1"]  # fmt: skip
    for spec in asked:
        assert spec is not None
        d = int(spec.rid[3])
        doc = docs[d]
        assert doc is not None
        assert spec.body["prompt"][: len(doc.body["prompt"])] == doc.body["prompt"]


def test_open_loop_paces_arrivals_and_counts_failures() -> None:
    script = Scripted(delay=0.0, fail_every=5)

    async def main() -> tuple[list[Any], float]:
        runner, url = await _serve(script)
        try:
            _, users = serve.longdoc_users(SHAPE, seed=3, vocab=500)
            users = users + serve.longdoc_users(SHAPE, seed=4, vocab=500)[1]
            return await load.drive(url, users, rate=20.0, seed=0)
        finally:
            await runner.cleanup()

    started = time.perf_counter()
    results, seconds = asyncio.run(main())
    assert len(results) == 12
    assert sum(not r.ok for r in results) == 2 and all("HTTP 500" in (r.error or "")
                                                       for r in results if not r.ok)  # fmt: skip
    # 12 Poisson arrivals at 20/s take about 0.6 s; far less would mean no pacing.
    gaps = random.Random(0)
    expected = sum(gaps.expovariate(20.0) for _ in range(12))
    assert seconds >= 0.8 * expected
    assert time.perf_counter() - started < 30


def test_drive_needs_exactly_one_load_shape() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(load.drive("http://127.0.0.1:9", [], concurrency=2, rate=1.0))


def test_workloads_too_small_for_a_quarter_engine_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold one request"):
        serve.sizes(serve.Shape(docs=2), "longdoc", per_token=1024, runs=1)
    size = serve.sizes(serve.Shape(), "longdoc", per_token=8192, runs=3)
    assert size.engine_kv * 4 <= serve.Shape().working_set("longdoc") * 8192
    assert size.cpu_tier >= 3 * serve.Shape().working_set("longdoc") * 8192


def test_raw_ssd_baseline_uses_the_threads_it_is_given(tmp_path: Path) -> None:
    (one,) = measure_raw(str(tmp_path), [1 << 20], 4, workers=1)
    (two,) = measure_raw(str(tmp_path), [1 << 20], 4, workers=2)
    assert one.workers == 1 and two.workers == 2
    assert one.write_gbps > 0 and two.read_gbps > 0
    assert not list(tmp_path.iterdir())  # its files are removed
    with pytest.raises(ValueError, match="positive"):
        measure_raw(str(tmp_path), [1 << 20], 4, workers=0)


def test_raw_ssd_baseline_writes_by_o_direct_when_asked(tmp_path: Path) -> None:
    (direct,) = measure_raw(str(tmp_path), [1 << 20], 4, workers=2, direct=True)
    assert direct.direct and direct.write_gbps > 0 and direct.read_gbps > 0
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="multiples of 4096"):
        measure_raw(str(tmp_path), [(1 << 20) + 1], 4, direct=True)


def _summary(ttft_p50: float, requests_per_s: float) -> load.Summary:
    return load.Summary(
        completed=24, failed=0, seconds=10.0, requests_per_s=requests_per_s,
        output_tokens_per_s=16 * requests_per_s, ttft_p50=ttft_p50, ttft_p90=ttft_p50,
        ttft_p99=ttft_p50, ttft_mean=ttft_p50, itl_p50=0.02, itl_p99=0.4, tpot_p50=0.02,
        tpot_p99=0.03, e2e_p50=ttft_p50 + 0.3, cached_tokens=0, prompt_tokens=80000, errors=[],
    )  # fmt: skip


def test_report_sets_each_cache_against_an_engine_that_holds_everything() -> None:
    runs = [
        serve_runs.Run(arm, "longdoc", "closed", 4.0, _summary(ttft, rps), None)
        for arm, ttft, rps in (
            ("prefix_all", 0.9, 2.8),
            ("meshkv_cpu", 1.2, 2.4),
            ("lmcache", 1.5, 2.0),
        )
    ]
    args = argparse.Namespace(
        workloads=["longdoc"], concurrency=4, rates=[], arms=list(serve.ARMS), shape=SHAPE,
        chunk_tokens=256, block_hits=True, async_scheduling=False,
    )  # fmt: skip
    rows = {r.name: r for r in serve.build_report(runs, args, {}).results}
    assert rows["ttft_p50_longdoc"].value == pytest.approx(1200.0)
    assert rows["ttft_p50_longdoc"].baseline_value == pytest.approx(1500.0)
    floor = rows["ttft_p50_longdoc_vs_prefix_all"]
    assert (floor.value, floor.baseline_value) == (pytest.approx(1200.0), pytest.approx(900.0))
    assert rows["ttft_p50_longdoc_lmcache_vs_prefix_all"].value == pytest.approx(1500.0)
    assert rows["throughput_longdoc_vs_prefix_all"].baseline_value == pytest.approx(2.8)
    assert rows["throughput_longdoc_lmcache_vs_prefix_all"].value == pytest.approx(2.0)
    assert "ttft_p50_longdoc_vs_prefix_cache" not in rows  # that arm did not run: no row


class Gauges:
    """A ``/metrics`` page whose scheduler gauges the test sets while a sampler reads it."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.preemptions = 5
        self.scrapes = 0

    async def metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{engine="0",model_name="m"}} {self.running}',
            f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {self.waiting}',
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {0.1 * self.running}',
            f'vllm:num_preemptions_total{{engine="0",model_name="m"}} {self.preemptions}',
        ]
        return web.Response(text="\n".join(lines) + "\n")


def test_occupancy_reports_what_the_engine_ran_waited_and_preempted_during_the_run() -> None:
    gauges = Gauges()

    async def main() -> dict[str, float]:
        runner, url = await _site([web.get("/metrics", gauges.metrics)])
        try:
            occupancy = serve_runs.Occupancy(url, period_s=0.02)
            # The sampler runs on its own thread: this loop keeps answering it.
            await asyncio.to_thread(occupancy.__enter__)
            gauges.running, gauges.waiting = 2, 3
            await asyncio.sleep(0.3)
            gauges.preemptions += 4
            await asyncio.to_thread(occupancy.__exit__, None, None, None)
            return occupancy.summary()
        finally:
            await runner.cleanup()

    summary = asyncio.run(main())
    assert summary["samples"] >= 5
    # Sampled after the first period, so (nearly) every sample saw 2 running and 3 waiting.
    assert summary["running_mean"] == pytest.approx(2.0, abs=0.5)
    assert summary["running_max"] == 2.0
    assert summary["waiting_mean"] == pytest.approx(3.0, abs=0.75)
    assert summary["kv_usage_mean"] == pytest.approx(0.2, abs=0.05)
    assert summary["preemptions"] == 4.0  # the run's own, not the counter's total


def test_occupancy_of_a_server_that_never_answers_has_no_samples() -> None:
    occupancy = serve_runs.Occupancy(f"http://127.0.0.1:{free_port()}", period_s=0.01)
    with occupancy:
        time.sleep(0.05)
    # Nothing measured is reported as nothing, not as zero.
    assert occupancy.summary() == {"samples": 0.0}


def test_a_chunk_size_that_engine_blocks_do_not_tile_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{}")  # refused before the model is read
    assert serve.main(["--model", str(tmp_path), "--chunk-tokens", "200"]) == 2
    assert "--chunk-tokens must be a multiple of vLLM CPU's block size (128), got 200" in (
        capsys.readouterr().err
    )


def test_async_scheduling_with_the_lmcache_arm_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert serve.main(["--model", str(tmp_path), "--async-scheduling"]) == 2
    assert "leave lmcache out of --arms" in capsys.readouterr().err
