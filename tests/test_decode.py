"""SID trie, HiGR coarse-to-fine decoding and flat beam search (tiny random models, CPU)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from higr_dist.decode.flat import flat_beam_decode
from higr_dist.decode.hier import RANKS, coarse_to_fine_decode, rank_by_mass
from higr_dist.decode.trie import SidTrie
from higr_dist.models.flat import Flat
from higr_dist.models.hsd import HSD, HSDConfig

TINY = HSDConfig(K=6, L=3, N=4, d_model=16, n_heads=2, ctx_layers=1, planner_layers=2,
                 gen_layers=1, history_len=6, dropout=0.0, id_buckets=32)


def _table(num_items: int, K: int, L: int, seed: int = 0) -> np.ndarray:
    keys = np.random.default_rng(seed).choice(K ** L, num_items, replace=False)
    return np.stack([(keys // K ** (L - 1 - i)) % K for i in range(L)], 1).astype(np.int64)


def _history(cfg: HSDConfig, table: np.ndarray, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    H = 5
    items = torch.randint(0, table.shape[0], (B, H), generator=g)
    mask = torch.rand(B, H, generator=g) > 0.3
    return torch.from_numpy(table)[items], mask, torch.rand(B, H, generator=g) * 3


# ---------------------------------------------------------------------------------------------
# trie
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_dense", [1 << 25, 0])  # dense tables / sparse searchsorted
def test_trie_matches_brute_force(max_dense):
    K, L = 5, 3
    table = _table(40, K, L, seed=1)
    trie = SidTrie.from_table(table, K, max_dense_entries=max_dense)
    assert trie.lookup(torch.from_numpy(table)).tolist() == list(range(40))
    rows = {tuple(r): i for i, r in enumerate(table.tolist())}
    every = torch.tensor(list(itertools.product(range(K), repeat=L)))  # all K^L codes
    want = torch.tensor([rows.get(tuple(c), -1) for c in every.tolist()])
    assert torch.equal(trie.lookup(every), want)
    assert torch.equal(trie.lookup(every.reshape(5, -1, L)), want.reshape(5, -1))
    for depth in range(L):
        combos = list(itertools.product(range(K), repeat=depth))  # [()] at depth 0
        prefixes = torch.tensor(combos, dtype=torch.long).reshape(len(combos), depth)
        counts = trie.child_counts(prefixes)  # [M, K]
        for p, row in zip(prefixes.tolist(), counts.tolist()):
            for c in range(K):
                n = sum(1 for r in table.tolist() if r[: depth + 1] == [*p, c])
                assert row[c] == n
        assert torch.equal(trie.next_mask(prefixes), counts > 0)
    # codes outside [0, K) and unknown prefixes are simply invalid
    assert trie.lookup(torch.tensor([[-1, 0, 0], [K, 0, 0]])).tolist() == [-1, -1]


def test_trie_allowed_excludes_placed_items():
    K = 4
    table = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    trie = SidTrie.from_table(table, K)
    root = torch.zeros(3, 0, dtype=torch.long)
    excl = torch.tensor([[0, 1], [3, -1], [0, 0]])  # row 2 repeats item 0: counted once
    allowed = trie.allowed(root, excl)
    assert allowed.tolist() == [[True, True, False, False],  # 0-0-* placed, 0-1-0 still free
                                [True, False, False, False],  # item 3 was the only 1-*
                                [True, True, False, False]]
    assert trie.allowed(root, torch.tensor([[0, 1, 2]]))[0].tolist() == [False, True, False, False]
    deeper = trie.allowed(torch.tensor([[0, 0]]), torch.tensor([[1]]))
    assert deeper.tolist() == [[True, False, False, False]]
    assert trie.allowed(torch.tensor([[0, 0]]), torch.tensor([[0, 1]])).sum() == 0


def test_trie_incremental_nodes_match_brute_force():
    """Walking the trie code by code (``root``/``child``, what the decoders do) reaches the same
    nodes as ``walk``, and ``allowed_at`` with random exclusions (duplicates, -1 slots, items
    elsewhere in the tree) equals a brute-force count over the table."""
    K, L = 4, 3
    table = _table(30, K, L, seed=7)
    rows = table.tolist()
    rng = np.random.default_rng(0)
    for max_dense in (1 << 25, 0):
        trie = SidTrie.from_table(table, K, max_dense_entries=max_dense)
        prefixes = torch.from_numpy(table[rng.integers(0, 30, 50)])  # [M, L] real SIDs
        prefixes[:10, 1] = torch.from_numpy(rng.integers(0, K, 10))  # some dead prefixes
        exclude = torch.from_numpy(rng.integers(-1, 30, (50, 4)))  # [M, P]
        node = trie.root(50)
        for depth in range(L):
            assert torch.equal(node, trie.walk(prefixes[:, :depth]))
            got = trie.allowed_at(depth, node, exclude)
            for m in range(50):
                p = prefixes[m, :depth].tolist()
                ex = {int(i) for i in exclude[m] if i >= 0}
                want = [any(r[:depth + 1] == [*p, c] and i not in ex for i, r in enumerate(rows))
                        for c in range(K)]
                assert got[m].tolist() == want
            node = trie.child(depth, node, prefixes[:, depth])
        assert torch.equal(trie.leaf_items(node), trie.lookup(prefixes))


def test_trie_rejects_bad_tables():
    with pytest.raises(ValueError, match="duplicate"):
        SidTrie.from_table(np.array([[0, 1], [0, 1]]), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        SidTrie.from_table(np.array([[0, 4]]), 4)
    trie = SidTrie.from_table(np.array([[0, 1]]), 4)
    with pytest.raises(ValueError):
        trie.next_mask(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(IndexError):
        trie.item_codes(torch.tensor([1]))


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------


def _check_valid(res, table: np.ndarray, N: int, rank: str = "placed") -> None:
    items = res.items
    assert items.shape[1] == N
    assert (items >= 0).all() and (items < table.shape[0]).all()
    assert torch.equal(res.codes, torch.from_numpy(table)[items])  # real SIDs of those items
    for row in items.tolist():
        assert len(set(row)) == N  # no repeats within a slate
    assert torch.isfinite(res.scores).all()
    if rank == "placed":
        assert (res.scores <= 0).all()  # log-probs
    else:
        assert (res.scores[:, :-1] >= res.scores[:, 1:] - 1e-6).all()  # best first


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), K=st.integers(2, 6), L=st.integers(1, 3),
       N=st.integers(1, 4), beam=st.integers(1, 5), extra=st.integers(0, 12),
       rank=st.sampled_from(RANKS), from_last=st.booleans())
def test_decoders_only_emit_real_distinct_items(seed, K, L, N, beam, extra, rank, from_last):
    num_items = min(K ** L, N + extra)
    if num_items < N:
        return  # not enough SIDs for a slate of N: covered by test_too_small_catalogue
    torch.manual_seed(seed)
    cfg = replace(TINY, K=K, L=L, N=N, start_from_last=from_last)
    table = _table(num_items, K, L, seed=seed)
    trie = SidTrie.from_table(table, K)
    hist = _history(cfg, table, B=3, seed=seed)
    _check_valid(coarse_to_fine_decode(HSD(cfg), *hist, trie, beam=beam, rank=rank), table, N,
                 rank)
    _check_valid(flat_beam_decode(Flat(cfg), *hist, trie, beam=beam, rank=rank), table, N, rank)


@pytest.mark.parametrize("beam,rank", [(1, "placed"), (3, "placed"), (3, "mass")])
def test_kv_cached_decoding_equals_uncached(beam, rank):
    torch.manual_seed(0)
    table = _table(60, TINY.K, TINY.L, seed=2)
    trie = SidTrie.from_table(table, TINY.K)
    hist = _history(TINY, table, B=4)
    for model, decode in ((HSD(TINY), coarse_to_fine_decode), (Flat(TINY), flat_beam_decode)):
        cached = decode(model, *hist, trie, beam=beam, rank=rank)
        plain = decode(model, *hist, trie, beam=beam, use_cache=False, rank=rank)
        assert torch.equal(cached.items, plain.items)
        assert torch.allclose(cached.scores, plain.scores, atol=1e-5)


def test_absorbed_cross_attention_decodes_the_same(monkeypatch):
    """Forcing every stack onto the absorbed cross-attention (raw memory, chosen by cost at
    large batches) changes neither decoder's slates; KV-cached still equals uncached."""
    from higr_dist.models import layers

    torch.manual_seed(6)
    table = _table(60, TINY.K, TINY.L, seed=5)
    trie = SidTrie.from_table(table, TINY.K)
    hist = _history(TINY, table, B=4, seed=1)
    for model, decode in ((HSD(TINY), coarse_to_fine_decode), (Flat(TINY), flat_beam_decode)):
        with monkeypatch.context() as m:
            m.setattr(layers, "absorb_pays", lambda *a: False)
            projected = decode(model, *hist, trie, beam=3)
        with monkeypatch.context() as m:
            m.setattr(layers, "absorb_pays", lambda *a: True)
            ctx = model.encode_context(*hist, beam=3)
            mems = ctx.planner_mem + ctx.gen_mem if isinstance(model, HSD) else ctx.mem
            assert all(isinstance(x, torch.Tensor) for x in mems)  # raw memory everywhere
            absorbed = decode(model, *hist, trie, beam=3)
            plain = decode(model, *hist, trie, beam=3, use_cache=False)
        assert torch.equal(absorbed.items, projected.items)
        assert torch.allclose(absorbed.scores, projected.scores, atol=1e-5)
        assert torch.equal(plain.items, absorbed.items)


