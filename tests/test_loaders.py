"""Loaders: tiny random HF and Meta checkpoints against transformers, GGUF details, and bad files."""
import json
import os
import shutil

import pytest
import torch

from llama_fast import LLM, SpanBias
from llama_fast.config import ModelConfig, UnsupportedModelError
from llama_fast.lite import LiteLLM
from llama_fast.loaders import CheckpointError, load_checkpoint, resolve_model_path
from llama_fast.window import checkpoint_window

import checkpoints

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def tiny_hf_model(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # random norms too, so a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module")
def smollm_tokenizer_dir(tmp_path_factory, hf_smollm):
    """The embedded model's tokenizer saved as a HF directory (tokenizer.json + tokenizer_config.json)."""
    folder = tmp_path_factory.mktemp("tok")
    hf_smollm[1].save_pretrained(folder)
    return folder


def save_hf(model, folder, tokenizer_dir, **kwargs):
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), folder)
    return folder


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 57, 2606, 253, 1345, 30, 314, 2841, 28, 4000, 49151]])


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, "rope_theta": 500000.0},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"num_key_value_heads": 4},
], ids=["untied", "tied", "llama3-rope", "linear-rope", "mha"])
def test_hf_directory_matches_transformers(tmp_path, smollm_tokenizer_dir, overrides):
    model = tiny_hf_model(**overrides)
    save_hf(model, tmp_path, smollm_tokenizer_dir)
    llm = LLM.from_pretrained(str(tmp_path), progress=False)
    assert (llm.logits(IDS) - hf_logits(model, IDS)).abs().max().item() <= 1e-4
    assert llm.tokenizer.encode("I love") == [57, 2606]


def test_hf_directory_in_a_block_format(tmp_path, monkeypatch, smollm_tokenizer_dir):
    """dtype q8_0 on a float checkpoint: quantised once into a GGUF in the cache (Q/K back in GGUF's layout
    and out again), then mapped: the logits are transformers' up to Q8_0's rounding."""
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_hf_model(seed=2)
    save_hf(model, tmp_path / "hf", smollm_tokenizer_dir)
    llm = LLM.from_pretrained(str(tmp_path / "hf"), dtype="q8_0", progress=False)
    assert {w.qtype for w in llm.model.quantized_weights().values()} == {"Q8_0"}
    want = hf_logits(model, IDS)
    assert ((llm.logits(IDS) - want).norm() / want.norm()).item() < 0.02
    entry = next((tmp_path / "cache").rglob("weights.gguf"))
    again = load_checkpoint(str(tmp_path / "hf"), progress=False, dtype="q8_0")
    assert again.tensor_types == {"Q8_0": 16, "F32": 5} and next((tmp_path / "cache").rglob("weights.gguf")) == entry


