"""One rank of the tensor-parallel tests: tests/test_tensor_parallel.py starts one process per rank with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun would, and reads what each writes.

    tp_worker.py tiny HEADS KV_HEADS OUT_DIR   a tiny random model: logits of a prompt, greedy tokens
    tp_worker.py path NAME_OR_PATH [DTYPE] OUT_DIR
                                               LLM.from_pretrained(NAME_OR_PATH, dtype=DTYPE,
                                               tensor_parallel=world): the embedded model, a checkpoint the
                                               test wrote
    tp_worker.py die OUT_DIR                   rank 1 exits during generation; the others must raise
    tp_worker.py lockstep OUT_DIR              rank 0 a LeaderEngine taking requests from another thread
                                               (some aborted), the others follow() its steps
    tp_worker.py cuda HEADS KV_HEADS OUT_DIR   a tiny random model on this rank's GPU over NCCL: logits and
                                               greedy tokens (CUDA graphs) of the shard and of the whole model
"""
import json
import os
import sys
import time

import torch

from llama_fast import LLM, SamplingParams, Tokenizer
from llama_fast.bench import peak_rss_bytes
from llama_fast.session import SessionRunner
from llama_fast.model_runner import ModelRunner
from llama_fast.tensor_parallel import LeaderEngine, follow, rank_device, shard_bytes, shard_model

from models import mapped_file, random_model
from tp_cases import PROMPT, lockstep_requests, tiny_config

torch.set_num_threads(1)


def logits_and_tokens(llm):
    runner = SessionRunner(llm.model, num_blocks=64, num_threads=1)
    seq = runner.add_sequence()
    logits = runner.step([(seq, PROMPT)], all_logits=True)
    tokens = [t for (t,) in llm.generate_ids([PROMPT], [SamplingParams(temperature=0.0)], 24, stop_at_eos=False)]
    return logits, tokens


def lockstep(llm, rank):
    """Rank 0: requests arrive from another thread while the engine steps, every third aborted soon after;
    -> each request's tokens. The others: follow until rank 0 stops them."""
    import threading

    if rank != 0:
        follow(llm, max_kv_tokens=1024)
        return {"followed": True}
    engine = LeaderEngine(llm, max_kv_tokens=1024)
    tokens, done = {}, threading.Event()

    def client():
        for i, (prompt, new) in enumerate(lockstep_requests()):
            rid = engine.add_request(prompt, max_new_tokens=new, ignore_eos=True, request_id=f"r{i}")
            time.sleep(0.01 * (i % 3))
            if i % 3 == 2:
                engine.abort(rid)
        done.set()

    thread = threading.Thread(target=client)
    thread.start()
    while not done.is_set() or engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason == "abort":
                tokens[out.request_id] = None
    thread.join()
    engine.stop_followers()
    return {"tokens": tokens, "blocks_in_use": engine.stats()["blocks_in_use"]}


def on_cuda(heads, kv_heads, world, tokenizer):
    """The shard and the whole model on this rank's GPU: their prompt logits (the model's forward, eager) and
    greedy tokens (decode steps replayed from CUDA graphs, the NCCL all-reduces captured in them)."""
    device = rank_device(torch.device("cuda"))
    whole = random_model(tiny_config(heads, kv_heads), seed=heads).to(device)
    shard = random_model(tiny_config(heads, kv_heads), seed=heads)
    shard_model(shard, world, device=device)
    result = {}
    for name, model in (("whole", whole), ("shard", shard)):
        runner = ModelRunner(model, num_blocks=64, graphs=False)
        seq = runner.add_sequence()
        result[f"{name}_logits"] = runner.step([(seq, PROMPT)], all_logits=True).float().cpu().tolist()
        runners = []
        result[f"{name}_tokens"] = [t for (t,) in LLM(model, tokenizer).generate_ids(
            [PROMPT], [SamplingParams(temperature=0.0)], 24, on_cache=runners.append, stop_at_eos=False)]
        result[f"{name}_captures"] = runners[0].graphs.captures
    return result


def main():
    mode, out = sys.argv[1], sys.argv[-1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tokenizer = Tokenizer.from_pretrained("smollm2-135m-instruct")
    if mode == "cuda":
        result = on_cuda(int(sys.argv[2]), int(sys.argv[3]), world, tokenizer)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        return
    if mode == "path":
        dtype = sys.argv[3] if len(sys.argv) == 5 else None
        llm = LLM.from_pretrained(sys.argv[2], dtype=dtype, tensor_parallel=world, tp_timeout_s=60, progress=False)
    else:
        heads, kv_heads = (int(a) for a in sys.argv[2:4]) if mode == "tiny" else (4, 2)
        model = random_model(tiny_config(heads, kv_heads), seed=heads)
        shard_model(model, world, timeout_s=5 if mode == "die" else 60)
        llm = LLM(model, tokenizer)
    if mode == "lockstep":
        result = lockstep(llm, rank)
    elif mode == "die":
        start = time.monotonic()
        try:
            for step, _ in enumerate(llm.generate_ids([PROMPT], [SamplingParams(temperature=0.0)], 200,
                                                      stop_at_eos=False)):
                if rank == 1 and step == 3:
                    os._exit(3)  # a rank dies mid-generation
            result = {"error": None}
        except Exception as err:  # the survivors: a clear error, within the collective timeout
            result = {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    else:
        logits, tokens = logits_and_tokens(llm)
        torch.save(logits, os.path.join(out, f"logits{rank}.pt"))
        eager = LLM(llm.model, llm.tokenizer, decode="eager")  # the model's forward, hooks and all
        torch.save(eager.logits(torch.tensor([PROMPT]))[0], os.path.join(out, f"eager{rank}.pt"))
        result = {"tokens": tokens, "weight_bytes": shard_bytes(llm.model),
                  "kv_heads": list(llm.model.tp.plan.kv_heads),
                  "mapped_from": sorted({mapped_file(p.data_ptr()) for p in llm.model.parameters()}),
                  "peak_rss_mib": peak_rss_bytes() / 2**20}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
