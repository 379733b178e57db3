"""meshkv.tiers."""
