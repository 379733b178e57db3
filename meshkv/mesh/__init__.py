"""meshkv.mesh."""