def test_hf_sharded_safetensors(tmp_path, smollm_tokenizer_dir):
    model = tiny_hf_model(seed=1)
    save_hf(model, tmp_path, smollm_tokenizer_dir, max_shard_size="2MB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    llm = LLM.from_pretrained(str(tmp_path), progress=False)
    assert (llm.logits(IDS) - hf_logits(model, IDS)).abs().max().item() <= 1e-4


def half_to_interleaved(w, n_heads):
    """HF rotate-half Q/K rows back to Meta's interleaved pairs (the inverse of the loaders' permutation)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def save_meta(model, folder, spm_model_file, shards=1):
    """Writes model (a transformers LlamaForCausalLM) as a Meta checkpoint: params.json, consolidated.*.pth."""
    c = model.config
    sd = model.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": half_to_interleaved(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": half_to_interleaved(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "multiple_of": 32,
              "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"]}
    checkpoints.save_meta(meta, params, folder, spm_model_file, files=shards)


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_directory_matches_transformers(tmp_path, spm_model_file, shards):
    # Meta's FeedForward sizing with multiple_of=32: int(2 * 4 * 64 / 3) = 170 -> 192.
    model = tiny_hf_model(seed=2, vocab_size=400, intermediate_size=192)
    save_meta(model, tmp_path, spm_model_file, shards=shards)
    llm = LLM.from_pretrained(str(tmp_path), progress=False)
    ids = torch.tensor([[1, 5, 17, 42, 99, 399, 3, 64]])
    assert (llm.logits(ids) - hf_logits(model, ids)).abs().max().item() <= 1e-4
    assert llm.tokenizer.kind == "sentencepiece" and llm.tokenizer.bos_id == 1
    text = "To be, or not to be"
    assert llm.tokenizer.decode(llm.tokenizer.encode(text), skip_special=True) == text


def test_gguf_metadata_and_types():
    ckpt = load_checkpoint("smollm2-135m-instruct", progress=False)
    c = ckpt.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.tie_embeddings
    assert ckpt.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert load_checkpoint("llama-base", progress=False).path == ckpt.path


def test_gguf_tensor_types_roundtrip(tmp_path):
    """F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors written with gguf's writer read back as their dequantised values."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q, GGUFWriter, quants

    from llama_fast.gguf_file import GGUFFile
    from llama_fast.loaders import _dequantised

    rng = np.random.default_rng(0)
    values = rng.standard_normal((8, 64)).astype(np.float32)
    path = str(tmp_path / "t.gguf")
    writer = GGUFWriter(path, "llama")
    expected = {}
    for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
        data = quants.quantize(values, qtype)
        writer.add_tensor(f"t_{qtype.name}", data, raw_dtype=qtype)
        expected[qtype.name] = quants.dequantize(data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in GGUFFile(path).tensors.values():
        got = _dequantised(t).float()
        assert got.shape == (8, 64)
        want = torch.from_numpy(expected[t.type].reshape(8, 64)).float()
        assert torch.equal(got, want), t.type
        tolerance = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.05, "Q4_0": 0.5, "Q4_1": 0.5}[t.type]
        assert (got - torch.from_numpy(values)).abs().max() <= tolerance + 1e-6


# ---- bad input ----

def test_missing_path_and_unknown_name():
    with pytest.raises(CheckpointError, match="no such model or path"):
        resolve_model_path("/nonexistent/model.gguf")
    with pytest.raises(CheckpointError, match="built-in names"):
        LLM.from_pretrained("not-a-model", progress=False)


def test_truncated_gguf(tmp_path):
    data = open(resolve_model_path("smollm2-135m-instruct"), "rb").read(100_000)
    (tmp_path / "cut.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_checkpoint(str(tmp_path / "cut.gguf"), progress=False)


def test_corrupt_gguf(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_checkpoint(str(tmp_path / "junk.gguf"), progress=False)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(CheckpointError, match="text.gguf"):
        load_checkpoint(str(tmp_path / "text.gguf"), progress=False)


def test_unsupported_tensor_type_and_architecture(tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType as Q, GGUFWriter, quants

    path = str(tmp_path / "q5_1.gguf")
    writer = GGUFWriter(path, "llama")
    for key, value in [("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                       ("attention.head_count", 2), ("context_length", 64), ("vocab_size", 16)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", quants.quantize(np.ones((16, 32), np.float32), Q.Q5_1), raw_dtype=Q.Q5_1)
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(CheckpointError, match="type Q5_1, supported: F32, F16, BF16, Q8_0"):
        load_checkpoint(path, progress=False)

    path = str(tmp_path / "gpt2.gguf")
    writer = GGUFWriter(path, "gpt2")
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_checkpoint(path, progress=False)


def test_corrupt_safetensors_and_bad_config(tmp_path, smollm_tokenizer_dir):
    save_hf(tiny_hf_model(), tmp_path, smollm_tokenizer_dir)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(str(tmp_path), progress=False)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(str(tmp_path), progress=False)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="GPTNeoX"):
        load_checkpoint(str(tmp_path), progress=False)


def test_corrupt_meta_checkpoint(tmp_path, spm_model_file):
    save_meta(tiny_hf_model(vocab_size=400, intermediate_size=192), tmp_path, spm_model_file)
    (tmp_path / "consolidated.00.pth").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load_checkpoint(str(tmp_path), progress=False)


def _params(folder, **changes):
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({k: v for k, v in {**params, **changes}.items() if v is not None}))


def _shard(folder, index, change):
    file = folder / f"consolidated.{index:02d}.pth"
    state = torch.load(file)
    change(state)
    torch.save(state, file)


@pytest.mark.parametrize("shards, damage, message", [
    (1, lambda d: _params(d, dim=None), r"params.json: params.json lacks 'dim'"),
    (1, lambda d: (d / "params.json").write_text("[1]"), "params.json: params.json holds a list, not an object"),
    (1, lambda d: _params(d, n_heads="4"), "params.json: n_heads must be a positive int, got '4'"),
    (1, lambda d: _params(d, hidden_dim=None, multiple_of=0), "params.json: multiple_of must be a positive int, got 0"),
    # Q/K rows are reordered by head: a head count they do not fit is named before.
    (1, lambda d: _params(d, n_heads=6),
     r"tensor layers.0.attention.wq.weight has shape \(64, 64\), expected \(60, 64\)"),
    (1, lambda d: _shard(d, 0, lambda s: s.update({"foo.weight": torch.zeros(3)})),
     r"tensors the config has no place for: \['foo.weight'\]"),
    (1, lambda d: torch.save([1, 2], d / "consolidated.00.pth"), "consolidated.00.pth: holds a list, not a state dict"),
    (2, lambda d: _shard(d, 1, lambda s: s.pop("norm.weight")),
     r"consolidated.01.pth: lacks tensors \['norm.weight'\] of consolidated.00.pth"),
    (2, lambda d: _shard(d, 1, lambda s: s.update({"layers.0.attention.wq.weight": torch.zeros(3, 7)})),
     r"consolidated.01.pth: tensor layers.0.attention.wq.weight has shape \(3, 7\), "
     r"consolidated.00.pth's is \(32, 64\): they may differ along dimension 0 only"),
])
def test_bad_meta_checkpoint_names_the_file(tmp_path, spm_model_file, shards, damage, message):
    save_meta(tiny_hf_model(vocab_size=400, intermediate_size=192), tmp_path, spm_model_file, shards=shards)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(tmp_path), progress=False)


def test_hf_tensors_the_config_has_no_place_for_are_refused(tmp_path, smollm_tokenizer_dir):
    """A layer more than num_hidden_layers, or a bias a plain Llama has not: refused naming them. Rotary
    inv_freq buffers (older transformers saved them) stay ignored."""
    from safetensors.torch import load_file, save_file

    save_hf(tiny_hf_model(), tmp_path, smollm_tokenizer_dir)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    save_file({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, file)
    load_checkpoint(str(tmp_path), progress=False)
    for extra in ["model.layers.2.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"]:
        save_file({**state, extra: torch.zeros(64)}, file)
        name = extra.replace("model.layers", "layers").replace("self_attn.q_proj", "attention.wq")
        with pytest.raises(CheckpointError, match=rf"{tmp_path}: tensors the config has no place for: \['{name}'\]"):
            load_checkpoint(str(tmp_path), progress=False)


def test_hf_index_names_the_files_loaded(tmp_path, smollm_tokenizer_dir):
    """With model.safetensors.index.json exactly the files it names are loaded: not a stale model.safetensors
    beside them, nor Mistral's consolidated.safetensors (Meta's names); a file it names that is missing, or
    that is not in the directory (the cache's stamp covers the directory's own files), is named."""
    from safetensors.torch import save_file

    model = tiny_hf_model(seed=1)
    save_hf(model, tmp_path, smollm_tokenizer_dir, max_shard_size="2MB")
    stale = tiny_hf_model(seed=5).state_dict()
    save_file({k: v.contiguous() for k, v in stale.items()}, tmp_path / "model.safetensors")
    save_file({"tok_embeddings.weight": torch.zeros(4, 64)}, tmp_path / "consolidated.safetensors")
    llm = LLM.from_pretrained(str(tmp_path), progress=False)
    assert (llm.logits(IDS) - hf_logits(model, IDS)).abs().max().item() <= 1e-4
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    for name, problem in [(shard, "missing"), ("sub/model.safetensors", "elsewhere")]:
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
            {**index, "weight_map": {**index["weight_map"], "lm_head.weight": name}}))
        if problem == "missing":
            os.rename(tmp_path / shard, tmp_path / "moved")
        with pytest.raises(CheckpointError, match=f"index.json: names '{name}', which is not a file in {tmp_path}"):
            load_checkpoint(str(tmp_path), progress=False)
        if problem == "missing":
            os.rename(tmp_path / "moved", tmp_path / shard)


def test_hf_without_index_skips_metas_consolidated_file(tmp_path, smollm_tokenizer_dir):
    """No index: model.safetensors alone if there is one, else the *.safetensors files but a consolidated one."""
    from safetensors.torch import save_file

    model = tiny_hf_model(seed=1)
    save_hf(model, tmp_path, smollm_tokenizer_dir, max_shard_size="2MB")
    os.remove(tmp_path / "model.safetensors.index.json")
    save_file({"tok_embeddings.weight": torch.zeros(4, 64)}, tmp_path / "consolidated.safetensors")
    llm = LLM.from_pretrained(str(tmp_path), progress=False)
    assert (llm.logits(IDS) - hf_logits(model, IDS)).abs().max().item() <= 1e-4
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    for shard in tmp_path.glob("model-*.safetensors"):
        shard.write_bytes(b"not read")
    assert (LLM.from_pretrained(str(tmp_path), progress=False).logits(IDS) - hf_logits(model, IDS)).abs().max() <= 1e-4


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(str(tmp_path), progress=False)


def test_gguf_conversion_cache(tmp_path, monkeypatch):
    """The parsed GGUF is cached (safetensors + JSON): same checkpoint back, a damaged entry is rebuilt."""
    import llama_fast.loaders as loaders
    from models import mapped_file

    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path))
    path = resolve_model_path("smollm2-135m-instruct")
    first = load_checkpoint(path, progress=False)
    folder = loaders.gguf_cache_path(path)
    assert os.path.exists(os.path.join(folder, "done"))
    # Dequantised into the entry a tensor at a time and mapped from it, the first load too.
    assert mapped_file(first.weights["layers.3.feed_forward.w2.weight"].data_ptr()) == os.path.join(
        folder, "weights.safetensors")
    second = load_checkpoint(path, progress=False)
    assert second.config == first.config and second.tensor_types == first.tensor_types
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert second.tokenizer.encode("I love") == [57, 2606]
    # A damaged entry (a new file: `first` and `second` map the old one, which must not shrink under them)
    (tmp_path / "damaged").write_bytes(b"damaged")
    os.replace(tmp_path / "damaged", os.path.join(folder, "weights.safetensors"))
    third = load_checkpoint(path, progress=False)
    assert torch.equal(third.weights["norm.weight"], first.weights["norm.weight"])
    # One that reads well but does not hold what the file makes: a tensor missing, another of another shape.
    # The fast start leaves it to the engine, which writes it again.
    entry = dict(third.weights)
    del entry["norm.weight"]
    entry["layers.0.ffn_norm.weight"] = entry["layers.0.ffn_norm.weight"][:5]
    loaders.save_weights(entry, str(tmp_path / "odd"))
    os.replace(tmp_path / "odd", os.path.join(folder, "weights.safetensors"))
    assert isinstance(LiteLLM._from_gguf(path, "float32", None, 0), str)
    fourth = load_checkpoint(path, progress=False)
    assert all(torch.equal(fourth.weights[k], first.weights[k]) for k in first.weights)
    assert isinstance(LiteLLM._from_gguf(path, "float32", None, 0), LiteLLM)
    # An entry per dtype asked for: the bf16 one holds what casting the fp32 weights gives.
    half = load_checkpoint(path, progress=False, dtype=torch.bfloat16)
    assert loaders.gguf_cache_path(path, torch.bfloat16) != folder
    assert all(half.weights[k].dtype == torch.bfloat16 and torch.equal(half.weights[k], first.weights[k].bfloat16())
               for k in first.weights)
    assert load_checkpoint(path, progress=False, dtype=torch.bfloat16).weights["norm.weight"].dtype == torch.bfloat16
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", "none")
    assert loaders.gguf_cache_path(path) is None


