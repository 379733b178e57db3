"""Benchmarks, the demo and the tiny test model: what needs the source tree (not installed)."""
