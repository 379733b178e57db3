"""meshkv's vLLM connector.

Use it with ``kv_transfer_config = {"kv_connector": "MeshKVConnector",
"kv_connector_module_path": "meshkv.integrations.vllm", "kv_role": "kv_both",
"kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"socket_path": ...}}``
(see docs/vllm.md). vLLM is imported only when the connector class is first used, so the
configuration helpers work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshkv.integrations.vllm.connector import MeshKVConnector
    from meshkv.integrations.vllm.stats import namespaces, registry_snapshot

__all__ = ["MeshKVConnector", "namespaces", "registry_snapshot"]


def __getattr__(name: str) -> Any:
    if name == "MeshKVConnector":
        from meshkv.integrations.vllm.connector import MeshKVConnector

        return MeshKVConnector
    if name in ("namespaces", "registry_snapshot"):
        from meshkv.integrations.vllm import stats

        return getattr(stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
