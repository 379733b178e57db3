"""``LatencyHistogram``: plain counts per latency bucket, exported as a Prometheus histogram.

The puller and the fetcher count their latencies on the event loop's hot path; an
``int`` increment there is cheaper than a prometheus-client ``Histogram.observe`` (a lock
and a float add per call), and the metrics module turns the counts into a histogram
family at scrape time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) for work that takes a millisecond to a few seconds."""


@dataclass(slots=True)
class LatencyHistogram:
    """Counts of observations per bucket (the last bucket is +Inf) and their sum."""

    bounds: tuple[float, ...] = DEFAULT_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(self.bounds) or not self.bounds:
            raise ValueError("histogram bounds must be a non-empty increasing sequence")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations at or below it)`` pairs, ``+Inf`` last."""
        out, acc = [], 0
        for bound, n in zip([*self.bounds, float("inf")], self.counts, strict=True):
            acc += n
            out.append(("+Inf" if bound == float("inf") else str(bound), acc))
        return out
