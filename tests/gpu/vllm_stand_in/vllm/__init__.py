"""Stand-ins for the few vLLM names meshkv's connector modules import at module level.

Only for the lent GPU machine (``tests/gpu/run.sh``), which has no vLLM and cannot install
one (no network; a CUDA vLLM wheel is far over what a run may carry). There the worker's
CUDA path (``tests/unit/test_vllm_worker_side.py``, ``cuda`` cases: pinned arena, side stream,
events) runs against fake agents, as it does here on CPU, with these base classes in place
of vLLM's. Never on the path elsewhere: CI and ``make test`` import the real vLLM.
"""

__version__ = "0+meshkv-stand-in"
