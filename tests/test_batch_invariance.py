"""Batch invariance of the CPU decode step's matrix kernels (csrc/core/cpu_decode_isa.inc, through
llama_fast._C.cpu_matvec): for one ISA and weight dtype, an output W[r] . x[j] is bitwise the same whatever
the number of vectors in the call (one vector, a decode batch, a prompt chunk), the vector's place among
them, the other vectors, the thread count and the rows a thread is given; and it is within a tight
tolerance of fp64 math on the same values. Fresh random inputs, odd sizes around every vector width.
"""
import pytest
import torch

from llama_fast import _ext

from models import supported_isas

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="llama_fast._C is not built")

K_SIZES = (1, 7, 33, 64, 100, 576, 1000, 1536)
N_SIZES = (1, 17, 129)
MAX_VECTORS = 70


def matvec(weight, x, isa, threads=1):
    return _ext.ext().cpu_matvec(weight, x.contiguous(), num_threads=threads, isa=isa)


def operand(x, isa, dtype):
    """x (fp64) as the kernels multiply it: rounded to bf16 where bf16 weights meet native bf16 dot products."""
    return x.bfloat16().double() if isa in ("avx512bf16", "amx") and dtype == torch.bfloat16 else x.double()


def assert_bitwise(got, want, msg):
    if not torch.equal(got, want):
        diff = (got != want).nonzero()
        raise AssertionError(f"{msg}: {len(diff)} outputs differ, first at {diff[0].tolist()} "
                             f"({got[tuple(diff[0])].item()!r} vs {want[tuple(diff[0])].item()!r})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", supported_isas())
def test_every_batch_size_gives_the_one_vector_result(isa, dtype):
    """Row j of an nb-vector product (nb = 1..70: one vector, decode batches, prompt chunks) equals the product
    of x[j] alone, bit for bit: as the first nb vectors, and as a random selection of nb vectors in random
    order (other companions, another place), on 1, 2 and 3 threads."""
    gen = torch.Generator().manual_seed(11 + len(isa) + dtype.itemsize)
    for K in K_SIZES:
        for N in N_SIZES:
            weight = torch.randn(N, K, generator=gen).to(dtype)
            pool = torch.randn(MAX_VECTORS, K, generator=gen)
            alone = torch.cat([matvec(weight, pool[j:j + 1], isa) for j in range(MAX_VECTORS)])
            expected = operand(pool, isa, dtype) @ weight.double().T
            torch.testing.assert_close(alone.double(), expected, rtol=1e-5, atol=1e-5 * K ** 0.5,
                                       msg=f"K={K} N={N} against fp64")
            for nb in range(1, MAX_VECTORS + 1):
                threads = 1 + nb % 3
                assert_bitwise(matvec(weight, pool[:nb], isa, threads), alone[:nb],
                               f"K={K} N={N} first {nb} vectors, {threads} threads")
                picked = torch.randperm(MAX_VECTORS, generator=gen)[:nb]
                threads = 1 + (nb + 1) % 3
                assert_bitwise(matvec(weight, pool[picked], isa, threads), alone[picked],
                               f"K={K} N={N} {nb} vectors picked {picked.tolist()}, {threads} threads")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", supported_isas())
def test_row_ranges_give_the_same_rows(isa, dtype):
    """A block of rows multiplied on its own (as a thread's share of the rows would be) gives those rows of the
    whole product bit for bit, for row ranges that start and end anywhere in the kernels' row blocks."""
    gen = torch.Generator().manual_seed(5 + len(isa) + dtype.itemsize)
    for K in (33, 100, 576, 1000):  # 1000: fp32 at 16 lanes in K blocks (f32_group)
        weight = torch.randn(129, K, generator=gen).to(dtype)
        for nb in (1, 2, 5, 8, 9, 13, 40, 70):
            x = torch.randn(nb, K, generator=gen)
            whole = matvec(weight, x, isa, threads=2)
            for r0, r1 in ((0, 1), (1, 6), (3, 17), (5, 129), (64, 127), (128, 129)):
                assert_bitwise(matvec(weight[r0:r1], x, isa, threads=3), whole[:, r0:r1],
                               f"K={K} nb={nb} rows [{r0}, {r1})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", supported_isas())
