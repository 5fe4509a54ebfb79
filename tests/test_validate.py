"""Bad input to the public API and the command line: each a one-line ValueError naming the argument, raised
before any work (no cache entry written for a refused dtype); and the rules' good cases."""
import inspect
import os
import subprocess
import sys

import pytest
import torch

from llama_fast import LLM, SamplingParams
from llama_fast.cli import read_text
from llama_fast.paths import SAMPLE_TEXT
from llama_fast.sampling import row_params
from llama_fast.validate import DTYPE_NAMES, device_name, dtype_name, integer, prompts, seed

VENV_BIN = os.path.dirname(sys.executable)
CLI = os.path.join(VENV_BIN, "llama-fast")


def one_line_error(call, *names):
    """call() raises a ValueError whose message is one line naming every one of names."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, message
    return message


def run_cli(*args, input=None, env=None, timeout=300):
    return subprocess.run([CLI, *args], capture_output=True, input=input, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=os.path.dirname(os.path.dirname(VENV_BIN)))


# ---- dtype names: one table for the API and the CLI ----

@pytest.mark.parametrize("alias, name", [("fp32", "float32"), ("float32", "float32"), ("bf16", "bfloat16"), ("Q4_K", "q4_k"),
                                         ("native", "native"), ("int4", "int4"),
                                         ("BF16", "bfloat16"), ("fp16", "float16"), ("float16", "float16"),
                                         (torch.bfloat16, "bfloat16"), (torch.float32, "float32")])
def test_dtype_aliases(alias, name):
    assert dtype_name(alias) == name


@pytest.mark.parametrize("bad", ["garbage", "float8_e4m3fn", "q5_k", "Q4_K_M", torch.int8, 32, None, True])
def test_refused_dtype_names_it_and_writes_nothing(bad, tmp_path, monkeypatch):
    one_line_error(lambda: dtype_name(bad), "dtype", *DTYPE_NAMES)
    if bad is None:
        return  # None is from_pretrained's default (float32), not an error there
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(cache))
    one_line_error(lambda: LLM.from_pretrained("smollm2-135m-instruct", dtype=bad, progress=False), "dtype")
    assert not cache.exists()  # refused before the GGUF was read or converted


def test_dtype_alias_loads_that_dtype(smollm, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", "none")
    llm = LLM.from_pretrained("smollm2-135m-instruct", dtype="bf16", progress=False)
    assert llm.model.tok_embeddings.weight.dtype == torch.bfloat16


def test_cli_dtype_aliases_and_garbage():
    result = run_cli("generate", "I love", "--max-new-tokens", "3", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    result = run_cli("generate", "I love", "--dtype", "int5")
    assert result.returncode == 2 and b"--dtype" in result.stderr and b"Traceback" not in result.stderr
    result = run_cli("generate", "I love", "--dtype", "int4")  # CUDA's format: the CPU's nearest is named
    assert result.returncode == 2 and b"use q4_0" in result.stderr and b"Traceback" not in result.stderr


# ---- devices ----

@pytest.mark.skipif(torch.version.cuda is not None, reason="a CPU-only torch build")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, 1, "0", torch.device("cuda")])
def test_cuda_on_a_cpu_build_says_so(device):
    message = one_line_error(lambda: device_name(device), "device")
    assert "no CUDA" in message


@pytest.mark.parametrize("device", ["mps", "garbage", "cpu:1", "cuda:x", -1, True, 1.5])
def test_unknown_devices(device):
    one_line_error(lambda: device_name(device), "device")


def test_cpu_devices():
    assert device_name(None) == device_name("cpu") == device_name("CPU") == device_name(torch.device("cpu")) == "cpu"


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CPU-only torch build")
def test_from_pretrained_and_cli_refuse_cuda_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    one_line_error(lambda: LLM.from_pretrained("smollm2-135m-instruct", device=0, progress=False), "device", "no CUDA")
    assert not (tmp_path / "cache").exists()
    result = run_cli("generate", "hi", "--device", "cuda")
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert result.stderr.decode().strip().count("\n") == 0 and b"no CUDA" in result.stderr


# ---- prompts and messages ----

@pytest.mark.parametrize("bad", [{"role": "user", "content": "hi"}, [{"role": "user", "content": "hi"}], [], "",
                                 None, 5, ["a", 5], [1, "a"], [True, 2], [[]], b"bytes", "a\ud800", ["a", "\udfff"]])
def test_bad_prompts(smollm, bad):
    if bad == "":
        with pytest.raises(ValueError, match="at least one token"):
            smollm.generate(bad, max_new_tokens=1)
        return
    message = one_line_error(lambda: smollm.generate(bad, max_new_tokens=1), "prompt")
    if isinstance(bad, dict):
        assert "LLM.chat" in message


def test_token_id_prompts_match_text(smollm):
    ids = smollm.tokenizer.encode("I love")
    assert smollm.generate(ids, max_new_tokens=5).token_ids == smollm.generate("I love", max_new_tokens=5).token_ids
    both = smollm.generate([ids, "I love"], max_new_tokens=5)
    assert both[0].token_ids == both[1].token_ids
    assert "".join(smollm.stream(ids, max_new_tokens=5)) == smollm.generate("I love", max_new_tokens=5).text
    one_line_error(lambda: smollm.generate([0, smollm.config.vocab_size], max_new_tokens=1), "prompt", "token ids")
    assert prompts([1, 2]) == ([[1, 2]], True) and prompts(["a", [1]]) == (["a", [1]], False)


@pytest.mark.parametrize("bad, names", [
    ([{"content": "hi"}], ["messages[0]['role']"]),
    ([{"role": "user"}], ["messages[0]['content']"]),
    ([{"role": "user", "content": 5}], ["messages[0]['content']"]),
    ([{"role": "user", "content": "hi"}, {"role": None, "content": "x"}], ["messages[1]['role']"]),
    ([{"role": "user", "content": ["a", "b"]}], ["messages[0]['content']"]),
    ([{"role": "user", "content": "lone \ud800"}], ["messages[0]['content']", "not valid Unicode"]),
    (["hi"], ["messages[0]"]),
    ([], ["messages"]),
    ("hi", ["messages"]),
])
def test_bad_chat_messages(smollm, bad, names):
    one_line_error(lambda: smollm.chat(bad, max_new_tokens=1), *names)
    if isinstance(bad, list) and bad and all(isinstance(m, dict) for m in bad):  # stream takes messages too
        one_line_error(lambda: list(smollm.stream(bad, max_new_tokens=1)), *[n.replace("messages", "prompt") for n in names])


# ---- sampling arguments ----

@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature="0.5"), "temperature"), (dict(temperature=True), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1), "temperature"),
    (dict(top_k=True), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_k=-1), "top_k"), (dict(top_k=2**31), "top_k"),
    # what the samplers' fp32 cannot hold: a reciprocal or a penalty that overflows, a penalty that rounds to 0
    (dict(temperature=1e-50), "temperature"), (dict(temperature=1e39), "temperature"),
    (dict(repetition_penalty=1e308), "repetition_penalty"), (dict(repetition_penalty=1e-50), "repetition_penalty"),
    (dict(presence_penalty=-1e39), "presence_penalty"), (dict(frequency_penalty=1e39), "frequency_penalty"),
    (dict(top_p="1"), "top_p"), (dict(top_p=0), "top_p"), (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=None), "repetition_penalty"), (dict(presence_penalty="x"), "presence_penalty"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"), (dict(penalty_last_n=0), "penalty_last_n"),
    (dict(penalty_last_n=True), "penalty_last_n"),
    (dict(max_new_tokens="5"), "max_new_tokens"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(stop=[1]), "stop"), (dict(stop=5), "stop"), (dict(stop=[""]), "stop"), (dict(stop=["\ud800"]), "stop"),
    (dict(seed=True), "seed"), (dict(seed=-1), "seed"), (dict(seed=2**63), "seed"), (dict(seed=2**64), "seed"),
    (dict(seed=1.0), "seed"), (dict(seed="1"), "seed"),
])
@pytest.mark.parametrize("method", ["generate", "stream", "chat"])
def test_bad_sampling_arguments(smollm, kwargs, name, method):
    if method == "generate":
        call = lambda: smollm.generate("hi", **{"max_new_tokens": 1, **kwargs})  # noqa: E731
    elif method == "stream":
        call = lambda: list(smollm.stream("hi", **{"max_new_tokens": 1, **kwargs}))  # noqa: E731
    else:
        call = lambda: smollm.chat([{"role": "user", "content": "hi"}], **{"max_new_tokens": 1, **kwargs})  # noqa: E731
    one_line_error(call, name)


def test_num_return_sequences(smollm):
    for bad in (0, True, "2", 1.0):
        one_line_error(lambda: smollm.generate("hi", max_new_tokens=1, num_return_sequences=bad), "num_return_sequences")


def test_seeds_are_never_wrapped():
    assert seed(0) == 0 and seed(2**63 - 1) == 2**63 - 1 and seed(None) is None
    one_line_error(lambda: seed(2**63 - 1, n_rows=2), "seed")  # row 1 would draw from 2**63
    one_line_error(lambda: row_params(2, 2**63 - 1, temperature=1.0), "seed")
    assert [p.seed for p in row_params(2, 2**63 - 2, temperature=1.0)] == [2**63 - 2, 2**63 - 1]
    one_line_error(lambda: row_params(1, -1, temperature=1.0), "seed")
    one_line_error(lambda: SamplingParams(seed=2**64), "seed")
    assert integer(3, "n") == 3
    one_line_error(lambda: integer(False, "n"), "n")


def test_seed_near_the_bound_samples_differently_from_zero(smollm):
    """Before, seed 2**64 wrapped to 0 and -1 to 2**63 - 1: distinct seeds that were the same stream."""
    settings = dict(max_new_tokens=12, temperature=1.0)
    top = smollm.generate("Once upon a time", seed=2**63 - 1, **settings).token_ids
    assert top == smollm.generate("Once upon a time", seed=2**63 - 1, **settings).token_ids
    assert top != smollm.generate("Once upon a time", seed=0, **settings).token_ids


def test_generate_stream_and_chat_take_the_same_sampling_keywords():
    def keywords(method, exclude):
        return {name for name, p in inspect.signature(method).parameters.items()
                if p.kind == p.KEYWORD_ONLY and name not in exclude}

    assert keywords(LLM.generate, {"num_return_sequences"}) == keywords(LLM.stream, set())
    # (logprobs is what the Engine reports with each token, not a way to choose one)
    assert set(SamplingParams.__dataclass_fields__) - {"logprobs"} <= keywords(LLM.stream, set())


def test_stream_samples_with_presence_and_frequency_penalties(smollm):
    settings = dict(max_new_tokens=16, presence_penalty=1.5, frequency_penalty=0.5)
    streamed = "".join(smollm.stream("I love", **settings))
    assert streamed == smollm.generate("I love", **settings).text
    assert streamed != smollm.generate("I love", max_new_tokens=16).text


# ---- the command line ----

def test_cli_prompt_from_stdin_matches_the_argument():
    piped = run_cli("generate", "-", "--max-new-tokens", "6", input="I love".encode())
    given = run_cli("generate", "I love", "--max-new-tokens", "6")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout and piped.stdout.strip()


def test_cli_non_utf8_prompt_is_a_one_line_error():
    for args, data in ((["generate", b"caf\xe9 au lait"], None), (["generate", "-"], b"caf\xe9 au lait")):
        result = run_cli(*args, "--max-new-tokens", "2", input=data)
        assert result.returncode == 2, result.stderr
        message = result.stderr.decode()
        assert "not valid UTF-8" in message and "prompt" in message and message.strip().count("\n") == 0


def test_cli_closed_pipe_exits_quietly():
    """`llama-fast generate ... | head -c 20`: the reader leaves; no "Broken pipe" error, no traceback."""
    proc = subprocess.Popen([CLI, "generate", "Once upon a time", "--max-new-tokens", "64"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = proc.stdout.read(20)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert len(first) == 20
    assert err == b"" and proc.returncode in (0, 141)


def test_cli_chat_samples_by_default_and_prints_its_seed():
    args = ["generate", "--chat", "Tell me about the sea.", "--max-new-tokens", "12"]
    sampled = run_cli(*args)
    assert sampled.returncode == 0, sampled.stderr
    line = [s for s in sampled.stderr.decode().splitlines() if s.startswith("seed: ")]
    assert len(line) == 1
    seed_value = line[0].split()[1]
    again = run_cli(*args, "--seed", seed_value)
    assert again.stdout == sampled.stdout and b"seed:" not in again.stderr  # the printed seed repeats the run
    greedy = run_cli(*args, "--temperature", "0")
    assert b"seed:" not in greedy.stderr
    assert greedy.stdout == run_cli(*args, "--temperature", "0").stdout
    plain = run_cli("generate", "I love", "--max-new-tokens", "4")  # without --chat: greedy, no seed
    assert b"seed:" not in plain.stderr


@pytest.mark.parametrize("kwargs, name", [(dict(chunk=-1), "chunk"), (dict(chunk=0), "chunk"), (dict(chunk=1.5), "chunk"),
                                          (dict(max_tokens=2.5), "max_tokens"), (dict(max_tokens=1), "max_tokens"),
                                          (dict(span="x"), "span"), (dict(text=b"bytes"), "text")])
def test_bad_perplexity_arguments(smollm, kwargs, name):
    one_line_error(lambda: smollm.perplexity(**{"text": "The sea is calm today.", **kwargs}), name)


def test_perplexity_reads_only_what_max_tokens_needs(smollm):
    with open("/dev/zero", "rb") as endless:
        text = read_text(endless, smollm.tokenizer.encode, 10)
    assert 10 < len(smollm.tokenizer.encode(text)) and len(text) <= 1 << 20
    with open(SAMPLE_TEXT, "rb") as f:
        head = read_text(f, smollm.tokenizer.encode, 50)
    whole = open(SAMPLE_TEXT, encoding="utf-8").read()
    assert whole.startswith(head) and len(head) < len(whole)
    assert smollm.tokenizer.encode(head)[:50] == smollm.tokenizer.encode(whole)[:50]
    result = run_cli("perplexity", "/dev/zero", "--max-tokens", "10", timeout=120)
    assert result.returncode == 0, result.stderr
    assert b"9 tokens predicted" in result.stdout
