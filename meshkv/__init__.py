"""meshkv: a peer-to-peer KV-cache mesh for LLM inference engines."""

__version__ = "0.1.0"
