"""``meshkv agent`` flag and TOML validation: every bad input fails fast with a clear reason."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from meshkv.cli.main import main
from meshkv.config import AgentConfig
from meshkv.errors import ConfigError
from meshkv.launch import AgentProcess


@pytest.fixture(autouse=True)
def no_agent_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process ``main(["agent", ...])`` calls here expect validation to refuse:
    input that passes must fail the test at once, not start an agent that serves on
    (pytest-timeout's alarm does not end a uvloop that waits for signals). The
    subprocess runs are not affected."""

    def no_agent(config: AgentConfig) -> None:
        raise AssertionError("the flags passed validation: an agent would start here")

    monkeypatch.setattr("meshkv.agent.run_agent", no_agent)


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshkv", "agent", "--http", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--http", "localhost"], "--http must be HOST:PORT"),
        (["--http", "127.0.0.1:99999"], "port 99999 is outside 0..65535"),
        (["--http", "127.0.0.1:http"], "port 'http' is not a number"),
        (["--cpu-gb", "-1"], "--cpu-gb must be positive"),
        (["--cpu-bytes", "0"], "--cpu-bytes must be positive"),
        (["--eviction", "random"], "--eviction must be one of lru, s3fifo"),
        (["--ssd-dir", "/nonexistent/meshkv-ssd"], "SSD directory /nonexistent/meshkv-ssd"),
        (["--lease-seconds", "0"], "lease seconds must be > 0"),
        (["--ready-file", "/proc/mkv-none/r.json"], "--ready-file: directory /proc/mkv-none does"),
        (["--ssd-dir", "/etc/hostname"], "SSD directory /etc/hostname is not a directory"),
        (["--cpu-gb", "0.01"], "must hold at least one segment"),
        (["--log-level", "loud"], "log level must be one of"),
        (["--admin-token-file", "/nonexistent/token"], "cannot read admin token file"),
        (["--socket", "/tmp/" + "x" * 120], "Unix sockets allow at most 107"),
        (["--remote", "http://127.0.0.1:6379"], "URL scheme must be one of redis, rediss"),
        (["--remote", "redis://"], "no host in"),
        (["--remote", "redis://127.0.0.1:99999"], "port is not a number in 1..65535"),
        (["--remote", "redis://127.0.0.1:6379/zero"], "the database must be a number"),
        (["--remote", "redis://h:6379/0?ssl=true"], "URL options (?ssl=true) are not read"),
        (["--remote", "redis://h", "--remote-ttl", "0"], "ttl must be > 0 seconds"),
        (["--remote", "redis://h", "--remote-gb", "-1"], "--remote-gb must be positive"),
        (["--remote", "redis://h", "--remote-queue-mb", "0"], "--remote-queue-mb must be"),
        (["--remote", "redis://h", "--remote-prefix", "a b"], "key prefix must be a word"),
        (["--remote-ttl", "60"], "remote tier settings (ttl_s) need a URL"),
        (["--remote", "redis://h", "--remote-tls-ca", "/x.pem"], "needs a rediss:// (or"),
        (
            ["--remote", "redis://:pw@h", "--remote-password-file", "/etc/hostname"],
            "the URL has a password and a password file is given",
        ),
        (
            ["--remote", "redis://h", "--remote-password-file", "/nonexistent/pw"],
            "cannot read remote password file /nonexistent/pw",
        ),
        (
            ["--remote", "rediss://h", "--remote-tls-ca", "/etc/hostname"],
            "cannot load TLS CA file /etc/hostname",
        ),
    ],
)
def test_bad_flags_are_rejected(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process: validation happens before anything is created, so this is the same path
    # as the real command (which test_real_command_exit_code runs once as a process).
    assert main(["agent", "--http", "127.0.0.1:0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshkv agent: error: ") and message in err, err


def test_real_command_exit_code() -> None:
    out = agent_cli("--eviction", "random")
    assert out.returncode == 2
    assert "--eviction must be one of lru, s3fifo, got 'random'" in out.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--socket", "/proc/meshkv/agent.sock", "cannot create the socket directory /proc/meshkv"),
        ("--ssd-dir", "/proc", "SSD directory /proc cannot be used: "),
        ("--ready-file", "/proc/ready.json", "cannot write the ready file /proc/ready.json"),
    ],
)
def test_a_path_the_agent_cannot_write_stops_it_with_the_reason(
    flag: str, value: str, message: str, tmp_path: Path
) -> None:
    """Paths that pass validation but fail when the agent starts (``/proc`` takes no new
    files, even from root): exit 1, one line naming the path, no traceback, and the
    arena already made is removed."""
    shm_before = set(os.listdir("/dev/shm"))
    args = ["--cpu-bytes", str(64 << 20), "--socket", str(tmp_path / "a.sock")]
    out = agent_cli(*args, flag, value)
    assert out.returncode == 1, out.stderr
    assert f"meshkv agent: error: {message}" in out.stderr
    assert "Traceback" not in out.stderr
    assert set(os.listdir("/dev/shm")) <= shm_before


