"""Stand-in for vLLM's connector metrics module: the stats carrier's base class."""

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