def test_big_chunks_give_the_one_vector_result(isa, dtype):
    """A prompt chunk too big for L2 goes in passes over its vectors, with K in blocks (chain_many at 16
    lanes: 128 fp32 vectors per pass at K = 2048), and long rows (fp32 K = 6000) go in tiles of rows instead:
    each row still equals that vector alone, bit for bit, with a K tail, with rows left over from the 4-row
    tiles, on 1 and 3 threads."""
    gen = torch.Generator().manual_seed(31 + len(isa) + dtype.itemsize)
    for K in (2048, 2061, 6000):
        weight = torch.randn(23, K, generator=gen).to(dtype)
        x = torch.randn(401, K, generator=gen)
        alone = torch.cat([matvec(weight, x[j:j + 1], isa) for j in range(len(x))])
        for threads in (1, 3):
            assert_bitwise(matvec(weight, x, isa, threads), alone, f"K={K} 401 vectors, {threads} threads")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", supported_isas())
def test_error_within_the_bound_of_the_order(isa, dtype):
    """Every path against fp64 math on the same values (x rounded to bf16 where the kernels round it), within
    the rigorous error bound of the kernels' order: at 16 lanes one chain of K / 16 roundings per lane (an FMA
    per 16 fp32 elements; bf16 widened, an FMA per even or odd half of a block of 32; native bf16, a
    vdpbf16ps per 32 adding two exact products one by one), else 2 chains of K / (2 W) FMAs; a 4-level tree
    over W lanes (lanes of a 16-wide vector are first paired); the tail's FMAs (K mod 16 for fp32 at 16 lanes,
    else K mod 2 W); on AMX tiles one chain of K roundings: |error| <= depth * 2^-24 * sum |w_k x_k|, with rows
    of x shifted by a constant so that sums cancel."""
    width = {"amx": 16, "avx512bf16": 16, "avx512vnni": 16, "avx512": 16, "avx2": 8, "scalar": 1}[isa]
    per_rounding = 16 if width == 16 else 2 * width  # elements of K per rounding of one lane's chain
    block = 16 if width == 16 and dtype == torch.float32 else 2 * width  # the tail: K mod block
    gen = torch.Generator().manual_seed(23 + len(isa) + dtype.itemsize)
    for K in (7, 64, 1000, 1536):
        depth = -(-K // per_rounding) + 6 + K % block
        if isa == "amx" and dtype == torch.bfloat16:  # AMX tiles: one sum per output, a rounding per product
            depth = K + 1
        weight = torch.randn(17, K, generator=gen).to(dtype)
        for nb in (1, 4, 8, 12, 31, 64):
            x = torch.randn(nb, K, generator=gen) + 3.0
            got = matvec(weight, x, isa, threads=2).double()
            expected = operand(x, isa, dtype) @ weight.double().T
            bound = depth * 2.0 ** -24 * (operand(x, isa, dtype).abs() @ weight.double().abs().T)
            assert ((got - expected).abs() <= bound).all(), f"K={K} nb={nb}"


@pytest.mark.skipif(not _ext.has_ext() or "amx" not in supported_isas(), reason="needs AMX-BF16 (and the tiles granted)")
def test_torch_fp32_products_are_unchanged_after_amx_products():
    """The amx level was once opt-in because a torch fp32 result computed right after AMX products in the same
    process came out ~5e-4 off (docs/session.md, history). Torch's fp32 linear / bmm / matmul right after AMX
    products, on several threads, must equal bitwise what they gave before any AMX product in the test."""
    gen = torch.Generator().manual_seed(7)
    a, w = torch.randn(128, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    q, k = torch.randn(9, 128, 64, generator=gen), torch.randn(9, 128, 64, generator=gen)

    def torch_products():
        return [torch.nn.functional.linear(a, w), torch.bmm(q, k.transpose(1, 2)), torch.matmul(q, k.transpose(1, 2))]

    before = torch_products()
    weight, x = torch.randn(1536, 576, generator=gen).bfloat16(), torch.randn(64, 576, generator=gen)
    for i in range(50):
        matvec(weight, x, "amx", threads=torch.get_num_threads())
        for got, want in zip(torch_products(), before):
            assert torch.equal(got, want), f"after AMX call {i}: torch fp32 product off by {(got - want).abs().max()}"