def test_bad_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
        code = main(["agent", "--http", "127.0.0.1:0", *args])
        err = capsys.readouterr().err
        return subprocess.CompletedProcess(args, code, "", err)

    cfg = tmp_path / "agent.toml"
    cfg.write_text('node_id = "n1"\nsockt = "/tmp/x.sock"\n')
    out = agent_cli("--config", str(cfg))
    assert out.returncode == 2
    assert f"{cfg}: unknown key 'sockt' at the top level" in out.stderr
    cfg.write_text("[store]\ncpu_gigs = 4\n")
    out = agent_cli("--config", str(cfg))
    assert "unknown key 'cpu_gigs' in [store]" in out.stderr and "cpu_bytes" in out.stderr
    cfg.write_text('[store]\ncpu_bytes = "lots"\n')
    out = agent_cli("--config", str(cfg))
    assert "[store] cpu_bytes must be int, got str 'lots'" in out.stderr
    cfg.write_text("[store.cpu]\ncapacity_gb = 4\n")
    out = agent_cli("--config", str(cfg))
    assert "unknown key 'capacity_gb' in [store.cpu]" in out.stderr
    assert "capacity_bytes" in out.stderr
    cfg.write_text("[store]\ncpu_bytes = 134217728\n[store.cpu]\ncapacity_bytes = 67108864\n")
    out = agent_cli("--config", str(cfg))
    assert "[store] cpu_bytes and [store.cpu] capacity_bytes are the same setting" in out.stderr
    cfg.write_text("[store.ssd]\nworkers = 2\n")
    out = agent_cli("--config", str(cfg))
    assert "[store.ssd] needs a directory" in out.stderr
    cfg.write_text(f'[store.ssd]\ndirectory = "{tmp_path}"\ndirect_io = "yes"\n')
    out = agent_cli("--config", str(cfg))
    assert out.returncode == 2
    assert "[store.ssd] direct_io must be bool, got str 'yes'" in out.stderr
    cfg.write_text("node_id = \n")
    out = agent_cli("--config", str(cfg))
    assert "is not valid TOML" in out.stderr
    out = agent_cli("--config", str(tmp_path / "missing.toml"))
    assert "does not exist" in out.stderr
    cfg.write_text('[remote]\nurl = "redis://h"\nttl = 60\n')
    out = agent_cli("--config", str(cfg))
    assert "unknown key 'ttl' in [remote]" in out.stderr and "ttl_s" in out.stderr
    cfg.write_text('[remote]\nurl = "redis://h"\nmax_bytes = "8G"\n')
    out = agent_cli("--config", str(cfg))
    assert "[remote] max_bytes must be int, got str '8G'" in out.stderr
    cfg.write_text("remote = 3\n")
    out = agent_cli("--config", str(cfg))
    assert "'remote' must be a table ([remote])" in out.stderr
    public = tmp_path / "public.pass"
    public.write_text("pw")
    public.chmod(0o644)
    cfg.write_text(f'[remote]\nurl = "redis://h"\npassword_file = "{public}"\n')
    out = agent_cli("--config", str(cfg))
    assert "remote password file" in out.stderr and "chmod 600" in out.stderr


