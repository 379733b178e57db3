"""Typed, validated ``kv_connector_extra_config`` of the meshkv vLLM connector."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from meshkv.errors import ConfigError
from meshkv.paths import default_socket_path

logger = logging.getLogger(__name__)

TESTED_VLLM_VERSIONS = ("0.32.",)
"""vLLM release lines the connector was tested against (prefix match)."""
ALLOW_UNTESTED_ENV = "MESHKV_ALLOW_UNTESTED_VLLM"
"""Environment variable that sets ``allow_untested_vllm`` for every engine of a process
tree (``make test-vllm-newest``, or trying a vLLM upgrade without editing each
``--kv-transfer-config``); the extra-config key, where given, wins."""
_ENV_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    """Settings read from ``kv_transfer_config.kv_connector_extra_config``."""

    socket_path: str = ""
    """Unix socket of the local meshkv agent (default: the agent's own default,
    ``$XDG_RUNTIME_DIR/meshkv/agent.sock`` or ``/tmp/meshkv-<uid>/agent.sock``)."""
    chunk_tokens: int = 256
    """Tokens per chunk; a multiple of vLLM's block size."""
    lookup_timeout_s: float = 0.2
    """Deadline of the scheduler's one lookup round-trip per request."""
    load_timeout_s: float = 2.0
    """How long a load off the step waits for chunks that come from peers (or SSD, with
    ``ssd_sync_wait_s`` 0)."""
    ssd_sync_wait_s: float = 0.5
    """Hits in this node's SSD tier are loaded inside the step that computes the request,
    as memory hits are, the step waiting up to this long, plus half of ``save_timeout_s``
    (the agent answers within that, however slow its disk), for the promotions the lookup
    started (a 2 MiB chunk took 10-18 ms here); a chunk not in memory by then is computed,
    and its promotion goes on for the next request. (0.75 s in all by default: on a disk
    throttled to 84 MB/s no load here needed longer, where 0.5 s in all cut some and the
    engine computed them, which on CPU costs far more than the wait.) 0: load SSD hits off
    the step like peer hits (the request waits while others run, and its blocks stay
    allocated meanwhile). Under vLLM's async scheduling or model runner V2 every load runs
    off the step whatever this says (docs/vllm.md, "What it does")."""
    save_timeout_s: float = 0.5
    """Deadline of each reserve/commit round-trip when saving."""
    transfer_save_timeout_s: float = 2.0
    """Prefill side of prefill/decode: how long a step that saves a transfer's chunks waits
    for the agent's reserve (instead of ``save_timeout_s``). A skipped save there makes the
    decode engine compute the whole prompt again, which costs it far more than this step's
    wait costs the prefill engine; the wait happens only when the agent is slow."""
    retry_interval_s: float = 1.0
    """After the agent is found gone (or ``breaker_failures`` calls in a row missed their
    deadline), skip it for this long: zero hits, no saves, no waiting."""
    breaker_failures: int = 3
    """Consecutive calls past their deadline before the agent counts as down. One slow
    answer is a miss for that request only; a socket that refuses opens the breaker at once."""
    verify_loads: bool = True
    """Hash every loaded chunk and compare with the checksum taken when it was committed:
    bytes damaged in the shared arena are reported as load errors, recomputed by vLLM, and
    dropped by the agent. On CPU the hash runs after the copy (it also catches bytes
    overwritten during it); on a GPU before the copy, which is asynchronous."""
    layer_loads: bool = False
    """GPU only: copy a step's loaded chunks layer by layer on a side stream, so attention
    on layer 0 starts while later layers still copy (``wait_for_layer_load`` orders each
    layer). vLLM then runs CUDA graphs piecewise only (``requires_piecewise_for_cudagraph``),
    since a full graph would skip the per-layer waits. Off: one copy of all layers on the
    compute stream before the forward pass, full graphs allowed."""
    transfer_timeout_s: float = 5.0
    """Decode side of prefill/decode: how long a request waits for its prompt's KV from the
    producer before it is computed here instead."""
    transfer_hold_s: float = 60.0
    """Prefill side: how long the agent keeps a transfer's chunks pinned if the decode side
    never says it is done."""
    transfer_renew_s: float = 10.0
    """Decode side: while a request waits in the engine's queue before its transfer is
    looked up (all running slots taken, KV cache full), ask the producer every this often
    to hold the transfer ``3 × transfer_renew_s`` more (the first time within half the
    time the producer's hold has left), as NIXL's decode side renews its lease by
    heartbeat. The producer holds a transfer 10 minutes at most, renewals included.
    0: no renewals; a request queued longer than the producer's ``transfer_hold_s`` may
    find its chunks gone and compute the prompt."""
    block_hits: bool = True
    """Hit every full engine block of a prompt, not only whole chunks: each prompt's last
    partial chunk is also saved cut to whole blocks (when that is at least half a chunk),
    and a lookup that hits asks for the next chunk cut at each block. A question about a
    document read before, or the next turn of a chat, then computes what vLLM's own prefix
    cache would (with 256-token chunks and vLLM CPU's 128-token blocks), instead of up to a
    chunk more."""
    save_decode_tokens: bool = False
    """Also save chunks that fill up during decoding (not only prompt chunks)."""
    namespace_salt: str = ""
    """Extra isolation: engines with different salts never share chunks."""
    model_id: str = ""
    """Name of the model in the namespace (default: vLLM's model path or id)."""
    draft_model_id: str = ""
    """Name of the speculative-decoding drafter in the namespace, for drafters whose layers
    keep KV in the engine's blocks (``draft_model``, EAGLE, MTP; default: vLLM's path or id
    of the draft model)."""
    allow_untested_vllm: bool = False
    """Start even on a vLLM version this connector was not tested with."""

    def __post_init__(self) -> None:
        if not self.socket_path:
            raise ConfigError("meshkv connector: socket_path must be a non-empty path")
        if self.chunk_tokens <= 0:
            raise ConfigError(
                f"meshkv connector: chunk_tokens must be positive, got {self.chunk_tokens}"
            )
        for name in (
            "lookup_timeout_s",
            "load_timeout_s",
            "save_timeout_s",
            "transfer_save_timeout_s",
            "transfer_timeout_s",
            "transfer_hold_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"meshkv connector: {name} must be > 0 seconds")
        if self.transfer_renew_s < 0:
            raise ConfigError("meshkv connector: transfer_renew_s must be >= 0 seconds (0: off)")
        if self.ssd_sync_wait_s < 0:
            raise ConfigError("meshkv connector: ssd_sync_wait_s must be >= 0 seconds")
        if self.retry_interval_s < 0:
            raise ConfigError("meshkv connector: retry_interval_s must be >= 0")
        if self.breaker_failures < 1:
            raise ConfigError("meshkv connector: breaker_failures must be >= 1")

    def check_block_size(self, block_size: int) -> None:
        """Raise unless whole engine blocks tile a chunk."""
        if self.chunk_tokens % block_size:
            raise ConfigError(
                f"meshkv connector: chunk_tokens ({self.chunk_tokens}) must be a multiple of "
                f"vLLM's block size ({block_size}); set kv_connector_extra_config "
                f'{{"chunk_tokens": {max(1, self.chunk_tokens // block_size) * block_size}}} '
                "or change --block-size"
            )

    @classmethod
    def from_extra_config(
        cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str]
    ) -> ConnectorConfig:
        """Parse and type-check the extra-config dict; unknown keys are an error.

        ``environ`` is the engine process's environment (read by the caller, the
        connector's edge): it decides the default socket, as for ``meshkv agent``."""
        extra = dict(extra or {})
        # "socket" is the documented key (the connector contract); "socket_path" is the
        # field name and stays accepted as an alias.
        if "socket" in extra:
            socket = extra.pop("socket")
            if extra.get("socket_path") not in (None, "", socket):
                raise ConfigError(
                    "meshkv connector: give the agent socket once, as 'socket' "
                    f"(got socket={socket!r} and socket_path={extra['socket_path']!r})"
                )
            extra["socket_path"] = socket
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(
                f"meshkv connector: unknown kv_connector_extra_config key(s) {unknown}; "
                f"known keys: {sorted(known)}"
            )
        values: dict[str, Any] = {}
        if not extra.get("socket_path"):
            extra["socket_path"] = default_socket_path(environ)
        if "allow_untested_vllm" not in extra and environ.get(ALLOW_UNTESTED_ENV, "") != "":
            flag = environ[ALLOW_UNTESTED_ENV]
            if flag.strip().lower() not in _ENV_BOOLS:
                raise ConfigError(
                    f"meshkv connector: {ALLOW_UNTESTED_ENV} must be 1, 0, true or false, "
                    f"got {flag!r}"
                )
            extra["allow_untested_vllm"] = _ENV_BOOLS[flag.strip().lower()]
        for name, value in extra.items():
            values[name] = _coerce(name, value, type(known[name].default))
        return cls(**values)


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"meshkv connector: {name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"meshkv connector: {name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"meshkv connector: {name} must be a number, got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"meshkv connector: {name} must be a string, got {value!r}")


def check_vllm_version(version: str, allow_untested: bool) -> None:
    """Refuse vLLM versions the connector was not tested with, unless allowed."""
    if version.startswith(TESTED_VLLM_VERSIONS):
        return
    message = (
        f"meshkv connector was tested with vLLM {', '.join(v + 'x' for v in TESTED_VLLM_VERSIONS)}"
        f" but this is vLLM {version}"
    )
    if not allow_untested:
        raise ConfigError(
            message + '; set kv_connector_extra_config {"allow_untested_vllm": true} '
            f"(or {ALLOW_UNTESTED_ENV}=1 in the engine's environment) to try it"
        )
    logger.warning("%s; continuing because allow_untested_vllm is set", message)
