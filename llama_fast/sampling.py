"""SamplingParams: how one row's next token is chosen (docs/ARCHITECTURE.md section 3b)."""
from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass

import numpy as np

from . import validate


MAX_LOGPROBS = 20  # top tokens a row may ask log-probabilities of (OpenAI's limit)
# The samplers take vocabularies of V < 2**31 tokens, and a top_k >= V keeps every token, as 0 does.
MAX_TOP_K = 2**31 - 1
FP32_MAX = float(np.finfo(np.float32).max)  # the samplers compute in fp32


@dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling settings, applied in this order (as Hugging Face generate does):

    penalties on the raw logits over the tokens seen so far, or over the last penalty_last_n of them
    (llama.cpp's repeat_last_n; None = the whole history, prompt included, as Hugging Face does)
    (repetition_penalty divides positive and multiplies negative logits; presence_penalty and
    frequency_penalty subtract as in the OpenAI API)
    -> temperature (0 = greedy argmax, ties to the lowest id) -> top_k (0 = off) -> top_p (1 = off)
    -> min_p (0 = off) -> renormalise -> a draw from the row's counter-based stream (seed, step).
    seed None: a fresh random seed is drawn once for the row; else an int in [0, 2**63).
    logprobs (the Engine's outputs; None = off): report each new token's log-probability and the
    `logprobs` most likely tokens' (0 to 20), from the raw logits.
    Numbers are ints or floats (a bool or a str is refused), counts are ints. The samplers compute in fp32,
    so each setting must keep its meaning there: no penalty that overflows or rounds to 0, no temperature
    whose reciprocal overflows.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int | None = None
    seed: int | None = None
    logprobs: int | None = None

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            validate.real(getattr(self, name), f"SamplingParams.{name}")
        validate.integer(self.top_k, "SamplingParams.top_k", minimum=0, maximum=MAX_TOP_K)
        validate.integer(self.penalty_last_n, "SamplingParams.penalty_last_n", minimum=1, optional=True)
        validate.seed(self.seed, argument="SamplingParams.seed")
        validate.integer(self.logprobs, "SamplingParams.logprobs", minimum=0, maximum=MAX_LOGPROBS, optional=True)
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not (0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]")
        if not (0 <= self.min_p <= 1):
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 means off)")
        for name in ("temperature", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if abs(getattr(self, name)) > FP32_MAX:
                bad(name, f"overflows fp32 (|value| <= {FP32_MAX:.4g})")
        with np.errstate(divide="ignore", over="ignore"):
            if self.temperature > 0 and not np.isfinite(1 / np.float32(self.temperature)):
                bad("temperature", "is too small for fp32: its reciprocal overflows (0 means greedy)")
        if not np.float32(self.repetition_penalty) > 0:
            bad("repetition_penalty", "rounds to 0 in fp32")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def row_params(n_rows: int, seed: int | None, **settings) -> list[SamplingParams]:
    """One SamplingParams per row: row r draws from seed + r, so rows differ and each is reproducible
    (seed None: a fresh random base). seed + r must stay below 2**63: it is never wrapped."""
    base = secrets.randbits(62) if validate.seed(seed, n_rows) is None else seed
    return [SamplingParams(seed=base + r, **settings) for r in range(n_rows)]


class PenaltyWindow:
    """One row's counts of the tokens its penalties see (the last params.penalty_last_n of its history, or
    all), kept in `counts`, a (V,) int32 numpy array (a row of a batch's (B, V) `seen`, or its own): what every
    sampler takes as `seen` (ops.sample through torch.from_numpy, the torch-free _lite.sample_row as it is). A
    penalty over a bounded window is what keeps a long stream from being pushed off every common token into a
    loop of rare ones."""

    def __init__(self, history: list[int], params: SamplingParams, counts: np.ndarray):
        n = params.penalty_last_n
        # Only a bounded row keeps its window (to uncount what leaves it); an unbounded one never uncounts.
        self.window = None if n is None else deque(history[-n:], maxlen=n)
        self.counts = counts
        np.add.at(counts, list(history if self.window is None else self.window), 1)

    def push(self, token: int) -> None:
        """Counts a new token; the one that leaves the window stops counting."""
        self.counts[token] += 1
        if self.window is not None:
            if len(self.window) == self.window.maxlen:
                self.counts[self.window[0]] -= 1
            self.window.append(token)  # (a full deque drops its oldest)


def check_max_new_tokens(n) -> None:
    """max_new_tokens of every generate call: an int >= 1."""
    validate.integer(n, "max_new_tokens", minimum=1)


def check_request(n_rows: int, max_new_tokens, stop, seed, settings: dict) -> None:
    """Checks a generation request's arguments before any work (LLM.generate / stream / chat and
    LiteLLM.stream): n_rows rows, each drawing from seed + row; settings: the other SamplingParams fields."""
    check_max_new_tokens(max_new_tokens)
    validate.stop(stop)
    validate.seed(seed, n_rows)
    SamplingParams(**settings)
