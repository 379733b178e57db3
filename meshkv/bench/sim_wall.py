"""Wall time of the 256-node, 600-simulated-second membership simulation.

The scenario lives in ``simulations/scale.py`` (a source-tree directory, not an installed
package), so this module needs the repository checkout.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]


def _scale_module() -> Any:
    try:
        return importlib.import_module("simulations.scale")
    except ImportError:
        if not (_REPO / "simulations" / "scale.py").is_file():
            raise ImportError(
                "meshkv.bench.sim_wall needs the meshkv source tree (simulations/)"
            ) from None
        sys.path.insert(0, str(_REPO))
        return importlib.import_module("simulations.scale")


def run_sim_wall(seed: int = 1, n: int = 256, duration_s: float = 600.0) -> float:
    """Run the churn scenario (``n`` nodes, ``duration_s`` virtual seconds, 1 % loss) and
    return the wall-clock seconds it took."""
    result: dict[str, Any] = _scale_module().run(seed=seed, n=n, duration_s=duration_s)
    return float(result["wall_s"])


def run_sim_result(seed: int = 1, n: int = 256, duration_s: float = 600.0) -> dict[str, Any]:
    """Like ``run_sim_wall`` but returns the scenario's whole result (digest, counts,
    ``wall_s`` and ``cpu_s``)."""
    out: dict[str, Any] = _scale_module().run(seed=seed, n=n, duration_s=duration_s)
    return out
