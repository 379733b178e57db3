"""The prefill/decode test stack: a plain engine's reference outputs, then two agents (a
mesh), a prefill and a decode vLLM OpenAI server and ``meshkv proxy``.

How much of each prompt the decode engine computed comes from its own counter
(``vllm:prompt_tokens_by_source{source="local_compute"}``): in P/D, the response's
``cached_tokens`` reports the prefill side's hits, so it cannot tell.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshkv.launch import (
    AgentProcess,
    HttpProcess,
    computed_prompt_tokens,
    free_port,
    http_get,
    meshkv_kv_transfer_config,
    vllm_server_command,
)
from tests.conftest import child_env
from tests.helpers.mesh import mesh_args, wait_converged, write_secret

BLOCK = 128  # vLLM CPU's default block size
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
TRANSFER_TIMEOUT_S = 4.0
UCX_TRANSFER_TIMEOUT_S = 15.0
"""Over UCX the first transfer also sets up the agents' UCX endpoints, which took over
4 s on the two loaded cores in some runs (the decode side then recomputed the prompt).
These tests check that the KV arrives through the mesh, not how fast: the benchmarks do."""
SERVER_TIMEOUT_S = 300.0

_rng = random.Random(909)


def _tokens(n: int) -> list[int]:
    return [_rng.randrange(3, 1000) for _ in range(n)]


PROMPTS = {"p700": _tokens(700), "p333": _tokens(333), "p1000": _tokens(1000)}
"""Token prompts whose lengths are not multiples of the 256-token chunk."""
WORDS = [
    "the",
    "mesh",
    "moves",
    "kv",
    "between",
    "nodes",
    "so",
    "that",
    "no",
    "prompt",
    "is",
    "computed",
    "twice",
]
CHAT = [
    {"role": "system", "content": " ".join(_rng.choice(WORDS) for _ in range(300))},
    {"role": "user", "content": " ".join(_rng.choice(WORDS) for _ in range(40))},
]


def post(
    url: str,
    body: dict[str, Any],
    timeout: float = 120.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: dict[str, Any] = json.load(response)
        return data


def stream(url: str, body: dict[str, Any], timeout: float = 120.0) -> str:
    """POST a streaming request and join the text of its SSE chunks."""
    request = urllib.request.Request(
        url,
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    text = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "choices" in event:  # OpenAI completions and chat
                choice = event["choices"][0]
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
            elif event.get("type") == "content_block_delta":  # Anthropic Messages
                text.append(event["delta"].get("text") or "")
            elif event.get("type") == "response.output_text.delta":  # OpenAI Responses
                text.append(event["delta"])
    return "".join(text)


def text_of(answer: dict[str, Any]) -> str:
    """The generated text of an answer of any of the four generating APIs."""
    if answer.get("type") == "message":  # Anthropic Messages
        return "".join(b.get("text", "") for b in answer["content"])
    if answer.get("object") == "response":  # OpenAI Responses
        return "".join(
            c.get("text", "") for item in answer["output"] for c in item.get("content") or []
        )
    choice = answer["choices"][0]
    return str(choice.get("text") if "text" in choice else choice["message"]["content"])


computed = computed_prompt_tokens
"""Prompt tokens the engine computed itself, so far."""


def settle_metrics(server: HttpProcess, before: float) -> float:
    """vLLM logs its counters after the step; give it a moment and return the delta."""
    time.sleep(0.3)
    return computed(server) - before


def requests_of(model: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (route, body) of every request the tests send."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, prompt in PROMPTS.items():
        out[name] = ("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 12,
                                         "temperature": 0})  # fmt: skip
    out["chat"] = ("/v1/chat/completions", {"model": model, "messages": CHAT,
                                            "max_tokens": 12, "temperature": 0})  # fmt: skip
    # vLLM's Anthropic Messages and OpenAI Responses APIs: the same conversation
    out["messages"] = ("/v1/messages", {"model": model, "system": CHAT[0]["content"],
                                        "messages": CHAT[1:], "max_tokens": 12,
                                        "temperature": 0})  # fmt: skip
    out["responses"] = ("/v1/responses", {"model": model, "instructions": CHAT[0]["content"],
                                          "input": CHAT[1]["content"], "max_output_tokens": 12,
                                          "temperature": 0})  # fmt: skip
    return out


@dataclass
class Stack:
    transport: str
    prefill_agent: AgentProcess
    decode_agent: AgentProcess
    prefill: HttpProcess
    decode: HttpProcess
    proxy: HttpProcess
    baseline: dict[str, str]
    requests: dict[str, tuple[str, dict[str, Any]]]
    procs: list[Any] = field(default_factory=list)


def _server(
    name: str,
    model: str,
    workdir: Path,
    agent: AgentProcess | None,
    template: Path,
    transfer_timeout_s: float = TRANSFER_TIMEOUT_S,
    kv_bytes: int | None = None,
    async_scheduling: bool = False,
    connector: dict[str, Any] | None = None,
    max_num_seqs: int | None = None,
) -> HttpProcess:
    port = free_port()
    transfer = None
    if agent is not None:
        transfer = meshkv_kv_transfer_config(
            agent.socket_path, transfer_timeout_s=transfer_timeout_s, save_decode_tokens=True,
            **(connector or {}),
        )  # fmt: skip
    sizes: dict[str, Any] = {}
    if kv_bytes is not None:  # a small KV cache: vLLM preempts under concurrent requests
        sizes = {"kv_cache_memory_bytes": kv_bytes, "max_model_len": 1100}
    seqs = [] if max_num_seqs is None else ["--max-num-seqs", str(max_num_seqs)]
    cmd = vllm_server_command(
        sys.executable, model, port, served_name="tiny", kv_transfer_config=transfer,
        extra=["--enforce-eager", "--chat-template", str(template), *seqs],
        async_scheduling=async_scheduling, **sizes,
    )  # fmt: skip
    # vLLM's response store on, as a deployment whose clients chain Responses requests
    # (previous_response_id) has it
    env = {**child_env(), "VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    return HttpProcess(
        name, cmd, f"http://127.0.0.1:{port}", env=env, log_path=workdir / f"{name}.log"
    ).start(SERVER_TIMEOUT_S)


_BASELINES: dict[str, dict[str, str]] = {}
"""A plain engine's greedy answers to ``requests_of("tiny")``, by model path."""


