"""LLM: the user-facing object. Loads a checkpoint, tokenizes, and generates through prefill / decode /
sample (as gpt-fast splits them), batching several prompts into one forward pass."""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from . import validate
from .cache import StaticKVCache
from .loaders import DEFAULT_MODEL, load_checkpoint, resolve_model_path
from .model import Transformer, build_model, pack_weights
from .sampling import SamplingParams, check_max_new_tokens, check_request, row_params
from .span import SpanBias, checkpoint_span
from .tokenizer import Tokenizer, check_context, stop_strings
from .window import prefill_chunk

log = logging.getLogger("llama_fast")

MAX_GENERATE_STEP_TOKENS = 4096  # tokens one step of a generate call may feed (its activations' memory)


@dataclass
class PerplexityResult:
    perplexity: float  # exp(mean negative log-likelihood)
    nll: float  # mean negative log-likelihood per predicted token (nats)
    num_tokens: int  # tokens predicted (the text's tokens minus the first)
    seconds: float
    tokens_per_s: float
    kv_bytes: int  # peak memory held by the KV cache


@dataclass
class Completion:
    text: str  # the generated text (prompt excluded), cut before a stop string
    token_ids: list[int]  # the generated token ids
    finish_reason: str  # "eos", "stop" (a stop string), "length" (max_new_tokens or the context)


