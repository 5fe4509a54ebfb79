"""GGUF block formats end to end (llama_fast/quant.py, the loaders' block path, `llama-fast quantize`): the
quantizers' bytes are ggml's layouts (gguf's dequantizers and llama.cpp read them back), a quantized file
loads mapped with no converted copy, another type is converted once into the cache, the model on its blocks
agrees with the same blocks dequantized (session and eager alike), llama.cpp loads what `quantize` writes
and computes the same logits from it, and bad files and dtypes raise errors that name the problem.
(tests/test_quant_kernels.py checks the C++ kernels themselves.)"""
import dataclasses
import os
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from llama_fast import LLM, _ext
from llama_fast.gguf_file import GGUFFile
from llama_fast.lite import LiteLLM
from llama_fast.loaders import load_checkpoint, quantize_gguf
from llama_fast.model import build_model
from llama_fast.paths import CheckpointError, resolve_model_path
from llama_fast.quant import QUANT_TYPES, QuantizedWeight, block_size, dequantize, quantize, storage_type

from models import benchmark_module, mapped_file, random_model

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="llama_fast._C is not built")

gguf_models = benchmark_module("gguf_models")

# Rows of 256 values (whole K-quant super-blocks) and of 768 (the FFN's down projection).
SMALL = dataclasses.replace(gguf_models.SHAPES["1b"], name="small", dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=64, ffn_dim=768, vocab_size=49152, max_seq_len=256)
PROMPT = "The capital of France is"
# Relative RMS error of a quantize -> dequantize round trip of N(0, 1) rows, per type (measured ~0.005 /
# 0.08 / 0.08 / 0.04 / 0.08 / 0.02: each bound leaves room above it).
ROUND_TRIP_RMS = {"Q8_0": 0.01, "Q4_0": 0.12, "Q4_1": 0.11, "Q5_0": 0.06, "Q4_K": 0.11, "Q6_K": 0.04}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small_f32(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "small.F32.gguf")
    gguf_models.write_gguf(path, SMALL, gguf_models.RandomWeights(gguf_models.weight_shapes(SMALL), seed=3), "F32")
    return path


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_quantizer_round_trip(qtype):
    """Fresh random rows (a zero row and a constant row among them) come back within the type's error, through
    gguf's reference dequantizer: the bytes are ggml's layout."""
    rng = np.random.default_rng(sum(map(ord, qtype)))
    values = rng.standard_normal((7, 3 * 256)).astype(np.float32)
    values[0], values[1] = 0.0, 0.75
    raw = quantize(values, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (7, quantize(values[:1], qtype).shape[1])
    back = dequantize(raw, qtype, values.shape)
    assert np.isfinite(back).all() and (back[0] == 0).all()
    np.testing.assert_allclose(back[1], 0.75, rtol=0.07)
    rms = np.linalg.norm(back[2:] - values[2:]) / np.linalg.norm(values[2:])
    assert rms < ROUND_TRIP_RMS[qtype], f"{qtype}: relative RMS error {rms:.4f}"


def test_k_quants_fall_back_on_partial_super_blocks():
    assert storage_type("Q4_K", 576) == "Q5_0" and storage_type("Q6_K", 576) == "Q8_0"
    assert storage_type("Q4_K", 1536) == "Q4_K" and storage_type("Q4_0", 576) == "Q4_0"
    with pytest.raises(ValueError, match="rows of 48 values cannot be stored as Q4_0"):
        storage_type("Q4_0", 48)
    with pytest.raises(ValueError, match="Q4_K needs rows whose length is a multiple of 256, got 576"):
        quantize(np.zeros((1, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match=r"a Q4_0 matrix of shape \(2, 64\) needs uint8 data of shape \(2, 36\)"):
        QuantizedWeight(torch.zeros(2, 40, dtype=torch.uint8), "Q4_0", (2, 64))


def test_native_load_maps_the_blocks(tmp_path):
    """The embedded model (Q4_1 matrices, a Q8_0 embedding) with dtype "native": every matrix a view of the
    file's blocks (Q/K rows reordered into private memory), nothing cached."""
    path = resolve_model_path("smollm2-135m-instruct")
    ckpt = load_checkpoint(path, progress=False, dtype="native")
    assert ckpt.tensor_types == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    emb, w2 = ckpt.weights["tok_embeddings.weight"], ckpt.weights["layers.3.feed_forward.w2.weight"]
    assert (emb.qtype, w2.qtype) == ("Q8_0", "Q4_1") and w2.shape == (576, 1536)
    assert mapped_file(emb.data.data_ptr()) == os.path.abspath(path) == mapped_file(w2.data.data_ptr())
    assert mapped_file(ckpt.weights["layers.0.attention.wq.weight"].data.data_ptr()) != os.path.abspath(path)
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def native_and_dequantized():
    """The embedded model on its blocks, and the same blocks dequantized to fp32 (the float path)."""
    native = LLM.from_pretrained("smollm2-135m-instruct", dtype="native", progress=False)
    weights = {name: w.dequantize() if isinstance(w, QuantizedWeight) else w
               for name, w in load_checkpoint("smollm2-135m-instruct", progress=False, dtype="native").weights.items()}
    widened = LLM(build_model(native.config, weights, dtype=torch.float32), native.tokenizer)
    return native, widened


def test_blocks_match_their_dequantized_weights(native_and_dequantized):
    """Logits from the blocks are those of the dequantized weights up to the activations' int8 rounding (as
    llama.cpp multiplies these types: ~1% per product, compounding over 30 layers; measured median 0.04, max
    0.13, where llama.cpp's own logits on this file are 0.03 / 0.17 from ours and 0.06 / 0.28 from fp32's);
    the C++ session's greedy text is the eager model's."""
    native, widened = native_and_dequantized
    ids = torch.tensor([native.tokenizer.encode("Once upon a time, in a land far away, there lived")])
    want, got = widened.logits(ids)[0], native.logits(ids)[0]
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert err.median() < 0.07 and err.max() < 0.25, f"relative error median {err.median():.4f}, max {err.max():.4f}"
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= 0.9, f"top-1 agrees on {agree:.0%} of positions"
    cpp = LLM(native.model, native.tokenizer, decode="cpp").generate(PROMPT, max_new_tokens=16).text
    assert LLM(native.model, native.tokenizer, decode="eager").generate(PROMPT, max_new_tokens=16).text == cpp


def test_other_type_is_converted_once_into_the_cache(tmp_path):
    """dtype q8_0 on the Q4_1 file: converted into a GGUF in the cache, mapped from there on the next load."""
    first = load_checkpoint("smollm2-135m-instruct", progress=False, dtype="q8_0")
    assert first.tensor_types == {"Q8_0": 211, "F32": 61}
    entries = list((tmp_path / "cache").rglob("weights.gguf"))
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    again = load_checkpoint("smollm2-135m-instruct", progress=False, dtype="q8_0")
    assert entries[0].stat().st_mtime_ns == stamp
    w = again.weights["layers.0.feed_forward.w1.weight"]
    assert w.qtype == "Q8_0" and mapped_file(w.data.data_ptr()) == str(entries[0])
    # A damaged copy (cut short: a new file, as the old one is mapped) is left by the fast start and made again.
    (tmp_path / "cut").write_bytes(entries[0].read_bytes()[:4096])
    os.replace(tmp_path / "cut", entries[0])
    assert "damaged" in LiteLLM._from_gguf(resolve_model_path("smollm2-135m-instruct"), "q8_0", None, 0)
    third = load_checkpoint("smollm2-135m-instruct", progress=False, dtype="q8_0")
    assert torch.equal(third.weights["layers.0.feed_forward.w1.weight"].data, w.data)


def test_quantized_file_loads_in_llama_cpp_with_the_same_logits(small_f32, tmp_path):
    """`llama-fast quantize` writes a file llama.cpp loads; both engines' logits on it agree (each quantizes
    its activations per block of 32 to int8) far closer than either does to the float weights."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = str(tmp_path / "small.Q4_0.gguf")
    cli = os.path.join(os.path.dirname(sys.executable), "llama-fast")
    done = subprocess.run([cli, "quantize", small_f32, out, "--type", "q4_0"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tensors 15 Q4_0, 6 F32" in done.stdout
    ours = LLM.from_pretrained(out, dtype="native", progress=False)
    ids = ours.tokenizer.encode(PROMPT)
    peer = llama_cpp.Llama(out, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    peer.eval(ids)
    theirs = torch.tensor(np.array(peer.scores[:len(ids)]), dtype=torch.float32)
    got = ours.logits(torch.tensor([ids]))[0]
    err = ((got - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max()
    assert err < 0.02, f"relative error against llama.cpp {err:.4f}"


def test_k_quant_file_reports_its_mix(small_f32, tmp_path):
    counts = quantize_gguf(small_f32, str(tmp_path / "small.Q4_K.gguf"), "q4_k", progress=False)
    assert counts == {"Q4_K": 15, "F32": 6}  # (rope_freqs among the F32)
    counts = quantize_gguf("smollm2-135m-instruct", str(tmp_path / "smol.Q4_K.gguf"), "q4_k", progress=False)
    assert counts == {"Q5_0": 181, "Q4_K": 30, "F32": 61}  # 576-wide rows take llama.cpp's fallback


def test_quantize_refuses_bad_arguments(small_f32, tmp_path):
    with pytest.raises(ValueError, match="--type must be one of q8_0, q4_0, q4_1, q4_k, q6_k, got 'int4'"):
        quantize_gguf(small_f32, str(tmp_path / "x.gguf"), "int4")
    with pytest.raises(ValueError, match="the output must not be the input file"):
        quantize_gguf(small_f32, small_f32, "q8_0")
    with pytest.raises(CheckpointError, match="quantize reads a .gguf file"):
        quantize_gguf(str(tmp_path), str(tmp_path / "x.gguf"), "q8_0")
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match="out is a directory: name the .gguf file to write"):
        quantize_gguf(small_f32, str(tmp_path / "out"), "q8_0")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="fifo exists and is not a regular file"):
        quantize_gguf(small_f32, str(tmp_path / "fifo"), "q8_0")
    assert stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    with pytest.raises(FileNotFoundError, match=r"x.gguf: the folder .*nowhere does not exist"):
        quantize_gguf(small_f32, str(tmp_path / "nowhere" / "x.gguf"), "q8_0")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob("*.part"))


def test_a_file_replaced_while_it_loads_caches_nothing_under_the_new_files_key(small_f32, tmp_path, monkeypatch):
    """A download finishing by rename while the model loads: the conversion of the file read would be cached
    under the key of the file now at the path (the key is read from the path), and served for it ever after.
    Refused instead; the new file then loads as itself."""
    import shutil

    from llama_fast import loaders
    from llama_fast.paths import gguf_cache_entry

    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copy(small_f32, path)
    shutil.copy(small_f32, tmp_path / "new.gguf")
    config = loaders.gguf_config

    def config_then_replaced(gguf):
        if (tmp_path / "new.gguf").exists():
            os.replace(tmp_path / "new.gguf", path)   # (another inode at the path now)
        return config(gguf)

    monkeypatch.setattr(loaders, "gguf_config", config_then_replaced)
    with pytest.raises(CheckpointError, match="model.gguf was replaced or changed while it was being loaded"):
        load_checkpoint(str(path), progress=False, dtype="q8_0")
    assert gguf_cache_entry(str(path), "blocks:q8_0") is None
    monkeypatch.setattr(loaders, "gguf_config", config)
    assert load_checkpoint(str(path), progress=False, dtype="q8_0") and gguf_cache_entry(str(path), "blocks:q8_0")


def _header_field(data: bytes, tensor: str) -> int:
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name)
    return at + 8 + len(name)


def test_k_quant_rows_must_be_whole_super_blocks(small_f32, tmp_path):
    path = tmp_path / "small.Q4_K.gguf"
    quantize_gguf(small_f32, str(path), "q4_k", progress=False)
    data = bytearray(path.read_bytes())
    at = _header_field(data, "blk.0.ffn_up.weight")
    struct.pack_into("<Q", data, at + 4, 288)  # ne0: 288 values per row
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"bad.gguf: tensor blk.0.ffn_up.weight of type Q4_K has rows of "
                                              r"\[288\] values, not a multiple of its block of 256"):
        load_checkpoint(str(bad), progress=False, dtype="native")


def test_cuda_formats_on_cpu_name_the_cpu_format():
    with pytest.raises(ValueError, match="dtype int8 is a CUDA weight format; on the CPU use q8_0"):
        LLM.from_pretrained("smollm2-135m-instruct", dtype="int8", progress=False)
    with pytest.raises(ValueError, match="dtype int4 is a CUDA weight format; on the CPU use q4_0"):
        LLM.from_pretrained("smollm2-135m-instruct", dtype="int4", progress=False)


def test_a_block_matrix_is_cut_between_its_blocks(native_and_dequantized):
    """QuantizedWeight.part, how a tensor-parallel rank takes its slice of a matrix kept in its blocks: rows
    and whole blocks of columns, the values those of the whole matrix; a cut through a block is refused."""
    from llama_fast._ext import ext
    from llama_fast.quant import row_bytes

    w = native_and_dequantized[0].model.layers[0].attention.wo.weight  # Q4_1, 576 x 576

    def values(q):
        return ext().cpu_dequantize(q.data.contiguous(), q.qtype, q.shape[1])

    part = w.part(slice(8, 19), range(64, 160))
    assert part.shape == (11, 96) and part.data.data_ptr() == w.data[8].data_ptr() + row_bytes("Q4_1", 64)  # a view
    assert torch.equal(values(part), values(w)[8:19, 64:160])
    rows = w.part(torch.tensor([3, 1]))
    assert torch.equal(values(rows), values(w)[[3, 1]])
    with pytest.raises(ValueError, match=r"blocks of 32 values: columns \[16, 64\) would cut a block"):
        w.part(None, range(16, 64))
    # At tensor_parallel=9 a rank's third of w2's columns (170 of 1536) is not whole blocks: named, refused.
    from llama_fast.tensor_parallel import plan_shard, shard_weights

    native = native_and_dequantized[0]
    state = {**native.model.state_dict(), **native.model.quantized_weights()}
    with pytest.raises(ValueError, match=r"^layers.0.feed_forward.w2.weight: a Q4_1 matrix .* would cut a block, "
                                         r"at tensor_parallel=9"):
        shard_weights(state, native.config, plan_shard(native.config, 9, 1))


def test_block_size_table():
    assert [block_size(t) for t in QUANT_TYPES] == [32, 32, 32, 32, 256, 256]
    assert GGUFFile(resolve_model_path("smollm2-135m-instruct")).metadata_types["general.file_type"] == (4, None)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cuda_weight_only_formats_run_in_the_model(kind):
    """pack_weights (what dtype int8 / int4 does on CUDA after loading) puts every projection in the Triton
    kernels' format; the model's logits are those of the same packed values dequantized (run here by the
    Triton interpreter on CPU tensors: no GPU)."""
    from llama_fast.cache import StaticKVCache
    from llama_fast.config import ModelConfig
    from llama_fast.kernels import dequantize_int4, dequantize_int8
    from llama_fast.model import pack_weights

    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=97, max_seq_len=64,
                      tie_embeddings=False)
    packed, widened = random_model(cfg, seed=2), random_model(cfg, seed=2)
    pack_weights(packed, kind)
    names = set(packed.quantized_weights())
    assert len(names) == 7 * cfg.n_layers + 1 and "output.weight" in names and "tok_embeddings.weight" not in names
    with torch.no_grad():
        for name, w in packed.quantized_weights().items():
            values = (dequantize_int8(w.qweight, w.scales) if kind == "int8"
                      else dequantize_int4(w.packed, w.scales, w.zeros, w.group_size))
            widened.get_parameter(name).copy_(values)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def logits(model):
        return model(ids, StaticKVCache(cfg.n_layers, 2, 9, cfg.n_kv_heads, cfg.head_dim, dtype=torch.float32,
                                        device="cpu"))

    torch.testing.assert_close(logits(packed), logits(widened), rtol=1e-4, atol=1e-4)


def test_fast_start_runs_the_blocks(native_and_dequantized, monkeypatch):
    """The torch-free fast start maps the same blocks and runs the same session: the engine's text. A type
    the file needs converting to waits for the engine's cached copy, then maps that."""
    from llama_fast.lite import LiteLLM

    native = native_and_dequantized[0]
    lite = LiteLLM.open("smollm2-135m-instruct", "native")
    assert lite is not None and lite.tensors["layers.0.feed_forward.w1.weight"][1:] == ("Q4_1", [1536, 576])
    assert "".join(lite.stream(PROMPT, max_new_tokens=16)) == native.generate(PROMPT, max_new_tokens=16).text
    assert LiteLLM.open("smollm2-135m-instruct", "q8_0") is None
    engine = LLM.from_pretrained("smollm2-135m-instruct", dtype="q8_0", progress=False)
    lite = LiteLLM.open("smollm2-135m-instruct", "q8_0")
    assert "".join(lite.stream(PROMPT, max_new_tokens=16)) == engine.generate(PROMPT, max_new_tokens=16).text
    # A cached copy in other types than asked for (here q8_0's, found for q4_0) is not taken.
    from llama_fast import lite as lite_module
    q8_entry = lite_module.gguf_cache_entry(resolve_model_path("smollm2-135m-instruct"), "blocks:q8_0")
    monkeypatch.setattr(lite_module, "gguf_cache_entry", lambda path, key: q8_entry)
    assert LiteLLM.open("smollm2-135m-instruct", "q4_0") is None


@pytest.mark.parametrize("gguf_type, want", [("F16", {"F16": 211, "F32": 61}), ("Q8_0", {"Q8_0": 211, "F32": 61})])
def test_benchmark_copies_of_the_embedded_model(tmp_path, monkeypatch, gguf_type, want):
    """llama_fast.bench.gguf_copy, the file both engines of the decode benchmark read: floats rewritten in
    place, block formats by `quantize`; norms stay F32."""
    from llama_fast import bench

    monkeypatch.setattr(bench, "CACHE", str(tmp_path))
    path = bench.gguf_copy(gguf_type)
    assert os.path.dirname(path) == str(tmp_path)
    types = [t.type for t in GGUFFile(path).tensors.values()]
    assert {t: types.count(t) for t in set(types)} == want
    assert bench.gguf_copy("Q4_1") == resolve_model_path("smollm2-135m-instruct")
