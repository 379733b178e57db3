"""Stand-in for vLLM's connector base module: the metadata base class only."""


class KVConnectorMetadata:  # noqa: B903 - vLLM's is an empty ABC too
    """What the scheduler side hands the worker side each step."""
