"""``meshkv bench faults``: faults injected while a real OpenAI server serves concurrent users.

One ``python -m vllm.entrypoints.openai.api_server`` with the meshkv connector and one
agent (CPU tier + SSD tier, written through) on this node; a closed-loop client keeps
``--concurrency`` long-document questions in flight (:mod:`meshkv.bench.openai_load`,
every request streamed and timed). Each scenario starts the agent afresh and first waits
(at most 30 s, ``reconnect_s`` in the JSON) until a throwaway request has been saved through
it: the engine's connector reconnects by itself, and a pass that started before then would
save nothing. Then three passes over the same requests:

1. **reference**: documents read once, then every question; nothing goes wrong. Its token
   ids are the reference, and its KV is what the second pass can reuse.
2. **fault**: the same questions again, the fault injected once the server has answered a
   third of them (so it lands mid-pass however fast the machine is).
3. **recovery**: the same questions once more, after the fault is over: the tokens the
   connector loads here show that hits resumed.

Scenarios:

* ``control`` — no fault: how often two passes differ anyway (vLLM on CPU is not
  batch-invariant: the same prompt in another batch can pick another token where two
  logits nearly tie, and from there the answers part);
* ``agent_kill9`` — SIGKILL the agent, start it again ``--down-s`` later on the same socket
  and SSD directory (the engine's connector reconnects by itself);
* ``agent_sigstop`` — SIGSTOP the agent for ``--stall-s`` seconds (socket open, nothing
  answers), then SIGCONT;
* ``ssd_enospc`` — the SSD directory is a tmpfs a third the size of the working set, so
  the disk fills during the first pass (the agent must degrade to CPU only and keep serving);
* ``ssd_bitflip`` — after the first pass the agent restarts (its CPU tier is gone, the SSD
  tier is scanned) and one byte of every other chunk file's payload is flipped; the second
  pass promotes from SSD: every damaged chunk must be detected, counted and recomputed.

The ``peer_*`` scenarios add a second agent, the *holder* (no engine). After the reference
pass the server's agent hands its SSD directory to the holder and starts again empty, so
the connector's hits in the next pass are pulled from the holder; before the recovery pass
this happens once more (the recovery pass counts the chunks pulled):

* ``peer_kill9`` — SIGKILL the holder mid-pull, start it again ``--down-s`` later;
* ``peer_sigstop`` — SIGSTOP the holder mid-pull for ``--stall-s`` seconds (its sockets
  stay open and silent: pulls must end at their deadlines, not hang), then SIGCONT;
* ``peer_bitflip`` — the holder is reached through a relay that flips a byte in every
  chunk payload block it carries, for ``--stall-s`` seconds: every damaged pull must be
  caught by its checksum, counted and recomputed;
* ``peer_partition`` — the holder lives in its own network namespace, joined by a veth
  pair; the link is cut for ``--stall-s`` seconds (packets dropped, connections time out)
  and restored: requests proceed by recompute, the two agents find each other again.

Reported per scenario: requests completed and failed, outputs identical to the reference
(token ids; an answer that differs is explained by the top-2 log-probability margin at its
first differing token, computed from scratch with a fresh ``cache_salt``: a scenario passes
when nothing failed and every difference is a near tie, below ``NEAR_TIE``), TTFT p50 and
max over the faulted pass, the connector's tokens in the recovery pass, and the
agent's checksum failures and degraded flag. Needs root for the tmpfs of ``ssd_enospc``
(skipped otherwise, and said so).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshkv.bench import openai_load as load
from meshkv.bench.args import model_arg
from meshkv.bench.faultkit import CorruptingProxy, NetnsAgent, VethNamespace
from meshkv.bench.report import ms, text_table
from meshkv.bench.scratch import WORKDIR_HELP, run_in_scratch
from meshkv.bench.serve import CHUNK_TOKENS, Shape, kv_bytes_per_token, longdoc_users, vocab_size
from meshkv.launch import (
    AgentProcess,
    HttpProcess,
    LaunchError,
    engine_env,
    free_port,
    http_get,
    http_post_json,
    mesh_args,
    meshkv_kv_transfer_config,
    prometheus_sum,
    vllm_server_command,
    write_secret,
)
from meshkv.tiers.ssd import payload_span

logger = logging.getLogger(__name__)

SCENARIOS = (
    "control", "agent_kill9", "agent_sigstop", "ssd_enospc", "ssd_bitflip",
    "peer_kill9", "peer_sigstop", "peer_bitflip", "peer_partition",
)  # fmt: skip
SERVER_TIMEOUT_S = 420.0
SAVING_TIMEOUT_S = 30.0
"""Longest the engine may take to save through a restarted agent before a pass."""


@dataclass(slots=True)
class FaultRun:
    """One scenario's faulted pass, against its reference pass."""

    scenario: str
    completed: int = 0
    failed: int = 0
    identical: int = 0
    compared: int = 0
    ttft_p50_s: float | None = None
    ttft_max_s: float | None = None
    reference_ttft_p50_s: float | None = None
    reconnect_s: float | None = None
    """Seconds from the server's agent being up to the engine's first save through it."""
    connector_tokens_after_recovery: float = 0.0
    """Prompt tokens the connector loaded in the recovery pass."""
    peer_pulls: float = 0.0
    """Peer scenarios: chunks pulled from the holder in the faulted pass..."""
    peer_pull_failures: float = 0.0
    """...and pulls that failed there (holder gone, timeout, checksum)."""
    peer_pulls_after_recovery: float = 0.0
    """Peer scenarios: chunks the server's agent pulled from the holder in the recovery pass."""
    proxy_damaged_blocks: int = 0
    """``peer_bitflip``: 64 KiB blocks the proxy damaged on the wire."""
    checksum_failures: float = 0.0
    ssd_degraded: float = 0.0
    errors: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    fault_window_s: tuple[float, float] | None = None
    """When the fault began and ended, seconds into the faulted pass."""
    requests: list[dict[str, Any]] = field(default_factory=list)
    """Every request of the faulted pass: start, TTFT, end to end, cached tokens."""
    note: str = ""

    @property
    def passed(self) -> bool:
        """Nothing failed, and every answer is the reference's or parts from it at a near
        tie (vLLM on CPU is not batch-invariant; a damaged load parts at any margin)."""
        return self.failed == 0 and not self.errors and all(m.near_tie for m in self.mismatches)


