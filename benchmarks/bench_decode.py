"""Decode benchmark: llama_fast against transformers eager and llama.cpp (llama_fast/bench.py; also
`llama-fast bench`). Run: .venv/bin/python benchmarks/bench_decode.py [--help]"""
from llama_fast.bench import main

if __name__ == "__main__":
    main()
