"""``meshkv proxy``'s P/D mode with a batch of prompts, against scripted engines
(``tests/helpers/proxy.py``): a flow per prompt, each prompt's decode as soon as its prefill
answered, the answers or streams joined as vLLM joins a batch's, and a streamed batch cut
off at the drain deadline. (Real engines: ``tests/vllm/test_pd.py``.)"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from meshkv.launch import free_port
from meshkv.proxy.app import build_app
from meshkv.proxy.config import ProxyConfig
from meshkv.proxy.serve import make_runner
from tests.helpers.proxy import FakeEngine, get, post, proxy, run, sse_events, until


def test_a_batch_of_prompts_gets_a_transfer_per_prompt_and_one_answer() -> None:
    """vLLM answers a batch with the first prompt's transfer parameters only; the proxy
    sends each prompt through a P/D flow of its own and joins the answers as vLLM joins
    a batch's."""

    async def main() -> None:
        p, d = await FakeEngine("p").start(), await FakeEngine("d").start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,)) as url:
                for prompts in (["one", "two", "three"], [[1, 2], [3, 4]]):
                    p.seen.clear()
                    d.seen.clear()
                    body = {"model": "tiny", "prompt": prompts, "max_tokens": 4, "n": 2}
                    status, answer = await post(url + "/v1/completions", body)
                    assert status == 200, answer
                    assert sorted(str(b["prompt"]) for b in p.seen) == sorted(map(str, prompts))
                    assert all(b["max_tokens"] == 1 and b["n"] == 1 for b in p.seen)
                    legs = [b for b in d.seen if "meshkv_probe" not in str(b)]
                    assert len(legs) == len(prompts)
                    for leg in legs:  # each decode leg carries its own prompt's parameters
                        assert leg["kv_transfer_params"]["meshkv"]["prompt"] == leg["prompt"]
                        assert leg["n"] == 2 and leg["max_tokens"] == 4
                    assert [c["prompt"] for c in answer["choices"]] == prompts
                    assert [c["index"] for c in answer["choices"]] == list(range(len(prompts)))
                    k = len(prompts)
                    assert answer["usage"] == {"prompt_tokens": 5 * k, "completion_tokens": 2 * k,
                                               "total_tokens": 7 * k}  # fmt: skip
                # Not a batch: one prompt of token ids, or a list of one prompt.
                for prompt in ([1, 2, 3], ["solo"]):
                    p.seen.clear()
                    status, answer = await post(url + "/v1/completions", {"prompt": prompt})
                    assert status == 200 and [b["prompt"] for b in p.seen] == [prompt]
                # One prompt's engine fails: the client gets that error, not a partial answer.
                p.fail_status = d.fail_status = 400
                status, answer = await post(url + "/v1/completions", {"prompt": ["a", "b"]})
                assert status == 400 and "d broke" in answer["error"]["message"]
        finally:
            await p.stop()
            await d.stop()

    run(main)


def test_a_streamed_batch_gets_a_transfer_per_prompt_and_one_stream() -> None:
    """Streamed, a batch's prompts are relayed as vLLM streams a batch: prompt i's j-th
    choice is index i*n+j, one id, one usage event summed over the prompts, one [DONE]."""

    async def main() -> None:
        p, d = await FakeEngine("p").start(), await FakeEngine("d").start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,)) as url:
                body = {"model": "tiny", "prompt": ["a", "b", "c"], "max_tokens": 3, "n": 2,
                        "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(url + "/v1/completions", json=body) as resp,
                ):
                    assert resp.status == 200
                    assert resp.headers["Content-Type"].startswith("text/event-stream")
                    events = sse_events(await resp.read())
                assert sorted(b["prompt"] for b in p.seen) == ["a", "b", "c"]
                legs = [b for b in d.seen if "meshkv_probe" not in str(b)]
                assert all(leg["kv_transfer_params"]["meshkv"]["prompt"] == leg["prompt"]
                           for leg in legs) and len(legs) == 3  # fmt: skip
                assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
                usage = events[-2]
                assert usage["choices"] == [] and usage["usage"] == {
                    "prompt_tokens": 15, "completion_tokens": 18, "total_tokens": 33}  # fmt: skip
                content = events[:-2]
                assert len({e["id"] for e in content + [usage]}) == 1
                texts: dict[int, list[str]] = {}
                for e in content:
                    (choice,) = e["choices"]
                    texts.setdefault(choice["index"], []).append(choice["text"])
                assert texts == {i * 2 + j: [f"{prompt}-t{k}" for k in range(3)]
                                 for i, prompt in enumerate("abc") for j in range(2)}  # fmt: skip
                # an engine that refuses one prompt: the client gets its error, no stream
                d.fail_status = 400
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(url + "/v1/completions", json=body) as resp,
                ):
                    assert resp.status == 400 and "d broke" in await resp.text()
                # a client that hangs up mid-stream ends every prompt's request
                d.fail_status, d.stream_chunks = None, 500
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(url + "/v1/completions", json=body) as resp,
                ):
                    await resp.content.readline()
                await until(lambda: len(d.abandoned) == 3)
                assert d.abandoned == ["streaming"] * 3 and p.abandoned == []
                await asyncio.sleep(0.2)
                _, ups = await get(url + "/v1/upstreams")
                assert [u["inflight"] for u in ups["upstreams"]] == [0, 0]
        finally:
            await p.stop()
            await d.stop()

    run(main)


