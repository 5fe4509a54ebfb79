"""The server's Prometheus metrics, named as vLLM names its own with our prefix (docs/server.md).

One registry per app (not prometheus_client's global one), so that several servers in one process, as in
the tests, each count their own. The engine's gauges are read from its stats() at each scrape; the token
counters and latency histograms are fed by the requests as they stream.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

PREFIX = "llama_fast_"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960)


class _EngineGauges:
    """A collector that reads the engine's stats() when scraped: always current, nothing to keep in step."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for name, key, doc in (("num_requests_running", "running", "Requests in the running batch."),
                               ("num_requests_waiting", "waiting", "Requests waiting to be scheduled."),
                               ("kv_blocks_in_use", "blocks_in_use", "KV cache blocks held by live requests.")):
            yield GaugeMetricFamily(PREFIX + name, doc, value=stats[key])


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineGauges(engine_stats))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of the requests served.",
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From arrival to the first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between two tokens of one sequence.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From arrival to the last token.",
                             buckets=E2E_BUCKETS, registry=self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Times one request from its arrival: time to its first token, the gap between consecutive tokens of
    each of its sequences, its end-to-end latency; and counts its tokens."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last_token: dict[tuple[int, int], float] = {}   # (prompt, sequence) -> when its last token came

    def tokens(self, sequence: tuple[int, int], count: int, prompt_tokens: int) -> None:
        """`count` new tokens of `sequence`; prompt_tokens: its prompt's length (counted once per prompt)."""
        if count == 0:
            return
        now = time.perf_counter()
        if not self.last_token:
            self.metrics.ttft.observe(now - self.arrival)
        previous = self.last_token.get(sequence)
        if previous is None:
            if not any(prompt == sequence[0] for prompt, _ in self.last_token):
                self.metrics.prompt_tokens.inc(prompt_tokens)
        else:
            for _ in range(count):  # a step that brings several tokens spreads its gap over them
                self.metrics.itl.observe((now - previous) / count)
        self.last_token[sequence] = now
        self.metrics.generation_tokens.inc(count)

    def finished(self) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
