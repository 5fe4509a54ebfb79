"""The llama-fast command (also `python -m llama_fast`): generate, chat, perplexity, serve, quantize, bench,
info."""
from __future__ import annotations

import argparse
import codecs
import os
import secrets
import sys

from . import validate
from .paths import DEFAULT_MODEL

# Chat on the command line samples as llama.cpp's command line does by default (a greedy reply of a small
# model soon loops); --temperature 0 makes it greedy. A plain `generate` and the Python API stay greedy.
CHAT_SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
GREEDY_SAMPLING = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, .gguf file, or HF/Meta directory")
    p.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=list(validate.DTYPE_NAMES), help="weight dtype (default: bfloat16 for a checkpoint whose matrices are all bf16, else float32)")
    p.add_argument("--window", type=int, default=None, help="sliding attention window (tokens)")
    p.add_argument("--sinks", type=int, default=0, help="attention-sink tokens kept with --window")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 is greedy (default: {CHAT_SAMPLING['temperature']} for chat, else 0)")
    p.add_argument("--top-k", type=int, default=None, help=f"0 is off (default: {CHAT_SAMPLING['top_k']} for chat, else 0)")
    p.add_argument("--top-p", type=float, default=None, help=f"1 is off (default: {CHAT_SAMPLING['top_p']} for chat, else 1)")
    p.add_argument("--min-p", type=float, default=None, help=f"0 is off (default: {CHAT_SAMPLING['min_p']} for chat, else 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--penalty-last-n", type=int, default=None,
                   help="the penalty sees only the last N tokens (default: all of them)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed in [0, 2**63) (default: a fresh one, printed to stderr)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args, chat: bool, draw_seed: bool = True) -> dict:
    """The sampling keywords: the flags given, the rest CHAT_SAMPLING's (chat) or GREEDY_SAMPLING's. A sampled
    run without --seed gets a fresh seed (with draw_seed), printed to stderr so that the run can be repeated."""
    defaults = CHAT_SAMPLING if chat else GREEDY_SAMPLING
    chosen = {key: defaults[key] if getattr(args, key) is None else getattr(args, key) for key in defaults}
    seed = args.seed
    if seed is None and chosen["temperature"] > 0 and draw_seed:
        seed = _fresh_seed()
    return dict(max_new_tokens=args.max_new_tokens, **chosen, repetition_penalty=args.repetition_penalty,
                penalty_last_n=args.penalty_last_n, seed=seed, stop=args.stop)


def _fresh_seed() -> int:
    """A seed for a sampled run without --seed, printed to stderr so that the run can be repeated."""
    seed = secrets.randbits(63)
    print(f"seed: {seed} (--seed {seed} repeats this run)", file=sys.stderr, flush=True)
    return seed


def _utf8(data: bytes | str, what: str) -> str:
    """Text from the command line or stdin; not UTF-8 is an error (argv's undecodable bytes arrive as
    surrogate escapes)."""
    try:
        return data.decode("utf-8") if isinstance(data, bytes) else data.encode("utf-8").decode("utf-8")
    except UnicodeError as err:
        raise ValueError(f"{what} is not valid UTF-8 ({err.reason} at {err.start})") from None


def _load(args, fast_start: bool = False):
    """The model for a command: with fast_start (generate, chat), LiteLLM where it can serve the command (it
    starts in a fraction of the time: no torch import), else LLM."""
    args.device = validate.device_name(args.device, "--device")
    if fast_start and args.device == "cpu":
        from .lite import LiteLLM

        lite = LiteLLM.open(args.model, args.dtype, window=args.window, sink_tokens=args.sinks)
        if lite is not None:
            return lite
    from .llm import LLM
    from .span import SpanBias

    span = SpanBias(window=args.window, sink_tokens=args.sinks) if args.window is not None or args.sinks else None
    return LLM.from_pretrained(args.model, device=args.device, dtype=args.dtype, span=span,
                               progress=sys.stderr.isatty(), tensor_parallel=getattr(args, "tp", 1))


def cmd_generate(args) -> None:
    text = _utf8(sys.stdin.buffer.read(), "the prompt read from stdin") if args.prompt == "-" else \
        _utf8(args.prompt, "the prompt")
    validate.integer(args.tp, "--tp", minimum=1)
    if args.tp > 1:  # every rank must draw the same tokens: rank 0's seed for all, rank 0 prints
        from .sampling import check_request

        settings = _sampling(args, chat=args.chat, draw_seed=False)
        rest = dict(settings)   # checked before the load and the group's join, as generate checks them
        check_request(1, rest.pop("max_new_tokens"), rest.pop("stop"), rest.pop("seed"), rest)
        llm = _load(args)
        settings["seed"] = _rank0_seed(args.seed, settings["temperature"] > 0)
        show = os.environ.get("RANK", "0") == "0"
    else:
        settings = _sampling(args, chat=args.chat)
        llm, show = _load(args, fast_start=True), True
    prompt = [{"role": "user", "content": text}] if args.chat else text
    for piece in llm.stream(prompt, **settings):
        if show:
            print(piece, end="", flush=True)
    if show:
        print()


def _rank0_seed(seed: int | None, sampled: bool) -> int | None:
    """The seed of a tensor-parallel run: the one given, else (sampled) a fresh one drawn and printed by rank
    0 and broadcast."""
    import torch
    import torch.distributed as dist

    if seed is None and not sampled:
        return None
    fresh = seed is None and dist.get_rank() == 0
    value = torch.tensor([_fresh_seed() if fresh else seed or 0], dtype=torch.int64)
    dist.broadcast(value, src=0)
    return int(value)


def cmd_chat(args) -> None:
    settings = _sampling(args, chat=True)
    llm = _load(args, fast_start=True)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting with", args.model, "- type /exit to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": _utf8(line, "the message")})
        reply = ""
        for piece in llm.stream(messages, **settings):
            reply += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_info(args) -> None:
    from . import rope
    from .loaders import load_checkpoint

    ckpt = load_checkpoint(args.model_path, progress=False)
    c = ckpt.config
    print(f"path:        {ckpt.path}")
    print(f"name:        {c.name}")
    print(f"parameters:  {c.num_params:,}")
    print(f"layers:      {c.n_layers}   hidden: {c.dim}   ffn: {c.ffn_dim}")
    print(f"heads:       {c.n_heads} (kv {c.n_kv_heads}), head_dim {c.head_dim}")
    print(f"vocab:       {c.vocab_size}   context: {c.max_seq_len}   rope theta: {c.rope_theta}"
          f"{'   rope scaling: ' + rope.describe(c.rope_scaling) if c.rope_scaling else ''}")
    print(f"embeddings:  {'tied' if c.tie_embeddings else 'untied'}")
    print("tensors:     " + ", ".join(f"{n} x {k}" for k, n in sorted(ckpt.tensor_types.items())))
    t = ckpt.tokenizer
    print(f"tokenizer:   {t.kind}, bos {t.bos_id}, eos {sorted(t.eos_ids)}, "
          f"chat template: {'yes' if t.chat_template else 'no'}")


def read_text(file, encode, max_tokens: int | None) -> str:
    """The text of a binary file object, or with max_tokens only as much of it as settles its first
    max_tokens tokens (encode(text) -> ids), so that an endless input (/dev/zero) is not read to its end:
    chunks of growing size (at most 16 MiB) until the text encodes to more tokens than needed and one more
    chunk leaves the first max_tokens as they were (a cut inside a long pre-token, a run of "_", changes the
    tokens before it), or the file ends."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    if max_tokens is None:
        return decoder.decode(file.read(), final=True)
    text, size, head = "", 4096, None
    while True:
        chunk = file.read(size)
        text += decoder.decode(chunk, final=not chunk)
        if not chunk:
            return text
        ids = encode(text)
        if len(ids) > max_tokens:
            if ids[:max_tokens] == head:
                return text
            head = ids[:max_tokens]
        size = min(2 * size, 1 << 24)


def cmd_perplexity(args) -> None:
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    llm = _load(args)
    try:
        with open(args.file, "rb") if args.file != "-" else os.fdopen(os.dup(0), "rb") as f:
            text = read_text(f, llm.tokenizer.encode, args.max_tokens)
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {args.file}: {err}") from err
    result = llm.perplexity(text, max_tokens=args.max_tokens, progress=sys.stderr.isatty())
    span = llm.model.span
    mode = "dense" if span.window is None else f"window {span.window}, sinks {span.sink_tokens}"
    print(f"perplexity:  {result.perplexity:.3f}   ({mode}, {result.num_tokens} tokens predicted)")
    print(f"speed:       {result.tokens_per_s:.1f} tokens/s ({result.seconds:.1f} s)")
    print(f"KV memory:   {result.kv_bytes / 2**20:.1f} MiB peak")


def cmd_quantize(args) -> None:
    from .loaders import quantize_gguf

    want = validate.dtype_name(args.type, "--type")
    counts = quantize_gguf(args.input, args.output, want, progress=sys.stderr.isatty())
    mix = ", ".join(f"{count} {kind}" for kind, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB): tensors {mix}")


def served_name(model: str) -> str:
    """The id a server gives its model by default: a built-in name as is, else the file's or folder's name
    (without .gguf)."""
    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf")


def cmd_serve(args) -> None:
    import logging
    import signal

    from .engine import Engine
    from .server.app import Server, build_app

    validate.integer(args.port, "--port", minimum=0, maximum=65535)
    validate.integer(args.max_body_bytes, "--max-body-bytes", minimum=1)
    if args.api_key == "":
        raise ValueError("--api-key must not be empty (omit it to serve without a key)")
    validate.integer(args.tp, "--tp", minimum=1)
    if not 0 <= validate.real(args.shutdown_timeout, "--shutdown-timeout") <= 3600:
        raise ValueError(f"--shutdown-timeout must be in [0, 3600] seconds, got {args.shutdown_timeout}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    llm = _load(args)
    limits = dict(max_kv_tokens=args.max_kv_tokens, max_batch_tokens=args.max_batch_tokens,
                  max_running=args.max_running, max_waiting=args.max_waiting)
    if args.tp > 1:  # rank 0 serves; the others repeat its engine's steps on their shards
        from .tensor_parallel import LeaderEngine, follow

        if os.environ.get("RANK", "0") != "0":
            # A SIGTERM (torchrun passes it to every rank) waits: rank 0 ends the loop once it has shut down.
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
            return follow(llm, **limits)
        engine = LeaderEngine(llm, **limits)
    else:
        engine = Engine(llm, **limits)
    app = build_app(engine, args.served_model_name or served_name(args.model), api_key=args.api_key,
                    max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout)
    server = Server(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it found: a
    # handler that does nothing makes that a clean exit (status 0) instead of death by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        if args.tp > 1:
            engine.stop_followers()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-fast", description="Fast LLaMA-family inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="stream a continuation of PROMPT")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: run as torchrun --nproc-per-node N -m llama_fast generate ... --tp N")
    p.add_argument("prompt", help="the prompt; - reads it from stdin")
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as one user message through the model's chat template (an instruct "
                        "model's greedy continuation of a bare instruction is often just its end token); "
                        "samples by default, as chat does")
    _add_model_args(p)
    _add_sampling_args(p, max_new_tokens=128)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat with the model's chat template (samples by default)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    _add_model_args(p)
    _add_sampling_args(p, max_new_tokens=512)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("perplexity", help="perplexity of the model on a text file")
    p.add_argument("file", help="a UTF-8 text file; - reads stdin")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="evaluate only the first N tokens (and read only as much of FILE as they need)")
    _add_model_args(p)
    p.set_defaults(func=cmd_perplexity)
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (docs/server.md)")
    _add_model_args(p)
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks: torchrun --nproc-per-node N -m llama_fast serve ... --tp N")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model's name, e.g. smollm2-135m-instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LLAMA_FAST_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LLAMA_FAST_API_KEY, else none)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--max-running", type=int, default=None, help="sequences decoding at once, each of a request's n choices one (engine default 64; "
                        "n may not exceed it)")
    p.add_argument("--max-waiting", type=int, default=None, help="requests queued beyond those; more get 429")
    p.add_argument("--max-kv-tokens", type=int, default=None, help="KV cache size in tokens (engine default)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per engine step (engine default)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds to let running requests finish before they are aborted")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("quantize", help="write a GGUF with every matrix in a block format (llama.cpp loads it)")
    p.add_argument("input", help="a .gguf file or built-in model name")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--type", required=True, choices=["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"],
                   help="block format; rows that are not whole super-blocks take llama.cpp's fallback "
                        "(q4_k: q5_0, q6_k: q8_0)")
    p.set_defaults(func=cmd_quantize)
    sub.add_parser("bench", help="decode benchmark against transformers and llama.cpp (bench --help: its options)")
    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("model_path", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options are llama_fast.bench's own
        from .bench import main as bench

        bench(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141
    except (ValueError, RuntimeError, OSError, ImportError) as err:
        print(f"llama-fast: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