@pytest.mark.parametrize("which", ["hier", "flat"])
def test_wide_beam_finds_the_best_first_item(which):
    """With beam >= catalogue size the search is exhaustive: item 1 is the argmax of the
    teacher-forced log-prob over all items, and its score is that log-prob."""
    torch.manual_seed(1)
    table = _table(25, TINY.K, TINY.L, seed=3)
    trie = SidTrie.from_table(table, TINY.K)
    hc, hm, hf = _history(TINY, table, B=3)
    model = HSD(TINY) if which == "hier" else Flat(TINY)
    model.eval()
    decode = coarse_to_fine_decode if which == "hier" else flat_beam_decode
    res = decode(model, hc, hm, hf, trie, beam=25, N=1)
    slates = torch.from_numpy(table)[None, :, None, :].expand(3, -1, -1, -1)  # [B, I, 1, L]
    with torch.no_grad():
        lp = model.slate_logprobs(hc, hm, hf, slates).sum((-1, -2))  # [B, I]
    assert res.items[:, 0].tolist() == lp.argmax(1).tolist()
    assert torch.allclose(res.scores[:, 0], lp.max(1).values, atol=1e-5)


def test_hier_scores_and_plan_feedback_are_consistent():
    """The decoded slate's per-item scores equal its teacher-forced log-probs (the planner
    really receives the placed items)."""
    torch.manual_seed(2)
    table = _table(50, TINY.K, TINY.L, seed=4)
    trie = SidTrie.from_table(table, TINY.K)
    hist = _history(TINY, table, B=3)
    for model, decode in ((HSD(TINY), coarse_to_fine_decode), (Flat(TINY), flat_beam_decode)):
        model.eval()
        res = decode(model, *hist, trie, beam=4)
        with torch.no_grad():
            lp = model.slate_logprobs(*hist, res.codes[:, None]).sum(-1)[:, 0]  # [B, N]
        assert torch.allclose(res.scores, lp, atol=1e-4)


