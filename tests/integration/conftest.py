"""Fixtures that start real ``meshkv agent`` processes (see ``tests/helpers/agents.py``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for `tests.helpers`

from tests.helpers.agents import AgentProcess  # noqa: E402


@pytest.fixture
def agent_factory() -> Iterator[Callable[..., AgentProcess]]:
    """Build (not start) agents; every one is killed and cleaned up after the test."""
    made: list[AgentProcess] = []

    def make(**kwargs: Any) -> AgentProcess:
        agent = AgentProcess(**kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.cleanup()


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess]) -> AgentProcess:
    """One running agent with a 64 MiB CPU tier and no SSD."""
    return agent_factory().start()


@pytest.fixture
def ssd_dir(tmp_path: Path) -> Path:
    path = tmp_path / "ssd"
    path.mkdir()
    return path