def test_toml_tree_flags_and_legacy_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """[store.cpu] / [store.ssd] fill the tier configs; flags override them; the flat keys
    of earlier releases still work and each one is reported as deprecated."""
    from meshkv.cli.agent_cmd import build_config
    from meshkv.cli.main import build_parser

    ssd = tmp_path / "ssd"
    ssd.mkdir()
    cfg = tmp_path / "agent.toml"

    def built(*flags: str) -> AgentConfig:
        args = build_parser().parse_args(["agent", "--config", str(cfg), *flags])
        return build_config(args)

    cfg.write_text(
        f"[store]\nverify_reads = true\n[store.cpu]\ncapacity_bytes = {128 << 20}\n"
        f'eviction = "lru"\n[store.ssd]\ndirectory = "{ssd}"\ncapacity_bytes = {1 << 30}\n'
    )
    config = built()
    assert config.store.cpu.capacity_bytes == 128 << 20 and config.store.cpu.eviction == "lru"
    assert config.store.ssd is not None and config.store.ssd.directory == str(ssd)
    assert config.store.ssd.capacity_bytes == 1 << 30 and config.store.verify_reads
    assert capsys.readouterr().err == ""
    config = built("--cpu-bytes", str(64 << 20), "--ssd-gb", "2")
    assert config.store.cpu.capacity_bytes == 64 << 20
    assert config.store.ssd is not None and config.store.ssd.capacity_bytes == 2 << 30

    cfg.write_text(f'[store]\ncpu_bytes = {128 << 20}\nssd_dir = "{ssd}"\nssd_fsync = false\n')
    config = built()
    assert config.store.cpu.capacity_bytes == 128 << 20
    assert config.store.ssd is not None and config.store.ssd.directory == str(ssd)
    assert config.store.ssd.fsync is False
    err = capsys.readouterr().err
    assert "[store] cpu_bytes is deprecated; write it as [store.cpu] capacity_bytes" in err
    assert "[store] ssd_dir is deprecated; write it as [store.ssd] directory" in err
    assert "[store] ssd_fsync is deprecated; write it as [store.ssd] fsync" in err


def test_help_documents_every_flag_with_default() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "meshkv", "agent", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag in (
        "--config", "--cpu-gb", "--cpu-bytes", "--ssd-dir", "--ssd-gb", "--socket", "--http",
        "--ready-file", "--eviction", "--write-through", "--verify-reads", "--lease-seconds",
        "--drain-seconds", "--admin-token-file", "--node-id", "--log-level",
    ):  # fmt: skip
        assert flag in text, flag
    assert text.count("(default:") >= 16


def test_default_socket_directory_is_private(tmp_path: Path) -> None:
    from meshkv.agent import prepare_socket_path

    path = tmp_path / "run" / "meshkv" / "agent.sock"
    prepare_socket_path(str(path))
    assert oct(path.parent.stat().st_mode & 0o777) == oct(0o700)
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="is not a socket"):
        prepare_socket_path(str(path))


def test_a_shared_or_foreign_socket_directory_is_refused(tmp_path: Path) -> None:
    from meshkv.agent import prepare_socket_path

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match=r"writable by group or others .*chmod go-w"):
        prepare_socket_path(str(shared / "agent.sock"))
    shared.chmod(0o755)
    prepare_socket_path(str(shared / "agent.sock"))  # readable by others is fine
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 12345, 12345)  # the tests run as root (as CI does)
    with pytest.raises(ConfigError, match="belongs to uid 12345"):
        prepare_socket_path(str(foreign / "agent.sock"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("libev", "MESHKV_EVENT_LOOP='libev': expected one of uvloop, asyncio"),
        (" ", None),  # blank: the default, accepted (the fixture refuses to start it)
    ],
)
def test_the_event_loop_setting_is_checked_with_the_flags(
    value: str,
    message: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MESHKV_EVENT_LOOP", value)
    if message is None:
        with pytest.raises(AssertionError, match="passed validation"):
            main(["agent", "--http", "127.0.0.1:0"])
        return
    assert main(["agent", "--http", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshkv agent: error: ") and message in err, err
    assert main(["proxy", "--engines", "http://127.0.0.1:1"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_agent_serves_on_the_event_loop_it_is_told(
    loop: str, agent_factory: Callable[..., AgentProcess]
) -> None:
    agent = agent_factory(env={**os.environ, "MESHKV_EVENT_LOOP": loop}, log_level="info")
    agent.start()
    with agent.client() as c:
        c.put(b"e" * 16, b"v" * 3000)
        assert c.get(b"e" * 16) == b"v" * 3000
    assert f"event loop: {loop}" in agent.log()
