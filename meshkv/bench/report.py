"""The JSON shape and table every meshkv benchmark writes.

``{"results": [{"name", "size_bytes", "value", "unit", "baseline", "baseline_value",
"ratio"}], "meta": {...}}``; ``ratio = value / baseline_value`` (meshkv over baseline).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Result:
    """One measured number and the baseline it is compared with (same run)."""

    name: str
    value: float
    unit: str
    size_bytes: int | None = None
    baseline: str | None = None
    baseline_value: float | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline_value:
            self.ratio = self.value / self.baseline_value


@dataclass(slots=True)
class Report:
    """Results of one benchmark run plus metadata about the machine and settings."""

    benchmark: str
    results: list[Result] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def to_json(self) -> dict[str, Any]:
        meta = {
            "benchmark": self.benchmark,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(),
            "machine": platform.machine(),
            **self.meta,
        }
        return {"results": [asdict(r) for r in self.results], "meta": meta}

    def write(self, path: str | Path | None) -> None:
        if path:
            Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        head = ("name", "size", "value", "unit", "baseline", "baseline_value", "ratio")
        rows = [head]
        for r in self.results:
            rows.append(
                (
                    r.name,
                    _size(r.size_bytes),
                    f"{r.value:.3f}",
                    r.unit,
                    r.baseline or "",
                    "" if r.baseline_value is None else f"{r.baseline_value:.3f}",
                    "" if r.ratio is None else f"{r.ratio:.2f}x",
                )
            )
        return text_table(rows)


def ms(seconds: float | None) -> str:
    """Seconds as whole milliseconds for a table cell; "-" when there is no value."""
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first is the header) as aligned text columns, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"
