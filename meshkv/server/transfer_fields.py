"""The prefill/decode fields of local requests: a lookup's ``transfer`` hint, a hold's
``transfer``, and the ``transfers`` op's ``[producer, transfer id]`` lists. Each parser
raises ``ProtocolError`` naming the field; ``docs/local-protocol.md`` has the formats."""

from __future__ import annotations

import asyncio

from meshkv.errors import ProtocolError
from meshkv.puller import TransferHint

MAX_TRANSFER_S = 600.0
"""Longest a prefill/decode transfer may ask to be waited for or held."""


def parse_transfer_hint(value: object) -> TransferHint | None:
    """A lookup's ``transfer`` field: ``{"id": str, "producer": str, "wait": seconds}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("'transfer' must be a map {id, producer, wait}")
    transfer_id, producer, wait = value.get("id"), value.get("producer"), value.get("wait")
    if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= 128:
        raise ProtocolError("transfer 'id' must be a string of 1..128 characters")
    if not isinstance(producer, str) or not 0 < len(producer) <= 256:
        raise ProtocolError("transfer 'producer' must be a node id (1..256 characters)")
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait > 0:
        raise ProtocolError(f"transfer 'wait' must be a positive number of seconds, got {wait!r}")
    deadline = asyncio.get_running_loop().time() + min(float(wait), MAX_TRANSFER_S)
    return TransferHint(transfer_id, producer, deadline)


MAX_TRANSFER_REFS = 4096
"""Most transfers one ``transfers`` request may name in each of its lists."""


def parse_transfer_refs(value: object, field: str) -> list[tuple[str, str]]:
    """A ``transfers`` request's list of ``[producer node id, transfer id]`` pairs."""
    if not isinstance(value, list) or len(value) > MAX_TRANSFER_REFS:
        raise ProtocolError(
            f"transfers {field!r} must be a list of at most {MAX_TRANSFER_REFS} "
            "[producer, transfer id] pairs"
        )
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise ProtocolError(f"transfers {field!r}[{i}] must be a [producer, transfer id] pair")
        producer, transfer_id = item
        if not isinstance(producer, str) or not 0 < len(producer) <= 256:
            raise ProtocolError(f"transfers {field!r}[{i}]: the producer must be a node id")
        if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= 128:
            raise ProtocolError(
                f"transfers {field!r}[{i}]: the transfer id must be a string of 1..128 characters"
            )
        out.append((producer, transfer_id))
    return out


def parse_transfer_hold(value: object) -> tuple[str, float, str | None] | None:
    """A hold's ``transfer`` field: ``{"id": str, "hold": seconds, "push_to": node|nil}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("'transfer' must be a map {id, hold, push_to}")
    transfer_id, hold, push_to = value.get("id"), value.get("hold"), value.get("push_to")
    if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= 128:
        raise ProtocolError("transfer 'id' must be a string of 1..128 characters")
    if isinstance(hold, bool) or not isinstance(hold, int | float) or not hold > 0:
        raise ProtocolError(f"transfer 'hold' must be a positive number of seconds, got {hold!r}")
    if push_to is not None and (not isinstance(push_to, str) or not 0 < len(push_to) <= 256):
        raise ProtocolError("transfer 'push_to' must be a node id or nil")
    return transfer_id, min(float(hold), MAX_TRANSFER_S), push_to
