"""The C++ sampler (llama_fast._C.sample through ops.sample) against the reference (docs/ARCHITECTURE.md section 3b).

Exact: greedy and top_k=1 are argmax (ties to the lowest id), penalties equal reference.apply_penalties
bit for bit, a row's token does not depend on the rest of the batch, the same (seed, step) gives the same
token. Statistical: frequencies of many draws (one per step) against reference.filtered_probs, with a
chi-square test at a false-failure rate of 1e-6 (fixed seeds, so the tests are deterministic), and the
support checked exactly: a token the reference filters out is never drawn.
"""
import math
import types

import pytest
import numpy as np
import torch

from llama_fast import SamplingParams, ops, reference
from llama_fast.sampling import PenaltyWindow
from llama_fast._ext import ext

C = ext()
Z_1E6 = 4.753424  # one-sided standard normal quantile for 1e-6


def chi2_critical(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - 1e-6."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + Z_1E6 * math.sqrt(h)) ** 3


def expected_probs(row: torch.Tensor, p: SamplingParams, seen_row=None) -> torch.Tensor:
    row = row.float()
    if seen_row is not None and p.has_penalties:
        row = reference.apply_penalties(row, seen_row, p)
    return reference.filtered_probs(row, p).double()


def check_distribution(row: torch.Tensor, p: SamplingParams, seen_row=None, n=20000):
    V = row.numel()
    logits = row[None, :].expand(n, V)
    seen = None if seen_row is None else seen_row[None, :].expand(n, V)
    tokens = ops.sample(logits, p, step=torch.arange(n), seen=seen, backend="cpu")
    counts = torch.bincount(tokens, minlength=V).double()
    probs = expected_probs(row, p, seen_row)
    outside = counts[probs == 0].sum().item()
    assert outside == 0, f"{outside} draws of tokens the reference filters out"
    # Chi-square over bins with expected count >= 5; the rest pooled into one bin.
    expect = probs * n
    big = expect >= 5
    obs = counts[big].tolist()
    exp = expect[big].tolist()
    small_e = expect[~big & (probs > 0)].sum().item()
    if small_e > 0:
        obs.append(counts[~big & (probs > 0)].sum().item())
        exp.append(small_e)
    df = len(obs) - 1
    if df == 0:
        assert counts[probs > 0].sum() == n
        return
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    assert stat < chi2_critical(df), f"chi-square {stat:.1f} >= {chi2_critical(df):.1f} (df={df})"


def logits_row(V, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * scale


# ---------------------------------------------------------------------------------------------------
# exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 1000, 49152])
def test_greedy_is_argmax(dtype, V):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(9, V, generator=g) * 3).to(dtype)
    if V > 1:
        logits[0, :] = 0  # all tied: id 0
        logits[1, V // 2] = logits[1, V - 1] = 100  # tie: the lower id
    tokens = ops.sample(logits, SamplingParams(temperature=0), backend="cpu")
    assert torch.equal(tokens, logits.float().argmax(-1))
    assert torch.equal(tokens, reference.sample(logits, [SamplingParams(temperature=0)] * 9))
    if V > 1:
        assert tokens[0] == 0 and tokens[1] == V // 2


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_is_argmax(temperature):
    logits = torch.randn(64, 32000) * 2
    params = [SamplingParams(temperature=temperature, top_k=1, seed=i) for i in range(64)]
    assert torch.equal(ops.sample(logits, params, step=3, backend="cpu"), logits.argmax(-1))


def test_penalties_match_reference_exactly():
    g = torch.Generator().manual_seed(0)
    B, V = 6, 5000
    logits = torch.randn(B, V, generator=g) * 4
    seen = torch.randint(0, 4, (B, V), generator=g) * (torch.rand(B, V, generator=g) < 0.1)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.7),
        SamplingParams(frequency_penalty=0.45),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-0.3, frequency_penalty=0.123),
        SamplingParams(repetition_penalty=1.7, presence_penalty=1.1, frequency_penalty=2.9),
        SamplingParams(),
    ]
    table = ops._params_table(params)
    for seen_t in (seen.to(torch.int32), seen.to(torch.int64)):
        got = C.apply_penalties(logits, seen_t, table)
        for b, p in enumerate(params):
            want = reference.apply_penalties(logits[b], seen_t[b], p)
            assert torch.equal(got[b], want), f"row {b}: max diff {(got[b] - want).abs().max()}"