def test_catalogue_of_exactly_n_items_uses_them_all():
    torch.manual_seed(3)
    cfg = replace(TINY, K=2, L=2, N=4)
    table = _table(4, 2, 2)
    trie = SidTrie.from_table(table, 2)
    hist = _history(cfg, table, B=5)
    for res in (coarse_to_fine_decode(HSD(cfg), *hist, trie, beam=1),
                flat_beam_decode(Flat(cfg), *hist, trie, beam=1)):
        assert all(sorted(r) == [0, 1, 2, 3] for r in res.items.tolist())


def test_too_small_catalogue_and_bad_arguments():
    cfg = replace(TINY, N=4)
    table = _table(3, cfg.K, cfg.L)
    trie = SidTrie.from_table(table, cfg.K)
    hist = _history(cfg, table, B=1)
    with pytest.raises(ValueError, match="fewer than the slate size"):
        coarse_to_fine_decode(HSD(cfg), *hist, trie)
    with pytest.raises(ValueError, match="fewer than the slate size"):
        flat_beam_decode(Flat(cfg), *hist, trie)
    big = SidTrie.from_table(_table(20, cfg.K + 1, cfg.L), cfg.K + 1)
    with pytest.raises(ValueError, match="trie has K"):
        coarse_to_fine_decode(HSD(cfg), *hist, big)
    with pytest.raises(ValueError, match="beam"):
        coarse_to_fine_decode(HSD(cfg), *hist, SidTrie.from_table(_table(9, 6, 3), 6), beam=0)


