"""One run of ``meshkv bench serve`` and how it reads: the :class:`Run` record, the
engine's occupancy sampled while it lasts (:class:`Occupancy`), the runs table and the
plots. The arms, workloads and the named results are in :mod:`meshkv.bench.serve`."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshkv.bench import openai_load as load
from meshkv.bench.report import ms, text_table
from meshkv.launch import http_get, prometheus_sum


@dataclass(slots=True)
class Run:
    """One load run on one arm."""

    arm: str
    workload: str
    mode: str
    """``closed`` or ``open``."""
    offered: float | None
    """Concurrency (closed) or requests/s (open)."""
    summary: load.Summary
    warmup: load.Summary | None
    tokens: dict[str, float] = field(default_factory=dict)
    """Prompt tokens of the measured requests by source: computed, prefix_cache, connector
    (meshkv: cpu, ssd, peer), as vLLM counts them at scheduling; meshkv arms also
    ``load_error_chunks``, chunks the connector promised but could not load (computed
    after all, which vLLM's counters do not show)."""
    load_avg: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    engine: dict[str, float] = field(default_factory=dict)
    """What the engine held while the run lasted (:class:`Occupancy`)."""


def find_run(runs: list[Run], arm: str, workload: str, mode: str, offered: float) -> Run | None:
    for r in runs:
        if (r.arm, r.workload, r.mode, r.offered) == (arm, workload, mode, offered):
            return r
    return None


PREEMPTIONS = "vllm:num_preemptions_total"


class Occupancy:
    """Samples the server's scheduler gauges while a run lasts: how many requests the engine
    ran at once, how many waited, how full its KV cache was, and how often it preempted.

    An arm whose engine cannot hold ``--concurrency`` prompts at once runs fewer of them
    side by side whatever its cache serves; these numbers tell that apart from what a hit
    costs. One scrape of ``/metrics`` every ``period_s`` (a few ms of the API server's
    time, the same in every arm)."""

    GAUGES = {
        "running": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "kv_usage": "vllm:kv_cache_usage_perc",
    }

    def __init__(self, url: str, period_s: float = 0.5) -> None:
        self._url = url + "/metrics"
        self._period = period_s
        self._samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="occupancy", daemon=True)
        self._preemptions = 0.0
        self.preemptions = float("nan")

    def _scrape(self) -> str | None:
        try:
            return http_get(self._url, timeout=5).decode()
        except OSError:
            return None  # a missed sample; the run itself reports what failed

    def _run(self) -> None:
        # The first sample after half a period: a run shorter than a period still gets one.
        wait = self._period / 2
        while not self._stop.wait(wait):
            wait = self._period
            text = self._scrape()
            if text is not None:
                self._samples.append(
                    {k: prometheus_sum(text, name) for k, name in self.GAUGES.items()}
                )

    def __enter__(self) -> Occupancy:
        text = self._scrape()
        self._preemptions = float("nan") if text is None else prometheus_sum(text, PREEMPTIONS)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        text = self._scrape()
        total = float("nan") if text is None else prometheus_sum(text, PREEMPTIONS)
        self.preemptions = total - self._preemptions

    def summary(self) -> dict[str, float]:
        """Means over the samples and the most requests seen running at once (none without
        samples), and the run's preemptions (absent unless both ends were read)."""
        n = len(self._samples)
        out = {"samples": float(n)}
        if n:
            out.update({f"{k}_mean": sum(s[k] for s in self._samples) / n for k in self.GAUGES})
            out["running_max"] = max(s["running"] for s in self._samples)
        if self.preemptions == self.preemptions:  # not NaN: both ends were read
            out["preemptions"] = self.preemptions
        return out


def _mean(engine: dict[str, float], gauge: str, scale: float = 1.0) -> str:
    value = engine.get(f"{gauge}_mean")
    return "" if value is None else f"{value * scale:.1f}"


def runs_table(runs: list[Run]) -> str:
    head = ("workload", "arm", "load", "ok", "fail", "req/s", "tok/s", "ttft p50", "p90", "p99",
            "itl p50", "p99", "computed", "ld err", "prefix", "connector", "cpu", "ssd", "running",
            "waiting", "kv %", "preempt", "la")  # fmt: skip
    rows = [head]
    for r in runs:
        s, t = r.summary, r.tokens
        rows.append(
            (
                r.workload,
                r.arm,
                f"c={r.offered:g}" if r.mode == "closed" else f"{r.offered:g}/s",
                str(s.completed),
                str(s.failed),
                f"{s.requests_per_s:.2f}",
                f"{s.output_tokens_per_s:.0f}",
                ms(s.ttft_p50),
                ms(s.ttft_p90),
                ms(s.ttft_p99),
                ms(s.itl_p50),
                ms(s.itl_p99),
                f"{t.get('computed', 0):.0f}",
                f"{t['load_error_chunks']:.0f}" if "load_error_chunks" in t else "",
                f"{t.get('prefix_cache', 0):.0f}",
                f"{t.get('connector', 0):.0f}",
                f"{t['cpu']:.0f}" if "cpu" in t else "",
                f"{t['ssd']:.0f}" if "ssd" in t else "",
                _mean(r.engine, "running"),
                _mean(r.engine, "waiting"),
                _mean(r.engine, "kv_usage", 100.0),
                f"{r.engine['preemptions']:.0f}" if "preemptions" in r.engine else "",
                f"{r.load_avg:.1f}",
            )  # fmt: skip
        )
    return text_table(rows)


def plot(
    runs: list[Run], workload: str, path: Path, concurrency: int, order: Sequence[str]
) -> None:
    """TTFT CDF per arm (closed loop) beside achieved vs offered load (open loop); the arms
    in ``order``."""
    import matplotlib  # noqa: PLC0415 - optional, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (cdf, tput) = plt.subplots(1, 2, figsize=(11, 4))
    arms = sorted({r.arm for r in runs if r.workload == workload}, key=list(order).index)
    for arm in arms:
        closed = find_run(runs, arm, workload, "closed", float(concurrency))
        if closed is not None and closed.ttfts:
            xs = [t * 1000 for t in closed.ttfts]
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            cdf.step(xs, ys, where="post", label=arm)
        opens = sorted(
            (r for r in runs if (r.arm, r.workload, r.mode) == (arm, workload, "open")),
            key=lambda r: r.offered or 0.0,
        )
        if opens:
            tput.plot(
                [r.offered for r in opens],
                [r.summary.requests_per_s for r in opens],
                marker="o",
                label=arm,
            )
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (ms, log)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title(f"{workload}: TTFT, closed loop, {concurrency} in flight")
    cdf.grid(alpha=0.3)
    cdf.legend()
    offered = sorted({r.offered or 0.0 for r in runs if r.mode == "open"})
    if offered:
        tput.plot(offered, offered, color="grey", linestyle=":", label="offered")
        tput.legend()
    else:
        tput.text(0.5, 0.5, "no open-loop runs (--rates)", ha="center", va="center")
    tput.set_xlabel("offered load (requests/s, Poisson)")
    tput.set_ylabel("completed requests/s")
    tput.set_title(f"{workload}: throughput vs offered load")
    tput.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