def _check_span(span) -> None:
    if span is not None and not isinstance(span, SpanBias):
        raise ValueError(f"span must be a SpanBias or None, got {type(span).__name__}")


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, path: str = "", *, decode: str | None = None):
        """decode: which runner the Engine steps (every generate call runs on one, llama_fast.engine): "auto"
        (default; also $LLAMA_FAST_DECODE): on CPU the C++ session (llama_fast.session) where it applies
        (fp32/bf16 weights or GGUF block formats, the extension built), else the model's forward over a
        paged cache (llama_fast.model_runner; on CUDA its decode steps replayed from CUDA graphs); "cpp":
        the C++ session or an error; "eager": always the model's forward, without graphs (the reference
        route; also the default when LLAMA_FAST_BACKEND=reference)."""
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.config = model.config
        if decode is None:
            decode = os.environ.get("LLAMA_FAST_DECODE") or (
                "eager" if os.environ.get("LLAMA_FAST_BACKEND") == "reference" else "auto")
        self.decode = decode
        if self.decode not in ("auto", "cpp", "eager"):
            raise ValueError(f"decode must be 'auto', 'cpp' or 'eager', got {self.decode!r}")
        self._session_reason = None  # why the C++ session cannot run this model ("": it can), once asked

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, *, device=None, dtype=None, span: SpanBias | None = None,
                        progress: bool = True, decode: str | None = None, tensor_parallel: int = 1,
                        tp_timeout_s: float = 60.0) -> "LLM":
        """name_or_path: "smollm2-135m-instruct" / "llama-base" (the embedded default), a .gguf file, or a
        Hugging Face or Meta directory. device: "cpu" (default), "cuda", "cuda:N" or N. dtype: a name of
        validate.DTYPE_NAMES ("float32" / "fp32", "bfloat16" / "bf16", "float16" / "fp16") or that torch dtype
        (None, the default: bfloat16 for a checkpoint whose matrices are all bf16, else float32); on CPU also a GGUF block format ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k": every matrix
        kept in it and multiplied as stored; a file in another type is converted once and cached) or "native"
        (each tensor of a GGUF in its stored type; float vectors in fp32); on CUDA also "int8" / "int4"
        (weight-only: the matrices packed at load, activations bf16; docs/quantization.md). span: default the checkpoint's (its sliding window, if it has one). decode: see __init__.
        tensor_parallel=N > 1: this process is one rank of a torchrun job of N; it loads and keeps only its shard
        of the model (llama_fast.tensor_parallel.load_shard, docs/tensor_parallel.md) and every rank must make
        the same calls; a collective that waits for a peer longer than tp_timeout_s seconds raises."""
        name_or_path = validate.path_or_name(name_or_path)
        device = torch.device(validate.device_name(device))
        packed = None  # CUDA's int8 / int4: loaded in bf16, packed on the device
        if dtype is not None:
            weights = validate.weight_dtype(dtype, device.type)
            if weights in validate.CUDA_ONLY_DTYPES:
                packed, weights = weights, "bfloat16"
            # A block format or "native" goes to the loader by name; the weights it keeps quantised run in fp32.
            dtype = getattr(torch, weights) if weights in validate.FLOAT_DTYPES else weights
        _check_span(span)
        validate.integer(tensor_parallel, "tensor_parallel", minimum=1)
        if validate.real(tp_timeout_s, "tp_timeout_s") <= 0:
            raise ValueError(f"tp_timeout_s must be > 0, got {tp_timeout_s!r}")
        if tensor_parallel > 1:  # each rank cuts its shard on the CPU and moves only that to its device
            from .tensor_parallel import load_shard, rank_device

            path = resolve_model_path(name_or_path)
            model, tokenizer = load_shard(path, tensor_parallel, dtype, span, device=rank_device(device),
                                          timeout_s=tp_timeout_s, progress=progress)
        else:
            ckpt = load_checkpoint(name_or_path, progress=progress, dtype=dtype)
            model = build_model(ckpt.config, ckpt.weights, dtype=ckpt.float_dtype(dtype), device=device,
                                span=checkpoint_span(span or SpanBias(), ckpt.config.sliding_window))
            tokenizer, path = ckpt.tokenizer, ckpt.path
        if packed is not None:
            pack_weights(model, packed)
        return cls(model, tokenizer, path, decode=decode)

    @classmethod
    def from_transformers(cls, model, tokenizer=None, *, decode: str | None = None) -> "LLM":
        """An LLM on an already-loaded transformers LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM,
        sharing its weight tensors (nothing is copied; see llama_fast.integrations.transformers). tokenizer:
        the model's transformers tokenizer, for text prompts (without it, token ids only). The span is
        `model.config.llama_fast_span`, else Mistral's sliding window, else plain causal."""
        from .integrations.transformers import llm_parts

        transformer, tok = llm_parts(model, tokenizer)
        return cls(transformer, tok, getattr(model, "name_or_path", ""), decode=decode)

    def with_span(self, span: SpanBias) -> "LLM":
        """The same model (weights shared, nothing copied) attending with another SpanBias (within the
        checkpoint's sliding window, if it has one)."""
        span = checkpoint_span(span, self.config.sliding_window)
        span.check_heads(self.config.n_heads)
        model = copy.copy(self.model)  # a shallow copy shares every parameter
        model.span = span
        return LLM(model, self.tokenizer, self.path, decode=self.decode)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- forward passes ----

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) int64 -> logits (B, T, vocab) fp32 (one full causal forward pass)."""
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64)
                or 0 in input_ids.shape):
            raise ValueError(f"input_ids must be a non-empty integer tensor (B, T), got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
        self._check_token_ids(input_ids)
        B, T = input_ids.shape
        check_context(T, self._context)
        c = self.config
        cache = StaticKVCache(c.n_layers, B, T, c.n_kv_heads, c.head_dim, dtype=self.model.dtype,
                              device=self.device)
        return self.model(input_ids.to(self.device, torch.int64), cache)

    def _check_token_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")

    @property
    def _context(self) -> int | None:
        """The most tokens an input may have (None under a sliding window: streams run past the context)."""
        return self.config.max_seq_len if self.model.span.window is None else None

    # ---- generation ----

    def _encode_prompts(self, prompts: Sequence[str | list[int]]) -> list[list[int]]:
        return [validate.prompt_token_ids(p, self.tokenizer, self.config.vocab_size, self._context) for p in prompts]

    def generate_ids(self, prompt_ids: list[list[int]], params: list[SamplingParams], max_new_tokens: int,
                     on_cache=None, stop_at_eos: bool = True) -> Iterator[list[int | None]]:
        """The decode loop: yields, per step, one new token per row (None for rows that produced none this
        step: finished, or not started yet).

        The rows run on an Engine (llama_fast.engine) over this LLM's runner (new_runner): prompts in
        chunks, each distinct prompt computed once and forked for the rows that repeat it, then one token
        per row per step, all rows in one pass over the weights; rows start as KV blocks allow
        (max_kv_tokens) and free theirs when done. on_cache, if given, is called with the runner once it
        exists (to watch its memory). stop_at_eos=False runs every row for max_new_tokens steps whatever it
        samples (benchmarks).
        """
        check_max_new_tokens(max_new_tokens)
        if not prompt_ids:
            raise ValueError("generate needs at least one prompt")
        for ids in prompt_ids:
            if not ids:
                raise ValueError("a prompt must contain at least one token")
            check_context(len(ids), self._context)
        B = len(prompt_ids)
        for step in self._engine_steps(prompt_ids, params, max_new_tokens, None, stop_at_eos, on_cache, False):
            tokens: list[int | None] = [None] * B
            for row, out in step:
                tokens[row] = out.new_token_ids[0] if out.new_token_ids else None
            if any(t is not None for t in tokens):
                yield tokens

    def _runs_on_session(self) -> bool:
        """Whether the runner is the C++ session (else the model's forward: model_runner)."""
        return self.decode != "eager" and self.device.type == "cpu" and self._session_supported()

    # The KV pool's budget in tokens (None: 2 GiB worth, at least one full context).
    max_kv_tokens: int | None = None

    def _session_supported(self) -> bool:
        """Whether the C++ session can run this model (asked once; decode="cpp" insists on it)."""
        if self._session_reason is None:
            from .session import supports

            self._session_reason = supports(self.model) or ""
            if self._session_reason:
                if self.decode == "cpp":
                    raise RuntimeError(f"decode='cpp': the C++ session cannot run this model: {self._session_reason}")
                log.info("llama_fast: decode steps run through the model's forward (%s)", self._session_reason)
        return not self._session_reason

    def new_runner(self, num_blocks: int, *, prefix_caching: bool = False):
        """The runner (session.Runner) of this model with a pool of num_blocks KV blocks: the C++ session
        where it runs this model (decode "auto" / "cpp" on CPU), else the model's forward (ModelRunner).
        Each generate call has its own, so calls a caller interleaves never take each other's blocks."""
        if self._runs_on_session():
            from .session import SessionRunner

            runner = SessionRunner(self.model, num_blocks=num_blocks, prefix_caching=prefix_caching)
        else:
            from .model_runner import ModelRunner

            runner = ModelRunner(self.model, num_blocks=num_blocks, graphs=False if self.decode == "eager" else None)
        log.debug("llama_fast: a runner on %s, %d KV blocks", runner.isa, num_blocks)
        return runner

    def _blocks_for_sequence(self, tokens: int, step_tokens: int) -> int:
        """The most KV blocks one sequence of `tokens` tokens takes on this LLM's runner, fed at most
        step_tokens at a time."""
        from .session import blocks_for_sequence  # the block manager's bound, the same on every runner

        span = self.model.span
        return blocks_for_sequence(tokens, step_tokens, span.window or 0, span.sink_tokens)

    def _kv_budget_blocks(self, block_size: int) -> int:
        c = self.config
        if self.max_kv_tokens is not None:
            return -(-self.max_kv_tokens // block_size)
        token_bytes = 2 * c.n_layers * c.n_kv_heads * c.head_dim * self.model.dtype.itemsize
        return max(-(-c.max_seq_len // block_size), (2 << 30) // (token_bytes * block_size))

    def _engine(self, prompt_ids: list[list[int]], max_new_tokens: int):
        """The Engine of one generate call: a pool of the blocks its rows need at most (within
        max_kv_tokens), every row running at once where the blocks allow."""
        from .engine import DEFAULT_MAX_BATCH_TOKENS, Engine
        from .session import BLOCK_SIZE

        rows, chunk = len(prompt_ids), prefill_chunk(self.model.span.window)
        need = sum(self._blocks_for_sequence(len(ids) + max_new_tokens, chunk) for ids in prompt_ids)
        blocks = min(need, self._kv_budget_blocks(BLOCK_SIZE))
        # A batch job, not a server: every prompt's first chunk in one step where it is not huge.
        first_chunks = sum(min(len(ids), chunk) for ids in prompt_ids)
        return Engine(self, max_kv_tokens=blocks * BLOCK_SIZE, max_running=rows,
                      max_batch_tokens=max(DEFAULT_MAX_BATCH_TOKENS, rows, min(first_chunks, MAX_GENERATE_STEP_TOKENS)))

    def _engine_steps(self, prompt_ids, params, max_new_tokens, stops, stop_at_eos, on_cache, text: bool):
        """Runs the rows on an Engine (each distinct prompt one request, computed once and forked for the
        rows that repeat it, where the KV pool holds those rows together; else one request per row, started
        as blocks allow); yields each step's [(row, RequestOutput)] (with their text where `text`)."""
        engine = self._engine(prompt_ids, max_new_tokens)
        if on_cache is not None:
            on_cache(engine.runner)
        groups: dict[tuple[int, ...], list[int]] = {}  # each distinct prompt -> the rows that run it
        for row, ids in enumerate(prompt_ids):
            groups.setdefault(tuple(ids), []).append(row)
        rows_of = {}
        for ids, rows in groups.items():
            together = engine.fits(len(ids) + engine.new_tokens_limit(len(ids), max_new_tokens), len(rows))
            for part in [rows] if together else [[row] for row in rows]:
                rows_of[engine.add_request(list(ids), [params[r] for r in part], max_new_tokens=max_new_tokens,
                                           stop=stops, n=len(part), ignore_eos=not stop_at_eos,
                                           detokenize=text)] = part
        try:
            while engine.has_unfinished():
                yield [(rows_of[out.request_id][out.index], out) for out in engine.step()]
        finally:  # a consumer that stops early (or an error) leaves no blocks behind
            engine.abort_all()

    def _stream_rows(self, prompts: list[str], max_new_tokens: int, stop, seed, settings) -> Iterator[tuple[int, str, int | None, str | None]]:
        """Yields (row, new text, new token id or None, finish reason or None): the Engine's outputs."""
        stops = stop_strings(stop)
        if getattr(self.model, "tp", None) is not None and seed is None and settings["temperature"] > 0:
            raise ValueError("seed: a tensor-parallel run that samples needs a seed (every rank must draw alike)")
        prompt_ids = self._encode_prompts(prompts)
        params = row_params(len(prompts), seed, **settings)
        text = getattr(self.tokenizer, "has_text", True)   # (no text: LLM.from_transformers without a tokenizer)
        for step in self._engine_steps(prompt_ids, params, max_new_tokens, stops, True, None, text):
            for row, out in step:
                finish = "eos" if isinstance(out.stop_reason, int) else out.finish_reason
                yield row, out.new_text, out.new_token_ids[0] if out.new_token_ids else None, finish

    def generate(self, prompt: str | list[str] | list[int] | list[list[int]], *, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, penalty_last_n: int | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None, num_return_sequences: int = 1):
        """Generates a continuation of each prompt; all prompts (times num_return_sequences) run as one batch.

        prompt: a str, token ids (a list of int), or a list of either. Returns a Completion for a single
        prompt, a list of them for a list of prompts; with num_return_sequences = n > 1, each of those
        becomes a list of n Completions. temperature 0 (the default) is greedy. The penalties see each row's last penalty_last_n tokens (None: all, prompt included).
        seed makes sampling reproducible (row r of the batch draws from seed + r).
        """
        prompts, single = validate.prompts(prompt)
        validate.integer(num_return_sequences, "num_return_sequences", minimum=1)
        rows = [p for p in prompts for _ in range(num_return_sequences)]
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty, penalty_last_n=penalty_last_n)
        check_request(len(rows), max_new_tokens, stop, seed, settings)
        completions = [Completion("", [], "length") for _ in rows]
        for row, text, token, finish_reason in self._stream_rows(rows, max_new_tokens, stop, seed, settings):
            completions[row].text += text
            if token is not None:
                completions[row].token_ids.append(token)
            if finish_reason is not None:
                completions[row].finish_reason = finish_reason
        if num_return_sequences > 1:
            completions = [completions[i:i + num_return_sequences] for i in range(0, len(rows), num_return_sequences)]
        return completions[0] if single else completions

    def stream(self, prompt: str | list[int] | list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, penalty_last_n: int | None = None,
               seed: int | None = None, stop: str | list[str] | None = None) -> Iterator[str]:
        """Yields the continuation of one prompt (a str or token ids; or a chat, given a list of messages, whose
        content stays text, never control tokens) as text pieces. The sampling keywords are generate's.
        Arguments are checked here, not at the first piece."""
        if not getattr(self.tokenizer, "has_text", True):
            raise ValueError("stream yields text, and this LLM has no tokenizer (LLM.from_transformers(model) without "
                             "tokenizer=): generate(token ids) gives the token ids")
        prompt = validate.one_prompt(prompt, functools.partial(self.tokenizer.apply_chat_template, tokenize=True))
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty, penalty_last_n=penalty_last_n)
        check_request(1, max_new_tokens, stop, seed, settings)
        return (text for _, text, _, _ in self._stream_rows([prompt], max_new_tokens, stop, seed, settings) if text)

    def chat(self, messages: list[dict], **kwargs) -> Completion:
        """One assistant reply to `messages` ([{"role": ..., "content": ...}]), via the checkpoint's template
        (message content stays text, never control tokens); kwargs: generate's (the same sampling keywords
        as stream)."""
        ids = self.tokenizer.apply_chat_template(validate.messages(messages), add_generation_prompt=True,
                                                 tokenize=True)
        return self.generate(ids, **kwargs)

    # ---- evaluation ----

    def perplexity(self, text: str, *, span: SpanBias | None = None, max_tokens: int | None = None,
                   chunk: int = 256, progress: bool = False) -> PerplexityResult:
        """Perplexity of the model on `text`, read left to right as generation reads it, on this LLM's runner
        (new_runner; under a window its memory stays constant, any length).

        span: overrides the model's SpanBias for this evaluation. max_tokens: evaluate only the first
        max_tokens tokens. chunk: tokens per step (under a window at most window.prefill_chunk).
        """
        from tqdm import tqdm

        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        _check_span(span)
        validate.integer(max_tokens, "max_tokens", minimum=2, optional=True)
        validate.integer(chunk, "chunk", minimum=1)
        span = checkpoint_span(span, self.config.sliding_window) if span is not None else self.model.span
        span.check_heads(self.config.n_heads)
        ids = self.tokenizer.encode(text)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise ValueError("perplexity needs a text of at least 2 tokens")
        if span.window is None:
            check_context(len(ids), self._context)
        llm = self if span is self.model.span else self.with_span(span)
        chunk = min(chunk, prefill_chunk(span.window))
        runner = llm.new_runner(llm._blocks_for_sequence(len(ids), chunk))
        seq = runner.add_sequence()
        total_nll, start_time = 0.0, time.perf_counter()
        for start in tqdm(range(0, len(ids) - 1, chunk), desc="perplexity", unit="chunk", disable=not progress):
            piece = ids[start:min(start + chunk, len(ids) - 1)]
            targets = torch.tensor(ids[start + 1:start + 1 + len(piece)])  # the next token of each position
            logprobs = torch.log_softmax(runner.step([(seq, piece)], all_logits=True), dim=-1)
            total_nll -= logprobs.gather(1, targets[:, None]).sum().item()
        kv_bytes = runner.kv_bytes
        seconds = time.perf_counter() - start_time
        n = len(ids) - 1
        return PerplexityResult(math.exp(total_nll / n), total_nll / n, n, seconds, len(ids) / seconds, kv_bytes)
