"""The CPU kernels on GGUF quantized weights (csrc/core/quant.h, quant_isa.inc) through llama_fast._C's
cpu_dequantize, cpu_quantize_activations and cpu_matvec, for every ISA this CPU runs and every type:

  - dequantization equals the gguf package's, bit for bit;
  - products are within a tight bound of fp64 math on the values the kernels multiply (the dequantized
    weights times the activations as the kernels quantize them), and within the activation quantization's
    bound of fp64 math on x itself;
  - every output is bitwise the same whatever the number of vectors, their order and company, the threads
    and the rows (the session's batch invariance);
  - bad input is a clear error.
Weights: gguf's quantizers for Q8_0, Q4_0, Q4_1, Q5_0; random blocks with sane scales for the K-quants. Odd
sizes throughout: K = 32 or 256 times odd counts, odd row counts, 1-16 vectors.
"""
import numpy as np
import pytest
import torch

from llama_fast import _ext

from models import supported_isas

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="llama_fast._C is not built")

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")
BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q4_K": 256, "Q6_K": 256}
ROWS = (1, 7, 33, 129)
U = 2.0 ** -24  # fp32's unit roundoff


def c():
    return _ext.ext()


def k_sizes(qtype):
    return (32, 96, 160, 480, 1504) if BLOCK[qtype] == 32 else (256, 768, 1280)


