"""The C++-backed KV caches: what goes in comes out (against plain concatenation), across ragged steps,
forks (copy-on-write), frees, window-with-sinks eviction and reuse of freed blocks; running out of blocks is
a clean exception; and decode attention reads the paged layout exactly as the reference expects.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_fast import CacheFullError, PagedKVCache, SpanBias, StaticKVCache, reference
from llama_fast._ext import ext

C = ext()
L, H, D = 2, 2, 4  # layers, KV heads, head dim of the small caches


class Tokens:
    """Distinct K/V values: token number n has K filled with n and V with -n (per layer offset)."""

    def __init__(self):
        self.n = 0

    def take(self, B, T):
        vals = torch.arange(self.n + 1, self.n + 1 + B * T, dtype=torch.float32).reshape(B, T)
        self.n += B * T
        k = torch.stack([vals + 1e6 * layer for layer in range(L)])[..., None, None].expand(L, B, T, H, D)
        return k.contiguous(), (-k).contiguous()


# ---------------------------------------------------------------------------------------------------
# static cache


def test_static_cache_ragged_steps():
    B, S = 3, 20
    cache = StaticKVCache(L, B, S, H, D)
    tok = Tokens()
    expect = [[[] for _ in range(B)] for _ in range(L)]
    for T, kept in [(5, [5, 3, 1]), (1, None), (4, [0, 4, 2])]:
        k, v = tok.take(B, T)
        pos = cache.begin_step(T)
        assert torch.equal(pos, cache.seqlens.long()[:, None] + torch.arange(T))
        for layer in range(L):
            cache.write(layer, k[layer], v[layer])
        assert cache.step_seqlens.tolist() == [int(s) + T for s in cache.seqlens]
        cache.end_step(kept)
        kept = kept or [T] * B
        for layer in range(L):
            for b in range(B):
                expect[layer][b].append(k[layer, b, : kept[b]])
    for layer in range(L):
        for b in range(B):
            n = int(cache.seqlens[b])
            want = torch.cat(expect[layer][b])
            assert torch.equal(cache.k[layer][b, :n], want)
            assert torch.equal(cache.v[layer][b, :n], -want)


def test_static_cache_full_and_bad_input():
    cache = StaticKVCache(1, 2, 4, H, D)
    cache.begin_step(4)
    cache.write(0, torch.ones(2, 4, H, D), torch.ones(2, 4, H, D))
    cache.end_step()
    with pytest.raises(CacheFullError):
        cache.begin_step(1)
    cache.reset()
    cache.begin_step(2)
    with pytest.raises(ValueError):
        cache.write(0, torch.ones(2, 3, H, D), torch.ones(2, 3, H, D))  # T differs from the step's
    with pytest.raises(ValueError):
        cache.write(0, torch.ones(2, 2, H, D + 1), torch.ones(2, 2, H, D + 1))
    with pytest.raises(ValueError):
        cache.write(0, torch.ones(3, 2, H, D), torch.ones(3, 2, H, D))
    with pytest.raises(IndexError):
        C.static_write(cache.k[0], cache.v[0], torch.ones(2, 2, H, D), torch.ones(2, 2, H, D),
                       torch.tensor([3, 0], dtype=torch.int32))
    with pytest.raises(IndexError):
        C.static_write(cache.k[0], cache.v[0], torch.ones(2, 1, H, D), torch.ones(2, 1, H, D),
                       torch.tensor([-1, 0], dtype=torch.int32))
    with pytest.raises(ValueError):
        StaticKVCache(1, 0, 4, H, D)


# ---------------------------------------------------------------------------------------------------
# paged cache: a model of what each sequence must hold


class Model:
    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.seqs: dict[int, list[torch.Tensor]] = {}  # seq -> per layer K (n, H, D); V is -K
        self.tok = Tokens()

    def add(self):
        s = self.cache.add_sequence()
        self.seqs[s] = [torch.zeros(0, H, D) for _ in range(L)]
        return s

    def fork(self, s):
        c = self.cache.fork(s)
        self.seqs[c] = [t.clone() for t in self.seqs[s]]
        return c

    def free(self, s):
        self.cache.free(s)
        del self.seqs[s]

    def evicted(self, s, dropped):
        """Mirror the cache's eviction: `dropped` tokens right after the sinks, whole blocks' worth."""
        c = self.cache
        if dropped == 0:
            return
        n = self.seqs[s][0].shape[0]
        invisible = n - c.window + 1 - c.sink_tokens
        assert c.window is not None and dropped % c.block_size == 0 and 0 < dropped <= invisible
        keep = torch.cat([torch.arange(c.sink_tokens), torch.arange(c.sink_tokens + dropped, n)])
        self.seqs[s] = [t[keep] for t in self.seqs[s]]

    def append(self, ids, T, kept=None):
        B = len(ids)
        k, v = self.tok.take(B, T)
        self.cache.set_batch(ids)
        ev = {s: self.cache.evicted(s) for s in ids}
        try:
            pos = self.cache.begin_step(T)
        finally:  # eviction may run even when the step then fails for lack of blocks
            for s in ids:
                self.evicted(s, self.cache.evicted(s) - ev[s])
        for b, s in enumerate(ids):  # true positions: the tokens held plus those evicted
            start = self.seqs[s][0].shape[0] + self.cache.evicted(s)
            assert pos[b].tolist() == list(range(start, start + T))
        for layer in range(L):
            self.cache.write(layer, k[layer], v[layer])
        self.cache.end_step(kept)
        kept = kept if kept is not None else [T] * B
        for b, s in enumerate(ids):
            for layer in range(L):
                self.seqs[s][layer] = torch.cat([self.seqs[s][layer], k[layer, b, : kept[b]]])

    def check(self):
        used = set()
        for s, layers in self.seqs.items():
            assert self.cache.length(s) == layers[0].shape[0]
            for layer in range(L):
                gk, gv = self.cache.gather(s, layer)
                assert torch.equal(gk, layers[layer]), f"seq {s} layer {layer}"
                assert torch.equal(gv, -layers[layer])
            used.update(self.cache.manager.blocks(s))
        assert self.cache.num_free_blocks + len(used) == self.cache.num_blocks
        for b in used:
            holders = sum(b in self.cache.manager.blocks(s) for s in self.seqs)
            assert self.cache.manager.refcount(b) == holders


def test_paged_basic_and_layout_matches_reference_attention():
    cache = PagedKVCache(L, 16, 4, H, D)
    m = Model(cache)
    a, b = m.add(), m.add()
    m.append([a, b], 6, kept=[6, 3])
    m.append([b], 7)
    m.append([a, b], 1)
    m.check()
    # decode_attention over the paged layout equals attention over the concatenated K/V.
    cache.set_batch([a, b])
    q = torch.randn(2, 1, H * 2, D)
    out = reference.decode_attention(q, cache.k[0], cache.v[0], cache.step_seqlens, SpanBias(), cache.block_table)
    for row, s in enumerate([a, b]):
        k = m.seqs[s][0][None]
        n = k.shape[1]
        dense_k = torch.zeros(1, n, H, D)
        dense_k[0] = k[0]
        want = reference.decode_attention(q[row : row + 1], dense_k, -dense_k, torch.tensor([n], dtype=torch.int32))
        torch.testing.assert_close(out[row : row + 1], want)


def test_fork_shares_the_prompt_copy_on_write():
    cache = PagedKVCache(L, 32, 4, H, D)
    m = Model(cache)
    p = m.add()
    m.append([p], 10)  # 3 blocks, the last one partly filled
    free0 = cache.num_free_blocks
    kids = [m.fork(p) for _ in range(3)]
    assert cache.num_free_blocks == free0  # the prompt is stored once
    m.append([p] + kids, 1)  # each row un-shares the last partial block (one keeps the original)
    assert cache.num_free_blocks == free0 - 3
    m.append([p] + kids, 5)
    m.check()
    m.free(p)
    m.check()
    for s in kids:
        m.free(s)
    assert cache.num_free_blocks == cache.num_blocks


def test_out_of_blocks_is_a_clean_error():
    cache = PagedKVCache(L, 4, 4, H, D)
    m = Model(cache)
    a, b = m.add(), m.add()
    m.append([a], 9)  # 3 blocks
    with pytest.raises(CacheFullError, match="out of blocks"):
        m.append([a, b], 4)
    m.check()  # nothing changed
    m.append([b], 4)
    m.check()
    with pytest.raises(CacheFullError):
        m.append([b], 1)
    m.free(a)
    m.append([b], 1)
    m.check()


def test_window_with_sinks_constant_memory():
    bs, W, S = 4, 10, 2
    cache = PagedKVCache(L, 8, bs, H, D, window=W, sink_tokens=S)
    m = Model(cache)
    s = m.add()
    m.append([s], 7)
    for step in range(200):
        m.append([s], 1)
        m.check()
        n = cache.length(s)
        assert n <= S + W - 1 + bs  # constant memory
    assert cache.evicted(s) > 150
    # The survivors: the stream's first S tokens, then its most recent tokens, in order.
    k = m.seqs[s][0][:, 0, 0]
    assert k[:S].tolist() == [1.0, 2.0]
    total = 7 + 200
    assert k[-(W - 1):].tolist() == [float(x) for x in range(total - W + 2, total + 1)]


def test_window_eviction_attention_equals_full_cache():
    """With window + sinks (no position-dependent bias), attention of the newest query over the evicted
    cache equals attention over the full stream: eviction drops only keys no query can see."""
    bs, W, S = 4, 9, 3
    span = SpanBias(window=W, sink_tokens=S)
    cache = PagedKVCache.for_span(1, 16, bs, H, D, span)
    full = StaticKVCache(1, 1, 200, H, D)
    seq = cache.add_sequence()
    cache.set_batch([seq])
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        T = 5 if step == 0 else 1
        k, v = torch.randn(1, T, H, D, generator=g), torch.randn(1, T, H, D, generator=g)
        q = torch.randn(1, T, 2 * H, D, generator=g)
        for c in (cache, full):
            c.begin_step(T)
            c.write(0, k, v)
        got = reference.decode_attention(q, cache.k[0], cache.v[0], cache.step_seqlens, span, cache.block_table)
        want = reference.decode_attention(q, full.k[0], full.v[0], full.step_seqlens, span)
        torch.testing.assert_close(got, want)
        for c in (cache, full):
            c.end_step()
    assert cache.evicted(seq) > 0


def test_window_sinks_with_shared_blocks():
    # Forked streams with unaligned sinks: the sink copy must un-share its target first.
    bs, W, S = 4, 8, 3
    cache = PagedKVCache(L, 24, bs, H, D, window=W, sink_tokens=S)
    m = Model(cache)
    p = m.add()
    m.append([p], 14)
    kid = m.fork(p)
    for _ in range(30):
        m.append([p, kid], 1)
        m.check()


@pytest.mark.parametrize("sinks", [0, 3, 4])
def test_eviction_keeps_keys_and_hands_out_true_positions(sinks):
    """Eviction drops keys but never rewrites the survivors (they stay rotated where they were written), and
    begin_step hands out each row's true positions (tokens ever appended), in forks too: a fork that falls
    behind evicts at other times than its parent and keeps its own keys."""
    bs, W = 4, 9
    cache = PagedKVCache(1, 40, bs, H, D, window=W, sink_tokens=sinks)
    g = torch.Generator().manual_seed(sinks)
    held: dict[int, torch.Tensor] = {}  # sequence -> the keys (n, H, D) it should hold
    appended: dict[int, int] = {}  # sequence -> tokens ever appended

    def step(ids, T):
        cache.set_batch(ids)
        before = {s: cache.evicted(s) for s in ids}
        positions = cache.begin_step(T)  # (B, T)
        for b, s in enumerate(ids):
            assert positions[b].tolist() == list(range(appended[s], appended[s] + T))
            dropped = cache.evicted(s) - before[s]
            if dropped:
                held[s] = torch.cat([held[s][:sinks], held[s][sinks + dropped:]])
        k = torch.randn(len(ids), T, H, D, generator=g)
        cache.write(0, k, torch.zeros_like(k))
        cache.end_step()
        for b, s in enumerate(ids):
            held[s] = torch.cat([held.get(s, k[b, :0]), k[b]])
            appended[s] = appended.get(s, 0) + T

    a = cache.add_sequence()
    appended[a] = 0
    step([a], 13)
    b = cache.fork(a)
    held[b], appended[b] = held[a].clone(), appended[a]
    for i in range(40):
        step([a, b] if i % 3 else [a], 1)  # b falls behind: the two evict at different times
        for s in (a, b):
            assert cache.length(s) + cache.evicted(s) == appended[s]
            assert torch.equal(cache.gather(s, 0)[0], held[s])
    assert cache.evicted(a) > cache.evicted(b) > 0


ops_strategy = st.lists(
    st.tuples(st.sampled_from(["add", "append", "fork", "free", "ragged"]), st.integers(0, 10 ** 6),
              st.integers(1, 9)),
    min_size=1, max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy, bs=st.sampled_from([1, 3, 4]), num_blocks=st.integers(4, 24),
       window=st.sampled_from([None, None, (6, 0), (7, 2), (9, 5)]))
def test_paged_cache_property(ops, bs, num_blocks, window):
    kw = {} if window is None else {"window": window[0], "sink_tokens": window[1]}
    cache = PagedKVCache(L, num_blocks, bs, H, D, **kw)
    m = Model(cache)
    for op, pick, T in ops:
        live = sorted(m.seqs)
        try:
            if op == "add" or not live:
                m.add()
            elif op == "fork":
                m.fork(live[pick % len(live)])
            elif op == "free":
                m.free(live[pick % len(live)])
            else:
                ids = [live[(pick + j) % len(live)] for j in range(1 + pick % min(3, len(live)))]
                ids = list(dict.fromkeys(ids))
                kept = [T - (pick + j) % T for j in range(len(ids))] if op == "ragged" else None
                m.append(ids, T, kept)
        except CacheFullError:
            # Eviction may have run (the model mirrors it); nothing else changed.
            for s in m.seqs:
                n = cache.length(s)
                if n != m.seqs[s][0].shape[0]:
                    pytest.fail("state changed on CacheFullError")
        m.check()


def test_paged_bad_input():
    cache = PagedKVCache(1, 4, 4, H, D)
    s = cache.add_sequence()
    with pytest.raises(IndexError):
        cache.fork(12345)
    with pytest.raises(IndexError):
        cache.set_batch([s, 99])
    with pytest.raises(ValueError):
        cache.set_batch([s, s])
    cache.free(s)
    with pytest.raises(IndexError):
        cache.free(s)
    with pytest.raises(IndexError):
        cache.length(s)
    # A block table from another (bigger) cache: ids outside this pool are refused.
    big = PagedKVCache(1, 64, 4, H, D)
    t = big.add_sequence()
    big.set_batch([t])
    for _ in range(10):
        big.begin_step(4)
        big.write(0, torch.ones(1, 4, H, D), torch.ones(1, 4, H, D))
        big.end_step()
    table = big.block_table
    with pytest.raises(IndexError):
        C.paged_write(cache.k[0], cache.v[0], torch.ones(1, 1, H, D), torch.ones(1, 1, H, D), table,
                      torch.tensor([39], dtype=torch.int32))
    with pytest.raises(IndexError):  # beyond the table's width
        C.paged_write(cache.k[0], cache.v[0], torch.ones(1, 1, H, D), torch.ones(1, 1, H, D),
                      torch.zeros(1, 2, dtype=torch.int32), torch.tensor([8], dtype=torch.int32))
    with pytest.raises(TypeError):
        C.paged_write(cache.k[0], cache.v[0], torch.ones(1, 1, H, D), torch.ones(1, 1, H, D),
                      torch.zeros(1, 2, dtype=torch.int64), torch.tensor([0], dtype=torch.int32))
    with pytest.raises(IndexError):
        C.copy_blocks(cache.k, cache.v, torch.tensor([[0, 4, 1]]))
    with pytest.raises(IndexError):
        C.copy_blocks(cache.k, cache.v, torch.tensor([[0, 1, 5]]))
    with pytest.raises(IndexError):
        C.gather_paged(cache.k[0], torch.tensor([0, 7], dtype=torch.int32), 6)
    with pytest.raises(ValueError):
        PagedKVCache(1, 4, 4, H, D, window=4, sink_tokens=4)
    # Counts past a sequence's limit: no block count wrapped around, and no pool allocated before it is refused.
    with pytest.raises(CacheFullError, match="2\\^31 - 1 tokens"):
        cache.blocks_needed([cache.add_sequence()], 2**63 - 1)
    for num_blocks in (2**40, -5):
        with pytest.raises(ValueError, match="num_blocks must be in"):
            C.PagedBlockManager(num_blocks, 4)
