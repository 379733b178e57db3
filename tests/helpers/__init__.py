"""Helpers shared by the integration, mesh and vLLM tests (real processes, no fakes)."""
