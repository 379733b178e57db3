"""Command-line checks shared by the tests of ``python -m ...`` entry points."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def assert_refused(
    main: Callable[[list[str]], int],
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``main(argv)`` exits with status 2 (argparse's usage error) and says ``message``."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
