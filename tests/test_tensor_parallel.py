"""Tensor parallelism on torch.distributed (gloo): real processes, one per rank (tests/tp_worker.py), started
as torchrun starts them; each rank's logits and greedy tokens against the single-process session."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from llama_fast import _ext
from llama_fast.bench import free_port
from llama_fast.session import SessionRunner
from llama_fast.loaders import save_weights
from llama_fast.paths import resolve_model_path
from llama_fast.tensor_parallel import init_process_group, leave_process_group, plan_shard, rank_device

from models import random_model
from tp_cases import PROMPT, tiny_config

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="the C++ extensions are not built")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_worker.py")


def launch(world: int, args: list[str], out, timeout: float = 300) -> list[dict]:
    """Runs tp_worker.py as `world` ranks -> what each rank wrote (ranks that wrote nothing are absent)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, WORKER, *args, str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    results = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
        elif args[0] != "die":
            pytest.fail(f"rank {rank} wrote nothing:\n{logs[rank][-3000:]}")
    return results


def single_process(model):
    runner = SessionRunner(model, num_blocks=64, num_threads=1)
    seq = runner.add_sequence()
    return runner.step([(seq, PROMPT)], all_logits=True)


def test_plan_splits_heads_and_replicates_kv_heads_that_do_not_divide():
    split = plan_shard(tiny_config(8, 4), world=2, rank=1)
    assert split.q_heads == range(4, 8) and split.kv_heads == (2, 3)
    replicated = [plan_shard(tiny_config(6, 2), world=3, rank=r).kv_heads for r in range(3)]
    assert replicated == [(0,), (0, 1), (1,)]  # query heads 2 and 3 read KV heads 0 and 1
    uneven = plan_shard(tiny_config(12, 4), world=3, rank=0)  # query heads 0-3: three read KV 0, one KV 1
    assert uneven.kv_heads == (0, 0, 0, 1)  # one copy per query head
    assert plan_shard(tiny_config(12, 4), world=3, rank=0).ffn == range(0, 53)
    with pytest.raises(ValueError, match="tensor_parallel=4 must divide the model's 6 query heads"):
        plan_shard(tiny_config(6, 2), world=4, rank=0)


def test_bad_tensor_parallel_arguments_are_refused_before_any_work(monkeypatch):
    """Refused before a checkpoint is read (the path does not exist) or a process group is joined."""
    from llama_fast.llm import LLM
    from llama_fast.tensor_parallel import shard_model

    with pytest.raises(ValueError, match="tensor_parallel"):
        LLM.from_pretrained("/nonexistent/model.gguf", tensor_parallel=0)
    for timeout in (0, -5.0):
        with pytest.raises(ValueError, match="tp_timeout_s must be > 0"):
            LLM.from_pretrained("/nonexistent/model.gguf", tensor_parallel=2, tp_timeout_s=timeout)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"tensor_parallel=2 needs a torchrun job .*torchrun --nproc-per-node 2"):
        shard_model(random_model(tiny_config(8, 4)), 2)
    with pytest.raises(ValueError, match="shard_model cuts the shard on the CPU .*the model is on meta"):
        shard_model(random_model(tiny_config(8, 4)).to("meta"), 2, device="cuda")


