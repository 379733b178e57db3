"""Request streams for the traffic simulations: multi-round chat, RAG, agentic loops, a mix.

A prompt is a sequence of *segments* (a system prompt, a user's document, one question, one
answer, one tool output...). Two segments with the same id hold the same tokens, so prompts
that share a segment at the same position share the chunks over it. Chunk keys are made with
the agent's own ``meshkv.chunk.next_key`` (prefix-chained xxh3-128): each 256-token chunk is
hashed over the (segment id, first offset, last offset) pieces it covers, a compact stand-in
for its 256 token ids with the same equality. Only full chunks have keys, as in the agent.

Parameters and where their defaults come from (all can be overridden per scenario):

* **chat** — LMCache's multi-round-qa benchmark shape: a system prompt shared by every user
  (1,000 tokens there; 1,024 here), a per-user context (LMCache sends a long per-user
  history; 2,000 tokens here), each round appends the last answer and a new question.
  Question/answer lengths: the vLLM paper's ShareGPT statistics (mean input ≈ 161, output
  ≈ 338 tokens), drawn log-normally. Rounds per session: log-normal with median 5 and a long
  tail (capped at 40), as in ShareGPT's heavy-tailed conversation lengths. Think time between
  rounds: log-normal, median 20 s, σ = 1 (reading + typing; capped at 10 min).
* **rag** — a corpus of 5,000 documents of 300–1,500 tokens with Zipf(1.1) popularity (the
  usual skew of document and web access), k = 3 documents per request in retrieval order after
  a 512-token system prompt, then a ~50-token question. Prefix caching reuses a document
  only where the same documents come first in the same order, which is what a prefix-keyed
  cache (vLLM's, LMCache's default, meshkv's) can do.
* **agent** — a tool-using agent: one of 20 agent types (3,000 tokens of system prompt and
  tool definitions shared by every task of that type), a 300-token task, then 5–50 calls
  (log-normal, median 12), each appending the model's last action (~150 tokens) and a tool
  output (log-normal, median 400 tokens); tool latency log-normal, median 2 s.
* **mix** — sessions drawn 50 % chat, 30 % rag, 20 % agent.

Sessions arrive as a Poisson process (``sessions_per_node_hour`` × nodes); every random draw
comes from one ``random.Random`` seeded by the scenario, so a stream is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from meshkv.chunk import ROOT_KEY, next_key

CHUNK_TOKENS = 256
NAMESPACE = b"meshkv-sim-ns-01"  # 16 bytes: one model, one namespace

# segment ids: small ranges are shared content, above SHARED_IDS everything is unique
_SYSTEM_CHAT = 1
_SYSTEM_RAG = 2
_AGENT_TYPE0 = 100
_DOC0 = 10_000
SHARED_IDS = 1_000_000


@dataclass(slots=True)
class Prompt:
    """A growing token stream with the keys of its full chunks, computed incrementally."""

    keys: list[bytes] = field(default_factory=list)
    tokens: int = 0
    _pieces: list[int] = field(default_factory=list)
    _prev: bytes = ROOT_KEY

    def append(self, ident: int, n: int) -> None:
        """Append ``n`` tokens of segment ``ident``."""
        off = 0
        while n > 0:
            room = CHUNK_TOKENS - self.tokens % CHUNK_TOKENS
            take = min(room, n)
            self._pieces += (ident, off, off + take)
            self.tokens += take
            off += take
            n -= take
            if self.tokens % CHUNK_TOKENS == 0:
                self._prev = next_key(NAMESPACE, self._prev, self._pieces)  # type: ignore[arg-type]
                self.keys.append(self._prev)
                self._pieces = []

    def copy(self) -> Prompt:
        return Prompt(list(self.keys), self.tokens, list(self._pieces), self._prev)


@dataclass(frozen=True, slots=True)
class Request:
    """One prompt sent at ``time`` by ``session`` (keys of its full chunks, in order)."""

    time: float
    session: int
    kind: str
    keys: tuple[bytes, ...]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Shape of the traffic; see the module docstring for where the defaults come from."""

    kind: str = "chat"
    """``chat``, ``rag``, ``agent`` or ``mix``."""
    sessions_per_node_hour: float = 40.0
    """New sessions per node per hour (Poisson)."""
    chat_system_tokens: int = 1024
    chat_user_context_tokens: int = 2000
    chat_question_median: float = 120.0
    chat_answer_median: float = 250.0
    chat_rounds_median: float = 5.0
    chat_rounds_max: int = 40
    chat_think_median_s: float = 20.0
    rag_docs: int = 5000
    rag_zipf_s: float = 1.1
    rag_k: int = 3
    rag_system_tokens: int = 512
    rag_questions_per_session: int = 3
    agent_types: int = 20
    agent_system_tokens: int = 3000
    agent_calls_median: float = 12.0
    agent_tool_output_median: float = 400.0
    agent_tool_latency_median_s: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("chat", "rag", "agent", "mix"):
            raise ValueError(f"workload kind must be chat, rag, agent or mix, not {self.kind!r}")
        if self.sessions_per_node_hour <= 0:
            raise ValueError("sessions_per_node_hour must be > 0")