def test_penalties_past_fp32s_range_clamp_to_it():
    """A penalty whose result leaves fp32's range clamps to it: the token becomes the likeliest (or the least
    likely), on both samplers; unclamped it was inf, whose softmax is NaN, and the draw fell to id V - 1."""
    g = torch.Generator().manual_seed(3)
    V, big = 500, torch.finfo(torch.float32).max
    logits = torch.randn(4, V, generator=g)
    logits[:, 7] = 10.0   # / 1e-38: past fp32's range
    seen = torch.zeros(4, V, dtype=torch.int32)
    seen[:, 7] = 2
    seen[:, 9] = 1
    boost = [SamplingParams(temperature=t, repetition_penalty=1e-38, frequency_penalty=f, seed=s)
             for t, f, s in ((1.0, 0.0, 1), (0.5, 0.0, 2), (1.0, -3e38, 3), (0.0, -3e38, 4))]
    table = ops._params_table(boost)
    got = C.apply_penalties(logits, seen, table)
    assert got[:, 7].tolist() == [big] * 4 and torch.isfinite(got).all()
    for b, p in enumerate(boost):
        assert torch.equal(got[b], reference.apply_penalties(logits[b], seen[b], p))
    sink = [SamplingParams(temperature=1.0, frequency_penalty=3e38, seed=s) for s in range(4)]
    for sample in (lambda *a, **k: ops.sample(*a, **k, backend="cpu"), reference.sample):
        assert sample(logits, boost, seen=seen).tolist() == [7] * 4
        drawn = {t for step in range(20) for t in sample(logits, sink, step=step, seen=seen).tolist()}
        assert len(drawn) > 10 and not drawn & {7, 9, V - 1}


def test_penalised_greedy_matches_reference():
    g = torch.Generator().manual_seed(1)
    B, V = 32, 3000
    logits = torch.randn(B, V, generator=g)
    seen = (torch.rand(B, V, generator=g) < 0.2).to(torch.int32) * 3
    # Make the raw argmax a seen token so that the penalty changes the answer.
    seen[torch.arange(B), logits.argmax(-1)] = 2
    params = [SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.2)] * B
    got = ops.sample(logits, params, seen=seen, backend="cpu")
    assert torch.equal(got, reference.sample(logits, params, seen=seen))
    assert not torch.equal(got, logits.argmax(-1))


def test_row_independent_of_batch_and_order():
    g = torch.Generator().manual_seed(2)
    B, V = 24, 2000
    logits = torch.randn(B, V, generator=g) * 2
    seen = (torch.rand(B, V, generator=g) < 0.05).to(torch.int64)
    params = [
        SamplingParams(temperature=0.5 + 0.1 * (b % 7), top_k=(b % 4) * 20, top_p=[1.0, 0.9, 0.5][b % 3],
                       min_p=[0.0, 0.05][b % 2], repetition_penalty=1.1 if b % 5 == 0 else 1.0, seed=1000 + b)
        for b in range(B)
    ]
    steps = torch.arange(B) * 7
    together = ops.sample(logits, params, step=steps, seen=seen, backend="cpu")
    perm = torch.randperm(B, generator=g)
    shuffled = ops.sample(logits[perm], [params[i] for i in perm], step=steps[perm], seen=seen[perm], backend="cpu")
    assert torch.equal(shuffled, together[perm])
    for b in (0, 5, 17):
        alone = ops.sample(logits[b : b + 1], params[b], step=int(steps[b]), seen=seen[b : b + 1], backend="cpu")
        assert alone.item() == together[b].item()