@contextlib.contextmanager
def pd_stack(
    transport: str,
    tiny_model: str,
    workdir: Path,
    decode_kv_bytes: int | None = None,
    async_scheduling: bool = False,
    prefill_connector: dict[str, Any] | None = None,
    decode_connector: dict[str, Any] | None = None,
    decode_max_seqs: int | None = None,
) -> Iterator[Stack]:
    """Build the stack (about a minute on two cores); everything is stopped after.
    ``decode_kv_bytes``: the decode engine's KV cache (default: the launcher's 64 MiB).
    ``async_scheduling``: both engines run vLLM's asynchronous scheduler (the plain
    engine of the reference outputs does not). ``*_connector``: more connector settings
    of that engine; ``decode_max_seqs``: the decode engine's ``--max-num-seqs``."""
    template = workdir / "chat.jinja"
    template.write_text(TEMPLATE)
    reqs = requests_of("tiny")
    procs: list[Any] = []
    try:
        baseline = _BASELINES.get(tiny_model)
        if baseline is None:  # one plain engine per session: TCP's and UCX's stacks share it
            plain = _server("plain", tiny_model, workdir, None, template)
            procs.append(plain)
            baseline = {n: text_of(post(plain.base_url + r, b)) for n, (r, b) in reqs.items()}
            plain.stop()
            _BASELINES[tiny_model] = baseline
        secret = write_secret(workdir)
        # Datacenter failure-detector timings: the loopback preset's 100 ms probe timeout
        # flaps under two vLLM servers on two cores.
        pa = AgentProcess(
            name="node-p",
            cpu_bytes=256 << 20,
            args=mesh_args(secret, transport=transport, preset="lan"),
        ).start()
        procs.append(pa)
        seed = pa.get_json("/v1/status")["mesh"]["address"]
        da = AgentProcess(
            name="node-d",
            cpu_bytes=256 << 20,
            args=mesh_args(secret, join=[seed], transport=transport, preset="lan"),
        ).start()
        procs.append(da)
        wait_converged([pa, da])
        wait = TRANSFER_TIMEOUT_S if transport == "tcp" else UCX_TRANSFER_TIMEOUT_S
        prefill = _server(
            "prefill", tiny_model, workdir, pa, template, wait, async_scheduling=async_scheduling,
            connector=prefill_connector,
        )  # fmt: skip
        procs.append(prefill)
        decode = _server(
            "decode", tiny_model, workdir, da, template, wait, decode_kv_bytes, async_scheduling,
            connector=decode_connector, max_num_seqs=decode_max_seqs,
        )  # fmt: skip
        procs.append(decode)
        port = free_port()
        proxy = HttpProcess(
            "proxy",
            [sys.executable, "-m", "meshkv", "proxy", "--prefill", prefill.base_url,
             "--decode", decode.base_url, "--listen", f"127.0.0.1:{port}",
             "--health-interval", "0.5"],
            f"http://127.0.0.1:{port}", env=dict(os.environ), log_path=workdir / "proxy.log",
        ).start(60)  # fmt: skip
        procs.append(proxy)
        yield Stack(transport, pa, da, prefill, decode, proxy, baseline, reqs, procs)
    finally:
        for proc in reversed(procs):
            if isinstance(proc, AgentProcess):  # a module's stack: its logs always kept
                proc.cleanup(keep_log_in=workdir / "agent-logs")
            else:
                proc.stop()


