"""Sliding-window attention with sinks: the settings' rules, shared by SpanBias (span.py) and the drivers of
every runner (llm.py, engine.py, lite.py). Torch-free."""
from __future__ import annotations


def check_window(window: int | None, sink_tokens: int) -> None:
    """Raises ValueError unless `window` (None: unlimited) and `sink_tokens` make a valid pair."""
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"SpanBias.window must be a positive int or None, got {window!r}")
    if not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"SpanBias.sink_tokens must be a non-negative int, got {sink_tokens!r}")
    if sink_tokens and window is None:
        raise ValueError("SpanBias.sink_tokens needs a window: without one every token is visible anyway")
    if window is not None and sink_tokens >= window:
        raise ValueError(f"SpanBias.sink_tokens ({sink_tokens}) must be smaller than window ({window})")


PREFILL_CHUNK = 256  # prompt tokens of one sequence per session step, without a window


def prefill_chunk(window: int | None) -> int:
    """Tokens of one sequence fed per step: under a window few enough (a quarter of it, 16 to 256) that the
    window plus one step stays a small, constant number of KV blocks."""
    return PREFILL_CHUNK if window is None else min(PREFILL_CHUNK, max(16, window // 4))


def checkpoint_window(window: int | None, sink_tokens: int, sliding_window: int | None) -> int | None:
    """The window to attend with, given the one asked for and the checkpoint's own sliding_window (Mistral,
    Qwen2; None: it attends to everything). The model was trained never to see past its window, so a
    request without a window gets it, a narrower one is kept and a wider one is refused."""
    check_window(window, sink_tokens)
    if sliding_window is None:
        return window
    if window is None:
        return sliding_window
    if window > sliding_window:
        raise ValueError(f"SpanBias.window ({window}) is wider than the checkpoint's sliding_window ({sliding_window})")
    return window
