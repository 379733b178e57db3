"""Prompt workloads of the end-to-end vLLM benchmark, as token ids, deterministic from a seed.

Three shapes, each a list of :class:`Prompt` in the order they are sent:

* **long-document QA** — ``docs`` documents, ``questions`` questions each; a prompt is the
  document followed by one question. The first question of a document is *cold* (nothing
  reusable exists), the later ones are *warm* (the document's KV was computed before).
* **multi-round chat** — ``conversations`` conversations of ``rounds`` rounds, sent round
  by round across conversations (as several users would). Round ``r`` is the whole
  conversation so far plus a new user turn, so every round after the first is warm.
* **unique** — prompts that share nothing with each other or anything else (all cold):
  the overhead of a connector that only ever misses and stores.

Token ids are drawn uniformly from ``[first_token, vocab_size)`` (ids below
``first_token`` are the tokenizer's special tokens). The prompts are random, which is what
a KV cache sees anyway: reuse depends only on exact token prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIRST_TOKEN = 3
"""Ids 0-2 are the tiny model's special tokens (``<s>``, ``</s>``, ``<unk>``)."""

_STREAMS = {"longdoc": 1, "chat": 2, "unique": 3, "warmup": 4}
"""Each workload draws from its own stream so that changing one leaves the others alone."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request of a workload."""

    rid: str
    """Unique id (``doc2-q1``, ``chat0-r3``, ``unique4``)."""
    workload: str
    """``longdoc``, ``chat``, ``unique`` or ``warmup``."""
    phase: str
    """``cold`` (no reusable prefix was sent before) or ``warm``."""
    tokens: tuple[int, ...]
    """Prompt token ids."""
    reusable_tokens: int = 0
    """Length of the prefix sent before in an earlier prompt (0 when cold)."""

    def __post_init__(self) -> None:
        if self.phase not in ("cold", "warm"):
            raise ValueError(f"prompt {self.rid}: phase must be cold or warm, got {self.phase!r}")
        if not self.tokens:
            raise ValueError(f"prompt {self.rid}: empty prompt")


class TokenSource:
    """Seeded random token ids over a vocabulary."""

    def __init__(self, seed: int, stream: str, vocab_size: int) -> None:
        if vocab_size <= FIRST_TOKEN + 1:
            raise ValueError(f"vocab_size must be > {FIRST_TOKEN + 1}, got {vocab_size}")
        self._rng = np.random.default_rng([seed, _STREAMS[stream]])
        self._vocab = vocab_size

    def take(self, n: int) -> tuple[int, ...]:
        if n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        return tuple(int(t) for t in self._rng.integers(FIRST_TOKEN, self._vocab, size=n))


def long_document_qa(
    *,
    seed: int,
    vocab_size: int,
    docs: int,
    questions: int,
    doc_tokens: int,
    question_tokens: int,
) -> list[Prompt]:
    """Documents one after another; each document's questions right after it."""
    _positive(
        docs=docs, questions=questions, doc_tokens=doc_tokens, question_tokens=question_tokens
    )
    src = TokenSource(seed, "longdoc", vocab_size)
    prompts: list[Prompt] = []
    for d in range(docs):
        doc = src.take(doc_tokens)
        for q in range(questions):
            prompts.append(
                Prompt(
                    rid=f"doc{d}-q{q}",
                    workload="longdoc",
                    phase="cold" if q == 0 else "warm",
                    tokens=doc + src.take(question_tokens),
                    reusable_tokens=0 if q == 0 else doc_tokens,
                )
            )
    return prompts


def multi_round_chat(
    *,
    seed: int,
    vocab_size: int,
    conversations: int,
    rounds: int,
    system_tokens: int,
    user_tokens: int,
    reply_tokens: int,
) -> list[Prompt]:
    """Round 1 of every conversation, then round 2 of every conversation, and so on.

    Round ``r`` (from 0) is ``system + (user, reply) * r + user``: the previous round's
    prompt plus the model's reply (synthetic; the benchmark generates one token only) plus
    a new user turn.
    """
    _positive(conversations=conversations, rounds=rounds, user_tokens=user_tokens)
    if system_tokens < 0 or reply_tokens < 0:
        raise ValueError("system_tokens and reply_tokens must be >= 0")
    src = TokenSource(seed, "chat", vocab_size)
    history = [src.take(system_tokens) for _ in range(conversations)]
    sent = [0] * conversations  # length of each conversation's previous prompt
    prompts: list[Prompt] = []
    for r in range(rounds):
        for c in range(conversations):
            prompt = history[c] + src.take(user_tokens)
            prompts.append(
                Prompt(
                    rid=f"chat{c}-r{r}",
                    workload="chat",
                    phase="cold" if r == 0 else "warm",
                    tokens=prompt,
                    reusable_tokens=sent[c],
                )
            )
            sent[c] = len(prompt)
            history[c] = prompt + src.take(reply_tokens)
    return prompts


def unique_prompts(
    *, seed: int, vocab_size: int, count: int, tokens: int, workload: str = "unique"
) -> list[Prompt]:
    """``count`` prompts sharing nothing (zero overlap; all cold)."""
    _positive(count=count, tokens=tokens)
    src = TokenSource(seed, workload, vocab_size)
    return [
        Prompt(rid=f"{workload}{i}", workload=workload, phase="cold", tokens=src.take(tokens))
        for i in range(count)
    ]


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
