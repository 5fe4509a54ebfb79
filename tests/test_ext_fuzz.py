"""Fuzzes every binding of llama_fast._C with hypothesis-generated garbage, in a subprocess: whatever the
arguments (wrong dtype, rank, shape, contiguity, negative or huge indices, freed or unknown sequence ids,
block tables from another cache, empty batches), the process must survive, raising Python exceptions only.
A crash (segfault, abort, a C++ exception escaping) shows up as a non-zero exit of the subprocess.
"""
import os
import subprocess
import sys
import textwrap

FUZZ = textwrap.dedent(
    r'''
    import sys
    import torch
    from hypothesis import HealthCheck, given, settings, strategies as st
    import llama_fast._C as C

    ALLOWED = (RuntimeError, ValueError, TypeError, IndexError, OverflowError)
    DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8,
              torch.bool]
    ints = st.one_of(st.integers(-3, 12), st.sampled_from([-2**31, 2**31 - 1, 2**31, 2**62, -2**63, 2**63 - 1]))
    small = st.integers(0, 5)

    @st.composite
    def tensors(draw, max_rank=5):
        rank = draw(st.integers(0, max_rank))
        shape = [draw(small) for _ in range(rank)]
        dtype = draw(st.sampled_from(DTYPES))
        kind = draw(st.sampled_from(["zeros", "rand", "big", "neg", "nan"]))
        t = torch.zeros(shape, dtype=torch.float64)
        if kind == "rand":
            t = torch.rand(shape, dtype=torch.float64) * 10
        elif kind == "big":
            t = torch.full(shape, 3e9, dtype=torch.float64)
        elif kind == "neg":
            t = -torch.rand(shape, dtype=torch.float64) * 10 - 1
        elif kind == "nan":
            t = torch.full(shape, float("nan"), dtype=torch.float64)
        t = t.to(dtype) if dtype.is_floating_point else t.nan_to_num(0).clamp(-2**40, 2**40).to(dtype)
        if rank >= 2 and draw(st.booleans()):
            t = t.transpose(0, 1)  # non-contiguous
        layout = draw(st.sampled_from(["strided"] * 6 + ["meta", "sparse", "expanded"]))
        if layout == "meta":
            t = t.to("meta")
        elif layout == "sparse" and rank >= 1 and dtype != torch.bool:
            t = t.to_sparse()
        elif layout == "expanded" and rank >= 1 and t.shape[-1] >= 1:
            t = t[..., :1].expand(*t.shape[:-1], 7)  # stride 0
        return t

    args = st.one_of(tensors(), ints, st.none(), st.floats(allow_nan=True), st.lists(ints, max_size=4),
                     st.lists(tensors(), max_size=3), st.booleans())

    def call(fn, *a):
        try:
            fn(*a)
        except ALLOWED:
            pass

    FNS = [C.sample, C.apply_penalties, C.static_write, C.paged_write, C.copy_blocks, C.gather_paged]
    SET = settings(max_examples=int(sys.argv[1]), deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))

    @SET
    @given(fn=st.sampled_from(FNS), a=st.lists(args, min_size=0, max_size=7))
    def fuzz_any(fn, a):
        call(fn, *a)

    @SET
    @given(B=small, V=st.integers(0, 40), params=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=7,
           max_size=7), seed=ints, step=ints, with_seen=st.booleans(), dtype=st.sampled_from(DTYPES[:3]),
           lp=st.booleans(), fill=st.sampled_from([0.0, 1.0, float("nan"), float("inf"), -3e38]))
    def fuzz_sample(B, V, params, seed, step, with_seen, dtype, lp, fill):
        logits = torch.randn(B, V).to(dtype)
        if B and V:
            logits[0, 0] = fill
        P = torch.tensor([params] * B, dtype=torch.float64).reshape(B, 7)
        def i64(x):
            return torch.full((B,), max(min(x, 2**63 - 1), -2**63), dtype=torch.int64)
        seen = torch.randint(0, 3, (B, V), dtype=torch.int32) if with_seen else None
        call(C.sample, logits, P, i64(seed), i64(step), seen, lp)
        call(C.apply_penalties, logits, seen if seen is not None else torch.zeros(B, V, dtype=torch.int64), P)

    @SET
    @given(nb=st.integers(-1, 6), bs=st.integers(-1, 5), script=st.lists(st.tuples(st.sampled_from(
           ["add", "fork", "free", "reserve", "commit", "evict", "table", "write", "copy", "gather", "length"]),
           ints, ints, ints), max_size=25))
    def fuzz_manager(nb, bs, script):
        try:
            m = C.PagedBlockManager(nb, bs)
        except ALLOWED:
            return
        k = torch.zeros(max(nb, 1), max(bs, 1), 2, 3)
        v = torch.zeros_like(k)
        seqs = []
        for op, a, b, c in script:
            ids = [seqs[a % len(seqs)] if seqs and a >= 0 else a] + ([b] if c % 2 else [])
            try:
                if op == "add":
                    seqs.append(m.add_sequence())
                elif op == "fork":
                    seqs.append(m.fork(ids[0]))
                elif op == "free":
                    m.free(ids[0])
                elif op == "reserve":
                    m.reserve(ids, b, c)
                elif op == "commit":
                    m.commit(ids, [b] * len(ids))
                elif op == "evict":
                    m.evict(ids, b, c)
                elif op == "table":
                    m.block_table(ids, b)
                elif op == "write":
                    t = m.block_table(ids[:1], 0)
                    C.paged_write(k, v, torch.ones(1, max(0, min(c, 9)), 2, 3), torch.ones(1, max(0, min(c, 9)), 2, 3),
                                  t, torch.tensor([max(min(b, 2**31 - 1), -2**31)], dtype=torch.int32))
                elif op == "copy":
                    C.copy_blocks([k], [v], torch.tensor([[a, b, c]], dtype=torch.int64).clamp(-2**62, 2**62))
                elif op == "gather":
                    C.gather_paged(k, torch.tensor(m.blocks(ids[0]) + [b % 2**31], dtype=torch.int32), c)
                elif op == "length":
                    m.length(ids[0]); m.evicted(ids[0]); m.refcount(a)
            except ALLOWED:
                pass
        # Bookkeeping invariant: every block is free or referenced.
        assert 0 <= m.num_free_blocks <= m.num_blocks

    fuzz_any()
    fuzz_sample()
    fuzz_manager()
    print("FUZZ-OK")
    '''
)


def test_bindings_survive_fuzzing(tmp_path):
    script = tmp_path / "fuzz_ext.py"
    script.write_text(FUZZ)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    # Run from tmp_path, so the repository root (and its kernels/ folder) is not on sys.path.
    proc = subprocess.run([sys.executable, str(script), os.environ.get("LLAMA_FAST_FUZZ_EXAMPLES", "400")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"fuzz subprocess died (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "FUZZ-OK" in proc.stdout
