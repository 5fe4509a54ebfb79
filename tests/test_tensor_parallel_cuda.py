"""Tensor parallelism on CUDA over NCCL, on a GPU machine (benchmarks/gpu_suite.sh runs it): each rank on its
own GPU (tests/tp_worker.py, mode cuda), the decode steps replayed from CUDA graphs that capture the NCCL
all-reduces. One rank (a one-rank NCCL group, where the all-reduce still runs) on any GPU; two where the
machine has two."""
import pytest
import torch

from test_tensor_parallel import launch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and NCCL)")


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_model_on_cuda_matches_the_whole_model_under_graph_capture(tmp_path, world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    for rank, r in enumerate(launch(world, ["cuda", "8", "4"], tmp_path)):
        whole, shard = torch.tensor(r["whole_logits"]), torch.tensor(r["shard_logits"])
        assert torch.allclose(shard, whole, atol=1e-4, rtol=1e-4), f"rank {rank}: {(shard - whole).abs().max()}"
        assert r["shard_tokens"] == r["whole_tokens"], rank
        assert r["shard_captures"] >= 1 and r["whole_captures"] >= 1, r
