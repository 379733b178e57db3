"""``python -m benchmarks.demo`` (``make demo``): a small live mesh with a real vLLM engine.

1. Builds a small random Llama on the spot (:mod:`benchmarks.tiny_llama`, cached).
2. Starts three ``meshkv agent`` processes (node-a, node-b, node-c) that gossip into one
   mesh (LOCAL preset, shared secret, TCP between agents).
3. Engine 1, a real vLLM engine with ``MeshKVConnector`` talking to node-a, serves a
   long-document workload twice: a few 1,500–3,000-token documents, each with a question.
   The first pass is cold (computed and stored); the second asks new questions about the
   same documents and loads the documents' KV from node-a instead of recomputing it.
4. Engine 2, a fresh process talking to node-b (its own arena, which never saw the
   documents), serves the first pass's requests: node-b finds the chunks through the
   keys' homes and pulls them from node-a; the greedy first tokens must match engine 1's.
5. Prefill/decode: engine 1 also prefills one more prompt (1,000 tokens, not a multiple of
   the chunk) as vLLM's P/D flow asks (``do_remote_decode``, pushed to node-b); engine 2
   then decodes it with the ``kv_transfer_params`` engine 1 returned, computing only the
   prompt's last token although engine 1 is gone by then (its agent holds the chunks).
6. node-c pulls one document through the client too, so all three agents share chunks.
7. Prints a summary table (TTFT and hit tokens per request, chunks and peer pulls per
   agent), ``meshkv ring status`` and ``meshkv status``.

Engines run as subprocess jobs (:mod:`benchmarks.engine_job`). Every process,
arena, socket and temporary file is removed on exit, also after Ctrl-C or a failure. The
exit status is 0 only when warm and cross-node hits happened and outputs matched.
TTFT here is the wall time of a one-token greedy request, on a small model on a shared
CPU: it shows the shape of the saving, not production numbers.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from meshkv.chunk import Namespace, chunk_keys
from meshkv.launch import (
    AgentProcess,
    LaunchError,
    engine_env,
    http_get,
    kill_group,
    log_tail,
    prometheus_sum,
)

REPO = Path(__file__).resolve().parents[1]

CHUNK_TOKENS = 256
DOC_TOKENS = (1536, 2304, 3072)
"""Document lengths: whole chunks, so every document token can be reused."""
QUESTION_TOKENS = 48
PD_TOKENS = 1000
PD_OUTPUT = 8
BLOCK = 128
AGENT_CPU_BYTES = 256 << 20
AGENT_START_S = 30.0
CONVERGE_S = 20.0
ENGINE_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 20.0
NODES = ("node-a", "node-b", "node-c")


class DemoFailed(Exception):
    """A step of the demo failed; the message says which and why."""


class Demo:
    """Owns every process and file of one demo run; :meth:`close` removes them all."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="meshkv-demo-", dir="/tmp"))
        self.agents: list[AgentProcess] = []
        self.engines: list[subprocess.Popen[bytes]] = []

    # --- processes --------------------------------------------------------------

    def start_agent(self, name: str, secret: Path, join: str | None) -> AgentProcess:
        ssd = self.workdir / f"{name}-ssd"
        ssd.mkdir()
        args = [
            "--listen", "127.0.0.1:0", "--mesh-secret-file", str(secret),
            "--mesh-preset", "local", "--transport", "tcp",
        ]  # fmt: skip
        if join:
            args += ["--join", join]
        agent = AgentProcess(
            name=name, cpu_bytes=AGENT_CPU_BYTES, ssd_dir=ssd, args=args, log_level="warning"
        )
        print("  $ meshkv", " ".join(agent.command()[3:]))
        self.agents.append(agent)
        try:
            return agent.start(AGENT_START_S)
        except LaunchError as exc:
            raise DemoFailed(str(exc)) from exc

    def run_engine(
        self, name: str, model: str, agent: AgentProcess, prompts: list[Any]
    ) -> dict[str, Any]:
        """One engine job (a fresh process) connected to ``agent``; returns its result."""
        jobdir = self.workdir / name
        jobdir.mkdir()
        job = {
            "model": model,
            "prompts": prompts,
            "connector": {"socket": agent.socket_path, "load_timeout_s": 5.0},
            "max_tokens": 1,  # the request's wall time is its time to first token
            "metrics": True,
        }
        (jobdir / "job.json").write_text(json.dumps(job))
        # One process per engine (quick to start), the same thread binding for both engines
        # so that their outputs are comparable.
        env = engine_env(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(REPO))
        log = jobdir / "engine.log"
        cmd = [sys.executable, "-m", "benchmarks.engine_job", "job.json", "result.json"]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=jobdir,
                start_new_session=True,
            )  # fmt: skip
        self.engines.append(proc)
        try:
            code = proc.wait(ENGINE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DemoFailed(
                f"engine {name} did not finish within {ENGINE_TIMEOUT_S:.0f} s:\n{_tail(log)}"
            ) from None
        finally:
            kill_group(proc)
        if code != 0:
            raise DemoFailed(f"engine {name} failed with exit code {code}:\n{_tail(log)}")
        result: dict[str, Any] = json.loads((jobdir / "result.json").read_text())
        return result

    def close(self) -> list[str]:
        """Stop engines and agents, remove arenas and files; returns problems found."""
        problems = []
        for proc in self.engines:
            kill_group(proc)
        for agent in self.agents:
            if agent.running:
                agent.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]  # leave
        for agent in self.agents:
            try:
                code = agent.stop(STOP_TIMEOUT_S)
            except LaunchError:
                code = -9
            if code != 0:
                problems.append(f"agent {agent.name} exited with {code}")
            if agent.proc is not None and glob.glob(f"/dev/shm/meshkv-{agent.proc.pid}-*"):
                problems.append(f"agent {agent.name} left its arena behind; removed")
            agent.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return problems


