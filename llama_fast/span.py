"""SpanBias: how attention is biased and masked by the span d = i - j between query i and key j.

docs/ARCHITECTURE.md section 3 gives the exact definition every implementation follows.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .window import check_window, checkpoint_window


@dataclass(frozen=True, eq=False)
class SpanBias:
    """Span-dependent bias and visibility for causal attention.

    alibi_slopes:  (H,) fp32 or None. Adds -alibi_slopes[h] * d.
    bucket_bias:   (H, num_buckets) or None. Adds bucket_bias[h, bucket(d)] (T5 causal buckets).
    num_buckets, max_distance: the T5 bucketing of d (used only with bucket_bias).
    window:        keys with d >= window are invisible (None: unlimited) ...
    sink_tokens:   ... except the first sink_tokens keys (j < sink_tokens), which stay visible.
    logit_softcap: scores become cap * tanh(score / cap) before the bias is added (None: off).

    SpanBias() is plain causal attention. Instances compare by identity (they hold tensors).
    """

    alibi_slopes: torch.Tensor | None = None
    bucket_bias: torch.Tensor | None = None
    num_buckets: int = 32
    max_distance: int = 128
    window: int | None = None
    sink_tokens: int = 0
    logit_softcap: float | None = None

    def __post_init__(self):
        check_window(self.window, self.sink_tokens)
        if self.logit_softcap is not None and not (self.logit_softcap > 0 and math.isfinite(self.logit_softcap)):
            raise ValueError(f"SpanBias.logit_softcap must be a positive finite number, got {self.logit_softcap!r}")
        if self.alibi_slopes is not None and self.alibi_slopes.dim() != 1:
            raise ValueError(f"SpanBias.alibi_slopes must have shape (H,), got {tuple(self.alibi_slopes.shape)}")
        if self.bucket_bias is not None:
            if self.bucket_bias.dim() != 2 or self.bucket_bias.shape[1] != self.num_buckets:
                raise ValueError(
                    f"SpanBias.bucket_bias must have shape (H, num_buckets={self.num_buckets}), "
                    f"got {tuple(self.bucket_bias.shape)}"
                )
            if self.num_buckets < 2 or self.max_distance <= self.num_buckets // 2:
                raise ValueError(
                    f"SpanBias needs num_buckets >= 2 and max_distance > num_buckets // 2, "
                    f"got num_buckets={self.num_buckets}, max_distance={self.max_distance}"
                )

    @property
    def is_plain_causal(self) -> bool:
        return (
            self.alibi_slopes is None
            and self.bucket_bias is None
            and self.window is None
            and self.logit_softcap is None
        )

    @property
    def has_sinks(self) -> bool:
        """A window with sinks: sinks past the window are scored from sink_position (docs/ARCHITECTURE.md
        section 3), with the queries rotated there (q_sink)."""
        return self.window is not None and self.sink_tokens > 0

    def check_heads(self, num_heads: int) -> None:
        """Raises if the per-head tables do not have num_heads rows."""
        for name in ("alibi_slopes", "bucket_bias"):
            table = getattr(self, name)
            if table is not None and table.shape[0] != num_heads:
                raise ValueError(f"SpanBias.{name} has {table.shape[0]} heads, the attention has {num_heads}")


def checkpoint_span(span: SpanBias, sliding_window: int | None) -> SpanBias:
    """span with the checkpoint's sliding window applied (window.checkpoint_window says how)."""
    window = checkpoint_window(span.window, span.sink_tokens, sliding_window)
    return span if window == span.window else dataclasses.replace(span, window=window)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes (Press et al.), (num_heads,) fp32, for any head count."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32)


_DERIVED: "weakref.WeakKeyDictionary[SpanBias, dict]" = weakref.WeakKeyDictionary()


def derived_table(span: SpanBias, name: str, device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A table derived from span.alibi_slopes (name "slopes") or span.bucket_bias (any other name), built
    once per span, name and device, and again when that source tensor is modified in place: the attention
    of every layer and step reuses it instead of rebuilding it."""
    source = span.alibi_slopes if name == "slopes" else span.bucket_bias
    key = (name, str(device), source._version)
    entry = _DERIVED.setdefault(span, {})
    if key not in entry:
        if len(entry) > 8:  # stale versions of modified tables
            entry.clear()
        entry[key] = build()
    return entry[key]
