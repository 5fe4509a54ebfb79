"""GGUF files read in place (llama_fast/gguf_file.py): the scale benchmark's writer (benchmarks/gguf_models.py)
gives files that load and generate as the same weights built in memory, mapped without a cache entry,
and bad files raise errors naming the file, the tensor and its type."""
import dataclasses
import os
import struct

import pytest
import torch

from llama_fast import LLM, rope
from llama_fast.config import UnsupportedModelError
from llama_fast.gguf_file import GGUFFile, half_to_interleaved, interleaved_to_half
from llama_fast.lite import LiteLLM
from llama_fast.loaders import load_checkpoint
from llama_fast.paths import CheckpointError
from llama_fast.tokenizer import Tokenizer

from models import benchmark_module, mapped_file, random_model

gguf_models = benchmark_module("gguf_models")

# Llama-3.2-1B's shape, shrunk; the vocabulary is the writer's smallest (the embedded tokenizer's).
TINY = dataclasses.replace(gguf_models.SHAPES["1b"], name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           head_dim=16, ffn_dim=96, vocab_size=49152, max_seq_len=256)
PROMPT = "The capital of France is"


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own: mapped loads must leave it empty."""
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    yield
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the model built in memory (fp32), the same weights written as F32, F16 and BF16 GGUFs)."""
    model = random_model(TINY, seed=4)
    weights = {name: t.numpy() for name, t in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("gguf")
    paths = {}
    for kind in ("F32", "F16", "BF16"):
        paths[kind] = str(folder / f"tiny.{kind}.gguf")
        gguf_models.write_gguf(paths[kind], TINY, weights.__getitem__, kind)
    return model, paths


def test_qk_reorder_round_trips():
    w = torch.arange(4 * 8 * 3).reshape(32, 3)
    assert torch.equal(interleaved_to_half(half_to_interleaved(w, 4), 4), w)
    assert not torch.equal(half_to_interleaved(w, 4), w)


def test_llama3_rope_scaling_survives_the_file(tiny):
    config = load_checkpoint(tiny[1]["F32"], progress=False).config
    assert config.rope_scaling["rope_type"] == "freq_factors"
    got = rope.inv_freq(TINY.head_dim, TINY.rope_theta, config.rope_scaling)
    want = rope.inv_freq(TINY.head_dim, TINY.rope_theta, TINY.rope_scaling)
    assert got == pytest.approx(want, rel=1e-6) and got != rope.inv_freq(TINY.head_dim, TINY.rope_theta)
    assert rope.describe(config.rope_scaling) == "freq_factors (8 divisors, 1 to 32)"


def test_written_file_generates_as_the_weights_in_memory(tiny):
    model, paths = tiny
    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(paths["F32"]).metadata, paths["F32"])
    in_memory = LLM(model, tokenizer)
    mapped = LLM.from_pretrained(paths["F32"], dtype="float32", progress=False)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    # (not bitwise: the file's RoPE divisors are fp32, so an inverse frequency may differ in its last bit)
    assert torch.allclose(mapped.logits(ids), in_memory.logits(ids), atol=1e-4)
    text = in_memory.generate(PROMPT, max_new_tokens=12).text
    assert mapped.generate(PROMPT, max_new_tokens=12).text == text
    assert "".join(LiteLLM.open(paths["F32"], "float32").stream(PROMPT, max_new_tokens=12)) == text


def test_bf16_file_streams_the_engines_text(tiny):
    path = tiny[1]["BF16"]
    engine = LLM.from_pretrained(path, dtype="bfloat16", progress=False)
    lite = LiteLLM.open(path, "bfloat16")
    assert "".join(lite.stream(PROMPT, max_new_tokens=12)) == engine.generate(PROMPT, max_new_tokens=12).text
    assert LiteLLM.open(path, "float32") is None  # (its matrices are BF16: the engine casts them)


def test_f16_file_is_cast_once_in_memory(tiny):
    """No F16 kernels: LLM casts an F16 file's tensors to the dtype asked for; the fast start declines it."""
    model, paths = tiny
    rounded = random_model(TINY, seed=4)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(paths["F16"]).metadata, paths["F16"])
    mapped = LLM.from_pretrained(paths["F16"], dtype="float32", progress=False)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    assert torch.allclose(mapped.logits(ids), LLM(rounded, tokenizer).logits(ids), atol=1e-4)
    assert LiteLLM.open(paths["F16"], "float32") is None


def test_tensors_are_views_of_the_mapped_file(tiny):
    path = tiny[1]["BF16"]
    weights = load_checkpoint(path, progress=False).weights
    assert mapped_file(weights["layers.1.feed_forward.w2.weight"].data_ptr()) == os.path.abspath(path)
    assert mapped_file(weights["tok_embeddings.weight"].data_ptr()) == os.path.abspath(path)
    # Q/K rows were reordered: private memory.
    assert mapped_file(weights["layers.0.attention.wq.weight"].data_ptr()) != os.path.abspath(path)
    model = LLM.from_pretrained(path, dtype="bfloat16", progress=False).model
    assert mapped_file(model.layers[0].feed_forward.w1.weight.data_ptr()) == os.path.abspath(path)