# --- helpers ------------------------------------------------------------------------


def _tail(path: Path, chars: int = 3000) -> str:
    return log_tail(path, chars)


def _get_json(http: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{http}{path}", timeout=5) as r:
        return json.load(r)


def _metric(http: str, name: str) -> float:
    """Sum of a Prometheus sample on the agent's ``/metrics`` (0 when absent)."""
    return prometheus_sum(http_get(f"http://{http}/metrics").decode(), name)


def _cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "meshkv", *args], capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        raise DemoFailed(f"meshkv {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.rstrip()


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms"


# --- the workload -------------------------------------------------------------------


@dataclass(slots=True)
class Workload:
    """Documents with two questions each (token ids; vocabulary of the tiny model)."""

    docs: list[list[int]]
    first: list[list[int]]
    """Pass 1 (and engine 2): each document followed by its first question."""
    second: list[list[int]]
    """Pass 2: the same documents followed by a new question."""
    warmup: list[int]
    """A short unrelated prompt sent first by each engine (untimed kernel warm-up)."""
    pd: list[int]
    """The prefill/decode prompt (1,000 tokens: three chunks and a partial one)."""


def make_workload(seed: int = 2026) -> Workload:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, 1000) for _ in range(n)]

    docs = [tokens(n) for n in DOC_TOKENS]
    return Workload(
        docs=docs,
        first=[d + tokens(QUESTION_TOKENS) for d in docs],
        second=[d + tokens(QUESTION_TOKENS) for d in docs],
        warmup=tokens(300),
        pd=tokens(PD_TOKENS),
    )


# --- the demo -----------------------------------------------------------------------


