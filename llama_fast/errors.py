"""Exceptions shared by the torch and torch-free routes (the C++ session raises them through its bindings)."""


class CacheFullError(RuntimeError):
    """The KV cache has no room for the tokens of this step."""
