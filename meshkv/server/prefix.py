"""Prefix queries: how many leading tokens of a prompt this node holds, and in which tier.

A router (``meshkv proxy --routing cache_aware``, or anyone's) asks each node's agent
``POST /v1/prefix {"token_ids": [...]}`` and sends the request where the most of its prompt
is already cached. The agent cannot derive chunk keys from token ids alone: keys mix in the
engine's namespace (model, dtype, layout, tensor-parallel rank...) and chunk size. So the
agent remembers the namespaces its engines declared at hello (:class:`NamespaceRegistry`,
filled by the local server) and answers for each of them: a prefix counts only as far as
every tensor-parallel rank of that engine has it, and the answer is the best engine group.

The query is read-only: it does not touch recency, start pulls or count as a lookup in the
agent's metrics. It costs one xxh3 pass over the prompt per rank and a dictionary probe per
chunk (measured in ``tests/integration/test_prefix_query.py``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any

from meshkv.chunk import Namespace, NamespaceId, chunk_keys
from meshkv.store import Store, Tier

MAX_NAMESPACES = 64
"""Namespaces remembered (most recently declared first out)."""
MAX_QUERY_TOKENS = 1 << 20
"""Longest prompt a prefix query accepts."""


@dataclass(frozen=True, slots=True)
class _Group:
    """One engine: its ranks' namespace ids and its chunk size."""

    model: str
    chunk_tokens: int
    ranks: tuple[NamespaceId, ...]


class NamespaceRegistry:
    """Namespaces (with their chunk size) that engines declared at hello, grouped by engine
    (the same namespace apart from ``tp_rank``). Thread-safe; bounded."""

    def __init__(self, limit: int = MAX_NAMESPACES) -> None:
        self._limit = limit
        self._seen: OrderedDict[tuple[NamespaceId, int], Namespace] = OrderedDict()
        self._lock = threading.Lock()
        self._groups: list[_Group] | None = None

    def add(self, namespace: Namespace, chunk_tokens: int) -> None:
        if chunk_tokens <= 0:
            return  # a client that did not declare its chunk size cannot be answered for
        key = (namespace.digest(), chunk_tokens)
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return
            self._seen[key] = namespace
            while len(self._seen) > self._limit:
                self._seen.popitem(last=False)
            self._groups = None

    def groups(self) -> list[_Group]:
        with self._lock:
            if self._groups is None:
                ranks: dict[tuple[NamespaceId, int], dict[int, NamespaceId]] = {}
                bases: dict[tuple[NamespaceId, int], Namespace] = {}
                for (digest, chunk), ns in self._seen.items():
                    engine = (replace(ns, tp_rank=0).digest(), chunk)
                    bases[engine] = ns
                    ranks.setdefault(engine, {})[ns.tp_rank] = digest
                self._groups = [
                    _Group(bases[e].model, e[1], tuple(by_rank[r] for r in sorted(by_rank)))
                    for e, by_rank in ranks.items()
                    if len(by_rank) == bases[e].tp_size  # every rank has said hello
                ]
            return list(self._groups)

    def describe(self) -> list[dict[str, Any]]:
        """Every namespace declared here, most recent last: its id (hex), chunk size and
        fields (``/v1/status`` → ``namespaces``: which engines and ranks use this agent)."""
        with self._lock:
            seen = list(self._seen.items())
        return [
            {"id": digest.hex(), "chunk_tokens": chunk, **asdict(ns)}
            for (digest, chunk), ns in seen
        ]

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)


def parse_query(body: Any) -> tuple[list[int], str | None]:
    """``{"token_ids": [int, ...], "model": str?}`` -> (tokens, model); ValueError with a
    message that says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError('expected a JSON object like {"token_ids": [1, 2, 3]}')
    tokens = body.get("token_ids")
    if not isinstance(tokens, list):
        raise ValueError("'token_ids' must be a list of token ids")
    if len(tokens) > MAX_QUERY_TOKENS:
        raise ValueError(f"'token_ids' holds {len(tokens)} tokens; at most {MAX_QUERY_TOKENS}")
    for t in tokens:
        if type(t) is not int or not 0 <= t <= 0xFFFFFFFF:
            raise ValueError(f"'token_ids' must hold integers in [0, 2**32), found {t!r}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError("'model' must be a string")
    return tokens, model


def query(
    store: Store, registry: NamespaceRegistry, tokens: list[int], model: str | None = None
) -> dict[str, Any]:
    """The longest cached prefix of ``tokens`` over the registered engines of ``model``
    (all when None): ``{"tokens", "chunk_tokens", "tiers": {"cpu", "ssd"}, "engines"}``."""
    best: dict[str, Any] = {"tokens": 0, "chunk_tokens": 0, "tiers": {"cpu": 0, "ssd": 0}}
    groups = [g for g in registry.groups() if model is None or g.model == model]
    for group in groups:
        per_rank: list[list[Tier | None]] = []
        for ns in group.ranks:
            keys = chunk_keys(ns, tokens, group.chunk_tokens)
            per_rank.append(store.peek(ns, keys))
        cpu = ssd = 0
        for tiers in zip(*per_rank, strict=True):
            if any(t is None for t in tiers):
                break
            if all(t is Tier.CPU for t in tiers):
                cpu += 1
            else:
                ssd += 1  # some rank must read it from disk
        n = (cpu + ssd) * group.chunk_tokens
        if n > best["tokens"]:
            best = {
                "tokens": n,
                "chunk_tokens": group.chunk_tokens,
                "tiers": {"cpu": cpu * group.chunk_tokens, "ssd": ssd * group.chunk_tokens},
            }
    best["engines"] = len(groups)
    return best