ENGINE_LINES = ("meshkv", "KV Transfer", "KV load failure", "Traceback", "Error")
"""What a failure's message quotes from the engines' logs: the connector's own lines."""


def logs(stack: Stack) -> str:
    """The agents' recent log lines, the connector's lines from both engines' logs and the
    prefill agent's store counters (for a failure's message)."""
    out = []
    for agent in (stack.prefill_agent, stack.decode_agent):
        lines = [x for x in agent.log().splitlines() if "links" not in x and "lease" not in x]
        out.append(f"--- {agent.name}\n" + "\n".join(lines[-40:]))
    for server in (stack.prefill, stack.decode):
        text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
        lines = [x[-600:] for x in text.splitlines() if any(w in x for w in ENGINE_LINES)]
        out.append(f"--- {server.name} engine\n" + "\n".join(lines[-15:]))
    with contextlib.suppress(Exception):
        store = stack.prefill_agent.get_json("/v1/status")["store"]
        out.append(f"--- node-p store\n{json.dumps(store, sort_keys=True)[:3000]}")
    return "\n".join(out)


def wait_for_push_target(stack: Stack) -> None:
    """The proxy learns the decode engine's agent by a one-token probe after start-up."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = json.loads(http_get(stack.proxy.base_url + "/v1/upstreams"))["upstreams"]
        if [r["node"] for r in rows if r["role"] == "decode"] == ["node-d"]:
            return
        time.sleep(0.25)
    raise AssertionError("the proxy never learned the decode engine's agent")


def check_outputs_and_decode_work(stack: Stack) -> None:
    """Every request through the proxy, streamed and not: the plain engine's output, and
    the decode engine computes at most one block of the prompt (in fact: one token)."""
    wait_for_push_target(stack)
    base = stack.proxy.base_url
    for name, (route, body) in stack.requests.items():
        for streamed in (False, True):
            before = computed(stack.decode)
            got = stream(base + route, body) if streamed else text_of(post(base + route, body))
            assert got == stack.baseline[name], (name, streamed)
            done = settle_metrics(stack.decode, before)
            assert done <= BLOCK, (
                f"{name} (stream={streamed}): decode computed {done} tokens\n{logs(stack)}"
            )
    # The chunks came through the mesh: pushed to (or pulled by) the decode node's agent.
    pushed = stack.prefill_agent.metric("meshkv_peer_transfer_pushes_total")
    pulled = stack.decode_agent.metric("meshkv_peer_pulls_total")
    assert pushed + pulled > 0


def check_pins_released(stack: Stack) -> None:
    """Every transfer's hold ends once the decode side has its chunks: nothing stays
    pinned on the prefill node (a hold left to expire would show as pins here)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if stack.prefill_agent.metric("meshkv_transfer_pins") == 0:
            break
        time.sleep(0.2)
    assert stack.prefill_agent.metric("meshkv_transfer_pins") == 0, logs(stack)
    released = stack.prefill_agent.metric("meshkv_transfers_ended_total", 'how="released"')
    assert released >= 1
    assert stack.prefill_agent.metric("meshkv_transfers_ended_total", 'how="expired"') == 0
    status = stack.prefill_agent.get_json("/v1/status")["store"]
    assert status["leases_open"] == 0, status
