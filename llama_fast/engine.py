"""Engine: continuous batching over the C++ session. Requests arrive and finish at any step; each step runs
every running sequence's next token and prompt chunks in one pass over the weights (scheduler.py decides
which), samples, detokenizes and reports what each sequence produced.

    engine = Engine.from_pretrained("smollm2-135m-instruct")
    engine.add_request("The sea is", SamplingParams(temperature=0.8, seed=1), max_new_tokens=32)
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.new_text, out.finish_reason)

AsyncEngine wraps it for asyncio (the server): the engine steps in its own thread, each request's outputs
come through an async iterator. Every LLM.generate call runs on an Engine too: the one decode loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np
import torch

from . import ops, validate
from .errors import EngineClosedError, QueueFullError, StepError
from .sampling import PenaltyWindow, SamplingParams, check_max_new_tokens, row_params
from .scheduler import Request, Scheduler, Sequence
from .session import BLOCK_SIZE
from .span import SpanBias
from .tokenizer import TextStream, stop_strings
from .window import prefill_chunk

DEFAULT_MAX_BATCH_TOKENS = 512  # tokens per step: bounds a step's time, so what a running stream waits
DEFAULT_MAX_RUNNING = 64  # sequences decoding together
NEVER = -1e30  # a logit no sampler picks (finite: the sampler refuses inf, penalties may scale it)


@dataclass
class RequestOutput:
    """What one sequence of a request produced in one step."""

    request_id: str
    index: int  # which of the request's n sequences
    new_token_ids: list[int]
    new_text: str  # text now safe to show (a possible stop string's start is held back)
    finish_reason: str | None  # None while running, then "stop" (EOS or a stop string), "length" or "abort"
    num_prompt_tokens: int
    stop_reason: str | int | None = None  # with "stop": the stop string, or the end-of-sequence token id
    # With SamplingParams(logprobs=k): per new token, (its log-probability, [(token id, log-probability)] of
    # the k most likely tokens), from the raw logits.
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


class Engine:
    def __init__(self, llm, *, max_kv_tokens: int | None = None, max_batch_tokens: int | None = None,
                 max_running: int | None = None, max_waiting: int | None = None, prefix_caching: bool = True,
                 chunked_prefill: bool = True):
        """An engine over `llm`: its steps run on llm.new_runner (the C++ session on CPU where it applies,
        else the model's forward: llama_fast.model_runner).

        max_kv_tokens: the KV pool, in tokens (default: 2 GiB worth, at least one full context).
        max_batch_tokens: tokens one step feeds (default 512). max_running: sequences running at once
        (default 64, at most max_batch_tokens). max_waiting: requests that may wait, >= 1 (every request
        waits until the next step starts it; None: no limit; past it add_request raises QueueFullError). prefix_caching: reuse the KV blocks of prompt prefixes
        already computed. chunked_prefill=False feeds each prompt whole in one step (without a window),
        however long it makes the step: what chunking is measured against."""
        validate.integer(max_kv_tokens, "max_kv_tokens", minimum=1, optional=True)
        max_batch_tokens = validate.integer(max_batch_tokens, "max_batch_tokens", minimum=1, optional=True) or DEFAULT_MAX_BATCH_TOKENS
        max_running = validate.integer(max_running, "max_running", minimum=1, optional=True) or min(DEFAULT_MAX_RUNNING, max_batch_tokens)
        if max_running > max_batch_tokens:
            raise ValueError(f"max_running ({max_running}) must be <= max_batch_tokens ({max_batch_tokens}): "
                             "every running sequence feeds a token each step")
        self.max_waiting = validate.integer(max_waiting, "max_waiting", minimum=1, optional=True)
        for name, flag in (("prefix_caching", prefix_caching), ("chunked_prefill", chunked_prefill)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        self.llm = llm
        num_blocks = -(-max_kv_tokens // BLOCK_SIZE) if max_kv_tokens is not None else llm._kv_budget_blocks(BLOCK_SIZE)
        self.runner = llm.new_runner(num_blocks, prefix_caching=prefix_caching)
        span = llm.model.span
        chunk = prefill_chunk(span.window) if chunked_prefill or span.window else llm.config.max_seq_len
        self.scheduler = Scheduler(self.runner, max_batch_tokens=max_batch_tokens, max_running=max_running,
                                   chunk=chunk, block_size=BLOCK_SIZE, chunked=chunked_prefill,
                                   windowed=span.window is not None)
        self._eos = set(llm.config.eos_token_ids) | llm.tokenizer.eos_ids
        # An embedding padded past the tokenizer's vocabulary (Qwen2, Phi-3): those ids have no text, so a
        # request that detokenizes never samples them, nor takes them in its prompt.
        self._textless = llm.tokenizer.vocab_size if llm.config.vocab_size > llm.tokenizer.vocab_size else None
        self._requests: dict[str, Request] = {}  # unfinished, by id
        self._reported: list[RequestOutput] = []  # aborts, reported by the next step
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._prompt_tokens_computed = 0
        self._generated_tokens = 0
        self._lock = threading.RLock()  # the engine's state: add_request / abort from other threads
        self._stepping = threading.Lock()  # one step at a time
        self._in_flight: set[Sequence] = set()  # the sequences of the step computing now

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype=None, device=None, span: SpanBias | None = None,
                        **limits) -> "Engine":
        """An engine over LLM.from_pretrained(name_or_path, dtype=..., device=..., span=...); limits: the
        constructor's keywords."""
        from .llm import LLM

        return cls(LLM.from_pretrained(name_or_path, dtype=dtype, device=device, span=span, progress=False), **limits)

    # ---- requests ----

    def add_request(self, prompt: str | list[int], params: SamplingParams | Seq[SamplingParams] | None = None, *,
                    max_new_tokens: int | None = 128, stop: str | list[str] | None = None, n: int = 1,
                    request_id: str | None = None, ignore_eos: bool = False, min_tokens: int = 0,
                    detokenize: bool = True) -> str:
        """Queues a request; returns its id. prompt: text or token ids. params: greedy when None; one
        SamplingParams (sequence i of the n draws from seed + i) or one per sequence. n > 1: the prompt is
        computed once and forked. stop: strings that end a sequence (cut from its text). ignore_eos: run
        to max_new_tokens whatever is sampled. min_tokens: no end-of-sequence token before that many.
        max_new_tokens None: as many as the model's context leaves and the KV pool holds for all n sequences.
        detokenize=False: token ids only (new_text stays empty; no stop strings).
        Everything is checked here, before any work; nothing in flight is disturbed by a bad request."""
        ids = self.encode(prompt)   # (before taking the lock: a long text takes a while to tokenize)
        with self._lock:
            request = self._new_request(ids, params, max_new_tokens, stop, n, request_id, ignore_eos, min_tokens,
                                        detokenize)
            self._requests[request.request_id] = request
            self.scheduler.add(request)
            return request.request_id

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids (text tokenized, ids checked), at most the model's context long; ValueError
        otherwise. Needs no lock: a server tokenizes in a worker thread, then adds the ids."""
        return validate.prompt_token_ids(prompt, self.llm.tokenizer, self.llm.config.vocab_size, self.llm._context)

    def _new_request(self, ids, params, max_new_tokens, stop, n, request_id, ignore_eos, min_tokens,
                     detokenize) -> Request:
        llm = self.llm
        context = llm._context
        if max_new_tokens is not None:
            check_max_new_tokens(max_new_tokens)
        validate.integer(n, "n", minimum=1, maximum=self.scheduler.max_running)
        validate.stop(stop)
        stops = stop_strings(stop)
        validate.integer(min_tokens, "min_tokens", minimum=0)
        for name, flag in (("ignore_eos", ignore_eos), ("detokenize", detokenize)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if stops and not detokenize:
            raise ValueError("stop strings need detokenize=True")
        if detokenize and self._textless is not None and max(ids) >= self._textless:
            raise ValueError(f"prompt token ids past the tokenizer's {self._textless} have no text (the model's "
                             f"embedding is padded to {llm.config.vocab_size}): use detokenize=False for them")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str or None, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        if any(out.request_id == request_id for out in self._reported):
            raise ValueError(f"request_id {request_id!r} was aborted and the next step reports it; use another id "
                             "or add this request after that step")
        per_sequence = self._sequence_params(params, n)
        if max_new_tokens is None:
            max_new_tokens = self._room(len(ids), n)
        limit = self.new_tokens_limit(len(ids), max_new_tokens)
        if limit < 1:
            raise ValueError(f"the prompt has {len(ids)} tokens, the whole model context ({context}): "
                             "no room for a new token")
        if not self.fits(len(ids) + limit, n):
            blocks = n * self.runner.blocks_for_sequence(len(ids) + limit, self.scheduler.chunk)
            raise ValueError(f"a prompt of {len(ids)} tokens with max_new_tokens={max_new_tokens} (x{n} sequences) "
                             f"needs {blocks * BLOCK_SIZE} KV tokens, more than max_kv_tokens="
                             f"{self.runner.num_blocks * BLOCK_SIZE} holds")
        if self.max_waiting is not None and self.scheduler.waiting_requests() >= self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are waiting already (max_waiting); try again later")
        request = Request(request_id, ids, limit, next(self._arrivals), stops, ignore_eos, min_tokens)
        vocab = llm.config.vocab_size
        for i, p in enumerate(per_sequence):
            penalties = PenaltyWindow(ids, p, np.zeros(vocab, dtype=np.int32)) if p.has_penalties else None
            text = TextStream(llm.tokenizer, ids, stops) if detokenize else None
            request.sequences.append(Sequence(request, i, p, list(ids), text, penalties))
        return request

    def new_tokens_limit(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """max_new_tokens within what the model's context leaves after the prompt (no bound under a window)."""
        context = self.llm._context
        return max_new_tokens if context is None else min(max_new_tokens, context - prompt_tokens)

    def fits(self, tokens: int, n: int = 1) -> bool:
        """Whether n sequences of `tokens` tokens fit the KV pool together."""
        return n * self.runner.blocks_for_sequence(tokens, self.scheduler.chunk) <= self.runner.num_blocks

    def _room(self, prompt_tokens: int, n: int) -> int:
        """The most new tokens each of n sequences of a prompt may have: what max_seq_len leaves that the KV
        pool holds for all n (at least 1: a prompt that leaves none is refused by the caller)."""
        low, high = 1, self.llm.config.max_seq_len - prompt_tokens
        if high <= low or not self.fits(prompt_tokens + low, n):
            return low
        while low < high:  # the largest count that fits: blocks only grow with tokens
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.fits(prompt_tokens + mid, n) else (low, mid - 1)
        return low

    @staticmethod
    def _sequence_params(params, n: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams(temperature=0.0)
        if isinstance(params, SamplingParams):
            fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams) if f.name != "seed"}
            return row_params(n, params.seed, **fields)
        params = list(params)
        if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"params must be a SamplingParams or a list of n={n} of them")
        return [p if p.seed is not None or p.greedy else dataclasses.replace(p, seed=ops.fresh_seed()) for p in params]

    def abort(self, request_id: str) -> None:
        """Ends an unfinished request now: its blocks are freed at once (or, for a sequence in the step
        running right now, as that step ends); the next step reports each of its sequences still running
        with finish_reason "abort"."""
        with self._lock:
            request = self._requests.pop(request_id, None)
            if request is None:
                raise ValueError(f"abort: no unfinished request with id {request_id!r}")
            for seq in request.sequences:
                if seq.finish is None:
                    seq.finish = "abort"
                    if seq not in self._in_flight:
                        self.scheduler.finish(seq)
                    self._reported.append(RequestOutput(request_id, seq.index, [], self._rest_of_text(seq), "abort",
                                                        len(request.prompt)))

    @staticmethod
    def _rest_of_text(seq: Sequence) -> str:
        """The text seq held back, for its abort; "" where it cannot be made (aborting a failed step's
        requests must not fail)."""
        try:
            return seq.text.flush()[0] if seq.text is not None else ""
        except Exception:
            return ""

    def abort_all(self) -> None:
        """Aborts every unfinished request."""
        with self._lock:
            for request_id in list(self._requests):
                self.abort(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._requests or self._reported)

    def stats(self) -> dict:
        with self._lock:
            r = self.runner
            return {
                "running": self.scheduler.running_requests(), "waiting": self.scheduler.waiting_requests(),
                "running_sequences": len(self.scheduler.running),
                "blocks_in_use": r.num_blocks - r.num_free_blocks, "blocks_cached": r.num_cached_blocks,
                "blocks_total": r.num_blocks, "prompt_tokens_computed": self._prompt_tokens_computed,
                "prompt_tokens_cached": self.scheduler.prompt_tokens_cached,
                "generated_tokens": self._generated_tokens, "preemptions": self.scheduler.preemptions,
            }

    # ---- one step ----

    def step(self) -> list[RequestOutput]:
        """Runs one step: every running sequence's next token, prompt chunks as the budget allows, requests
        started as blocks allow. Returns what each sequence produced (and the aborts since the last step).
        Steps run one at a time; add_request, abort and stats from other threads do not wait for the
        step's computation, only for its bookkeeping. A step that fails (a bug) aborts the requests it ran
        and raises StepError naming them; the engine goes on with the others."""
        with self._stepping:
            with self._lock:
                self._before_schedule()
                outputs, self._reported = self._reported, []
                plan = self.scheduler.schedule()
                if not plan:
                    return outputs
                entries = [(s.slot, s.tokens[s.computed:s.computed + n]) for s, n in plan]
                self._in_flight = {s for s, _ in plan}
            failure, produced = None, []
            try:
                logits = self.runner.step(entries)
            except BaseException as err:  # (a KeyboardInterrupt too: the cache holds the step, `computed` not)
                failure = err
            finally:
                with self._lock:
                    self._in_flight = set()
                    for seq, _ in plan:
                        if seq.finish == "abort":  # aborted while the step ran: its blocks go now
                            self.scheduler.finish(seq)
            with self._lock:
                if failure is None:
                    try:
                        self._finish_step(plan, logits, produced)
                        return outputs + produced
                    except BaseException as err:
                        failure = err
                # The step's unfinished requests cannot go on (a sequence may be half-advanced): aborted; the
                # engine stays usable, and what the step did produce (requests it finished) and the aborts are
                # reported by the next.
                self._reported = outputs + produced + self._reported
                failed = sorted({seq.request.request_id for seq, _ in plan} & self._requests.keys())
                for request_id in failed:
                    self.abort(request_id)
                if not isinstance(failure, Exception):  # KeyboardInterrupt, SystemExit: theirs to handle
                    raise failure
                raise StepError(failed, failure) from failure

    def _before_schedule(self) -> None:
        """Called at the start of every step, under the lock (tensor_parallel.LeaderEngine sends its
        changes to the other ranks here)."""

    def _finish_step(self, plan: list[tuple[Sequence, int]], logits: torch.Tensor, produced: list[RequestOutput]):
        """Advances the step's sequences, samples those whose next token is due and appends each one's
        RequestOutput to `produced` as it is made (so that a failure keeps the ones before it)."""
        ready: list[tuple[Sequence, int]] = []  # sequences whose next token is due, and their logits row
        for row, (seq, n) in enumerate(plan):
            if seq.finish is not None:
                continue
            prompt = len(seq.request.prompt)
            self._prompt_tokens_computed += max(0, min(seq.computed + n, prompt) - seq.computed)
            seq.computed += n
            if seq.pending == 0:
                ready.append((seq, row))
                if not seq.request.forked and len(seq.request.sequences) > 1:
                    ready += [(child, row) for child in self.scheduler.fork(seq)]
        if not ready:
            return
        tokens, logprobs = self._sample(logits, ready)
        for (seq, _), token, lp in zip(ready, tokens, logprobs):
            produced.append(self._append(seq, token, lp))

    def _sample(self, logits: torch.Tensor, ready: list[tuple[Sequence, int]]):
        """The next token of each ready sequence (as LLM.generate samples: the row's params, its draw
        counter = tokens it has generated, its penalty counts), and the logprobs they asked for."""
        seqs = [seq for seq, _ in ready]
        # A copy (masking below touches no other row), made by numpy: a small torch op may wake torch's
        # thread pool, which costs milliseconds on a busy machine.
        rows = torch.from_numpy(logits.numpy()[[row for _, row in ready]])
        if self._textless is not None:
            rows[[i for i, seq in enumerate(seqs) if seq.text is not None], self._textless:] = NEVER
        eos = sorted(self._eos)
        for i, seq in enumerate(seqs):
            if seq.generated < seq.request.min_tokens and eos:
                rows[i, eos] = NEVER
        seen = None
        if any(seq.penalties is not None for seq in seqs):
            zeros = np.zeros(rows.shape[1], dtype=np.int32)
            seen = torch.from_numpy(np.stack([zeros if seq.penalties is None else seq.penalties.counts for seq in seqs]))
        tokens = ops.sample(rows, [seq.params for seq in seqs], step=[seq.generated for seq in seqs], seen=seen).tolist()
        logprobs = [None] * len(seqs)
        for i, seq in enumerate(seqs):
            k = seq.params.logprobs
            if k is not None:
                lp = torch.log_softmax(logits[ready[i][1]], dim=-1)
                top = lp.topk(k) if k else None
                logprobs[i] = (float(lp[tokens[i]]), [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
        return tokens, logprobs

    def _append(self, seq: Sequence, token: int, logprobs) -> RequestOutput:
        """Appends a sampled token to seq; finishes it on EOS, a stop string or its length."""
        request = seq.request
        seq.tokens.append(token)
        self._generated_tokens += 1
        if seq.penalties is not None:
            seq.penalties.push(token)
        stream = seq.text
        if token in self._eos and not request.ignore_eos:
            text, stop_reason = stream.flush() if stream else ("", None)
            seq.finish, stop_reason = ("stop", stop_reason) if stop_reason else ("eos", token)
        else:
            text, stop_reason = stream.push(token) if stream else ("", None)
            if stop_reason is None and seq.generated >= request.max_new_tokens:
                rest, stop_reason = stream.flush() if stream else ("", None)
                text += rest
            if stop_reason is not None:
                seq.finish = "stop"
            elif seq.generated >= request.max_new_tokens:
                seq.finish = "length"
        if seq.finish is not None:
            self.scheduler.finish(seq)
            if all(s.finish is not None for s in request.sequences):
                del self._requests[request.request_id]
        reason = {"eos": "stop"}.get(seq.finish, seq.finish)
        return RequestOutput(request.request_id, seq.index, [token], text, reason, len(request.prompt), stop_reason,
                             None if logprobs is None else [logprobs])


class RequestStream:
    """One request's outputs as an async iterator. Closing it (aclose), or cancelling the task waiting on it,
    before the request finished aborts the request, whether or not it was ever read."""

    def __init__(self, async_engine: "AsyncEngine", request_id: str, queue: asyncio.Queue, n: int):
        self.request_id = request_id
        self._async_engine, self._queue, self._unfinished = async_engine, queue, n
        self._closed = False

    def __del__(self):
        # Dropped unfinished (a `break` out of `async for`): the stepping thread aborts it before its next
        # step (aborting here could land in the middle of a step's bookkeeping).
        if not self._closed and self._unfinished:
            self._async_engine._abandon(self.request_id, self._queue)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed or not self._unfinished:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
            if isinstance(out, BaseException):
                raise out
        except BaseException:
            await self.aclose()
            raise
        self._unfinished -= out.finish_reason is not None
        if not self._unfinished:
            self._async_engine._release(self.request_id, self._queue, abort=False)
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._async_engine._release(self.request_id, self._queue, abort=self._unfinished > 0)


class AsyncEngine:
    """An Engine for asyncio code: the engine steps in its own thread while requests are unfinished; each
    request's outputs arrive through the async iterator generate() returns. Closing or cancelling that
    iterator before the request finished aborts it (its blocks are freed within one step)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        # (request id, queue) of the streams dropped unfinished (RequestStream.__del__)
        self._abandoned: list[tuple[str, asyncio.Queue]] = []
        self._closing = False
        self._thread: threading.Thread | None = None

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, **kwargs) -> "RequestStream":
        """Queues a request (Engine.add_request's arguments; errors raise here, at once) and returns the
        async iterator of its outputs, which ends once each of its sequences has finished."""
        if self._closing:
            raise EngineClosedError("the engine is shutting down: it takes no new requests")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self.engine._lock:  # registered before the stepping thread can report on it
            request_id = self.engine.add_request(prompt, params, **kwargs)
            self._streams[request_id] = (loop, queue)
        self._start()
        return RequestStream(self, request_id, queue, kwargs.get("n", 1))

    def _abort(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except ValueError:
            pass  # it finished meanwhile

    def _release(self, request_id: str, queue: asyncio.Queue, abort: bool) -> None:
        """Forgets the stream of request_id whose queue is `queue`, aborting its request if asked; nothing
        if the id now names a later request (an id is free again once its request has finished)."""
        with self.engine._lock:  # (generate adds a request and its stream under it)
            stream = self._streams.get(request_id)
            if stream is not None and stream[1] is queue:
                del self._streams[request_id]
                if abort:
                    self._abort(request_id)

    def _abandon(self, request_id: str, queue: asyncio.Queue) -> None:
        with self._wake:
            self._abandoned.append((request_id, queue))
            self._wake.notify()

    def _start(self) -> None:
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llama_fast-engine", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.engine.has_unfinished() and not self._closing:
                    self._wake.wait()
                if self._closing and not self.engine.has_unfinished():
                    return
                abandoned, self._abandoned = self._abandoned, []
            for request_id, queue in abandoned:
                self._release(request_id, queue, abort=True)
            try:
                outputs = self.engine.step()
            except Exception as err:  # a bug: the requests it hit (all, where it cannot tell) hear of it
                for request_id in err.request_ids if isinstance(err, StepError) else list(self._streams):
                    self._deliver(request_id, err)
                    self._abort(request_id)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # its event loop has closed
                pass

    def stats(self) -> dict:
        return self.engine.stats()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stops taking requests, lets the running ones finish for up to `timeout` seconds, aborts the rest
        and stops the stepping thread."""
        self._closing = True
        deadline = asyncio.get_running_loop().time() + timeout
        while self.engine.has_unfinished() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self.engine.abort_all()
        with self._wake:
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
