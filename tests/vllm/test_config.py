"""Connector configuration and version gate: bad settings fail with clear messages."""

from __future__ import annotations

import pytest

from meshkv.errors import ConfigError
from meshkv.integrations.vllm.config import ConnectorConfig, check_vllm_version

pytestmark = pytest.mark.vllm


ENV: dict[str, str] = {}


def parse(extra: dict[str, object] | None) -> ConnectorConfig:
    return ConnectorConfig.from_extra_config(extra, ENV)


def test_defaults_and_typed_values() -> None:
    cfg = parse({"socket_path": "/s.sock", "chunk_tokens": 512, "lookup_timeout_s": 1})
    assert cfg.socket_path == "/s.sock"
    assert cfg.chunk_tokens == 512
    assert cfg.lookup_timeout_s == 1.0 and isinstance(cfg.lookup_timeout_s, float)
    assert parse(None).socket_path.endswith("agent.sock")
    # "socket" is the documented key; "socket_path" (the field name) is an alias.
    assert parse({"socket": "/a.sock"}).socket_path == "/a.sock"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"chunk_tokens": "256"}, "chunk_tokens must be an integer"),
        ({"chunk_tokens": 0}, "chunk_tokens must be positive"),
        ({"save_decode_tokens": "yes"}, "save_decode_tokens must be true or false"),
        ({"block_hits": 1}, "block_hits must be true or false"),
        ({"load_timeout_s": -1}, "load_timeout_s must be > 0"),
        ({"sockets": "/x"}, "unknown kv_connector_extra_config key(s) ['sockets']"),
        ({"socket": "/a", "socket_path": "/b"}, "give the agent socket once"),
    ],
)
def test_bad_values_are_rejected_clearly(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(extra)
    assert message in str(info.value)


def test_chunk_must_tile_blocks() -> None:
    cfg = parse({"chunk_tokens": 200})
    with pytest.raises(ConfigError, match="multiple of vLLM's block size"):
        cfg.check_block_size(128)
    parse({"chunk_tokens": 384}).check_block_size(128)


def test_default_socket_follows_the_agents_rule() -> None:
    """One function decides the default socket for ``meshkv agent`` and the connector."""
    from meshkv.paths import default_socket_path

    env = {"XDG_RUNTIME_DIR": "/run/user/1234"}
    cfg = ConnectorConfig.from_extra_config(None, env)
    assert cfg.socket_path == "/run/user/1234/meshkv/agent.sock" == default_socket_path(env)
    assert default_socket_path({}, uid=77) == "/tmp/meshkv-77/agent.sock"


def test_version_gate() -> None:
    check_vllm_version("0.32.0", allow_untested=False)
    with pytest.raises(ConfigError, match="allow_untested_vllm"):
        check_vllm_version("0.40.1", allow_untested=False)
    check_vllm_version("0.40.1", allow_untested=True)  # warns, does not raise


def test_the_environment_can_allow_an_untested_vllm_and_the_key_wins() -> None:
    """``MESHKV_ALLOW_UNTESTED_VLLM`` (what ``make test-vllm-newest`` sets for every engine
    it starts) gives the default; the extra-config key, where given, decides."""
    home = {"XDG_RUNTIME_DIR": "/run/user/1"}
    assert not ConnectorConfig.from_extra_config(None, home).allow_untested_vllm
    for flag, want in (("1", True), ("true", True), ("0", False), ("False", False)):
        env = {**home, "MESHKV_ALLOW_UNTESTED_VLLM": flag}
        assert ConnectorConfig.from_extra_config(None, env).allow_untested_vllm is want
    env = {**home, "MESHKV_ALLOW_UNTESTED_VLLM": "1"}
    assert not ConnectorConfig.from_extra_config(
        {"allow_untested_vllm": False}, env
    ).allow_untested_vllm
    with pytest.raises(ConfigError, match="MESHKV_ALLOW_UNTESTED_VLLM must be 1, 0, true or"):
        ConnectorConfig.from_extra_config(None, {**home, "MESHKV_ALLOW_UNTESTED_VLLM": "on"})


def test_layer_loads_asks_vllm_for_piecewise_cuda_graphs() -> None:
    """vLLM's own config code asks the connector class; full graphs would skip the
    per-layer waits that layered loads depend on."""
    from meshkv.integrations.vllm.connector import MeshKVConnector

    assert MeshKVConnector.requires_piecewise_for_cudagraph({"layer_loads": True}) is True
    assert MeshKVConnector.requires_piecewise_for_cudagraph({}) is False
    with pytest.raises(ConfigError, match="layer_loads must be true or false"):
        MeshKVConnector.requires_piecewise_for_cudagraph({"layer_loads": "on"})
