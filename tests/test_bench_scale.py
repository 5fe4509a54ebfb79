"""benchmarks/bench_scale.py end to end at a tiny shape, llama_fast only: the files, the fresh processes,
the worker and the report (its numbers are not checked: timings are the machine's)."""
import dataclasses
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_scale_runs_at_a_tiny_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # (as when the script runs)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))  # its processes
    spec = importlib.util.spec_from_file_location("bench_scale", os.path.join(ROOT, "benchmarks", "bench_scale.py"))
    bench_scale = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_scale", bench_scale)  # (its worker process is found by this name)
    spec.loader.exec_module(bench_scale)
    shapes = bench_scale.gguf_models.SHAPES
    monkeypatch.setitem(shapes, "tiny", dataclasses.replace(shapes["1b"], name="tiny", dim=64, n_layers=2, n_heads=4,
                                                             n_kv_heads=2, head_dim=16, ffn_dim=96, vocab_size=49152))
    monkeypatch.setattr(bench_scale, "BATCH8_UP_TO", ("tiny",))
    out = tmp_path / "out"
    bench_scale.main(["--shapes", "tiny", "--no-llama-cpp", "--prompt-tokens", "16", "--batch8-prompt-tokens", "4",
                      "--new-tokens", "3", "--out", str(out)])
    report = json.loads((out / "bench_scale.json").read_text())
    (result,) = report["results"]
    assert (result["model"], result["type"]) == ("tiny", "BF16")
    ours = result["engines"]["llama_fast"]
    for key in ("load_cold_s", "load_warm_s", "ttft_s", "decode_tok_s", "batch8_tok_s", "peak_rss_mib", "cli_peak_rss_mib"):
        assert ours[key] > 0, key
    assert result["decode_bytes"] == result["weight_bytes"] > 64 * 49152 * 2  # tied: the embedding is read
    assert (out / "bench_scale.png").stat().st_size > 0
    assert os.listdir(tmp_path / "cache" / "scale") == ["tiny-random.BF16.gguf"]
