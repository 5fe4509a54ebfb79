"""Exceptions shared by the torch and torch-free routes (the C++ session raises them through its bindings)."""


class CacheFullError(RuntimeError):
    """The KV cache has no room for the tokens of this step."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue holds max_waiting requests already: try again later (HTTP 429)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""