class _Zipf:
    """Draws ranks 0..n-1 with P(r) ∝ 1/(r+1)^s by inverse CDF (bisect on a table)."""

    def __init__(self, n: int, s: float) -> None:
        acc = 0.0
        self.cdf: list[float] = []
        for r in range(n):
            acc += 1.0 / (r + 1) ** s
            self.cdf.append(acc)
        self.total = acc

    def draw(self, rng: random.Random) -> int:
        import bisect

        return min(bisect.bisect_left(self.cdf, rng.random() * self.total), len(self.cdf) - 1)


def _lognormal(rng: random.Random, median: float, sigma: float = 0.8) -> float:
    return median * math.exp(sigma * rng.gauss(0.0, 1.0))


@dataclass(slots=True)
class _Session:
    ident: int
    kind: str
    prompt: Prompt
    left: int  # requests still to send after the current one


class Workload:
    """Yields the requests of ``nodes`` nodes' traffic in time order up to ``duration_s``."""

    def __init__(self, config: WorkloadConfig, nodes: int, seed: int) -> None:
        self.config = config
        self.nodes = nodes
        self._rng = random.Random(f"workload/{seed}/{config.kind}")
        self._zipf = _Zipf(config.rag_docs, config.rag_zipf_s)
        self._doc_len = [
            int(300 + 1200 * random.Random(f"doc/{d}").random()) for d in range(config.rag_docs)
        ]
        self._next_id = SHARED_IDS

    def _unique(self) -> int:
        self._next_id += 1
        if self._next_id >= 2**32:
            raise OverflowError("segment ids exhausted")
        return self._next_id

    def _tokens(self, median: float) -> int:
        return max(8, int(_lognormal(self._rng, median)))

    def _start(self, ident: int, kind: str) -> _Session:
        c, rng = self.config, self._rng
        p = Prompt()
        if kind == "chat":
            p.append(_SYSTEM_CHAT, c.chat_system_tokens)
            p.append(self._unique(), c.chat_user_context_tokens)
            p.append(self._unique(), self._tokens(c.chat_question_median))
            rounds = min(c.chat_rounds_max, max(1, round(_lognormal(rng, c.chat_rounds_median))))
            return _Session(ident, kind, p, rounds - 1)
        if kind == "rag":
            self._rag_prompt(p)
            return _Session(ident, kind, p, c.rag_questions_per_session - 1)
        agent = rng.randrange(c.agent_types)
        p.append(_AGENT_TYPE0 + agent, c.agent_system_tokens)
        p.append(self._unique(), self._tokens(300.0))
        calls = min(200, max(1, round(_lognormal(rng, c.agent_calls_median))))
        return _Session(ident, kind, p, calls - 1)

    def _rag_prompt(self, p: Prompt) -> None:
        c, rng = self.config, self._rng
        p.append(_SYSTEM_RAG, c.rag_system_tokens)
        docs: list[int] = []
        while len(docs) < c.rag_k:
            d = self._zipf.draw(rng)
            if d not in docs:
                docs.append(d)
        for d in docs:
            p.append(_DOC0 + d, self._doc_len[d])
        p.append(self._unique(), self._tokens(50.0))

    def _advance(self, s: _Session) -> float:
        """Append what the next request adds; return the delay before it is sent."""
        c, rng = self.config, self._rng
        if s.kind == "chat":
            s.prompt.append(self._unique(), self._tokens(c.chat_answer_median))
            s.prompt.append(self._unique(), self._tokens(c.chat_question_median))
            return min(600.0, _lognormal(rng, c.chat_think_median_s, 1.0))
        if s.kind == "rag":
            s.prompt = Prompt()
            self._rag_prompt(s.prompt)
            return min(600.0, _lognormal(rng, c.chat_think_median_s, 1.0))
        s.prompt.append(self._unique(), self._tokens(150.0))
        s.prompt.append(self._unique(), self._tokens(c.agent_tool_output_median))
        return min(120.0, _lognormal(rng, c.agent_tool_latency_median_s, 0.7))

    def _kind(self) -> str:
        if self.config.kind != "mix":
            return self.config.kind
        r = self._rng.random()
        return "chat" if r < 0.5 else "rag" if r < 0.8 else "agent"

    def requests(self, duration_s: float) -> Iterator[Request]:
        import heapq

        rate = self.config.sessions_per_node_hour * self.nodes / 3600.0
        rng = self._rng
        heap: list[tuple[float, int, _Session | None]] = []
        seq = 0
        heapq.heappush(heap, (rng.expovariate(rate), 0, None))
        sessions = 0
        while heap:
            t, _, s = heapq.heappop(heap)
            if t > duration_s:
                return
            if s is None:  # a new session arrives; schedule the next arrival
                seq += 1
                heapq.heappush(heap, (t + rng.expovariate(rate), seq, None))
                sessions += 1
                s = self._start(sessions, self._kind())
            p = s.prompt
            yield Request(t, s.ident, s.kind, tuple(p.keys), p.tokens)
            if s.left > 0:
                s.left -= 1
                delay = self._advance(s)
                seq += 1
                heapq.heappush(heap, (t + delay, seq, s))
