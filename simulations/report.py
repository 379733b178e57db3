"""Shared command line and output of the scenario scripts.

``python -m simulations.<name> --seed S --out DIR`` runs a scenario, prints its numbers and
writes ``DIR/<name>.json`` (and ``DIR/<name>.png`` when matplotlib happens to be installed;
it is not a dependency).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PlotFn = Callable[[Any, dict[str, Any]], None]


def main(
    name: str,
    run: Callable[..., dict[str, Any]],
    argv: Sequence[str] | None = None,
    *,
    options: dict[str, type] | None = None,
    plot: PlotFn | None = None,
) -> int:
    """Parse ``--seed``, ``--out`` and scenario ``options`` (``--name value``), run, write."""
    p = argparse.ArgumentParser(prog=f"python -m simulations.{name}", description=run.__doc__)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=".", help="directory for the JSON (and PNG) output")
    for opt, typ in (options or {}).items():
        p.add_argument(f"--{opt.replace('_', '-')}", dest=opt, type=typ, default=None)
    args = p.parse_args(argv)
    kwargs = {k: getattr(args, k) for k in (options or {}) if getattr(args, k) is not None}
    t0 = time.perf_counter()
    result = run(seed=args.seed, **kwargs)
    result.setdefault("wall_s", round(time.perf_counter() - t0, 3))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for key, value in result.items():
        if not isinstance(value, list | dict):
            print(f"{key:>28}: {value}")
    if plot is not None and importlib.util.find_spec("matplotlib") is not None:
        # optional and untyped: imported by name so that type checkers need no stubs
        importlib.import_module("matplotlib").use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")

        fig = plt.figure(figsize=(7, 4))
        plot(fig, result)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
    print(f"wrote {out / (name + '.json')}")
    return 0
