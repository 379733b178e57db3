"""Stand-in for vLLM's connector metrics module: the stats carrier's and the Prometheus
metrics' base classes."""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class KVConnectorStats:
    """Stats a connector's workers send to the engine's logger."""

    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def reset(self) -> None:
        raise NotImplementedError

    def aggregate(self, other: "KVConnectorStats") -> "KVConnectorStats":
        raise NotImplementedError

    def reduce(self) -> dict[str, int | float]:
        raise NotImplementedError

    def is_empty(self) -> bool:
        raise NotImplementedError


class KVConnectorPromMetrics:
    """Per-connector Prometheus metrics: the attributes vLLM's base class sets."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        self._kv_transfer_config = getattr(vllm_config, "kv_transfer_config", None)
        by_name = {key.__name__: cls for key, cls in metric_types.items()}
        self._gauge_cls = by_name.get("Gauge")
        self._counter_cls = by_name.get("Counter")
        self._histogram_cls = by_name.get("Histogram")
        self._labelnames = labelnames
        self.per_engine_labelvalues = per_engine_labelvalues

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        raise NotImplementedError