@pytest.mark.parametrize("kind", ["F32", "BF16"])
@pytest.mark.parametrize("world", [2, 4])
def test_a_tensor_parallel_shard_of_a_mapped_file_keeps_its_row_slices_mapped(tiny, kind, world):
    """Each rank's shard of a mapped file equals the shard of the same weights in memory; the slices that are
    ranges of rows stay views of the map (only the pages a rank reads get loaded), the column slices of wo
    and w2 are copies, and so are Q and K's rows, reordered at load."""
    from llama_fast.tensor_parallel import plan_shard, shard_weights

    path = os.path.abspath(tiny[1][kind])
    ckpt = load_checkpoint(path, progress=False)
    in_memory = {name: w.clone() for name, w in ckpt.weights.items()}
    for rank in range(world):
        plan = plan_shard(ckpt.config, world, rank)
        got, want = shard_weights(dict(ckpt.weights), ckpt.config, plan), shard_weights(dict(in_memory), ckpt.config, plan)
        assert got.keys() == want.keys()
        for name, w in got.items():
            assert torch.equal(w, want[name]), name
            assert mapped_file(want[name].data_ptr()) != path, name  # weights in memory: copies, the full ones freed
            copied = name.endswith(("wo.weight", "w2.weight", "wq.weight", "wk.weight"))
            assert (mapped_file(w.data_ptr()) == path) != copied, name
        assert ckpt.weights["layers.0.feed_forward.w2.weight"].sum().isfinite()  # dropped pages read back


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shard_in_another_dtype_converts_only_the_shard(tiny, dtype):
    """An F16 file run in fp32 or bf16: each rank's shard is the cast of the in-memory shard; every tensor
    stored in another dtype (the F16 matrices; the F32 norms in bf16) is a copy of its own, the others stay
    views of the map, and the process holds no more than the shard in memory."""
    from llama_fast.tensor_parallel import bytes_in_memory, plan_shard, shard_weights

    path = os.path.abspath(tiny[1]["F16"])
    ckpt = load_checkpoint(path, progress=False)
    in_memory = {name: w.clone() for name, w in ckpt.weights.items()}
    plan = plan_shard(ckpt.config, 2, 1)
    got = shard_weights(dict(ckpt.weights), ckpt.config, plan, dtype)
    want = shard_weights(in_memory, ckpt.config, plan)
    assert got.keys() == want.keys()
    copies = 0
    for name, w in got.items():
        assert w.dtype == dtype and torch.equal(w, want[name].to(dtype)), name
        copied = want[name].dtype != dtype
        assert (mapped_file(w.data_ptr()) == path) != copied, name
        copies += w.nbytes if copied else 0
    assert bytes_in_memory(got) == copies
    assert bytes_in_memory(ckpt.weights) < copies  # (Q/K, reordered at load)


# ---- bad files ----

def _header_field(data: bytes, tensor: str) -> int:
    """The byte offset of `tensor`'s n_dims in the header's tensor infos."""
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name)
    return at + 8 + len(name)


def test_truncated_file_names_the_tensor_and_type(tiny, tmp_path):
    data = open(tiny[1]["BF16"], "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut.gguf: tensor output_norm.weight of type F32 .* the end of the file"):
        load_checkpoint(str(cut), progress=False)
    cut.write_bytes(data[:2000])  # inside the vocabulary
    with pytest.raises(CheckpointError, match="cut.gguf: not a readable GGUF file"):
        load_checkpoint(str(cut), progress=False)


@pytest.mark.parametrize("kind, dims, needs", [
    ("BF16", (TINY.dim, TINY.n_heads * TINY.head_dim * 2), r"\(128, 64\) needs 16384 bytes, 8192 are there"),  # twice the rows
    ("F32", (2**32, 2**32), rf"\(4294967296, 4294967296\) needs {2**66} bytes"),  # a size that wraps 2**64 to 0
])
def test_tensor_larger_than_its_bytes_names_it(tiny, tmp_path, kind, dims, needs):
    data = bytearray(open(tiny[1][kind], "rb").read())
    struct.pack_into("<QQ", data, _header_field(data, "blk.0.attn_q.weight") + 4, *dims)  # (ne0, ne1)
    bad = tmp_path / "big.gguf"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"big.gguf: tensor blk.0.attn_q.weight of type {kind} and shape {needs}"):
        load_checkpoint(str(bad), progress=False)


def test_unknown_type_id_names_it(tiny, tmp_path):
    data = bytearray(open(tiny[1]["F32"], "rb").read())
    at = _header_field(data, "blk.1.ffn_up.weight")
    struct.pack_into("<I", data, at + 4 + 2 * 8, 99)
    bad = tmp_path / "odd.gguf"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError, match="odd.gguf: tensor blk.1.ffn_up.weight has unknown type id 99"):
        load_checkpoint(str(bad), progress=False)
    with pytest.raises(CheckpointError, match="odd.gguf: tensor blk.1.ffn_up.weight has unknown type id 99"):
        LiteLLM.open(str(bad), "float32")