@pytest.mark.parametrize("stream", [False, True])
def test_a_batchs_prompts_decode_as_soon_as_each_is_prefilled(stream: bool) -> None:
    """Each prompt of a batch goes to its decode engine as soon as its own prefill
    answered (so its KV is held on the producer only that long, and the first prompts
    decode while the last prefill), with at most ``batch_prefills`` prefill legs at once;
    the answer is the same batch answer."""

    async def main() -> None:
        p, d = await FakeEngine("p", delay=0.2).start(), await FakeEngine("d").start()
        try:
            async with proxy(prefill=(p.url,), decode=(d.url,), batch_prefills=2) as url:
                prompts = [f"q{i}" for i in range(6)]
                body = {"prompt": prompts, "max_tokens": 3, "stream": stream}
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(url + "/v1/completions", json=body) as resp,
                ):
                    assert resp.status == 200
                    raw = await resp.read()
                assert p.peak_busy == 2 and len(p.seen) == 6
                legs = [(t, b) for t, b in zip(d.seen_at, d.seen, strict=True)
                        if "meshkv_probe" not in str(b)]  # fmt: skip
                assert sorted(b["prompt"] for _, b in legs) == prompts
                first_decode = min(t for t, _ in legs)
                assert first_decode < max(p.seen_at), "decode waited for the whole batch"
                if stream:
                    texts = {e["choices"][0]["index"]: e["choices"][0]["text"]
                             for e in sse_events(raw)[:-1] if e["choices"]}  # fmt: skip
                    assert texts == {i: f"q{i}-t2" for i in range(6)}
                else:
                    answer = json.loads(raw)
                    assert [c["prompt"] for c in answer["choices"]] == prompts
                    assert [c["index"] for c in answer["choices"]] == list(range(6))
        finally:
            await p.stop()
            await d.stop()

    run(main)


def test_the_drain_deadline_ends_a_streamed_batch_with_an_error_event() -> None:
    """A P/D batch still streaming when the proxy's drain deadline passes: the client gets
    what was streamed, an error event saying why and ``[DONE]``; every prompt's request
    on the decode engine is ended, and the proxy's shutdown waits for none of them."""

    async def main() -> None:
        p = await FakeEngine("p").start()
        d = await FakeEngine("d", stream_chunks=500, chunk_delay=0.05).start()
        try:
            cfg = ProxyConfig(port=free_port(), prefill=(p.url,), decode=(d.url,), drain_s=0.3)
            runner = make_runner(build_app(cfg), cfg.drain_s)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", cfg.port).start()
            body = {"prompt": ["a", "b"], "max_tokens": 3, "stream": True}
            async with aiohttp.ClientSession() as http:
                async with http.post(f"http://127.0.0.1:{cfg.port}/v1/completions",
                                     json=body) as resp:  # fmt: skip
                    assert resp.status == 200
                    await resp.content.readline()  # streaming
                    stopping = asyncio.get_running_loop().time()
                    stopped = asyncio.create_task(runner.cleanup())
                    events = sse_events(await resp.read())
                await stopped
            took = asyncio.get_running_loop().time() - stopping
            assert took < 2.0, took  # not the 25 s the streams would take
            assert events[-1] == "[DONE]", events[-3:]
            assert "shutting down" in events[-2]["error"]["message"], events[-2]
            assert all("choices" in e for e in events[:-2]) and len(events) > 2
            await until(lambda: len(d.abandoned) == 2)
        finally:
            await p.stop()
            await d.stop()

    run(main)
