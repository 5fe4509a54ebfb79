"""One rank of the tensor-parallel tests: tests/test_tensor_parallel.py starts one process per rank with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun would, and reads what each writes.

    tp_worker.py tiny HEADS KV_HEADS OUT_DIR   a tiny random model: logits of a prompt, greedy tokens
    tp_worker.py smollm OUT_DIR                the embedded model
    tp_worker.py die OUT_DIR                   rank 1 exits during generation; the others must raise
"""
import json
import os
import resource
import sys
import time

import torch

from llama_fast import LLM, SamplingParams, Tokenizer
from llama_fast.session import SessionRunner
from llama_fast.tensor_parallel import shard_bytes, shard_model

from models import random_model
from tp_cases import PROMPT, tiny_config

torch.set_num_threads(1)


def logits_and_tokens(llm):
    runner = SessionRunner(llm.model, num_blocks=64, num_threads=1)
    seq = runner.add_sequence()
    logits = runner.step([(seq, PROMPT)], all_logits=True)
    tokens = [t for (t,) in llm.generate_ids([PROMPT], [SamplingParams(temperature=0.0)], 24, stop_at_eos=False)]
    return logits, tokens


def main():
    mode, out = sys.argv[1], sys.argv[-1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tokenizer = Tokenizer.from_pretrained("smollm2-135m-instruct")
    if mode == "smollm":
        llm = LLM.from_pretrained("smollm2-135m-instruct", tensor_parallel=world, tp_timeout_s=60, progress=False)
    else:
        heads, kv_heads = (int(a) for a in sys.argv[2:4]) if mode == "tiny" else (4, 2)
        model = random_model(tiny_config(heads, kv_heads), seed=heads)
        shard_model(model, world, timeout_s=5 if mode == "die" else 60)
        llm = LLM(model, tokenizer)
    if mode == "die":
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
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
