"""The Engine's scheduler: which sequences run in the next step, and how many tokens each feeds.

Split as vLLM splits it: the engine (engine.py) samples, detokenizes and reports; the scheduler decides;
the block manager (the C++ session's paged cache, behind session.SessionRunner: a session.Runner) holds the
KV blocks.

A step feeds at most max_batch_tokens tokens: one token of every decoding sequence first, then prompt
chunks (at most `chunk` tokens of one sequence) in what is left, so a long prompt never holds the running
streams up for more than one chunk. With chunked=False (the benchmark's comparison) a prompt goes in whole
(up to `chunk` tokens, the context) whatever the budget, which it only uses up. Waiting sequences start first come, first served while max_running
allows, the step has tokens to spare and the pool has the blocks of their whole prompt (plus one spare
block per running sequence, so that a start is not undone by the next decode steps). A sequence whose prompt shares whole
blocks with a prompt still being computed waits until those blocks are cached instead of computing them a
second time. When a step needs more blocks than are free, the newest request is preempted: its blocks
are freed and it is computed again later from its tokens (prompt and generated). The KV it gets back is
bitwise the one it lost (the session's arithmetic is batch- and chunk-invariant), so its text is unchanged.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sampling import PenaltyWindow, SamplingParams

if TYPE_CHECKING:
    from .session import Runner
    from .tokenizer import TextStream


@dataclass(eq=False)
class Sequence:
    """One of a request's n continuations, and what the engine keeps of it."""

    request: "Request"
    index: int  # which of the request's n
    params: SamplingParams  # its seed fixed
    tokens: list[int]  # prompt + generated; the KV cache holds tokens[:computed]
    text: "TextStream | None"  # None: token ids only (detokenize=False)
    penalties: PenaltyWindow | None = None  # None: its params have no penalties
    computed: int = 0
    slot: int | None = None  # its sequence in the runner while it holds blocks
    finish: str | None = None  # once finished: "eos", "stop" (a stop string), "length" or "abort"

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)

    @property
    def pending(self) -> int:
        """Tokens to feed before its next token can be sampled (1 while it decodes)."""
        return len(self.tokens) - self.computed


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: list[int]
    max_new_tokens: int  # within the model's context, where it has one
    arrival: int  # arrival order: the newest running request is the first preempted
    stops: list[str]
    ignore_eos: bool
    min_tokens: int
    sequences: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1: whether sequence 0's prompt has been forked into the others yet


class Scheduler:
    def __init__(self, runner: "Runner", *, max_batch_tokens: int, max_running: int, chunk: int,
                 block_size: int, chunked: bool = True, windowed: bool = False):
        self.runner, self.chunked, self.windowed = runner, chunked, windowed
        self.max_batch_tokens, self.max_running, self.chunk, self.block_size = max_batch_tokens, max_running, chunk, block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in the order they started
        self.preemptions = 0
        self.prompt_tokens_cached = 0  # prompt tokens sequences found in the prefix cache

    # ---- queues ----

    def add(self, request: Request) -> None:
        """Queues a new request: its first sequence (the others are forked from it once its prompt is in)."""
        self.waiting.append(request.sequences[0])

    def waiting_requests(self) -> int:
        return len({id(seq.request) for seq in self.waiting})

    def running_requests(self) -> int:
        return len({id(seq.request) for seq in self.running})

    def finish(self, seq: Sequence) -> None:
        """Drops a finished (or aborted) sequence, freeing its blocks at once."""
        if seq.slot is not None:
            self.runner.free(seq.slot)
            seq.slot = None
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def fork(self, seq: Sequence) -> list[Sequence]:
        """The request's other sequences, started as copy-on-write forks of `seq`, whose prompt is in."""
        request = seq.request
        request.forked = True
        children = [s for s in request.sequences if s is not seq]
        for child in children:
            child.slot, child.computed = self.runner.fork(seq.slot), seq.computed
            self.running.append(child)
        return children

    # ---- the plan of one step ----

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens it feeds) for the next step; empty when nothing can run."""
        while True:
            plan, budget = self._plan_running()
            need = self.runner.blocks_needed([(s.slot, n) for s, n in plan])
            if need <= self.runner.num_free_blocks:
                break
            self._preempt_newest()
        return plan + self._admit(plan, budget)

    def _plan_running(self) -> tuple[list[tuple[Sequence, int]], int]:
        budget = self.max_batch_tokens
        plan = [(s, 1) for s in self.running if s.pending == 1]  # decoding: one token each, first
        budget -= len(plan)
        for s in self.running:
            if s.pending > 1 and budget > 0:  # a prompt (or a preempted sequence's tokens) in chunks
                n = self._chunk(s.pending, budget)
                plan.append((s, n))
                budget -= n
        return plan, budget

    def _chunk(self, pending: int, budget: int) -> int:
        return min(pending, self.chunk, budget) if self.chunked else min(pending, self.chunk)

    def _preempt_newest(self) -> None:
        if not self.running:
            raise RuntimeError("llama_fast: the KV pool cannot hold one step of a request that fit alone (a bug)")
        newest = max(self.running, key=lambda s: s.request.arrival).request
        evicted = [s for s in self.running if s.request is newest]
        for s in evicted:
            self.runner.free(s.slot)
            s.slot, s.computed = None, 0
            self.running.remove(s)
        self.waiting.extendleft(reversed(evicted))  # back at the front, in their order
        self.preemptions += 1

    def _admit(self, plan: list[tuple[Sequence, int]], budget: int) -> list[tuple[Sequence, int]]:
        started = []
        for seq in list(self.waiting):
            if budget <= 0:
                break
            seats = 1 if seq.request.forked else len(seq.request.sequences)  # the forks need theirs too
            if len(self.running) + seats > self.max_running:
                break
            if self._prefix_in_flight(seq):
                continue  # its blocks will be cached within a few steps: later sequences may go first
            slot = self.runner.add_sequence()
            matched = self.runner.match_prefix(slot, seq.tokens) if self.runner.prefix_caching else 0
            n = self._chunk(len(seq.tokens) - matched, budget)
            # Blocks for all its tokens, not just this chunk: one started now must not be preempted by
            # its own next chunk (under a window the blocks it will hold are bounded anyway: its chunk's).
            reserve = n if self.windowed else len(seq.tokens) - matched
            need = self.runner.blocks_needed([(s.slot, k) for s, k in plan + started] + [(slot, reserve)])
            if need + len(self.running) > self.runner.num_free_blocks and self.running:
                self.runner.free(slot)
                break  # first come, first served: nothing behind it starts either
            self.waiting.remove(seq)
            seq.slot, seq.computed = slot, matched
            self.prompt_tokens_cached += min(matched, len(seq.request.prompt))
            self.running.append(seq)
            started.append((seq, n))
            budget -= n
        return started

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Whether a running sequence is still computing whole blocks of seq's prompt's prefix."""
        if not self.runner.prefix_caching:
            return False
        bs = self.block_size
        head = seq.tokens[:bs]
        for other in self.running:
            prompt = other.request.prompt
            if other.computed >= len(prompt) or prompt[:bs] != head:
                continue
            limit = min(len(prompt), len(seq.tokens) - 1)
            common = next((i for i in range(limit) if prompt[i] != seq.tokens[i]), limit)
            if other.computed < common // bs * bs:
                return True
        return False
