"""A failed test keeps its agents' logs: ``conftest.pytest_runtest_makereport`` marks the
test, and the agent fixtures copy each log into ``tmp_path/agent-logs`` before cleaning up
(pytest keeps the last three runs' ``tmp_path``s). A CI failure that depends on timing can
then be read after the fact instead of rerun until it happens again."""

from __future__ import annotations

from pathlib import Path

import pytest

FAILED = pytest.StashKey[bool]()


def kept_logs(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    """Where a failed test's agents leave their logs, or None if it passed."""
    return tmp_path / "agent-logs" if request.node.stash.get(FAILED, False) else None