def rewritten(src: str, dst, changes: dict) -> str:
    """The GGUF at `src` written to `dst` with its metadata changed: key -> (value, GGUF value type)."""
    import numpy as np

    from llama_fast.gguf_write import write_gguf

    gguf = GGUFFile(src)
    metadata = {key: (value, *gguf.metadata_types[key]) for key, value in gguf.metadata.items()}
    metadata.update({key: (value, kind, None) for key, (value, kind) in changes.items()})
    write_gguf(str(dst), "llama", metadata, [(t.name, t.shape, t.type, lambda t=t: np.frombuffer(t.data, np.uint8))
                                             for t in gguf.tensors.values()])
    return str(dst)


U32, F32, BOOL, STR = 4, 6, 7, 8  # GGUF value types


@pytest.mark.parametrize("value, kind", [(0, U32), (3, U32), ("32", STR)])
def test_alignment_that_is_not_a_power_of_two_names_it(tiny, tmp_path, value, kind):
    bad = rewritten(tiny[1]["F32"], tmp_path / "align.gguf", {"general.alignment": (value, kind)})
    with pytest.raises(CheckpointError, match=rf"align.gguf: general.alignment must be a power of two, got {value!r}"):
        load_checkpoint(bad, progress=False)


def test_tensor_twice_in_the_file_names_it(tiny, tmp_path):
    data = open(tiny[1]["F32"], "rb").read()
    name = b"blk.0.attn_q.weight"
    bad = tmp_path / "twice.gguf"
    bad.write_bytes(data.replace(name, b"blk.0.attn_k.weight", 1))  # (the header holds each name once)
    with pytest.raises(CheckpointError, match="twice.gguf: tensor blk.0.attn_k.weight is in the file twice"):
        load_checkpoint(str(bad), progress=False)


@pytest.mark.parametrize("key, value, kind, message", [
    ("llama.attention.head_count", 0, U32, "llama.attention.head_count must be a positive int, got 0"),
    ("llama.attention.head_count", 4.0, F32, "llama.attention.head_count must be a positive int, got 4.0"),
    ("llama.attention.head_count", True, BOOL, "llama.attention.head_count must be a positive int, got True"),
    ("llama.block_count", 2.0, F32, "llama.block_count must be a positive int, got 2.0"),
    ("llama.embedding_length", "64", STR, "llama.embedding_length must be a positive int, got '64'"),
    ("llama.feed_forward_length", 96.0, F32, "llama.feed_forward_length must be a positive int, got 96.0"),
    ("llama.vocab_size", 49152.0, F32, "llama.vocab_size must be a positive int, got 49152.0"),
    ("llama.context_length", "256", STR, "llama.context_length must be a positive int, got '256'"),
    ("llama.rope.freq_base", "x", STR, "llama.rope.freq_base must be a positive finite number, got 'x'"),
    ("llama.attention.layer_norm_rms_epsilon", "x", STR,
     "llama.attention.layer_norm_rms_epsilon must be a positive finite number, got 'x'"),
    ("tokenizer.ggml.eos_token_id", 10**6, U32, r"tokenizer.ggml.eos_token_id must be a token id in \[0, 49152\), "
                                                r"got 1000000"),
])
def test_metadata_of_the_wrong_type_or_value_names_the_file_and_key(tiny, tmp_path, key, value, kind, message):
    bad = rewritten(tiny[1]["F32"], tmp_path / "meta.gguf", {key: (value, kind)})
    with pytest.raises(CheckpointError, match="meta.gguf: " + message) as info:
        load_checkpoint(bad, progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="meta.gguf: " + message):
        LiteLLM.open(bad, "float32")


@pytest.mark.parametrize("key, value, message", [
    # Q/K rows are reordered by head: a head count they do not fit is named before.
    ("llama.attention.head_count", 6, r"tensor layers.0.attention.wq.weight has shape \(64, 64\), expected \(96, 64\)"),
    ("llama.block_count", 1, r"tensors the config has no place for: \['layers.1.attention.wk.weight'"),
])
def test_tensors_that_do_not_fit_the_metadata_name_them(tiny, tmp_path, key, value, message):
    bad = rewritten(tiny[1]["F32"], tmp_path / "meta.gguf", {key: (value, U32)})
    with pytest.raises(CheckpointError, match="meta.gguf: " + message):
        load_checkpoint(bad, progress=False)
    with pytest.raises(CheckpointError, match="meta.gguf: " + message):   # the fast start checks alike
        LiteLLM.open(bad, "float32")


def test_rope_scaling_the_model_does_not_run_is_refused(tiny, tmp_path):
    bad = rewritten(tiny[1]["F32"], tmp_path / "yarn.gguf", {"llama.rope.scaling.type": ("yarn", STR)})
    with pytest.raises(UnsupportedModelError, match="yarn.gguf: llama.rope.scaling.type 'yarn' is not supported"):
        load_checkpoint(bad, progress=False)
