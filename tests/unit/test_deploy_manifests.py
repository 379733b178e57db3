"""The Kubernetes manifests in docs/deploy: valid against Kubernetes' own schemas (offline,
``kubernetes-validate``), and saying what meshkv itself accepts — the agent's arguments
parse with ``meshkv agent``'s parser, the engine's connector config with the connector's,
and the agent and the engines share the socket and the arena. No cluster or Docker daemon
exists here: what a real cluster would add (scheduling, hostPath permissions, image
builds) stays untested and is listed in docs/operations.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate  # dev dependency (requirements-dev.txt): schemas ship inside it
import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "docs" / "deploy" / "kubernetes"
K8S_VERSION = "1.30"


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def find(kind: str, name: str) -> dict[str, Any]:
    for _, doc in documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name}")


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    for c in doc["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name}")


def mounts(doc: dict[str, Any], c: dict[str, Any]) -> dict[str, str]:
    """mountPath -> hostPath of a container's hostPath volumes."""
    volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
        for m in c.get("volumeMounts", [])
        if "hostPath" in volumes[m["name"]]
    }


@pytest.mark.parametrize(("path", "doc"), documents(), ids=lambda x: str(x)[:40])
def test_every_manifest_is_valid_kubernetes(path: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_agent_arguments_parse_with_meshkvs_own_parser(tmp_path: Path) -> None:
    from meshkv.cli.agent_cmd import build_config
    from meshkv.cli.main import build_parser

    ds = find("DaemonSet", "meshkv-agent")
    c = container(ds, "agent")
    env = {"POD_IP": "10.1.2.3", "NODE_NAME": "gpu-node-7"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    assert args[0] == "agent"
    # point the files at real ones here: a private secret and token, an SSD directory
    files = {"/etc/meshkv/mesh-secret": "mesh-secret", "/etc/meshkv/admin-token": "token"}
    for name in files.values():
        (tmp_path / name).write_text("x" * 40 + "\n")
        (tmp_path / name).chmod(0o600)
    (tmp_path / "ssd").mkdir()
    local = {
        **{k: str(tmp_path / v) for k, v in files.items()},
        "/var/lib/meshkv": str(tmp_path / "ssd"),
    }
    local["/run/meshkv/agent.sock"] = str(tmp_path / "agent.sock")
    fixed = []
    for a in args[1:]:
        flag, _, value = a.partition("=")
        fixed.append(f"{flag}={local.get(value, value)}" if value else a)
    config = build_config(build_parser().parse_args(["agent", *fixed]))
    assert config.node_id == "gpu-node-7"
    assert config.mesh is not None and config.mesh.listen == "10.1.2.3:7470"
    assert config.mesh.join == ("meshkv-agents.meshkv.svc.cluster.local:7470",)
    assert config.http_host == "10.1.2.3" and config.admin_token_file is not None
    # the agent's files live where the volumes say, and the secrets come from the Secret
    m = mounts(ds, c)
    assert m["/run/meshkv"] == "/run/meshkv" and m["/dev/shm"] == "/dev/shm"
    assert {"/etc/meshkv", "/var/lib/meshkv"} <= {v["mountPath"] for v in c["volumeMounts"]}
    secret = find("Secret", "meshkv-secrets")
    assert {"mesh-secret", "admin-token"} <= set(secret["stringData"])
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert ds["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_engine_reaches_the_agent_and_its_connector_config_parses() -> None:
    from meshkv.integrations.vllm.config import ConnectorConfig

    ds = find("DaemonSet", "meshkv-agent")
    sts = find("StatefulSet", "vllm")
    engine = container(sts, "vllm")
    arg = next(a for a in engine["args"] if a.startswith("--kv-transfer-config="))
    transfer = json.loads(arg.partition("=")[2])
    assert transfer["kv_connector_module_path"] == "meshkv.integrations.vllm"
    assert transfer["kv_load_failure_policy"] == "recompute"
    cfg = ConnectorConfig.from_extra_config(transfer["kv_connector_extra_config"], {})
    agent_socket = next(a for a in container(ds, "agent")["args"] if a.startswith("--socket="))
    assert cfg.socket_path == agent_socket.partition("=")[2]
    # same host directories for the socket and the arena, and the agent's user
    assert mounts(sts, engine) == {
        path: host
        for path, host in mounts(ds, container(ds, "agent")).items()
        if path in ("/run/meshkv", "/dev/shm")
    }
    uid = ds["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_the_proxy_names_engines_that_the_statefulset_creates() -> None:
    from meshkv.cli.main import build_parser

    proxy = container(find("Deployment", "meshkv-proxy"), "proxy")
    args = build_parser().parse_args(proxy["args"])
    sts = find("StatefulSet", "vllm")
    names = {
        f"http://vllm-{i}.{sts['spec']['serviceName']}.meshkv.svc.cluster.local:8000"
        for i in range(sts["spec"]["replicas"])
    }
    assert set(args.engines) == names


def test_the_proxy_drains_within_the_pods_grace_period() -> None:
    """On a rolling update the kubelet runs preStop, then sends SIGTERM, and kills the pod
    at ``terminationGracePeriodSeconds``: the preStop sleep (the Service dropping the pod
    meanwhile), ``--drain-seconds`` and the time to answer the requests cut off at that
    deadline must fit in it."""
    from meshkv.cli.main import build_parser
    from meshkv.proxy.drain import DRAIN_GRACE_S

    deployment = find("Deployment", "meshkv-proxy")
    proxy = container(deployment, "proxy")
    drain = build_parser().parse_args(proxy["args"]).drain_seconds
    sleep = proxy["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert sleep >= 3 and sleep + drain + DRAIN_GRACE_S <= grace, (sleep, drain, grace)