def run(demo: Demo) -> int:
    from benchmarks.tiny_llama import BENCH_CONFIG, build_tiny_llama

    t_start = time.monotonic()
    _step("a small Llama (8 layers, random weights, built offline and cached)")
    model = str(build_tiny_llama(BENCH_CONFIG))
    print(f"  model: {model}")

    _step("three agents gossip into one mesh")
    secret = demo.workdir / "mesh.secret"
    secret.write_text(os.urandom(24).hex() + "\n")
    secret.chmod(0o600)
    a = demo.start_agent(NODES[0], secret, None)
    seed = str(_get_json(a.http, "/v1/status")["mesh"]["address"])
    b = demo.start_agent(NODES[1], secret, seed)
    c = demo.start_agent(NODES[2], secret, seed)
    agents = [a, b, c]
    deadline = time.monotonic() + CONVERGE_S
    while True:
        views = [_get_json(x.http, "/v1/ring?stats=0") for x in agents]
        alive = [sum(m["state"] == "alive" for m in v["members"]) for v in views]
        if alive == [3, 3, 3] and len({v["ring"]["digest"] for v in views}) == 1:
            break
        if time.monotonic() > deadline:
            raise DemoFailed(f"the agents did not converge within {CONVERGE_S:.0f} s")
        time.sleep(0.1)
    print(f"  converged: 3 members alive, ring digest {views[0]['ring']['digest']}")
    for x in agents:
        print(f"  {x.name}: socket {x.socket_path}, http {x.http}, arena {x.info['arena_name']}")

    work = make_workload()
    n = len(work.docs)
    _step(
        f"engine 1 (vLLM + MeshKVConnector -> node-a): {n} documents of "
        f"{', '.join(f'{len(d):,}' for d in work.docs)} tokens, two passes"
    )
    pd_plain = {"tokens": work.pd, "max_tokens": PD_OUTPUT}
    pd_prefill = {
        "tokens": work.pd,
        "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True, "meshkv_push_to": NODES[1]},
    }
    # The P/D prompt is asked twice on engine 1 (vLLM's own prefix cache is off): once as
    # usual, for the reference output, then as a prefill (its whole chunks come back from
    # node-a; the partial tail is computed and saved, and the whole prompt is held).
    one = demo.run_engine(
        "engine-1",
        model,
        a,
        [work.warmup, *work.first, *work.second, pd_plain, pd_prefill],
    )
    outs1 = one["outputs"][1 : 1 + 2 * n]
    cold, warm = outs1[:n], outs1[n:]
    pd_reference = one["outputs"][-2]["tokens"]
    pd_params = one["outputs"][-1]["kv_transfer_params"]
    if not isinstance(pd_params, dict) or "meshkv" not in pd_params:
        raise DemoFailed(f"engine 1's prefill returned no meshkv kv_transfer_params: {pd_params}")
    print(f"  engine 1 started in {one['startup_s']:.1f} s; saved "
          f"{one['counters']['saved_chunks']:.0f} chunks to node-a")  # fmt: skip

    # node-b learns where the chunks are from the keys' homes (announcements are batched).
    namespace = Namespace(**one["namespaces"]["scheduler"])
    doc_keys = [chunk_keys(namespace.digest(), d, CHUNK_TOKENS) for d in work.docs]
    all_keys = [k for keys in doc_keys for k in keys]
    deadline = time.monotonic() + 10
    while not all(
        _get_json(b.http, f"/v1/owners/{k.hex()}")["holders"] == [a.name] for k in all_keys[-3:]
    ):
        if time.monotonic() > deadline:
            raise DemoFailed("node-a's chunks were not announced to their homes within 10 s")
        time.sleep(0.05)

    _step(
        "engine 2, a fresh process on node-b (its own arena, empty): the same requests, "
        "then the P/D decode"
    )
    pd_decode = {"tokens": work.pd, "max_tokens": PD_OUTPUT, "kv_transfer_params": pd_params}
    two = demo.run_engine("engine-2", model, b, [work.warmup, *work.first, pd_decode])
    cross = two["outputs"][1:-1]
    pd_out = two["outputs"][-1]
    print(f"  engine 2 started in {two['startup_s']:.1f} s; loaded "
          f"{two['counters']['loaded_chunks']:.0f} chunks pulled through node-b")  # fmt: skip

    _step("node-c reads document 1 through its own agent (pulled from a peer)")
    with c.client(namespace=namespace) as cc:
        t0 = time.perf_counter()
        found = cc.lookup(doc_keys[0])  # the lookup finds the holder and starts the pulls
        print(f"  node-c lookup: prefix={found.prefix} tiers={','.join(map(str, found.tiers))}")
        leases = cc.read(doc_keys[0], wait=10.0)
        got = sum(x is not None for x in leases)
        cc.release([x for x in leases if x is not None])
        del leases
    print(f"  node-c: {got}/{len(doc_keys[0])} chunks of document 1 in "
          f"{_ms(time.perf_counter() - t0)}")  # fmt: skip

    # --- summary ---------------------------------------------------------------------
    rows = []
    for i in range(n):
        rows.append(
            (
                f"doc {i + 1}",
                f"{len(work.first[i]):,}",
                _ms(cold[i]["seconds"]),
                f"{cold[i]['cached_tokens']:,}",
                _ms(warm[i]["seconds"]),
                f"{warm[i]['cached_tokens']:,}",
                _ms(cross[i]["seconds"]),
                f"{cross[i]['cached_tokens']:,}",
            )
        )

    def med(outs: list[dict[str, Any]]) -> str:
        return _ms(statistics.median(o["seconds"] for o in outs))

    def hits(outs: list[dict[str, Any]]) -> int:
        return sum(int(o["cached_tokens"]) for o in outs)

    rows.append(
        (
            "median/sum",
            f"{sum(len(p) for p in work.first):,}",
            med(cold), f"{hits(cold):,}",
            med(warm), f"{hits(warm):,}",
            med(cross), f"{hits(cross):,}",
        )
    )  # fmt: skip
    head = ("request", "tokens", "cold TTFT", "hits", "warm TTFT", "hits", "node-b TTFT", "hits")
    print("\n" + "=" * 78)
    print("SUMMARY  (engine 1 on node-a: pass 1 cold, pass 2 warm; engine 2: fresh, node-b)")
    print("=" * 78)
    print(_table(head, rows))

    same = [o1["tokens"] == o2["tokens"] for o1, o2 in zip(cold, cross, strict=True)]
    ring_view = _get_json(a.http, "/v1/ring")
    held = {m["id"]: int(m["chunks"]) for m in ring_view["members"]}
    agent_rows = [
        (
            x.name,
            f"{held.get(x.name, 0)}",
            f"{_metric(x.http, 'meshkv_peer_pulls_total'):.0f}",
            f"{_metric(x.http, 'meshkv_peer_pull_bytes_total') / (1 << 20):.1f}",
            "engine 1" if x is a else "engine 2" if x is b else "client read",
        )
        for x in agents
    ]
    print()
    print(_table(("agent", "chunks held", "peer pulls", "pulled MiB", "used by"), agent_rows))
    print(f"\nengine 2's first tokens identical to engine 1's: {sum(same)}/{len(same)}")
    pd_same = pd_out["tokens"] == pd_reference
    print(
        f"prefill/decode: a {len(work.pd):,}-token prompt prefilled by engine 1 (node-a, since"
        f" stopped), decoded by engine 2 (node-b): engine 2 computed "
        f"{pd_out['computed_tokens']:.0f} prompt tokens; its {PD_OUTPUT} output tokens "
        f"{'equal' if pd_same else 'DIFFER FROM'} engine 1's own answer"
    )

    _step(f"meshkv ring status --http {a.http}")
    print(_cli("ring", "status", "--http", a.http))
    _step(f"meshkv status --http {b.http}")
    print(_cli("status", "--http", b.http))
    print(f"\n(demo ran {time.monotonic() - t_start:.0f} s)")

    failures = []
    if hits(warm) == 0:
        failures.append("zero warm hits on node-a")
    if hits(cross) == 0:
        failures.append("zero hits for the fresh engine on node-b")
    if not all(same):
        failures.append("engine 2's outputs differ from engine 1's")
    if _metric(b.http, "meshkv_peer_pulls_total") == 0:
        failures.append("node-b pulled nothing from its peers")
    if got != len(doc_keys[0]):
        failures.append("node-c could not read document 1")
    if not pd_same:
        failures.append("the P/D decode's output differs from engine 1's")
    if pd_out["computed_tokens"] > BLOCK:
        failures.append(f"the P/D decode computed {pd_out['computed_tokens']:.0f} prompt tokens")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C and SIGTERM both stop the demo and clean up. SIGINT explicitly too: a shell
    # without job control starts background commands with SIGINT ignored, and Python then
    # keeps it ignored (a CI run launched that way made the Ctrl-C test fail: the demo ran
    # to its end).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    print("meshkv demo: a three-agent mesh and real vLLM engines (about a minute on 2 cores)")
    demo = Demo()
    code = 1
    try:
        code = run(demo)
    except DemoFailed as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        code = 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = demo.close()
        for p in problems:
            print(f"cleanup: {p}", file=sys.stderr)
        print("\nall agents stopped (graceful leave), engines gone, arenas and files removed")
    if problems and code == 0:
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