class Node:
    """The agent and the vLLM server of the run; the agent is replaced per scenario."""

    def __init__(self, args: argparse.Namespace, workdir: Path, per_token: int) -> None:
        self.args = args
        self.workdir = workdir
        shape: Shape = args.shape
        ws = shape.working_set("longdoc")
        self.working_set_bytes = ws * per_token
        self.max_len = shape.max_len("longdoc") + 16
        self.engine_kv = max(ws // 4, 2 * self.max_len) * per_token
        self.cpu_bytes = 2 * self.working_set_bytes + (64 << 20)
        self.agent_args = ["--write-through", "--ssd-gb", "16"]
        self.agent = AgentProcess(
            name="faults", cpu_bytes=self.cpu_bytes, ssd_dir=None, log_level="info",
            args=self.agent_args,
        )  # fmt: skip
        self.server: HttpProcess | None = None

    def start_agent(self, ssd: Path) -> None:
        ssd.mkdir(parents=True, exist_ok=True)
        self.agent.ssd_dir = str(ssd)
        self.agent.start()

    def wait_saving(self, tag: str, timeout_s: float = SAVING_TIMEOUT_S) -> float:
        """Seconds until the engine saved through the agent that just (re)started (or
        raise): its connector reconnects by itself, within a retry interval or when its
        probe hears the agent, and a pass that starts before then saves nothing (a peer
        scenario's holder would then hold nothing). One throwaway request per try."""
        assert self.server is not None
        started = time.monotonic()
        rng = random.Random(tag)
        vocab = vocab_size(self.args.model)
        n = 0
        while True:
            chunks = self.agent.metric("meshkv_tier_chunks", 'tier="cpu"')
            if chunks > 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise LaunchError(
                    f"the engine saved nothing through its restarted agent within {timeout_s} s"
                )
            prompt = [rng.randrange(3, min(vocab, 32000)) for _ in range(CHUNK_TOKENS + 8)]
            body = {"model": "model", "prompt": prompt, "max_tokens": 1, "temperature": 0}
            spec = load.RequestSpec(f"saving-{tag}-{n}", "/v1/completions", body, tag="probe")
            asyncio.run(load.drive(self.server.base_url, [load.User("probe", spec)], concurrency=1))
            n += 1
            time.sleep(0.2)

    def start_server(self) -> None:
        port = free_port()
        transfer = meshkv_kv_transfer_config(
            self.agent.socket_path, chunk_tokens=CHUNK_TOKENS, retry_interval_s=0.5
        )
        cmd = vllm_server_command(
            sys.executable, self.args.model, port, kv_transfer_config=transfer,
            prefix_caching=True, kv_cache_memory_bytes=self.engine_kv,
            max_model_len=self.max_len,
            extra=["--max-num-batched-tokens", str(max(self.max_len, 2048))],
        )  # fmt: skip
        self.server = HttpProcess(
            "faults", cmd, f"http://127.0.0.1:{port}", env=engine_env(os.environ),
            log_path=self.workdir / "server.log",
        ).start(SERVER_TIMEOUT_S)  # fmt: skip

    def _server_metric(self, name: str) -> float:
        assert self.server is not None
        return prometheus_sum(
            http_get(self.server.base_url + "/metrics", timeout=10).decode(), name
        )

    def finished_requests(self) -> float:
        return self._server_metric("vllm:request_success_total")

    def connector_tokens(self) -> float:
        return self._server_metric("vllm:external_prefix_cache_hits_total")

    def agent_metric(self, name: str) -> float:
        try:
            return self.agent.metric(name)
        except OSError:
            return float("nan")

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        with contextlib.suppress(Exception):
            self.agent.stop()
        self.agent.cleanup()


@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int) -> Iterator[bool]:
    """A tmpfs of ``size_bytes`` at ``path`` (True), or nothing when mounting is not
    allowed here (False)."""
    path.mkdir(parents=True, exist_ok=True)
    size_kb = max(1024, size_bytes // 1024)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs", str(path)],
        capture_output=True,
    )
    try:
        yield done.returncode == 0
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def flip_payload_bytes(ssd: Path, every: int = 2) -> int:
    """Flip one payload byte in every ``every``-th chunk file; returns how many."""
    files = sorted(p for p in ssd.rglob("*.mkv") if p.is_file())
    flipped = 0
    for i, path in enumerate(files):
        if i % every:
            continue
        offset, length = payload_span(str(path))
        if not length:
            continue
        with path.open("r+b") as f:
            at = offset + length // 2
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x5A]))
        flipped += 1
    return flipped


