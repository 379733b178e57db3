"""``meshkv bench faults``: faults injected while a real OpenAI server serves concurrent users.

One ``python -m vllm.entrypoints.openai.api_server`` with the meshkv connector and one
agent (CPU tier + SSD tier, written through) on this node; a closed-loop client keeps
``--concurrency`` long-document questions in flight (:mod:`meshkv.bench.openai_load`,
every request streamed and timed). Each scenario runs three passes over the same requests:

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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meshkv.bench import openai_load as load
from meshkv.bench.report import text_table
from meshkv.bench.serve import CHUNK_TOKENS, Shape, kv_bytes_per_token, longdoc_users, vocab_size
from meshkv.chunk import RECORD_HEADER_BYTES
from meshkv.launch import (
    AgentProcess,
    HttpProcess,
    LaunchError,
    engine_env,
    free_port,
    http_get,
    http_post_json,
    meshkv_kv_transfer_config,
    prometheus_sum,
    vllm_server_command,
)

logger = logging.getLogger(__name__)

SCENARIOS = ("control", "agent_kill9", "agent_sigstop", "ssd_enospc", "ssd_bitflip")
SERVER_TIMEOUT_S = 420.0


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
    connector_tokens_after_recovery: float = 0.0
    """Prompt tokens the connector loaded in the recovery pass."""
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
        self.agent = AgentProcess(
            name="faults", cpu_bytes=self.cpu_bytes, ssd_dir=None, log_level="info",
            args=["--write-through", "--ssd-gb", "16"],
        )  # fmt: skip
        self.server: HttpProcess | None = None

    def start_agent(self, ssd: Path) -> None:
        ssd.mkdir(parents=True, exist_ok=True)
        self.agent.ssd_dir = str(ssd)
        self.agent.start()

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
        size = path.stat().st_size
        if size <= RECORD_HEADER_BYTES:
            continue
        with path.open("r+b") as f:
            at = RECORD_HEADER_BYTES + (size - RECORD_HEADER_BYTES) // 2
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


def _after(
    node: Node, done: int, action: Callable[[], None], errors: list[str]
) -> threading.Thread:
    """Run ``action`` on a thread once the server has finished ``done`` more requests than
    now (so the fault lands mid-pass however fast this machine is); errors collected."""
    start = node.finished_requests()

    def body() -> None:
        try:
            while node.finished_requests() < start + done:
                time.sleep(0.02)
            action()
        except Exception as exc:  # reported in the scenario's row, never swallowed
            errors.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def run_scenario(node: Node, name: str, seed: int) -> FaultRun:
    args = node.args
    out = FaultRun(name)
    ssd = node.workdir / name / "ssd"
    disk = (
        tmpfs(ssd, node.working_set_bytes // 3)
        if name == "ssd_enospc"
        else contextlib.nullcontext(True)
    )
    with disk as usable:
        if not usable:
            out.note = "skipped: cannot mount a tmpfs here (needs root)"
            return out
        ssd.mkdir(parents=True, exist_ok=True)
        if node.agent.running:
            node.agent.stop()
        node.start_agent(ssd)
        assert node.server is not None
        url = node.server.base_url
        vocab = vocab_size(args.model)
        warm, questions = longdoc_users(args.shape, seed, vocab)
        _drive(url, warm, args.concurrency)
        reference = {r.rid: r for r in _drive(url, questions, args.concurrency)}
        ref_ttfts = [r.ttft_s for r in reference.values() if r.ttft_s is not None]
        out.reference_ttft_p50_s = load.percentile(ref_ttfts, 0.5)
        failures_before = node.agent_metric("meshkv_checksum_failures_total")
        errors: list[str] = []
        mark: dict[str, float] = {}
        after = max(1, len(questions) // 3)

        if name == "agent_kill9":

            def kill_and_restart() -> None:
                mark["fault_start"] = time.perf_counter()
                node.agent.kill()
                time.sleep(args.down_s)
                node.agent.start()
                mark["fault_end"] = time.perf_counter()

            thread = _after(node, after, kill_and_restart, errors)
        elif name == "agent_sigstop":

            def stall() -> None:
                mark["fault_start"] = time.perf_counter()
                node.agent.sigstop()
                time.sleep(args.stall_s)
                node.agent.sigcont()
                mark["fault_end"] = time.perf_counter()

            thread = _after(node, after, stall, errors)
        else:
            if name == "ssd_bitflip":
                node.agent.stop()
                out.note = f"{flip_payload_bytes(ssd)} chunk files damaged"
                node.agent.start()
                failures_before = 0.0
            thread = _after(node, 0, lambda: None, errors)
        _, fresh = longdoc_users(args.shape, seed, vocab)  # the same requests, new users
        prompts = {
            spec.rid: list(spec.body["prompt"])
            for u in longdoc_users(args.shape, seed, vocab)[1]
            if (spec := u.take()) is not None
        }
        pass_t0 = time.perf_counter()
        results = _drive(url, fresh, args.concurrency)
        thread.join(timeout=args.stall_s + args.down_s + 60)
        # Hits resume: the same questions once more, after the fault (the connector
        # retries the agent every 0.5 s; give it that).
        time.sleep(1.0)
        before = node.connector_tokens()
        _drive(url, longdoc_users(args.shape, seed, vocab)[1], args.concurrency)
        out.connector_tokens_after_recovery = node.connector_tokens() - before
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
        out.checksum_failures = node.agent_metric("meshkv_checksum_failures_total") - (
            failures_before if failures_before == failures_before else 0.0
        )
        out.ssd_degraded = node.agent_metric("meshkv_ssd_degraded")
        node.agent.stop()
    return out


def rows_table(runs: list[FaultRun]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    rows = [
        [
            r.scenario, str(r.completed), str(r.failed), f"{r.identical}/{r.compared}",
            ms(r.reference_ttft_p50_s), ms(r.ttft_p50_s), ms(r.ttft_max_s),
            f"{r.connector_tokens_after_recovery:.0f}", f"{r.checksum_failures:.0f}",
            f"{r.ssd_degraded:.0f}", "yes" if r.passed else "NO",
            " ".join([r.note, *r.errors, *(
                f"{m.rid} parts at token {m.position}/{m.length} (top-2 margin {m.margin})"
                for m in r.mismatches)]).strip(),
        ]
        for r in runs
    ]  # fmt: skip
    head = ["scenario", "ok", "failed", "identical", "ref TTFT p50 ms", "TTFT p50 ms",
            "TTFT max ms", "connector tokens after recovery", "checksum failures",
            "ssd degraded", "pass", "note"]  # fmt: skip
    return text_table([head, *rows])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory vLLM loads")
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
    p.add_argument("--workdir", help="keep logs here (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
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
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mkv-faults-"))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshkv bench faults")
    p.add_argument("--json", metavar="FILE")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
