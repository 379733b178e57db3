"""meshkv.cli."""