def make_weights(qtype, rows, K, rng):
    """uint8 (rows, row bytes) blocks of qtype: gguf's quantization of random values, or (K-quants) random
    bytes with positive fp16 scales of a sane size."""
    if BLOCK[qtype] == 32:
        values = rng.standard_normal((rows, K)).astype(np.float32) * rng.uniform(0.01, 1.0, (rows, 1)).astype(np.float32)
        return quants.quantize(values, QT[qtype]).reshape(rows, -1)
    nbytes = {"Q4_K": 144, "Q6_K": 210}[qtype]
    blocks = rng.integers(0, 256, (rows * K // 256, nbytes), dtype=np.uint8)
    scales = rng.uniform(1e-3, 3e-2, (len(blocks), 2)).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        blocks[:, 0:4] = scales  # d, dmin
    else:
        blocks[:, 208:210] = scales[:, 0:2]  # d
    return blocks.reshape(rows, -1)


def reference_dequantize(raw, qtype, K):
    return torch.from_numpy(quants.dequantize(raw, QT[qtype]).reshape(len(raw), K).astype(np.float32))


def magnitudes(raw, qtype, K):
    """|scale * q| + |offset| per element: the size of the terms the kernels sum exactly (a dequantized value
    is their sum rounded once where it has an offset, Q4_1's min and Q4_K's dmin * m)."""
    w = reference_dequantize(raw, qtype, K).double()
    if qtype == "Q4_1":
        blocks = raw.reshape(-1, 20)
        m = torch.from_numpy(blocks[:, 2:4].copy().view(np.float16).astype(np.float64)).view(len(raw), -1, 1)
        w = w.view(len(raw), -1, 32)
        return ((w - m).abs() + m.abs()).view(len(raw), K)
    if qtype == "Q4_K":
        blocks = raw.reshape(-1, 144)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
        _, mins = quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
        dm = torch.from_numpy(dmin * mins.astype(np.float64)).view(len(raw), -1, 1)  # (rows, sub-blocks, 1)
        w = w.view(len(raw), -1, 32)
        return ((w + dm).abs() + dm).view(len(raw), K)
    return w.abs()


def matvec(raw, x, qtype, isa, threads=1):
    return c().cpu_matvec(torch.from_numpy(raw), x.contiguous(), num_threads=threads, isa=isa, wtype=qtype)


def assert_bitwise(got, want, msg):
    if not torch.equal(got, want):
        diff = (got != want).nonzero()
        raise AssertionError(f"{msg}: {len(diff)} outputs differ, first at {diff[0].tolist()} "
                             f"({got[tuple(diff[0])].item()!r} vs {want[tuple(diff[0])].item()!r})")


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_is_gguf_exactly(qtype):
    rng = np.random.default_rng(1 + TYPES.index(qtype))
    for K in k_sizes(qtype):
        raw = make_weights(qtype, 33, K, rng)
        got = c().cpu_dequantize(torch.from_numpy(raw), qtype, K)
        assert_bitwise(got, reference_dequantize(raw, qtype, K), f"{qtype} K={K}")


@pytest.mark.parametrize("qtype", TYPES)
def test_activations_are_quantized_alike_on_every_isa(qtype):
    """Per block: |x - xq| <= d / 2 with d about max|x| / 127, every value d * q exact in fp32, and the same
    values whichever ISA quantizes (the quantization is one IEEE rule)."""
    gen = torch.Generator().manual_seed(7)
    K = 3 * BLOCK[qtype]
    x = torch.randn(5, K, generator=gen) * torch.logspace(-3, 2, 5).unsqueeze(1)
    x[0, :BLOCK[qtype]] = 0.0  # an all-zero block
    got = {isa: c().cpu_quantize_activations(x, qtype, isa) for isa in supported_isas()}
    first = next(iter(got.values()))
    for isa, xq in got.items():
        assert_bitwise(xq, first, f"{qtype} {isa} against {next(iter(got))}")
    blocks = x.view(5, -1, BLOCK[qtype])
    amax = blocks.abs().amax(-1, keepdim=True)
    err = (first.view_as(blocks) - blocks).abs()
    assert (err <= amax / 254 * (1 + 2.0 ** -14)).all()
    assert (first[0, :BLOCK[qtype]] == 0).all()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("isa", supported_isas())
def test_products_within_bounds(isa, qtype):
    """Against fp64 on the values multiplied: |error| <= (K / 32 + 16) u sum |w_k xq_k| (each lane's chain of
    roundings, one per unit, and the final tree); against fp64 on x: plus sum |w_k| d_k / 2."""
    rng = np.random.default_rng(11 + TYPES.index(qtype) + len(isa))
    gen = torch.Generator().manual_seed(11 + len(isa))
    for K in k_sizes(qtype):
        for rows in ROWS:
            raw = make_weights(qtype, rows, K, rng)
            w = reference_dequantize(raw, qtype, K).double()
            nb = 1 + (K + rows) % 16
            x = torch.randn(nb, K, generator=gen) + 0.5  # not centred: sums cancel
            got = matvec(raw, x, qtype, isa, threads=2).double()
            xq = c().cpu_quantize_activations(x, qtype, isa).double()
            tight = (K / 32 + 16) * U * (xq.abs() @ magnitudes(raw, qtype, K).T)
            err = (got - xq @ w.T).abs()
            assert (err <= tight).all(), f"{qtype} K={K} rows={rows}: {(err / tight).max().item():.3g} of the bound"
            blocks = x.double().view(nb, -1, BLOCK[qtype])
            half_step = (blocks.abs().amax(-1, keepdim=True) / 254 * (1 + 2.0 ** -14)).expand_as(blocks).reshape(nb, K)
            loose = tight + half_step @ w.abs().T
            assert ((got - x.double() @ w.T).abs() <= loose).all(), f"{qtype} K={K} rows={rows} against x"


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("isa", supported_isas())
def test_batch_invariance(isa, qtype):
    """Each vector's row of a 1..16-vector product equals its product alone, bit for bit, as the first nb
    vectors and as a random pick in random order, on 1-3 threads; rows multiplied on their own (a thread's
    share) equal those rows of the whole product."""
    rng = np.random.default_rng(5 + TYPES.index(qtype))
    gen = torch.Generator().manual_seed(5 + len(isa))
    K = 5 * BLOCK[qtype] if BLOCK[qtype] == 32 else 3 * BLOCK[qtype]
    raw = make_weights(qtype, 37, K, rng)
    pool = torch.randn(16, K, generator=gen)
    alone = torch.cat([matvec(raw, pool[j:j + 1], qtype, isa) for j in range(16)])
    for nb in range(1, 17):
        threads = 1 + nb % 3
        assert_bitwise(matvec(raw, pool[:nb], qtype, isa, threads), alone[:nb], f"{qtype} first {nb}, {threads} threads")
        picked = torch.randperm(16, generator=gen)[:nb]
        assert_bitwise(matvec(raw, pool[picked], qtype, isa, 1 + (nb + 1) % 3), alone[picked],
                       f"{qtype} {nb} picked {picked.tolist()}")
    for r0, r1 in ((0, 1), (1, 6), (3, 17), (5, 37), (36, 37)):
        for nb in (1, 3, 9):
            assert_bitwise(matvec(raw[r0:r1], pool[:nb], qtype, isa, 3), alone[:nb, r0:r1], f"{qtype} rows [{r0}, {r1})")


def test_bad_input_is_a_clear_error():
    rng = np.random.default_rng(3)
    raw = torch.from_numpy(make_weights("Q4_0", 4, 64, rng))
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"Q4_0 weight of K = 64 is uint8 \(N, 36\).*\[4, 35\]"):
        c().cpu_matvec(raw[:, :35].contiguous(), x, wtype="Q4_0")
    with pytest.raises(RuntimeError, match=r"Q4_0 weight of K = 96 is uint8 \(N, 54\)"):
        c().cpu_matvec(raw, torch.randn(2, 96), wtype="Q4_0")
    with pytest.raises(RuntimeError, match=r"Q4_0 rows hold whole blocks of 32 values, got K = 63"):
        c().cpu_matvec(raw, torch.randn(2, 63), wtype="Q4_0")
    with pytest.raises(RuntimeError, match=r"unknown wtype 'Q3_K' \(F32, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K\)"):
        c().cpu_matvec(raw, x, wtype="Q3_K")
    with pytest.raises(RuntimeError, match="is uint8"):
        c().cpu_matvec(raw.float(), x, wtype="Q4_0")
    with pytest.raises(RuntimeError, match="wtype 'BF16' but the weight is Float"):
        c().cpu_matvec(torch.randn(4, 64), x, wtype="BF16")
    with pytest.raises(RuntimeError, match=r"Q4_K rows hold whole blocks of 256 values, got K = 64"):
        c().cpu_dequantize(raw, "Q4_K", 64)
    with pytest.raises(RuntimeError, match=r"Q6_K weight of K = 256 is uint8 \(N, 210\)"):
        c().cpu_dequantize(raw, "Q6_K", 256)
    with pytest.raises(RuntimeError, match="unknown wtype 'q4_0'"):
        c().cpu_dequantize(raw, "q4_0", 64)
    with pytest.raises(RuntimeError, match=r"Q5_0 rows hold whole blocks of 32 values, got K = 48"):
        c().cpu_quantize_activations(torch.randn(2, 48), "Q5_0")
    with pytest.raises(RuntimeError, match="wtype must be a quantized type"):
        c().cpu_quantize_activations(x, "F32")


# ---- The session on quantized matrices ----

def session_parts(weights):
    """A _lite.Session over `weights` (name -> (address or buffer, dtype, shape)) of the tiny model below."""
    from llama_fast import _lite

    return lambda w: _lite.Session(
        n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, norm_eps=1e-5, max_positions=256, weights=w,
        owner=weights, inv_freq=[10000.0 ** (-i / 8) for i in range(8)], alibi_slopes=[], bucket_table=[], window=0,
        sinks=0, logit_softcap=0.0, scale=0.0, num_blocks=32, block_size=16, kv_dtype="F32", num_threads=2,
        isa="auto")


@pytest.fixture(scope="module")
def tiny_weights():
    """The tiny model's weights as floats, and with every matrix (the embedding too) in a quantized type
    (cycling through the 32-element ones), and the quantized ones dequantized as F32 buffers."""
    from llama_fast.config import ModelConfig
    from llama_fast.session import weight_map
    from models import random_model

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=96, max_seq_len=256,
                      head_dim=16)
    model = random_model(cfg, seed=3)
    weights, owners = weight_map(model)
    state = model.state_dict()
    quantized, dequantized = dict(weights), dict(weights)
    for i, name in enumerate(n for n, (_, _, shape) in weights.items() if len(shape) == 2):
        qtype = TYPES[i % 4]
        raw = quants.quantize(state[name].float().numpy(), QT[qtype])
        quantized[name] = (raw, qtype, list(raw.shape[:1]) + [state[name].shape[1]])
        dequantized[name] = (quants.dequantize(raw, QT[qtype]).astype(np.float32), "F32", list(state[name].shape))
    return quantized, dequantized, owners


