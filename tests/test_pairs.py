"""Slate pair construction (O1/O2/O3) and the PREF collate, on small hand-made SID tables."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from higr_dist.data.pairs import (
    PairConfig,
    PrefCollate,
    build_embedding_neighbours,
    build_neighbour_table,
    make_negatives,
    o1_permutation,
    o2_replace,
    pack_history,
    sample_rng,
    shared_prefix_len,
)
from higr_dist.schema import PREF

N = 5


def _brute_neighbours(table: np.ndarray, k: int, emb: np.ndarray | None) -> np.ndarray:
    """Reference: rank every other item by (shared prefix desc, cosine desc | item_idx asc)."""
    out = np.full((len(table), k), -1, dtype=np.int64)
    unit = None if emb is None else emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for a in range(len(table)):
        keys = []
        for j in range(len(table)):
            if j == a:
                continue
            lcp = int(shared_prefix_len(table[a], table[j]))
            tie = float(unit[a] @ unit[j]) if unit is not None else -j
            keys.append((-lcp, -tie, j))
        keys.sort()
        got = [j for _, _, j in keys[:k]]
        out[a, : len(got)] = got
    return out


def _lcp_rank_ok(table: np.ndarray, nbr: np.ndarray) -> bool:
    """Every chosen neighbour shares at least as long a prefix as every non-chosen item."""
    for a in range(len(table)):
        chosen = set(nbr[a][nbr[a] >= 0].tolist())
        lcp = shared_prefix_len(table, table[a][None, :])
        others = [lcp[j] for j in range(len(table)) if j != a and j not in chosen]
        if chosen and others and min(lcp[list(chosen)]) < max(others):
            return False
    return True


@pytest.fixture
def sid_dir(tmp_path):
    """40 items, K=4, L=3, unique SIDs; a few items share 2-code prefixes; random embeddings."""
    rng = np.random.default_rng(0)
    all_codes = np.array([(a, b, c) for a in range(4) for b in range(4) for c in range(4)])
    table = all_codes[rng.choice(len(all_codes), size=40, replace=False)].astype(np.int64)
    np.save(tmp_path / "sid_table.npy", table)
    np.save(tmp_path / "item_emb.npy", rng.normal(size=(40, 8)).astype(np.float32))
    (tmp_path / "sid_meta.json").write_text(json.dumps({"K": 4, "L": 3, "num_items": 40}))
    return tmp_path


def _pref(user: str, ts: int, pos, neg, hist) -> dict:
    return {"user_id": user, "ts": ts, "hist_items": list(hist), "hist_fb": [1.0] * len(hist),
            "pos_items": list(pos), "pos_fb": sorted([3.0, 2.5, 2.0, 1.5, 1.2][: len(pos)], reverse=True),
            "neg_items": list(neg), "neg_fb": [0.1] * len(neg)}


def test_o1_is_a_permutation_different_from_y_plus():
    pos = np.array([7, 3, 9, 1, 4])
    for i in range(200):
        y = o1_permutation(pos, sample_rng(f"u{i}", i, seed=0))
        assert y is not None and sorted(y) == sorted(pos) and not np.array_equal(y, pos)
    assert o1_permutation(np.array([5]), sample_rng("u", 0, 0)) is None
    assert o1_permutation(np.array([2, 2, 2]), sample_rng("u", 0, 0)) is None


def test_o1_deterministic_per_sample_and_seed():
    pos = np.arange(5)
    a = o1_permutation(pos, sample_rng("alice", 100, seed=3))
    b = o1_permutation(pos, sample_rng("alice", 100, seed=3))
    assert np.array_equal(a, b)
    draws = {tuple(o1_permutation(pos, sample_rng("alice", 100, seed=s))) for s in range(20)}
    assert len(draws) > 5  # the seed changes the draw
    draws = {tuple(o1_permutation(pos, sample_rng("alice", 100, 0, epoch=e))) for e in range(20)}
    assert len(draws) > 5  # so does the epoch


def test_o2_replaces_ceil_half_with_negative_items():
    pos, neg = np.array([10, 11, 12, 13, 14]), np.array([20, 21, 22, 23])
    for i in range(50):
        y = o2_replace(pos, neg, sample_rng("u", i, 0), fraction=0.5)
        replaced = y != pos
        assert replaced.sum() == math.ceil(N / 2)
        assert set(y[replaced]) <= set(neg) and len(set(y)) == N  # distinct negatives
        assert np.array_equal(y[~replaced], pos[~replaced])  # untouched positions keep order
    # fewer usable negatives than the quota: replace as many as there are
    y = o2_replace(pos, np.array([20, 12]), sample_rng("u", 0, 0), fraction=0.5)
    assert (y != pos).sum() == 1 and 20 in y
    assert o2_replace(pos, np.array([], dtype=np.int64), sample_rng("u", 0, 0), 0.5) is None
    assert o2_replace(pos, np.array([11, 13]), sample_rng("u", 0, 0), 0.5) is None  # all in y+


def test_neighbour_table_matches_brute_force_on_fixture(sid_dir):
    table = np.load(sid_dir / "sid_table.npy")
    emb = np.load(sid_dir / "item_emb.npy")
    for tie_emb in (None, emb):
        got = build_neighbour_table(table, N - 1, tie_emb, window=64)
        assert np.array_equal(got, _brute_neighbours(table, N - 1, tie_emb))
    # a narrow window stays exact in the shared-prefix criterion (ties may differ)
    narrow = build_neighbour_table(table, N - 1, emb, window=1, chunk_floats=64)
    assert _lcp_rank_ok(table, narrow)
    assert (narrow != np.arange(40)[:, None]).all()  # never the anchor itself


@settings(max_examples=30, deadline=None)
@given(num_items=st.integers(1, 30), K=st.integers(2, 4), L=st.integers(1, 3),
       k=st.integers(1, 5), window=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_neighbour_table_property(num_items, K, L, k, window, seed):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, K, size=(num_items, L))  # SIDs may repeat here: still well-defined
    got = build_neighbour_table(table, k, None, window=window, chunk_floats=37)
    assert got.shape == (num_items, k)
    assert _lcp_rank_ok(table, got)
    for a in range(num_items):
        row = got[a]
        assert ((row >= 0).sum() == min(k, num_items - 1)) and a not in row
        assert len(set(row[row >= 0].tolist())) == (row >= 0).sum()
    if window >= num_items:
        assert np.array_equal(got, _brute_neighbours(table, k, None))


def test_make_negatives_masks_and_order(sid_dir):
    table = np.load(sid_dir / "sid_table.npy")
    nbr = build_neighbour_table(table, N - 1, None)
    pos = np.array([0, 1, 2, 3, 4])
    cfg = PairConfig(objectives=["o1", "o2", "o3"])
    rej, mask = make_negatives(pos, np.array([], dtype=np.int64), sample_rng("u", 1, 0), cfg, nbr)
    assert rej.shape == (3, N) and mask.tolist() == [True, False, True]
    assert np.array_equal(rej[1], pos)  # masked rows hold y+ (a valid model input)
    assert rej[2, 0] == pos[0] and np.array_equal(rej[2, 1:], nbr[pos[0]])
    rej, mask = make_negatives(pos, np.array([30]), sample_rng("u", 1, 0),
                               PairConfig(objectives=["o3", "o2"]), nbr)
    assert mask.tolist() == [True, True] and rej[0, 0] == pos[0] and 30 in rej[1]
    with pytest.raises(ValueError, match="neighbour table"):
        make_negatives(pos, pos, sample_rng("u", 1, 0), cfg, None)


def test_pack_history_truncates_and_pads():
    items, mask, fb = pack_history([[1, 2, 3, 4], [5]], [[0.1, 0.2, 0.3, 0.4], [0.5]], 3)
    assert items.tolist() == [[2, 3, 4], [5, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert fb.dtype == np.float32 and fb[0].tolist() == pytest.approx([0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="feedback"):
        pack_history([[1, 2]], [[0.1]], 5)


def test_collate_builds_pref_batch(sid_dir):
    table = np.load(sid_dir / "sid_table.npy")
    samples = [_pref("a", 10, [0, 1, 2, 3, 4], [5, 6], range(7, 20)),
               _pref("b", 11, [9, 8, 7, 6, 5], [], [1, 2]),
               _pref("c", 12, [10, 11, 12, 13, 14, 15], [0], [3])]
    # through the real codec, as the loader delivers them
    samples = [PREF.decode(PREF.encode(s)) for s in samples]
    collate = PrefCollate(sid_dir, PairConfig(), slate_size=N, history_len=8)
    collate = pickle.loads(pickle.dumps(collate))  # workers receive a pickled copy
    batch = collate(samples)
    B, R, H, L = 3, 3, 8, 3
    assert batch.hist_codes.shape == (B, H, L) and batch.hist_mask.shape == (B, H)
    assert batch.chosen_codes.shape == (B, N, L) and batch.rejected_codes.shape == (B, R, N, L)
    assert batch.rejected_mask.tolist() == [[True, True, True], [True, False, True],
                                            [True, True, True]]
    assert batch.chosen_items[2].tolist() == [10, 11, 12, 13, 14]  # y+ cut to N
    assert batch.hist_mask.sum(1).tolist() == [8, 2, 1]
    assert torch.equal(batch.hist_codes[0], torch.from_numpy(table[list(range(12, 20))]))
    assert (batch.hist_codes[1, 2:] == 0).all() and (batch.hist_fb[1, 2:] == 0).all()
    assert torch.equal(batch.chosen_codes, torch.from_numpy(table[batch.chosen_items.numpy()]))
    assert torch.equal(batch.rejected_codes, torch.from_numpy(table[batch.rejected_items.numpy()]))
    assert batch.slates.shape == (B, 1 + R, N, L)
    assert batch.num_samples == B and batch.num_tokens == B * (1 + R) * N * L
    assert batch.objectives == ("o1", "o2", "o3")
    # deterministic: same samples -> same batch
    again = PrefCollate(sid_dir, PairConfig(), slate_size=N, history_len=8)(samples)
    assert torch.equal(again.rejected_items, batch.rejected_items)
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.hist_fb.dtype == torch.float32 and moved.hist_codes.dtype == torch.long
    assert moved.rejected_mask.dtype == torch.bool
    assert len(pickle.dumps(collate)) < 2000  # neither the table nor the neighbours travel


def test_collate_objectives_subset_and_errors(sid_dir):
    s = _pref("a", 10, [0, 1, 2, 3, 4], [], [1])
    batch = PrefCollate(sid_dir, PairConfig(objectives=["o2"]), N, 4)([s])
    assert batch.rejected_codes.shape[1] == 1 and not batch.rejected_mask.any()
    with pytest.raises(ValueError, match="pos_items"):
        PrefCollate(sid_dir, PairConfig(), N, 4)([_pref("a", 1, [0, 1], [], [1])])
    with pytest.raises(ValueError, match="at least one"):
        PrefCollate(sid_dir, PairConfig(objectives=[]), N, 4)
    (sid_dir / "item_emb.npy").unlink()
    with pytest.raises(FileNotFoundError, match="item_emb"):
        PrefCollate(sid_dir, PairConfig(), N, 4)([s])
    ok = PrefCollate(sid_dir, PairConfig(o3_tie_break="item_idx"), N, 4)([s])
    assert ok.rejected_mask[0, 2]


def test_embedding_neighbours_match_brute_force():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(30, 6)).astype(np.float32)
    emb[7] = emb[3] * 2.0  # same direction: each is the other's nearest
    got = build_embedding_neighbours(emb, N - 1, chunk_floats=70)  # several chunks
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for a in range(30):
        sim = unit @ unit[a]
        want = sorted((j for j in range(30) if j != a), key=lambda j: (-sim[j], j))[: N - 1]
        assert got[a].tolist() == want
    assert got[3, 0] == 7 and got[7, 0] == 3
    small = build_embedding_neighbours(emb[:3], N - 1)
    assert small.shape == (3, N - 1) and (small[:, 2:] == -1).all() and (small[:, :2] >= 0).all()


def test_collate_o3_by_embedding_is_the_nearest_items(sid_dir):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(40, 5)).astype(np.float32)
    np.save(sid_dir / "item_features.npy", feats)
    cfg = PairConfig(objectives=["o3"], o3_similarity="embedding",
                     o3_embedding="item_features.npy")
    batch = PrefCollate(sid_dir, cfg, N, 4)([_pref("a", 10, [6, 1, 2, 3, 4], [], [1])])
    o3 = batch.rejected_items[0, 0].tolist()
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = unit @ unit[6]
    assert o3[0] == 6 and o3[1:] == [int(j) for j in np.argsort(-sim)[1:N]]
    assert all(sim[j] >= np.sort(sim)[-N] for j in o3)  # the N-1 most similar, then the anchor
    assert PairConfig(o3_similarity="nearest").validate()  # unknown mode is a problem
    assert PairConfig(o3_embedding="../x.npy").validate()
    (sid_dir / "item_features.npy").unlink()
    with pytest.raises(FileNotFoundError, match="item_features"):
        PrefCollate(sid_dir, cfg, N, 4)([_pref("a", 10, [6, 1, 2, 3, 4], [], [1])])


def test_chosen_slate_in_time_order_when_asked(sid_dir):
    from higr_dist.schema.prefs import pref_group_of, unpack_prefs

    # y+ by feedback is [5, 2, 8]; the user watched them as 8, 5, 2
    window = _pref("u", 1, [8, 5, 2], [], [1, 3])
    window["pos_when"] = [0, 1, 2]  # pref_group_of lays y+ out in the order given
    (sample,) = unpack_prefs(pref_group_of({k: v for k, v in window.items()
                                            if k != "pos_when"}), "k")
    assert sample["pos_when"] == [0, 1, 2]
    sample = dict(sample, pos_items=[5, 2, 8], pos_when=[1, 2, 0])
    by_fb = PrefCollate(sid_dir, PairConfig(objectives=["o1"]), 3, 4)([sample])
    by_time = PrefCollate(sid_dir, PairConfig(objectives=["o1"], chosen_order="time"), 3, 4)(
        [sample])
    assert by_fb.chosen_items.tolist() == [[5, 2, 8]]
    assert by_time.chosen_items.tolist() == [[8, 5, 2]]
