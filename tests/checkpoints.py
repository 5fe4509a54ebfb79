"""Checkpoints the tests write: Meta directories (params.json, consolidated.*.pth, tokenizer.model)."""
import json
import shutil

import torch

# How Meta's model-parallel files split each tensor (absent: whole in every file).
META_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def save_meta(state: dict[str, torch.Tensor], params: dict, folder, spm_model_file, files: int = 1) -> None:
    """Writes a Meta checkpoint into `folder`: `state` (Meta's names, Q/K rows in Meta's interleaved order)
    split over `files` model-parallel files, `params` as params.json, and the SentencePiece model."""
    for s in range(files):
        part = {}
        for name, w in state.items():
            dim = META_SPLIT.get(name.split(".")[-2])
            part[name] = w.clone() if dim is None else w.chunk(files, dim=dim)[s].clone()
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copy(spm_model_file, folder / "tokenizer.model")
