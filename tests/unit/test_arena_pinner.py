"""The worker's arena pinner counts the clients of the process's one arena mapping: it
page-locks the mapping at the first client's map and unlocks it at the last one's unmap
(the lanes share one mapping; unpinning at the first lane's reconnect would pull the
memory from under the others' kernel copies). The CUDA calls are replaced by counters."""

from __future__ import annotations

from typing import Any

import pytest

import meshkv.kernels
from meshkv.integrations.vllm.link import ArenaPinner


def test_the_shared_mapping_is_pinned_once_and_unpinned_by_its_last_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(meshkv.kernels, "as_byte_tensor", lambda view: view)
    monkeypatch.setattr(meshkv.kernels, "pin_host_memory", lambda t: calls.append("pin") or True)
    monkeypatch.setattr(meshkv.kernels, "unpin_host_memory", lambda t: calls.append("unpin"))
    pinner = ArenaPinner()
    view = memoryview(bytearray(64))
    pinner.on_map(view)  # not a GPU engine (yet): nothing pinned
    pinner.on_unmap(view)
    assert calls == []
    pinner.enabled = True
    for _ in range(3):  # three lanes map the one mapping
        pinner.on_map(view)
    assert calls == ["pin"]
    pinner.on_unmap(view)
    pinner.on_unmap(view)
    assert calls == ["pin"]  # a lane left; the others still copy through it
    pinner.on_unmap(view)
    assert calls == ["pin", "unpin"]


def test_a_refused_pin_is_tried_once_per_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[Any] = []
    monkeypatch.setattr(meshkv.kernels, "as_byte_tensor", lambda view: view)
    monkeypatch.setattr(meshkv.kernels, "pin_host_memory", lambda t: tries.append(t) and False)
    monkeypatch.setattr(meshkv.kernels, "unpin_host_memory", lambda t: pytest.fail("unpinned"))
    pinner = ArenaPinner()
    pinner.enabled = True
    view = memoryview(bytearray(64))
    pinner.on_map(view)
    pinner.on_map(view)
    assert len(tries) == 1
    pinner.on_unmap(view)
    pinner.on_unmap(view)