def test_session_with_quantized_matrices(tiny_weights):
    """Logits near those of the same weights dequantized (the activations' quantization apart), and a
    sequence's logits bitwise the same alone and in a batch."""
    quantized, dequantized, owners = tiny_weights
    new = session_parts(owners)
    prompts = [[(7 * i + 3 * j) % 97 for j in range(n)] for i, n in enumerate((23, 9, 40))]
    quant, ref = new(quantized), new(dequantized)
    alone, want = [], []
    for p in prompts:
        for session, out in ((quant, alone), (ref, want)):
            seq = session.add_sequence()
            out.append(torch.from_numpy(session.step([seq], [len(p)], p, all_logits=True)))
    for got, expected in zip(alone, want):
        assert (got - expected).norm() <= 0.05 * expected.norm()
    batched = new(quantized)
    seqs = [batched.add_sequence() for _ in prompts]
    together = torch.from_numpy(batched.step(seqs, [len(p) for p in prompts], sum(prompts, []), all_logits=True))
    assert_bitwise(together, torch.cat(alone), "a batch of three prompts against each alone")


def test_session_checks_quantized_weights(tiny_weights):
    quantized, _, owners = tiny_weights
    new = session_parts(owners)
    name = "layers.0.attention.wq.weight"
    raw, qtype, shape = quantized[name]
    with pytest.raises(ValueError, match=rf"'{name}' is Q4_K, which needs a matrix \(rows, K\) with K a multiple of "
                                         r"256, got \(64, 64\)"):
        new({**quantized, name: (raw.ctypes.data, "Q4_K", shape)})
    short = np.ascontiguousarray(raw[:, :-2])
    with pytest.raises(ValueError, match=rf"'{name}' has {short.nbytes} bytes, its shape \(64, 64\) and dtype "
                                         rf"{qtype} need {raw.nbytes}"):
        new({**quantized, name: (short, qtype, shape)})
    norm = quants.quantize(np.ones((1, 64), np.float32), QT.Q8_0)
    with pytest.raises(ValueError, match="'norm.weight' is Q8_0: norms and biases must be F32 or BF16"):
        new({**quantized, "norm.weight": (norm.ctypes.data, "Q8_0", [64])})
    with pytest.raises(ValueError, match="kv_dtype must be F32 or BF16, got Q8_0"):
        from llama_fast import _lite
        _lite.Session(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, norm_eps=1e-5, max_positions=256,
                      weights=quantized, owner=owners, inv_freq=[1.0], alibi_slopes=[], bucket_table=[], window=0,
                      sinks=0, logit_softcap=0.0, scale=0.0, num_blocks=4, block_size=16, kv_dtype="Q8_0",
                      num_threads=1, isa="auto")


