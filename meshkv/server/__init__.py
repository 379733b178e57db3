"""meshkv.server."""
