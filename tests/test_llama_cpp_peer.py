"""llama.cpp as the benchmarks' peer (benchmarks/llama_cpp_bin.py, scripts/build_llama_cpp.sh).

The parser runs on a real llama-batched-bench output kept in tests/data; the real runs (batched_bench,
LlamaServer) need the programs built by scripts/build_llama_cpp.sh and are skipped when they are absent:
these tests never build llama.cpp."""
import json
import os
import shutil
import socket
import subprocess
import urllib.request

import pytest

from models import benchmark_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
SCRIPT = os.path.join(ROOT, "scripts", "build_llama_cpp.sh")

peer = benchmark_module("llama_cpp_bin")

# Captured from `llama-batched-bench -m smollm2-135m-instruct.F32.gguf -c 576 -npp 32 -ntg 16 -npl 1,2,4,12
# -t 2 -tb 2 --output-format jsonl` (stdout and stderr together, as a user would see them).
SAMPLE = os.path.join(DATA, "llama_batched_bench_jsonl.txt")
SAMPLE_SIZES, SAMPLE_P, SAMPLE_G = [1, 2, 4, 12], 32, 16


def needs(name: str):
    """Skips a test when llama.cpp's program `name` is not built."""
    try:
        peer.program(name)
        missing = False
    except peer.LlamaCppError:
        missing = True
    return pytest.mark.skipif(missing, reason=f"llama.cpp's {name} is not built "
                              "(run scripts/build_llama_cpp.sh, or set $LLAMA_CPP_BIN)")


def _sample() -> str:
    with open(SAMPLE) as f:
        return f.read()


def test_parse_real_batched_bench_output():
    text = _sample()
    rows = peer.parse_batched_bench(text, SAMPLE_SIZES, SAMPLE_P, SAMPLE_G)
    assert list(rows) == SAMPLE_SIZES
    records = {r["pl"]: r for r in map(json.loads, (l for l in text.splitlines() if l.startswith('{"n_kv_max"')))}
    for size, row in rows.items():
        record = records[size]
        # Every row is the record of its own batch size, and its rates are its token counts over its times.
        assert row["tg_tps"] == record["speed_tg"] and row["pp_tps"] == record["speed_pp"]
        assert row["tg_tps"] == pytest.approx(size * SAMPLE_G / row["tg_s"], rel=1e-3)
        assert row["pp_tps"] == pytest.approx(size * SAMPLE_P / row["pp_s"], rel=1e-3)
        assert row["n_kv"] == size * (SAMPLE_P + SAMPLE_G)
        assert row["threads"] == 2


def test_parse_asks_for_a_subset_in_the_callers_order():
    rows = peer.parse_batched_bench(_sample(), [12, 1, 2, 4], SAMPLE_P, SAMPLE_G)
    assert list(rows) == [12, 1, 2, 4]


def test_parse_rejects_a_missing_batch_size():
    # llama-batched-bench skips, silently, each batch whose tokens do not fit in -c.
    with pytest.raises(peer.LlamaCppError, match=r"no row for B=\[16\]"):
        peer.parse_batched_bench(_sample(), SAMPLE_SIZES + [16], SAMPLE_P, SAMPLE_G)


@pytest.mark.parametrize("sizes, p, g", [([1, 2, 4], SAMPLE_P, SAMPLE_G), (SAMPLE_SIZES, SAMPLE_P + 1, SAMPLE_G),
                                         (SAMPLE_SIZES, SAMPLE_P, 7)])
def test_parse_rejects_rows_not_asked_for(sizes, p, g):
    with pytest.raises(peer.LlamaCppError, match="asked for"):
        peer.parse_batched_bench(_sample(), sizes, p, g)


def test_parse_rejects_a_repeated_row_and_broken_json():
    row = next(l for l in _sample().splitlines() if l.startswith('{"n_kv_max"'))
    with pytest.raises(peer.LlamaCppError, match="two rows"):
        peer.parse_batched_bench(row + "\n" + row, [json.loads(row)["pl"]], SAMPLE_P, SAMPLE_G)
    with pytest.raises(peer.LlamaCppError, match="does not parse"):
        peer.parse_batched_bench(row[:-5], [json.loads(row)["pl"]], SAMPLE_P, SAMPLE_G)