@pytest.mark.parametrize("qtype", TYPES)
def test_non_finite_and_tiny_blocks_quantize_alike_on_every_isa(qtype):
    """A block holding inf or NaN quantizes to NaN, a block too small for 1 / d to be finite to zeros: on every
    ISA (each used to round x * inf its own way: a tiny positive value to -d, +inf to -inf on AVX2)."""
    n = BLOCK[qtype]
    x = torch.randn(4, 2 * n, generator=torch.Generator().manual_seed(3))
    x[0, 5], x[1, n + 3], x[2, 7] = float("inf"), float("-inf"), float("nan")
    x[3, :n] = 1e-38
    got = {isa: c().cpu_quantize_activations(x, qtype, isa) for isa in supported_isas()}
    for isa, xq in got.items():
        blocks = xq.view(4, 2, n)
        assert blocks[0, 0].isnan().all() and blocks[1, 1].isnan().all() and blocks[2, 0].isnan().all(), isa
        assert (blocks[3, 0] == 0).all(), isa
        finite = torch.tensor([[False, True], [True, False], [False, True], [True, True]])
        assert_bitwise(blocks[finite], next(iter(got.values())).view(4, 2, n)[finite], f"{qtype} {isa}")
    w = make_weights(qtype, 3, 2 * n, np.random.default_rng(5))
    for isa in supported_isas():
        y = matvec(w, x, qtype, isa, threads=1)
        assert y[:3].isnan().all() and y[3].isfinite().all(), isa
