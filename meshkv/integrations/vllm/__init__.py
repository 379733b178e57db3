"""meshkv's vLLM connector.

Use it with ``kv_transfer_config = {"kv_connector": "MeshKVConnector",
"kv_connector_module_path": "meshkv.integrations.vllm", "kv_role": "kv_both",
"kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"socket_path": ...}}``
(see docs/vllm.md).
"""

from meshkv.integrations.vllm.connector import MeshKVConnector
from meshkv.integrations.vllm.stats import namespaces, registry_snapshot

__all__ = ["MeshKVConnector", "namespaces", "registry_snapshot"]
