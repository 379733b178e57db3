"""The ``kv_transfer_params`` meshkv reads and writes in vLLM's prefill/decode flow.

vLLM's standard flow (its toy proxy, llm-d's sidecar, ``meshkv proxy``):

1. The proxy sends the request to a prefill engine with ``max_tokens: 1`` and
   ``kv_transfer_params: {"do_remote_decode": true, "do_remote_prefill": false, ...}``. Our
   proxy may add ``"meshkv_push_to": <node id>``: the decode node's agent, to push to.
2. The prefill engine's connector saves every prompt token (the last partial chunk too) and
   ``request_finished`` returns the parameters built by ``producer_params``.
3. The proxy passes those parameters, unchanged, to a decode engine with the original
   request. Its connector reads them with ``parse_consumer`` and loads the prompt's KV
   asynchronously from the producer's agent (or finds it pushed already).

What the prefill side returns (``kv_transfer_params`` of its response)::

    {"do_remote_prefill": true, "do_remote_decode": false,
     "remote_engine_id": <producer node id>, "remote_block_ids": null,
     "remote_host": null, "remote_port": null,
     "meshkv": {"v": 1,                      # this format's version
                "producer": <node id>,       # the producer's agent (the consumer pulls there)
                "transfer": <transfer id>,   # names the producer's hold on the chunks
                "tokens": <int>,             # prompt tokens saved (the whole prompt)
                "chunk_tokens": <int>,       # chunk size the keys were made with
                "last_key": <32 hex digits>, # the last chunk's key (rank 0): the consumer
                                             # checks it against its own prompt's keys
                "expires": <unix seconds>,   # the producer's hold ends then (at the latest)
                "engine": {...}}}            # the producer's namespace fields (model, dtype,
                                             # layout, drafter...; optional): a consumer whose
                                             # own differ says which, loudly

The NIXL-shaped fields are there so proxies written for vLLM's own connectors pass the
parameters on without special cases. Everything is validated: a malformed ``meshkv`` map
is ignored (the decode engine computes the prompt), never an error for the request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 1
MAX_ID_CHARS = 128
MAX_NODE_CHARS = 256
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class ProducerRequest:
    """What a prefill request asks of the meshkv connector."""

    push_to: str | None
    """Node id of the decode side's agent, when the proxy named it."""


@dataclass(frozen=True, slots=True)
class ConsumerRequest:
    """What a decode request carries from its prefill (parsed ``meshkv`` map)."""

    producer: str
    transfer_id: str
    tokens: int
    chunk_tokens: int
    last_key: bytes
    expires: float
    engine: dict[str, Any] | None = None
    """The producer engine's namespace fields (None: an older producer, or malformed)."""


MAX_ENGINE_FIELDS = 32
MAX_ENGINE_VALUE_CHARS = 512


def _engine_fields(value: object) -> dict[str, Any] | None:
    """The ``engine`` map if it is a small map of names to scalars (or one level of such
    maps, as ``extra``); None otherwise: it only feeds a diagnostic."""

    def scalar(v: object) -> bool:
        return (isinstance(v, str) and len(v) <= MAX_ENGINE_VALUE_CHARS) or (
            _is_int(v) or v is None
        )

    if not isinstance(value, Mapping) or len(value) > MAX_ENGINE_FIELDS:
        return None
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str) or len(k) > 64:
            return None
        if isinstance(v, Mapping):
            if len(v) > MAX_ENGINE_FIELDS or not all(
                isinstance(ik, str) and len(ik) <= 64 and scalar(iv) for ik, iv in v.items()
            ):
                return None
            out[k] = dict(v)
        elif scalar(v):
            out[k] = v
        else:
            return None
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _node_id(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_NODE_CHARS and value.isprintable():
        return value
    return None


def parse_producer(params: Mapping[str, Any] | None) -> ProducerRequest | None:
    """The prefill side of a request (``do_remote_decode``), or None."""
    if not isinstance(params, Mapping) or params.get("do_remote_decode") is not True:
        return None
    return ProducerRequest(push_to=_node_id(params.get("meshkv_push_to")))


def parse_consumer(params: Mapping[str, Any] | None) -> ConsumerRequest | None:
    """The decode side of a request (``do_remote_prefill`` with a valid ``meshkv`` map), or
    None (no P/D, or parameters of another connector, or malformed ones)."""
    if not isinstance(params, Mapping) or params.get("do_remote_prefill") is not True:
        return None
    ours = params.get("meshkv")
    if not isinstance(ours, Mapping) or ours.get("v") != FORMAT_VERSION:
        return None
    producer = _node_id(ours.get("producer"))
    transfer_id = ours.get("transfer")
    tokens, chunk_tokens = ours.get("tokens"), ours.get("chunk_tokens")
    last_key, expires = ours.get("last_key"), ours.get("expires")
    if producer is None:
        return None
    if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= MAX_ID_CHARS:
        return None
    if not isinstance(tokens, int) or not isinstance(chunk_tokens, int):
        return None
    if not (_is_int(tokens) and _is_int(chunk_tokens)) or tokens <= 0 or chunk_tokens <= 0:
        return None
    if not isinstance(last_key, str) or not _HEX32.match(last_key):
        return None
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        return None
    return ConsumerRequest(
        producer, transfer_id, int(tokens), int(chunk_tokens), bytes.fromhex(last_key),
        float(expires), _engine_fields(ours.get("engine")),
    )  # fmt: skip


def producer_params(
    *,
    producer: str,
    transfer_id: str,
    tokens: int,
    chunk_tokens: int,
    last_key: bytes,
    expires: float,
    engine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill request finishes with."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": producer,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
        "meshkv": {
            "v": FORMAT_VERSION,
            "producer": producer,
            "transfer": transfer_id,
            "tokens": tokens,
            "chunk_tokens": chunk_tokens,
            "last_key": last_key.hex(),
            "expires": round(expires, 3),
            **({"engine": dict(engine)} if engine is not None else {}),
        },
    }


def engine_fields(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """What a producer says about its engine: its namespace's fields but the rank (each
    rank of a tensor-parallel engine has its own)."""
    return {k: v for k, v in namespace.items() if k != "tp_rank"}


def engine_differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """``field: theirs != ours`` for every field (``extra`` ones by their name) the two
    engines disagree on, a field only one of them names included; empty when they agree."""
    flat_theirs, flat_ours = _flat(theirs), _flat(ours)
    return [
        f"{name}: {flat_theirs.get(name)!r} (prefill) != {flat_ours.get(name)!r} (here)"
        for name in sorted(set(flat_theirs) | set(flat_ours))
        if flat_theirs.get(name) != flat_ours.get(name)
    ]


def _flat(fields: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{ik}": iv for ik, iv in v.items()})
        else:
            out[k] = v
    return out


def wants_identity(params: Mapping[str, Any] | None) -> bool:
    """A probe (``{"meshkv_probe": true}``): the proxy asks which agent serves this engine."""
    return isinstance(params, Mapping) and params.get("meshkv_probe") is True


def identity_params(node_id: str) -> dict[str, Any]:
    """What a decode-side (or probed) request finishes with: the node of its agent, so a
    proxy can name it as the push target of the next prefill."""
    return {"meshkv_node": node_id}