def test_decoding_restores_training_mode_and_is_deterministic():
    torch.manual_seed(4)
    cfg = replace(TINY, dropout=0.5)
    table = _table(30, cfg.K, cfg.L)
    trie = SidTrie.from_table(table, cfg.K)
    hist = _history(cfg, table, B=2)
    model = HSD(cfg).train()
    a = coarse_to_fine_decode(model, *hist, trie, beam=3)
    b = coarse_to_fine_decode(model, *hist, trie, beam=3)
    assert model.training  # restored
    assert torch.equal(a.items, b.items)  # dropout was off while decoding


@pytest.mark.gpu
def test_cuda_decoding_matches_cpu():
    torch.manual_seed(5)
    table = _table(60, TINY.K, TINY.L)
    trie = SidTrie.from_table(table, TINY.K)
    hist = _history(TINY, table, B=4)
    for model, decode in ((HSD(TINY), coarse_to_fine_decode), (Flat(TINY), flat_beam_decode)):
        cpu = decode(model, *hist, trie, beam=3)
        gpu = decode(model.cuda(), *(t.cuda() for t in hist), trie, beam=3)
        assert torch.equal(gpu.items.cpu(), cpu.items)


def test_rank_by_mass_sums_duplicates_and_breaks_ties_by_item():
    cand = torch.tensor([[7, 3, 7, -1, 5, 3], [2, 2, 9, 4, 1, -1]])
    w = torch.tensor([[0.2, 0.3, 0.25, 9.0, 0.1, 0.05], [0.5, 0.5, 0.2, 0.2, 0.9, 5.0]])
    items, mass = rank_by_mass(cand, w, 3)
    assert items.tolist() == [[7, 3, 5], [2, 1, 4]]  # 4 before 9: equal mass, smaller id
    assert torch.allclose(mass, torch.tensor([[0.45, 0.35, 0.1], [1.0, 0.9, 0.2]]))
    with pytest.raises(RuntimeError):
        rank_by_mass(torch.tensor([[1, 1, -1]]), torch.ones(1, 3), 2)


@pytest.mark.parametrize("which", ["hier", "flat"])
def test_mass_ranking_orders_by_expected_presence(which):
    """``mass`` returns the placed slate's items and the other candidates by summed weight;
    with a beam of one it has no other candidates, so it returns the placed items, reordered
    by their path-weighted probabilities (monotone non-increasing along the plan)."""
    torch.manual_seed(7)
    table = _table(40, TINY.K, TINY.L, seed=8)
    trie = SidTrie.from_table(table, TINY.K)
    hist = _history(TINY, table, B=4, seed=3)
    model = HSD(TINY) if which == "hier" else Flat(TINY)
    decode = coarse_to_fine_decode if which == "hier" else flat_beam_decode
    placed = decode(model, *hist, trie, beam=1, rank="placed")
    mass = decode(model, *hist, trie, beam=1, rank="mass")
    assert torch.equal(mass.items, placed.items)  # path weights only decrease along the plan
    assert (mass.scores[:, :-1] >= mass.scores[:, 1:]).all()
    wide = decode(model, *hist, trie, beam=6, rank="mass")
    assert (wide.scores[:, :-1] >= wide.scores[:, 1:] - 1e-6).all()
