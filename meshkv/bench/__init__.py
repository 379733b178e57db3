"""meshkv.bench."""