NEAR_TIE = 0.05
"""Top-2 log-probability margin (nats) below which a differing token is a near tie. On the
tiny bench model the margin is below this at about 8 % of positions (48 positions sampled,
median 1.0), so a difference from a wrong KV load passes for a near tie about 1 time in 12."""


@dataclass(slots=True)
class Mismatch:
    """An answer that differs from the reference, and why it may: the top-2 margin at the
    first differing token, computed from scratch (a fresh ``cache_salt``: no cache)."""

    rid: str
    position: int
    length: int
    margin: float | None

    @property
    def near_tie(self) -> bool:
        return self.margin is not None and self.margin < NEAR_TIE


def _explain(
    url: str, prompt: list[int], got: load.RequestResult, ref: load.RequestResult
) -> Mismatch:
    a, b = ref.token_ids or [], got.token_ids or []
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    body = {
        "model": "model", "prompt": prompt + a[:i], "max_tokens": 1,
        "temperature": 0, "logprobs": 2, "cache_salt": os.urandom(8).hex(),
        "return_tokens_as_token_ids": True,  # else ids that decode alike share a key
    }  # fmt: skip
    margin = None
    try:
        answer = http_post_json(url + "/v1/completions", body, timeout=120)
        top = sorted(answer["choices"][0]["logprobs"]["top_logprobs"][0].values(), reverse=True)
        margin = round(top[0] - top[1], 5) if len(top) >= 2 else None
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        logger.warning("could not explain %s: %s", got.rid, exc)
    return Mismatch(got.rid, i, len(a), margin)