def test_seed_and_step_determinism():
    logits = torch.zeros(1, 1000)  # uniform: every draw is informative
    p = SamplingParams(seed=42)
    a = [ops.sample(logits, p, step=s, backend="cpu").item() for s in range(50)]
    b = [ops.sample(logits, p, step=s, backend="cpu").item() for s in range(50)]
    assert a == b
    assert len(set(a)) > 30  # steps give different draws
    other = [ops.sample(logits, SamplingParams(seed=43), step=s, backend="cpu").item() for s in range(50)]
    assert other != a


def test_unseeded_rows_draw_fresh_seeds():
    logits = torch.zeros(1, 100000)
    draws = {ops.sample(logits, SamplingParams(), backend="cpu").item() for _ in range(10)}
    assert len(draws) > 1


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(5, 777) * 3
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=b) for b in range(5)]
    tokens, lp = ops.sample(logits, params, logprobs=True, backend="cpu")
    want = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logits_name_the_row(bad):
    logits = torch.randn(4, 50)
    logits[2, 7] = bad
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        ops.sample(logits, SamplingParams(seed=1), backend="cpu")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        ops.sample(logits, SamplingParams(temperature=0), backend="cpu")


def test_edge_cases():
    # Empty batch.
    assert ops.sample(torch.zeros(0, 10), [], backend="cpu").shape == (0,)
    # top_k larger than V is no top_k.
    logits = torch.randn(2000, 5)
    a = ops.sample(logits, SamplingParams(top_k=1000, seed=3), step=torch.arange(2000), backend="cpu")
    b = ops.sample(logits, SamplingParams(top_k=0, seed=3), step=torch.arange(2000), backend="cpu")
    assert torch.equal(a, b)
    # One-token vocabulary.
    assert ops.sample(torch.randn(3, 1), SamplingParams(top_p=0.1, seed=0), backend="cpu").tolist() == [0, 0, 0]
    # Extreme logits stay finite in the math.
    big = torch.tensor([[3e38, -3e38, 0.0], [-3e38, -3e38, -3e38]])
    assert ops.sample(big, SamplingParams(seed=0), backend="cpu").tolist()[0] == 0


def test_bad_arguments_raise():
    logits = torch.randn(2, 10)
    params = ops._params_table([SamplingParams()] * 2)
    seeds = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError):
        C.sample(logits.double(), params, seeds, seeds)
    with pytest.raises(ValueError):
        C.sample(logits[0], params, seeds, seeds)
    with pytest.raises(ValueError):
        C.sample(logits, params[:1], seeds, seeds)
    with pytest.raises(ValueError):
        C.sample(logits, params, seeds, seeds, torch.zeros(2, 9, dtype=torch.int32))
    with pytest.raises(TypeError):
        C.sample(logits, params, seeds, seeds, torch.zeros(2, 10))
    for col, value in [(0, -1.0), (0, float("nan")), (1, 1.5), (1, -2), (2, 0.0), (2, 1.5), (3, -0.1), (4, 0.0),
                       (5, float("inf"))]:
        bad = params.clone()
        bad[0, col] = value
        with pytest.raises(ValueError, match="row 0"):
            C.sample(logits, bad, seeds, seeds)
    with pytest.raises(ValueError):
        C.sample(logits, params, seeds - 1, seeds)
    with pytest.raises(ValueError):
        ops.sample(logits, [SamplingParams()], backend="cpu")


# ---------------------------------------------------------------------------------------------------
# statistical


DIST_CASES = {
    "temperature": SamplingParams(temperature=0.7, seed=11),
    "hot": SamplingParams(temperature=1.8, seed=12),
    "top_k": SamplingParams(top_k=10, seed=13),
    "top_p": SamplingParams(top_p=0.8, seed=14),
    "min_p": SamplingParams(min_p=0.1, seed=15),
    "combined": SamplingParams(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05, seed=16),
    "k_then_p": SamplingParams(temperature=0.9, top_k=6, top_p=0.7, seed=17),
}


