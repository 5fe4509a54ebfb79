"""RoPE's inverse frequencies: the one rule every route uses (the PyTorch model's cos/sin table, the C++
session, the torch-free fast start), computed in double precision and rounded to fp32 once. Torch-free.

HF's rope_scaling kinds "linear" (positions divided by factor) and "llama3" (Llama 3.1's low frequencies
divided by factor, high ones kept, a smooth blend between) are applied here, and "freq_factors": one divisor
per frequency, as GGUF files carry Llama 3.1's scaling (llama.cpp's rope_freqs tensor)."""
from __future__ import annotations

import math
import struct


def _fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def inv_freq(rot_dim: int, theta: float, scaling: dict | None = None) -> list[float]:
    """(rot_dim // 2) inverse frequencies theta^(-2i / rot_dim), scaled, as fp32 values."""
    freqs = [1.0 / theta ** (2 * i / rot_dim) for i in range(rot_dim // 2)]
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        freqs = [f / scaling["factor"] for f in freqs]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        scaled = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old_len / high:  # high frequencies: kept
                scaled.append(f)
            elif wavelen > old_len / low:  # low frequencies: divided by factor
                scaled.append(f / factor)
            else:  # in between: blended
                smooth = (old_len / wavelen - low) / (high - low)
                scaled.append((1 - smooth) * f / factor + smooth * f)
        freqs = scaled
    elif kind == "freq_factors":
        factors = scaling["factors"]
        if len(factors) != len(freqs):
            raise ValueError(f"rope scaling has {len(factors)} frequency factors, the head needs {len(freqs)}")
        freqs = [f / d for f, d in zip(freqs, factors)]
    return [_fp32(f) for f in freqs]


def describe(scaling: dict | None) -> str:
    """A one-line summary of a rope_scaling (per-frequency factors counted, not listed)."""
    if scaling is None:
        return "none"
    if scaling.get("rope_type") == "freq_factors":
        factors = scaling["factors"]
        return f"freq_factors ({len(factors)} divisors, {min(factors):g} to {max(factors):g})"
    return str(scaling)
