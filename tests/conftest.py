"""Shared test setup. TRITON_INTERPRET must be set before anything imports Triton, so it is set here,
at collection time: Triton kernels then run on CPU tensors (in fp32/fp16; the interpreter gets bf16 wrong)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model through llama_fast, fp32 on CPU."""
    from llama_fast import LLM

    return LLM.from_pretrained("smollm2-135m-instruct", dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def hf_smollm():
    """(model, tokenizer) of transformers' LlamaForCausalLM loaded from the same GGUF, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_fast.loaders import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def spm_model_file(tmp_path_factory):
    """A tiny SentencePiece BPE model (400 pieces, byte fallback) trained on the package's sample text."""
    import shutil

    import sentencepiece as spm

    from llama_fast.paths import SAMPLE_TEXT

    folder = tmp_path_factory.mktemp("spm")
    shutil.copy(SAMPLE_TEXT, folder / "corpus.txt")
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "m"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    return folder / "m.model"
