"""The decode step's thread count, chosen by measurement (torch-free: the engine's C++ step and the
command line's fast start, llama_fast.lite, share it)."""
from __future__ import annotations

import statistics
import time


class ThreadTuner:
    """Picks the thread count of the decode step by measurement, and keeps checking.

    On an idle machine every core helps (the step is bandwidth-bound and one core cannot saturate memory);
    on a machine whose cores are busy with other work, threads that meet at barriers wait for descheduled
    peers and one thread can be faster. So the first steps alternate between the candidates, the faster
    median wins, and every `every` steps a few steps probe again.
    """

    def __init__(self, candidates: list[int], probes: int = 3, every: int = 128):
        self.candidates, self.probes, self.every = candidates, probes, every
        self.times: dict[int, list[float]] = {n: [] for n in candidates}
        self.best = candidates[0]
        self.steps = 0

    def next_threads(self) -> int | None:
        """The thread count to time this step with, or None when not probing (run with self.best)."""
        phase = self.steps % self.every
        if phase < self.probes * len(self.candidates):
            return self.candidates[phase % len(self.candidates)]
        return None

    def record(self, threads: int, seconds: float) -> None:
        self.times[threads].append(seconds)
        if self.steps % self.every == self.probes * len(self.candidates) - 1:  # the probe window is complete
            self.best = min(self.candidates, key=lambda n: statistics.median(self.times[n][-self.probes:]))

    def run(self, decoder, step, *args):
        """Returns step(*args), one decode step, run with the thread count this step gets (set as
        decoder.num_threads) and timed when it is a probe."""
        threads = self.next_threads()
        if threads is None:
            decoder.num_threads = self.best
            result = step(*args)
        else:
            decoder.num_threads = threads
            start = time.perf_counter()
            result = step(*args)
            self.record(threads, time.perf_counter() - start)
        self.steps += 1
        return result
