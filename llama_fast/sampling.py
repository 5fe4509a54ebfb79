"""SamplingParams: how one row's next token is chosen (DESIGN.md section 3b)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling settings, applied in this order (as Hugging Face generate does):

    penalties on the raw logits over the tokens seen so far (repetition_penalty divides positive and
    multiplies negative logits; presence_penalty and frequency_penalty subtract as in the OpenAI API)
    -> temperature (0 = greedy argmax, ties to the lowest id) -> top_k (0 = off) -> top_p (1 = off)
    -> min_p (0 = off) -> renormalise -> a draw from the row's counter-based stream (seed, step).
    seed None: a fresh random seed is drawn once for the row.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an int >= 0 (0 means off)")
        if not (0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]")
        if not (0 <= self.min_p <= 1):
            bad("min_p", "must be in [0, 1]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", "must be a finite number > 0 (1 means off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be finite")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            bad("seed", "must be an int in [0, 2**63) or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