def _drive(url: str, users: list[load.User], concurrency: int) -> list[load.RequestResult]:
    results, _ = asyncio.run(load.drive(url, users, concurrency=concurrency))
    return results


def _when(
    ready: Callable[[], bool], action: Callable[[], None], errors: list[str]
) -> threading.Thread:
    """Run ``action`` on a thread once ``ready()`` (polled every 20 ms); errors collected."""

    def body() -> None:
        try:
            while not ready():
                time.sleep(0.02)
            action()
        except Exception as exc:  # reported in the scenario's row, never swallowed
            errors.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def _answered(node: Node, more: int) -> Callable[[], bool]:
    """True once the server has finished ``more`` requests more than now (so a fault lands
    mid-pass however fast this machine is)."""
    start = node.finished_requests()
    return lambda: node.finished_requests() >= start + more


class Holder:
    """The peer scenarios' second node: an agent without an engine that holds the chunks
    the server's agent must pull. After the reference pass the server's agent hands its
    SSD directory to the holder and starts again empty, so every hit the connector gets
    in the next pass is pulled from the holder (or comes from vLLM's own prefix cache)."""

    def __init__(self, node: Node, name: str, stack: contextlib.ExitStack) -> None:
        self.node = node
        self.name = name
        secret = write_secret(node.workdir)
        self.veth: VethNamespace | None = None
        self.proxy: CorruptingProxy | None = None
        local_host = holder_host = "127.0.0.1"
        if name == "peer_partition":
            self.veth = stack.enter_context(VethNamespace("f"))
            local_host, holder_host = self.veth.host_ip, self.veth.ns_ip
        local = f"{local_host}:{free_port(local_host)}"
        node.agent.args = [*node.agent_args, *mesh_args(secret, listen=local)]
        holder_port = free_port()  # inside a fresh namespace nothing holds it
        args = ["--ssd-gb", "16", *mesh_args(secret, listen=f"{holder_host}:{holder_port}",
                                              join=[local])]  # fmt: skip
        if name == "peer_bitflip":
            # Damage only chunk payloads (64 KiB blocks), only while the fault is on.
            self.proxy = CorruptingProxy(("127.0.0.1", holder_port), min_block=32768, active=False)
            stack.callback(self.proxy.close)
            args += ["--advertise", f"127.0.0.1:{self.proxy.port}"]
        self.agent: AgentProcess = (
            NetnsAgent(netns=self.veth.name, admin_ip=self.veth.ns_ip, name="holder",
                       cpu_bytes=node.cpu_bytes, log_level="info", args=args)
            if self.veth is not None
            else AgentProcess(name="holder", cpu_bytes=node.cpu_bytes, log_level="info",
                              args=args)
        )  # fmt: skip
        stack.callback(self.agent.cleanup)

    def take_over(self, ssd: Path, fresh: Path) -> None:
        """The holder starts on ``ssd`` (the server's agent's chunks); the server's agent
        starts again on the empty ``fresh``; both wait until the directory knows every key."""
        node = self.node
        node.agent.stop()
        if self.agent.running:
            self.agent.stop()
        node.start_agent(fresh)
        self.agent.ssd_dir = str(ssd)
        self.agent.start()
        deadline = time.monotonic() + 60
        while True:
            held = self.agent.metric("meshkv_mesh_held_keys")
            known = node.agent.metric("meshkv_mesh_directory_keys") + self.agent.metric(
                "meshkv_mesh_directory_keys"
            )
            alive = node.agent.metric("meshkv_mesh_members", 'state="alive"')
            if held > 0 and known >= held and alive >= 2:
                return
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"holder not known to the server's agent within 60 s "
                    f"(held {held}, directory {known}, alive {alive})"
                )
            time.sleep(0.1)

    def ready(self) -> Callable[[], bool]:
        """When the fault lands: ``peer_bitflip`` at once (every pull of its window is
        damaged), the others once the first chunk has been pulled, so that the rest of
        the pulls are in flight or still to come (pulls happen at the start of the pass,
        when each document is first asked about)."""
        if self.name == "peer_bitflip":
            return lambda: True
        agent = self.node.agent
        return lambda: agent.metric("meshkv_peer_pulls_total") >= 1

    def fault(self, mark: dict[str, float]) -> None:
        args = self.node.args
        mark["fault_start"] = time.perf_counter()
        if self.name == "peer_kill9":
            self.agent.kill()
            time.sleep(args.down_s)
            self.agent.start()
        elif self.name == "peer_sigstop":
            self.agent.sigstop()  # connections open, nothing answers
            time.sleep(args.stall_s)
            self.agent.sigcont()
        elif self.name == "peer_bitflip":
            assert self.proxy is not None
            self.proxy.active = True
            time.sleep(args.stall_s)
            self.proxy.active = False
        else:
            assert self.veth is not None
            self.veth.cut()
            time.sleep(args.stall_s)
            self.veth.heal()
        mark["fault_end"] = time.perf_counter()


