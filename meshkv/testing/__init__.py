"""Helpers for tests, demos and benchmarks (tiny models, agent processes)."""
