"""Tiny random models and the ISAs this CPU runs, for the tests of the C++ routes; the benchmarks' helper
modules, for the tests that share them."""
import importlib.util
import os

import torch

from llama_fast import _ext
from llama_fast.config import ModelConfig
from llama_fast.model import Transformer, build_model
from llama_fast.span import SpanBias


def benchmark_module(name: str):
    """benchmarks/<name>.py as a module, loaded by path: benchmarks/ is on sys.path for the benchmark scripts,
    not for the tests."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mapped_file(address: int) -> str:
    """The file whose mapping holds `address` in this process ("" for anonymous memory): where a loaded
    tensor's bytes live."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return rest[-1].strip() if len(rest) == 5 else ""
    return ""


def supported_isas():
    """The kernel variants this CPU runs (scalar only where the extension is not built: the tests skip)."""
    if not _ext.has_ext():
        return ["scalar"]
    return _ext.ext().cpu_isas()


def random_model(cfg: ModelConfig, span: SpanBias = SpanBias(), *, seed=0, dtype=torch.float32, qk_gain=1.0):
    """A model of cfg's shape with random weights (norms around 1, matrices scaled by 1/sqrt(fan-in))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm weights around 1 (and biases around 0)
            weights[name] = (0.0 if name.endswith(".bias") else 1.0) + 0.2 * torch.randn(shape, generator=gen)
        else:
            w = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            if name.endswith(("wq.weight", "wk.weight")):
                w = w * qk_gain
            weights[name] = w
    return build_model(cfg, weights, dtype=dtype, span=span)