@pytest.mark.parametrize("name", list(DIST_CASES))
def test_distribution_matches_reference(name):
    check_distribution(logits_row(64, seed=len(name)), DIST_CASES[name])


def test_distribution_with_penalties():
    row = logits_row(64, seed=5)
    seen = torch.zeros(64, dtype=torch.int32)
    seen[row.topk(8).indices] = torch.arange(1, 9, dtype=torch.int32)
    p = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.2,
                       frequency_penalty=0.1, seed=21)
    check_distribution(row, p, seen)


@pytest.mark.parametrize("V", [32000, 128256])
def test_distribution_large_vocab(V):
    # A peaked row (most mass on a few hundred tokens) exercises the radix candidate selection.
    row = logits_row(V, seed=V, scale=3.0)
    check_distribution(row, SamplingParams(top_p=0.5, seed=7), n=4000)
    check_distribution(row, SamplingParams(top_k=40, top_p=0.95, seed=8), n=4000)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_distribution_half_logits(dtype):
    row = logits_row(64, seed=9).to(dtype)
    check_distribution(row, SamplingParams(temperature=0.8, top_p=0.9, seed=31), n=10000)


def test_default_backend_on_cpu_is_the_extension(monkeypatch):
    monkeypatch.delenv("LLAMA_FAST_BACKEND", raising=False)
    calls = []
    real = C.sample
    fake = types.SimpleNamespace(sample=lambda *a: calls.append(1) or real(*a), with_cuda=False)
    monkeypatch.setattr(ops, "ext", lambda: fake)
    ops.sample(torch.randn(2, 10), SamplingParams(seed=0))
    assert calls


# ---------------------------------------------------------------------------------------------------
# penalty window (penalty_last_n)


@pytest.mark.parametrize("limits", [[None, 1, 5], [3, 64, None]])
def test_penalty_counts_match_a_recount_of_the_window(limits):
    gen = torch.Generator().manual_seed(3)
    V = 12
    histories = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (1, 7, 20)]
    params = [SamplingParams(repetition_penalty=1.2, penalty_last_n=n) for n in limits]
    rows = [PenaltyWindow(h, p, np.zeros(V, dtype=np.int32)) for h, p in zip(histories, params)]
    for _ in range(40):
        new = torch.randint(0, V, (3,), generator=gen).tolist()
        for row, token in enumerate(new):
            rows[row].push(token)
            histories[row].append(token)
        for row, n in enumerate(limits):
            window = histories[row] if n is None else histories[row][-n:]
            assert rows[row].counts.tolist() == torch.bincount(torch.tensor(window), minlength=V).tolist()


def test_penalty_last_n_is_validated():
    for bad in (0, -3, 2.5, "4"):
        with pytest.raises(ValueError, match="penalty_last_n"):
            SamplingParams(penalty_last_n=bad)
    assert SamplingParams(penalty_last_n=1).penalty_last_n == 1


def test_generation_penalises_only_the_last_n_tokens(smollm):
    """Greedy with a strong repetition penalty over the last n tokens, against the same loop written
    out with reference.sample and the window recounted from scratch at every step."""
    prompt = smollm.tokenizer.encode("The cat sat on the mat. The cat sat on the mat. The cat")
    for n in (4, None):
        params = SamplingParams(temperature=0, repetition_penalty=3.0, penalty_last_n=n)
        got = [t for (t,) in smollm.generate_ids([prompt], [params], 12)]
        history, want = list(prompt), []
        for _ in range(12):
            logits = smollm.logits(torch.tensor([history]))[0, -1:].float()
            window = history if n is None else history[-n:]
            seen = torch.bincount(torch.tensor(window), minlength=logits.shape[-1])[None]
            token = int(reference.sample(logits, [params], seen=seen)[0])
            want.append(token)
            history.append(token)
        assert got == want, n