def test_cache_files_round_trip_and_are_mapped(tmp_path):
    """save_weights writes a tensor at a time what safetensors reads back: fp32, bf16 and f16, non-contiguous
    and empty tensors, given or made as they are written; read_weights maps the file. A made tensor that is
    not what was announced raises."""
    from llama_fast.loaders import read_weights, save_weights
    from models import mapped_file

    weights = {"t": torch.randn(3, 5).t(), "b": torch.randn(7).bfloat16(), "h": torch.randn(2, 3, 4).half(),
               "e": torch.randn(0, 4)}
    made = torch.randn(4, 6)
    save_weights({**weights, "made": ((4, 6), torch.float32, made.clone)}, str(tmp_path / "w.safetensors"))
    back = read_weights(str(tmp_path / "w.safetensors"))
    assert back.keys() == weights.keys() | {"made"} and torch.equal(back["made"], made)
    assert all(back[k].dtype == w.dtype and torch.equal(back[k], w) for k, w in weights.items())
    assert mapped_file(back["t"].data_ptr()) == str(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"made was announced as torch.bfloat16 \(4, 6\), made as torch.float32"):
        save_weights({"made": ((4, 6), torch.bfloat16, made.clone)}, str(tmp_path / "bad.safetensors"))


def test_writers_of_one_cache_entry_at_once_never_mix_their_bytes(tmp_path, caplog):
    """Two writers of the same entry at once (the ranks of a tensor-parallel job loading one checkpoint),
    both halfway through their file: the entry holds one writer's bytes whole, and no part file is left.
    An entry that cannot be written is logged, not raised."""
    import threading

    from llama_fast.paths import complete_entry, write_entry

    halfway = threading.Barrier(2)

    def writer(byte: bytes):
        def write(part: str) -> None:
            with open(part, "wb") as f:
                f.write(byte * 4096)
                f.flush()
                halfway.wait(timeout=30)
                f.write(byte * 4096)
        return write

    folder = tmp_path / "entry"
    threads = [threading.Thread(target=write_entry, args=(str(folder), {"w.bin": writer(b)})) for b in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (folder / "w.bin").read_bytes() in (b"a" * 8192, b"b" * 8192)
    assert complete_entry(str(folder)) and sorted(os.listdir(folder)) == ["done", "w.bin"]
    (tmp_path / "file").write_text("")
    assert not write_entry(str(tmp_path / "file" / "entry"), {"w.bin": writer(b"c")})
    assert "cannot write the cache entry" in caplog.text


def test_gguf_with_unknown_pre_tokenizer_caches_nothing(tmp_path, monkeypatch):
    """An unknown tokenizer.ggml.pre raises naming it, before a cache entry is written."""
    import numpy as np
    from gguf import GGUFWriter

    from llama_fast.tokenizer import TokenizerError

    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(cache))
    path = str(tmp_path / "m.gguf")
    writer = GGUFWriter(path, "llama")
    for key, value in [("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                       ("attention.head_count", 2), ("context_length", 64), ("vocab_size", 4)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("no-such-pre")
    writer.add_token_list(["a", "b", "ab", "c"])
    writer.add_token_merges(["a b"])
    shapes = {"token_embd.weight": (4, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32),
              "blk.0.ffn_down.weight": (32, 64), **{f"blk.0.attn_{x}.weight": (32, 32) for x in ("q", "k", "v", "output")}}
    for name, shape in shapes.items():
        writer.add_tensor(name, np.ones(shape, np.float32))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(TokenizerError, match="m.gguf: unknown tokenizer.ggml.pre 'no-such-pre'"):
        load_checkpoint(path, progress=False)
    assert not cache.exists() or not any(cache.rglob("*"))


def tiny_mistral(sliding_window, seed=3):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=sliding_window)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


@pytest.mark.parametrize("sliding_window", [1, 3, 8])
def test_mistral_sliding_window_matches_transformers(tmp_path, smollm_tokenizer_dir, sliding_window):
    """A Mistral checkpoint's sliding_window is the model's window: logits as transformers' MistralForCausalLM
    (fp32) on a prompt longer than the window, and different from attending to everything."""
    model = tiny_mistral(sliding_window)
    save_hf(model, tmp_path, smollm_tokenizer_dir)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] == sliding_window
    llm = LLM.from_pretrained(str(tmp_path), progress=False)
    assert llm.model.span.window == sliding_window
    expected = hf_logits(model, IDS)
    assert (llm.logits(IDS) - expected).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="sliding_window"):  # wider than the checkpoint's window: refused
        llm.with_span(SpanBias(window=sliding_window + 1))
    assert llm.with_span(SpanBias()).model.span.window == sliding_window
    assert llm.with_span(SpanBias(window=1)).model.span.window == 1
    # Decoding token by token (the C++ session, freeing blocks the window passes) gives transformers'
    # greedy tokens, each from a full
    # forward pass over the sequence so far (its generate() with a window of 1 disagrees with its own forward).
    ids = IDS[0].tolist()[:6]
    expected = list(ids)
    with torch.no_grad():
        for _ in range(24):
            expected.append(int(model(torch.tensor([expected])).logits[0, -1].argmax()))
    assert llm.generate(ids, max_new_tokens=24).token_ids == expected[6:]


