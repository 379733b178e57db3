"""meshkv.integrations."""