def _checksum_failures(agent: AgentProcess) -> float:
    """Damaged chunks the agent caught: its own (SSD, arena) plus pulls from peers."""
    try:
        return agent.metric("meshkv_checksum_failures_total") + agent.metric(
            "meshkv_peer_checksum_failures_total"
        )
    except OSError:
        return float("nan")


def run_scenario(node: Node, name: str, seed: int) -> FaultRun:
    args = node.args
    out = FaultRun(name)
    ssd = node.workdir / name / "ssd"
    with contextlib.ExitStack() as stack:
        holder: Holder | None = None
        node.agent.args = list(node.agent_args)
        if name == "ssd_enospc" and not stack.enter_context(
            tmpfs(ssd, node.working_set_bytes // 3)
        ):
            out.note = "skipped: cannot mount a tmpfs here (needs root)"
            return out
        if name.startswith("peer_"):
            try:
                holder = Holder(node, name, stack)
            except LaunchError as exc:
                if name != "peer_partition":
                    raise
                out.note = f"skipped: no network namespace here (needs root): {exc}"
                return out
        ssd.mkdir(parents=True, exist_ok=True)
        if node.agent.running:
            node.agent.stop()
        node.start_agent(ssd)
        assert node.server is not None
        try:
            out.reconnect_s = node.wait_saving(name)
        except LaunchError as exc:
            out.note = str(exc)
            out.errors.append(str(exc))
            return out
        url = node.server.base_url
        vocab = vocab_size(args.model)
        warm, questions = longdoc_users(args.shape, seed, vocab)
        _drive(url, warm, args.concurrency)
        reference = {r.rid: r for r in _drive(url, questions, args.concurrency)}
        ref_ttfts = [r.ttft_s for r in reference.values() if r.ttft_s is not None]
        out.reference_ttft_p50_s = load.percentile(ref_ttfts, 0.5)
        errors: list[str] = []
        mark: dict[str, float] = {}
        after = max(1, len(questions) // 3)

        if holder is not None:
            holder.take_over(ssd, node.workdir / name / "ssd-fresh")
            thread = _when(holder.ready(), lambda: holder.fault(mark), errors)
        elif name == "agent_kill9":

            def kill_and_restart() -> None:
                mark["fault_start"] = time.perf_counter()
                node.agent.kill()
                time.sleep(args.down_s)
                node.agent.start()
                mark["fault_end"] = time.perf_counter()

            thread = _when(_answered(node, after), kill_and_restart, errors)
        elif name == "agent_sigstop":

            def stall() -> None:
                mark["fault_start"] = time.perf_counter()
                node.agent.sigstop()
                time.sleep(args.stall_s)
                node.agent.sigcont()
                mark["fault_end"] = time.perf_counter()

            thread = _when(_answered(node, after), stall, errors)
        else:
            if name == "ssd_bitflip":
                node.agent.stop()
                out.note = f"{flip_payload_bytes(ssd)} chunk files damaged"
                node.agent.start()
            thread = _when(lambda: True, lambda: None, errors)
        # Counted from here: the agent restarted for ssd_bitflip and the peer scenarios.
        failures_before = _checksum_failures(node.agent)
        _, fresh = longdoc_users(args.shape, seed, vocab)  # the same requests, new users
        prompts = {
            spec.rid: list(spec.body["prompt"])
            for u in longdoc_users(args.shape, seed, vocab)[1]
            if (spec := u.take()) is not None
        }
        pass_t0 = time.perf_counter()
        results = _drive(url, fresh, args.concurrency)
        thread.join(timeout=args.stall_s + args.down_s + 60)
        out.checksum_failures = _checksum_failures(node.agent) - failures_before
        out.ssd_degraded = node.agent_metric("meshkv_ssd_degraded")
        if holder is not None:
            out.peer_pulls = node.agent_metric("meshkv_peer_pulls_total")
            out.peer_pull_failures = node.agent_metric("meshkv_peer_pull_failures_total")
            out.proxy_damaged_blocks = holder.proxy.corrupted if holder.proxy else 0
            # Hits resume from the peer: the server's agent starts empty once more.
            holder.take_over(Path(str(holder.agent.ssd_dir)), node.workdir / name / "ssd-again")
        # Hits resume: the same questions once more, after the fault (the connector
        # retries the agent every 0.5 s; give it that).
        time.sleep(1.0)
        before = node.connector_tokens()
        _drive(url, longdoc_users(args.shape, seed, vocab)[1], args.concurrency)
        out.connector_tokens_after_recovery = node.connector_tokens() - before
        if holder is not None:
            out.peer_pulls_after_recovery = node.agent_metric("meshkv_peer_pulls_total")
        out.errors = errors
        out.completed = sum(r.ok for r in results)
        out.failed = len(results) - out.completed
        for r in results:
            ref = reference.get(r.rid)
            if r.ok and ref is not None and ref.ok:
                out.compared += 1
                if r.token_ids == ref.token_ids:
                    out.identical += 1
                else:
                    out.mismatches.append(_explain(url, prompts[r.rid], r, ref))
        ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
        out.ttft_p50_s = load.percentile(ttfts, 0.5)
        if "fault_start" in mark:
            out.fault_window_s = (
                round(mark["fault_start"] - pass_t0, 2),
                round(mark.get("fault_end", time.perf_counter()) - pass_t0, 2),
            )
        out.requests = [
            {"rid": r.rid, "start_s": round(r.start_s, 3), "ttft_s": r.ttft_s,
             "e2e_s": round(r.e2e_s, 3), "cached_tokens": r.cached_tokens, "ok": r.ok}
            for r in results
        ]  # fmt: skip
        out.ttft_max_s = max(ttfts) if ttfts else None
        node.agent.stop()
    return out


def rows_table(runs: list[FaultRun]) -> str:
    rows = [
        [
            r.scenario, str(r.completed), str(r.failed), f"{r.identical}/{r.compared}",
            ms(r.reference_ttft_p50_s), ms(r.ttft_p50_s), ms(r.ttft_max_s),
            f"{r.connector_tokens_after_recovery:.0f}",
            f"{r.peer_pulls:.0f}/{r.peer_pull_failures:.0f}" if r.scenario.startswith("peer_")
            else "-",
            f"{r.peer_pulls_after_recovery:.0f}" if r.scenario.startswith("peer_") else "-",
            f"{r.checksum_failures:.0f}",
            f"{r.ssd_degraded:.0f}", "yes" if r.passed else "NO",
            " ".join(x for x in [
                r.note, *r.errors,
                f"{r.proxy_damaged_blocks} blocks damaged" if r.proxy_damaged_blocks else "",
                *(f"{m.rid} parts at token {m.position}/{m.length} (top-2 margin {m.margin})"
                  for m in r.mismatches),
            ] if x),
        ]
        for r in runs
    ]  # fmt: skip
    head = ["scenario", "ok", "failed", "identical", "ref TTFT p50 ms", "TTFT p50 ms",
            "TTFT max ms", "connector tokens after recovery", "pulls ok/failed",
            "peer pulls after recovery",
            "checksum failures",
            "ssd degraded", "pass", "note"]  # fmt: skip
    return text_table([head, *rows])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=model_arg, help="model directory vLLM loads")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)}",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--docs", type=int, default=6)
    p.add_argument("--questions", type=int, default=5, help="per document")
    p.add_argument("--doc-tokens", type=int, default=1800)
    p.add_argument("--stall-s", type=float, default=10.0, help="agent_sigstop: frozen for")
    p.add_argument("--down-s", type=float, default=3.0, help="agent_kill9: down for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help=WORKDIR_HELP)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown or not names:
        print(f"meshkv bench faults: unknown scenario(s) {unknown}; known: {SCENARIOS}",
              file=sys.stderr)  # fmt: skip
        return 2
    for flag in ("concurrency", "docs", "questions", "doc_tokens"):
        if getattr(args, flag) <= 0:
            print(f"meshkv bench faults: --{flag.replace('_', '-')} must be positive",
                  file=sys.stderr)  # fmt: skip
            return 2
    if args.stall_s <= 0 or args.down_s < 0:
        print("meshkv bench faults: --down-s must be >= 0, --stall-s > 0",
              file=sys.stderr)  # fmt: skip
        return 2
    if not (Path(args.model) / "config.json").is_file():
        print(f"meshkv bench faults: --model {args.model} is not a model directory "
              "(no config.json)", file=sys.stderr)  # fmt: skip
        return 2
    args.shape = Shape(
        docs=args.docs, doc_tokens=(args.doc_tokens, args.doc_tokens + args.doc_tokens // 8),
        questions=args.questions,
    )  # fmt: skip
    workdir = Path(args.workdir)
    node = Node(args, workdir, kv_bytes_per_token(args.model))
    runs: list[FaultRun] = []
    try:
        node.start_agent(workdir / "boot-ssd")  # the server needs an agent to start with
        node.start_server()
        for i, name in enumerate(names):
            logger.info("scenario %s", name)
            try:
                runs.append(run_scenario(node, name, args.seed * 100 + i))
            except (LaunchError, OSError) as exc:
                runs.append(FaultRun(name, errors=[str(exc)[-1000:]]))
    finally:
        node.close()
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    print(rows_table(runs))
    return 0 if all(r.passed or r.note.startswith("skipped") for r in runs) else 1


def run(args: argparse.Namespace) -> int:
    """The run in ``--workdir``, or in a temporary directory removed when it passes."""
    return run_in_scratch(_run, args, prefix="mkv-faults-", command="meshkv bench faults")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshkv bench faults")
    p.add_argument("--json", metavar="FILE")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
