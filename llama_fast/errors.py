"""Exceptions shared by the torch and torch-free routes (the C++ session raises them through its bindings)."""


class CacheFullError(RuntimeError):
    """The KV cache has no room for the tokens of this step."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue holds max_waiting requests already: try again later (HTTP 429)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


class StepError(RuntimeError):
    """An engine step failed (a bug; its cause is chained): the requests it was running were aborted, and
    the others go on."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"an engine step failed ({type(cause).__name__}: {cause}); its requests "
                         f"{', '.join(request_ids)} were aborted")
        self.request_ids = request_ids