def test_mistral_without_sliding_window_is_dense(tmp_path, smollm_tokenizer_dir):
    model = tiny_mistral(None)
    save_hf(model, tmp_path, smollm_tokenizer_dir)
    llm = LLM.from_pretrained(str(tmp_path), progress=False)
    assert llm.model.span.window is None
    assert (llm.logits(IDS) - hf_logits(model, IDS)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("keys, window", [
    ({"sliding_window": 64}, 64),
    ({"sliding_window": 64, "use_sliding_window": False}, None),  # Qwen2: the window is off
    ({"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 0}, 64),  # every layer slides
    ({"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 2}, None),  # no layer slides
    ({"sliding_window": None}, None),
    ({"sliding_window": 64, "layer_types": ["sliding_attention", "sliding_attention"]}, 64),
])
def test_config_sliding_window_rules(keys, window):
    assert ModelConfig.from_hf({**TINY, **keys}).sliding_window == window


@pytest.mark.parametrize("keys, name", [
    ({"sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1}, "some layers"),
    ({"sliding_window": 64, "layer_types": ["full_attention", "sliding_attention"]}, "some layers"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"attention_bias": True}, "biases"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_config_keys_that_change_the_math_are_refused(keys, name):
    with pytest.raises(UnsupportedModelError, match=name):
        ModelConfig.from_hf({**TINY, **keys})


@pytest.mark.parametrize("keys, message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive int, got 0"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be a positive int, got '4'"),
    ({"num_attention_heads": 4.0}, "num_attention_heads must be a positive int, got 4.0"),
    ({"num_attention_heads": True}, "num_attention_heads must be a positive int, got True"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be a positive int, got 2.0"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive int, got '2'"),
    ({"num_key_value_heads": 2.0}, "num_key_value_heads must be a positive int, got 2.0"),
    ({"head_dim": "16"}, "head_dim must be a positive int, got '16'"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps must be a positive finite number, got 'x'"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive finite number, got nan"),
    ({"rope_theta": "x"}, "rope_theta must be a positive finite number, got 'x'"),
    ({"max_position_embeddings": None}, "max_position_embeddings must be a positive int, got None"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor must be a positive finite number, got None"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": "4"}},
     "rope_parameters.high_freq_factor must be a positive finite number, got '4'"),
    ({"eos_token_id": "2"}, r"eos_token_id must be a token id in \[0, 49152\), got '2'"),
    ({"eos_token_id": [2, 49152]}, r"eos_token_id must be a token id in \[0, 49152\), got 49152"),
    ({"bos_token_id": -1}, r"bos_token_id must be a token id in \[0, 49152\), got -1"),
    ({"sliding_window": 0}, "sliding_window must be a positive int, got 0"),
    ({"sliding_window": 64, "max_window_layers": "1"}, "max_window_layers must be an int >= 0, got '1'"),
])
def test_hf_config_values_of_the_wrong_type_name_the_key(keys, message):
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_hf({**TINY, **keys})


def test_bad_config_values_are_refused_at_load_naming_the_file(tmp_path, smollm_tokenizer_dir):
    save_hf(tiny_hf_model(), tmp_path, smollm_tokenizer_dir)
    for keys, message in [({"num_attention_heads": "4"}, "num_attention_heads must be a positive int, got '4'"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'")]:
        (tmp_path / "config.json").write_text(json.dumps({**TINY, **keys}))
        with pytest.raises((CheckpointError, UnsupportedModelError), match=f"{tmp_path / 'config.json'}: {message}"):
            load_checkpoint(str(tmp_path), progress=False)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json holds a list, not an object"):
        load_checkpoint(str(tmp_path), progress=False)


GGUF_META = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
             "llama.attention.head_count": 4, "llama.feed_forward_length": 160, "llama.vocab_size": 300}


@pytest.mark.parametrize("keys, message", [
    ({"llama.attention.head_count": None}, "llama.attention.head_count must be a positive int, got None"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count must be a positive int, got 0"),
    ({"llama.attention.head_count_kv": 2.0}, "llama.attention.head_count_kv must be a positive int, got 2.0"),
    ({"llama.vocab_size": None}, "llama.vocab_size must be a positive int, got None"),  # (and no tokens)
    ({"llama.rope.scaling.type": "linear"}, "llama.rope.scaling.factor must be a positive finite number, got None"),
    ({"llama.attention.sliding_window": 8.0}, "llama.attention.sliding_window must be a positive int, got 8.0"),
    ({"tokenizer.ggml.bos_token_id": "1"}, r"tokenizer.ggml.bos_token_id must be a token id in \[0, 300\), got '1'"),
])
def test_gguf_metadata_of_the_wrong_type_names_the_key(keys, message):
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_gguf({**GGUF_META, **keys})


def test_model_config_checks_its_fields():
    with pytest.raises(ValueError, match="n_heads must be a positive int, got 4.0"):
        ModelConfig(dim=64, n_layers=2, n_heads=4.0, n_kv_heads=2, vocab_size=97, ffn_dim=96)
    with pytest.raises(ValueError, match=r"eos_token_ids must be a token id in \[0, 97\), got 97"):
        ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=96, eos_token_ids=[97])
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=96, rope_theta=10000,
                         rope_scaling={"rope_type": "default"})
    assert config.rope_theta == 10000.0 and isinstance(config.rope_theta, float) and config.rope_scaling is None


def test_empty_hf_config_names_the_missing_keys(tmp_path, smollm_tokenizer_dir):
    save_hf(tiny_hf_model(), tmp_path, smollm_tokenizer_dir)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="lacks 'hidden_size'") as info:
        load_checkpoint(str(tmp_path), progress=False)
    assert "\n" not in str(info.value)
    partial = {k: v for k, v in TINY.items() if k != "num_attention_heads"}
    (tmp_path / "config.json").write_text(json.dumps(partial))
    with pytest.raises(CheckpointError, match="lacks 'num_attention_heads'"):
        load_checkpoint(str(tmp_path), progress=False)


def test_gguf_sliding_window_and_the_window_rule():
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.attention.head_count": 4, "llama.feed_forward_length": 160, "llama.vocab_size": 300}
    assert ModelConfig.from_gguf(meta).sliding_window is None
    assert ModelConfig.from_gguf({**meta, "llama.attention.sliding_window": 32}).sliding_window == 32
    # The one rule LLM (span.checkpoint_span) and the torch-free LiteLLM share.
    assert checkpoint_window(None, 0, 32) == 32 and checkpoint_window(16, 4, 32) == 16
    assert checkpoint_window(None, 0, None) is None and checkpoint_window(64, 0, None) == 64
    with pytest.raises(ValueError, match="sliding_window"):
        checkpoint_window(33, 0, 32)