def test_each_rank_takes_its_local_gpu_and_a_cuda_model_needs_nccl(monkeypatch):
    """A CUDA device without an index is LOCAL_RANK's GPU; a named one or the CPU stays. A group joined with
    gloo cannot carry a CUDA model's collectives: a clear error (no GPU needed to see it)."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert rank_device(torch.device("cpu")) == torch.device("cpu")
    for var, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(var, value)
    try:
        assert init_process_group(1) == 0  # gloo, for a model on the CPU
        with pytest.raises(ValueError, match="tensor parallelism on cuda needs a nccl process group, this one is gloo"):
            init_process_group(1, device=torch.device("cuda", 0))
    finally:
        leave_process_group()


@pytest.mark.parametrize("heads, kv_heads, world", [(8, 4, 2), (6, 2, 3), (12, 4, 3), (6, 6, 2)])
def test_ranks_match_the_single_process_logits_and_text(tmp_path, heads, kv_heads, world):
    """Each rank's logits, through the C++ session and through the model's forward, equal the single-process
    ones within 1e-4 (fp32), greedy tokens identical, and each rank holds about 1/world of the sharded
    weights plus the replicated ones."""
    results = launch(world, ["tiny", str(heads), str(kv_heads)], tmp_path)
    model = random_model(tiny_config(heads, kv_heads), seed=heads)
    want = single_process(model)
    from llama_fast import LLM, SamplingParams, Tokenizer

    llm = LLM(model, Tokenizer.from_pretrained("smollm2-135m-instruct"))
    tokens = [t for (t,) in llm.generate_ids([PROMPT], [SamplingParams(temperature=0.0)], 24, stop_at_eos=False)]
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    replicated = sum(t.numel() * t.element_size() for n, t in state.items() if t.dim() == 1 or n == "tok_embeddings.weight")
    for rank, result in enumerate(results):
        torch.testing.assert_close(torch.load(tmp_path / f"logits{rank}.pt"), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.load(tmp_path / f"eager{rank}.pt"), want, atol=1e-4, rtol=1e-4)
        assert result["tokens"] == tokens
        # Its share of the rest (an output slice included; KV heads copied where they do not divide).
        assert result["weight_bytes"] <= replicated + 1.4 * (total - replicated + state["tok_embeddings.weight"].numel() * 4) / world


def test_embedded_model_at_tp3_matches_one_process(tmp_path, smollm):
    results = launch(3, ["path", "smollm2-135m-instruct"], tmp_path)
    want = single_process(smollm.model)
    from llama_fast import SamplingParams

    tokens = [t for (t,) in smollm.generate_ids([PROMPT], [SamplingParams(temperature=0.0)], 24, stop_at_eos=False)]
    total = sum(t.numel() * t.element_size() for t in smollm.model.state_dict().values())
    print(f"\nembedded model at tp=3: weight bytes per rank {[r['weight_bytes'] >> 20 for r in results]} MiB "
          f"of {total >> 20} MiB; peak RSS per rank {[round(r['peak_rss_mib']) for r in results]} MiB")
    for rank, result in enumerate(results):
        torch.testing.assert_close(torch.load(tmp_path / f"logits{rank}.pt"), want, atol=1e-4, rtol=1e-4)
        assert result["tokens"] == tokens


def test_block_formats_at_tp3_match_one_process(tmp_path):
    """The embedded model run in its stored blocks (dtype "native": Q4_1 matrices, a Q8_0 embedding), each
    rank's columns of wo and w2 whole blocks of them: greedy tokens identical to one process's, the same
    argmax at every prompt position, and logits (session and model's forward) as close to one process's as
    that process's two routes are to each other. (Not 1e-4 as in fp32: the activations are rounded to int8
    per block, so a last-bit difference in a partial sum may move a rounding, and the int8 steps add up over
    the layers: 3% of a row's norm here.) Each rank holds its third of the blocks beside the embedding."""
    from llama_fast import LLM, SamplingParams
    from llama_fast.tensor_parallel import shard_bytes

    results = launch(3, ["path", "smollm2-135m-instruct", "native"], tmp_path)
    one = LLM.from_pretrained("smollm2-135m-instruct", dtype="native", progress=False)
    want = single_process(one.model)
    eager = LLM(one.model, one.tokenizer, decode="eager").logits(torch.tensor([PROMPT]))[0]

    def distance(logits):  # the largest relative distance of a row from one process's session
        return ((logits - want).norm(dim=-1) / want.norm(dim=-1)).max().item()

    noise = distance(eager)
    assert 0 < noise < 0.1
    tokens = [t for (t,) in one.generate_ids([PROMPT], [SamplingParams(temperature=0.0)], 24, stop_at_eos=False)]
    embedding = one.model.tok_embeddings.weight.nbytes
    for rank, result in enumerate(results):
        for route in ("logits", "eager"):
            got = torch.load(tmp_path / f"{route}{rank}.pt")
            assert distance(got) <= 2 * noise and torch.equal(got.argmax(-1), want.argmax(-1)), (rank, route)
        assert result["tokens"] == tokens
        assert result["weight_bytes"] <= embedding + 1.1 * (shard_bytes(one.model) - embedding) / 3 + embedding / 3


def test_ranks_dequantising_one_file_at_once_share_its_cached_copy(tmp_path, monkeypatch):
    """The embedded model is a Q4_1 file: with no dequantised copy in the cache yet, the three ranks each write
    it into the cache at once, a tensor at a time, and map it: one whole file results (no part file left),
    every rank's row slices are views of it (so no shard of its own is cached), and the next load maps the
    same file and computes the same logits and tokens."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(cache))
    runs = {}
    for run in ("first", "again"):
        (tmp_path / run).mkdir()
        runs[run] = launch(3, ["path", "smollm2-135m-instruct"], tmp_path / run)
    entries = [str(e) for e in cache.rglob("weights.safetensors")]
    assert len(entries) == 1 and not list(cache.rglob("*.part")) and not (cache / "shards").exists()
    for rank in range(3):
        for run in runs.values():  # (the column slices of wo and w2 are copies in memory)
            files = [f.removesuffix(" (deleted)") for f in run[rank]["mapped_from"] if f.startswith("/")]
            assert files == entries  # (deleted: the copy a rank mapped before another's copy replaced it)
        assert runs["again"][rank]["tokens"] == runs["first"][rank]["tokens"]
        assert torch.equal(torch.load(tmp_path / "again" / f"logits{rank}.pt"),
                           torch.load(tmp_path / "first" / f"logits{rank}.pt"))


W1 = "layers.1.feed_forward.w1.weight"


def test_meta_files_at_tp2_give_one_process_logits_and_each_rank_maps_its_cached_shard(tmp_path, monkeypatch,
                                                                                       spm_model_file):
    """A Meta checkpoint in two model-parallel files, joined in memory as it loads (more than a rank's shard):
    at tp=2 each rank's logits equal one process's within 1e-4, with the same greedy tokens; each rank writes
    its shard to the cache, and its next load maps that file alone and computes the same logits. A damaged
    entry is removed and written again, as is one that reads well but lacks a tensor or holds a misshapen one."""
    from safetensors.torch import load_file
    from llama_fast import LLM, SamplingParams
    from llama_fast.config import ModelConfig
    from llama_fast.gguf_file import half_to_interleaved

    from checkpoints import save_meta

    config = ModelConfig(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2050, ffn_dim=256)
    state = random_model(config, seed=7).state_dict()
    for name, w in state.items():  # Meta's files hold Q/K rows in interleaved pairs
        if name.endswith(("wq.weight", "wk.weight")):
            state[name] = half_to_interleaved(w, config.n_heads if ".wq." in name else config.n_kv_heads)
    folder = tmp_path / "meta"
    folder.mkdir()
    save_meta(state, dict(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2050, multiple_of=256,
                          norm_eps=config.norm_eps, rope_theta=config.rope_theta), folder, spm_model_file, files=2)
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    one = LLM.from_pretrained(str(folder), progress=False)
    want = single_process(one.model)
    tokens = [t for (t,) in one.generate_ids([PROMPT], [SamplingParams(temperature=0.0)], 24, stop_at_eos=False)]
    runs, entries = {}, {}
    for run in ("first", "again", "damaged", "incomplete"):
        (tmp_path / run).mkdir()
        runs[run] = launch(2, ["path", str(folder)], tmp_path / run)
        for rank, result in enumerate(runs[run]):
            torch.testing.assert_close(torch.load(tmp_path / run / f"logits{rank}.pt"), want, atol=1e-4, rtol=1e-4)
            assert result["tokens"] == tokens
        entries[run] = sorted(str(e) for e in (tmp_path / "cache" / "shards").glob("*/weights.safetensors"))
        if run == "again":
            with open(entries[run][0], "r+b") as f:  # (the processes that mapped it have exited)
                f.write(b"\xff" * 64)
        if run == "damaged":  # one entry lacks a tensor, the other holds one of the wrong shape
            shard = load_file(entries[run][1])
            save_weights({name: w for name, w in shard.items() if name != "norm.weight"}, str(tmp_path / "part"))
            os.replace(tmp_path / "part", entries[run][1])
            shard = load_file(entries[run][0])
            save_weights({**shard, W1: shard[W1][:-1]}, str(tmp_path / "part"))
            os.replace(tmp_path / "part", entries[run][0])
    assert len(entries["first"]) == 2 and entries["again"] == entries["damaged"] == entries["incomplete"] == entries["first"]
    assert "norm.weight" in load_file(entries["incomplete"][1])
    assert load_file(entries["incomplete"][0])[W1].shape == load_file(entries["incomplete"][1])[W1].shape
    assert sorted(f for r in runs["again"] for f in r["mapped_from"]) == entries["first"]  # one file per rank
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / "again" / f"logits{rank}.pt"),
                           torch.load(tmp_path / "first" / f"logits{rank}.pt"))


def test_a_dead_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    results = launch(2, ["die"], tmp_path, timeout=120)
    assert len(results) == 1  # rank 1 died without writing
    error = results[0]["error"]
    assert error is not None and results[0]["seconds"] < 30, results[0]


def test_torchrun_generate_prints_the_single_process_text_once():
    """`torchrun --nproc-per-node 3 -m llama_fast generate ... --tp 3`: rank 0 prints the text one process
    prints (greedy), the others nothing; sampled, the seed rank 0 drew for every rank, which repeats it."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = ["generate", "The capital of France is", "--max-new-tokens", "12"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "llama_fast", *args], capture_output=True, text=True, env=env, timeout=300)
    three = subprocess.run([torchrun, "--nproc-per-node", "3", "-m", "llama_fast", *args, "--tp", "3"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert three.returncode == 0, three.stderr[-3000:]
    assert one.stdout.strip() and three.stdout == one.stdout
    # Sampled without --seed: rank 0 prints the seed it drew (once), and --seed N repeats the run.
    def sampled(*seed):
        return subprocess.run([torchrun, "--nproc-per-node", "3", "-m", "llama_fast", *args, "--tp", "3",
                               "--temperature", "0.9", *seed], capture_output=True, text=True, env=env, timeout=300)

    first = sampled()
    seeds = re.findall(r"seed: (\d+) \(--seed \1 repeats this run\)", first.stderr)
    assert first.returncode == 0 and len(seeds) == 1, first.stderr[-3000:]
    again = sampled("--seed", seeds[0])
    assert again.stdout == first.stdout and "seed:" not in again.stderr


@pytest.mark.parametrize("flags, named", [(["--seed", str(2**63), "--temperature", "0.5"], "seed must be in [0, 2**63)"),
                                          (["--top-p", "0"], "top_p must be in (0, 1]")])
def test_generate_at_tp_checks_its_sampling_flags_before_loading_or_joining(flags, named):
    """Outside torchrun, so loading or joining the group would fail first, saying so."""
    result = subprocess.run([sys.executable, "-m", "llama_fast", "generate", "hi", "--tp", "2", *flags],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and named in result.stderr and "torchrun" not in result.stderr, result.stderr


def test_followers_repeat_the_leaders_steps_with_requests_arriving_and_aborted(tmp_path):
    """A tensor-parallel server's engines: rank 0's takes requests from another thread and aborts some,
    rank 1 follows its steps; the finished requests get the tokens they get alone in one process."""
    from llama_fast import Engine, LLM, Tokenizer
    from tp_cases import lockstep_requests

    results = launch(2, ["lockstep"], tmp_path)
    leader, follower = results
    assert follower == {"followed": True} and leader["blocks_in_use"] == 0
    llm = LLM(random_model(tiny_config(4, 2), seed=4), Tokenizer.from_pretrained("smollm2-135m-instruct"))
    finished = 0
    for i, (prompt, new) in enumerate(lockstep_requests()):
        got = leader["tokens"].get(f"r{i}")
        if got is None:
            continue  # aborted
        engine = Engine(llm)
        engine.add_request(prompt, max_new_tokens=new, ignore_eos=True)
        want = []
        while engine.has_unfinished():
            want += [t for out in engine.step() for t in out.new_token_ids]
        assert got == want, i
        finished += 1
    assert finished >= 10


def test_serve_at_tp3_answers_as_one_process_and_stops_on_sigterm(smollm):
    """`llama-fast serve --tp 3` as three ranks: rank 0 answers a greedy completion with the text of one
    process; SIGTERM to every rank (as torchrun passes it on) ends all three cleanly."""
    import signal
    import time

    import httpx

    rdzv, port = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "llama_fast", "serve", "--tp", "3", "--port", str(port)],
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="3",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(rdzv), OMP_NUM_THREADS="1",
                                       PYTHONFAULTHANDLER="1"),  # a fatal signal prints every thread's stack
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(3)]
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            time.sleep(0.5)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120, json={
            "model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 12,
            "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == smollm.generate("The capital of France is", max_new_tokens=12).text
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0, 0], [p.stderr.read()[-2000:] for p in procs]


def test_bench_tp_runs_at_a_tiny_shape_and_on_a_file(tmp_path):
    """benchmarks/bench_tp.py end to end (its timings are the machine's, not checked): the decode step's
    all-reduces at tp=2 beside one process, and loading the embedded model at tp=3 with a fresh cache."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LLAMA_FAST_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    script = os.path.join(root, "benchmarks", "bench_tp.py")

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    out = run("--layers", "2", "--dim", "128", "--heads", "4", "--kv-heads", "2", "--ffn", "256", "--vocab", "512",
              "--steps", "4", "--dtype", "float32")
    assert "all-reduces per step: 4 (+1 gather of the logits)" in out and "a bare all-reduce of 128 floats" in out
    assert "projected on 2 GPUs (Llama-3.1-8B" in out
    out = run("--tp", "3", "--gguf", resolve_model_path("smollm2-135m-instruct"))
    assert out.count("first load: peak RSS") == out.count("again load: peak RSS") == 3 and "same tokens: True" in out