def test_bad_arguments_name_the_argument(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    good = dict(gguf_path=str(gguf), batch_sizes=[1, 2], prompt_tokens=8, new_tokens=4, threads=1)
    for name, value in [("gguf_path", str(tmp_path / "absent.gguf")), ("batch_sizes", []), ("batch_sizes", [1, 0]),
                        ("batch_sizes", [2, 2]), ("batch_sizes", "1,2"), ("prompt_tokens", 0),
                        ("new_tokens", 2.5), ("threads", True)]:
        with pytest.raises(ValueError, match=name):
            peer.batched_bench_command(**{**good, name: value})
    for name, value in [("parallel", 0), ("ctx_per_slot", -1), ("threads", "2"), ("startup_timeout", 0),
                        ("extra_args", "--foo")]:
        with pytest.raises(ValueError, match=name):
            peer.LlamaServer(str(gguf), **{name: value})


def test_missing_programs_say_how_to_build_them(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_BIN", str(tmp_path))
    with pytest.raises(peer.LlamaCppError, match=r"scripts/build_llama_cpp\.sh.*LLAMA_CPP_BIN"):
        peer.program("llama-server")


def test_programs_are_looked_for_where_the_script_builds_them(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_BIN", raising=False)
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path))
    folder = peer.bin_dir()
    assert folder.startswith(os.path.join(str(tmp_path), "llama.cpp", "")) and folder.endswith(os.sep + "bin")
    assert not os.path.exists(folder)  # --where builds nothing


def test_build_script_fails_in_one_line_without_cmake(tmp_path):
    # A PATH with the tools the script needs to start, and no cmake: a one-line error, exit 1, nothing written.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ["bash", "dirname", "grep", "head", "cut", "mkdir"]:
        os.symlink(shutil.which(tool), tools / tool)
    cache = tmp_path / "cache"
    env = {"PATH": str(tools), "HOME": str(tmp_path), "LLAMA_FAST_CACHE_DIR": str(cache)}
    done = subprocess.run([str(tools / "bash"), SCRIPT], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["build_llama_cpp.sh: error: cmake not found (install it, e.g. apt-get install cmake)"]
    assert not cache.exists()
    done = subprocess.run(["bash", SCRIPT, "--bogus"], capture_output=True, text=True, env=env | {"PATH": os.environ["PATH"]})
    assert done.returncode == 1 and "unknown argument --bogus" in done.stderr


# ----------------------------------------------------------------------------------------------------
# Real runs of the built programs on the embedded model.

@pytest.fixture(scope="module")
def gguf():
    from llama_fast.loaders import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")  # the original Q4_1: no conversion needed


@needs("llama-batched-bench")
def test_batched_bench_runs_for_real(gguf):
    rows = peer.batched_bench(gguf, [1, 2], prompt_tokens=8, new_tokens=4, threads=1)
    assert list(rows) == [1, 2]
    for size, row in rows.items():
        assert row["n_kv"] == size * (8 + 4) and row["threads"] == 1
        assert row["pp_tps"] > 0 and row["tg_tps"] > 0
        assert row["tg_tps"] == pytest.approx(size * 4 / row["tg_s"], rel=1e-3)


@needs("llama-batched-bench")
def test_batched_bench_failure_shows_the_programs_output(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(peer.LlamaCppError, match="llama-batched-bench exited with"):
        peer.batched_bench(str(junk), [1], prompt_tokens=4, new_tokens=2, threads=1)


def _refuses_connections(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@needs("llama-server")
def test_llama_server_starts_serves_and_stops(gguf):
    with peer.LlamaServer(gguf, parallel=2, ctx_per_slot=256, threads=1) as server:
        assert server.health() == "ok"
        body = json.dumps({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["usage"]["completion_tokens"] == 4 and answer["choices"][0]["text"]
        process, port = server.process, server.port
    assert process.poll() is not None and _refuses_connections(port)


@needs("llama-server")
def test_llama_server_stops_on_an_exception(gguf):
    with pytest.raises(KeyError):
        with peer.LlamaServer(gguf, threads=1) as server:
            process = server.process
            raise KeyError("boom")
    assert process.poll() is not None


@needs("llama-server")
def test_llama_server_that_dies_reports_its_log(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    server = peer.LlamaServer(str(junk), threads=1)
    with pytest.raises(peer.LlamaCppError, match=r"(?s)llama-server exited with .*\n.+"):
        server.__enter__()
    assert server.process.poll() is not None
