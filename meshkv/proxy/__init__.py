"""``meshkv proxy``: OpenAI-compatible front for vLLM engines (P/D and cache-aware routing)."""
