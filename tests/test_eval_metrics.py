"""Slate metrics on hand-made examples (values computed by hand in the comments)."""

import math

import numpy as np
import pytest

from higr_dist.eval.metrics import SlateMetrics, slate_ild


def test_impressions_and_effective_by_hand():
    m = SlateMetrics(effective_threshold=2.0)
    # user 0: predicts 1,2,3,4,5; targets 1,9,3,8,7 with fb; effective targets {1 (2.5), 8 (3.0)}
    # user 1: predicts 10..14; targets 20..24, no effective target
    m.update(
        pred_items=np.array([[1, 2, 3, 4, 5], [10, 11, 12, 13, 14]]),
        target_items=np.array([[1, 9, 3, 8, 7], [20, 21, 22, 23, 24]]),
        target_fb=np.array([[2.5, 0.1, 1.0, 3.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]]),
    )
    r = m.result()
    # impressions: user0 hits {1,3} -> hit 1, recall 2/5; user1 0 -> means 0.5 and 0.2
    assert r["impressions"]["hit5"] == pytest.approx(0.5)
    assert r["impressions"]["recall5"] == pytest.approx(0.2)
    # effective: only user0; hits item 1 at rank 1 -> recall 1/2, dcg 1, idcg 1 + 1/log2(3)
    assert r["effective_users"] == 1
    assert r["effective"]["hit5"] == pytest.approx(1.0)
    assert r["effective"]["recall5"] == pytest.approx(0.5)
    assert r["effective"]["ndcg5"] == pytest.approx(1.0 / (1.0 + 1.0 / math.log2(3)))


def test_ndcg_rank_discount():
    m = SlateMetrics()
    # one effective target (item 7) hit at rank 3 -> ndcg = 1/log2(4) / 1 = 0.5
    m.update(np.array([[1, 2, 7, 4, 5]]), np.array([[7, 8, 9, 10, 11]]),
             np.array([[5.0, 0.0, 0.0, 0.0, 0.0]]))
    assert m.result()["effective"]["ndcg5"] == pytest.approx(0.5)


def _random_users(seed: int, users: int, items: int, dim: int):
    """Predicted slates, held-out items, their feedback and item embeddings, at random."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, items, size=(users, 5)), rng.integers(0, items, size=(users, 5)),
            rng.uniform(0, 4, size=(users, 5)), rng.normal(size=(items, dim)))


def test_merge_equals_single_pass():
    pred, tgt, fb, emb = _random_users(0, users=7, items=20, dim=3)
    whole = SlateMetrics()
    whole.update(pred, tgt, fb, emb)
    a, b = SlateMetrics(), SlateMetrics()
    a.update(pred[:2], tgt[:2], fb[:2], emb)  # uneven split, like ranks with 2 and 5 users
    b.update(pred[2:], tgt[2:], fb[2:], emb)
    merged = a.merge(b).result()
    for key in ("impressions", "effective"):
        for k, v in whole.result()[key].items():
            assert merged[key][k] == pytest.approx(v)
    assert merged["ild"] == pytest.approx(whole.result()["ild"])


def test_ild_by_hand():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # pairs: (0,1) 1-0=1, (0,2) 1-1=0, (1,2) 1 -> mean 2/3
    assert slate_ild(np.array([[0, 1, 2]]), emb)[0] == pytest.approx(2 / 3)
    # identical items -> 0 diversity; a single item -> undefined
    assert slate_ild(np.array([[0, 2, -1]]), emb)[0] == pytest.approx(0.0)
    assert np.isnan(slate_ild(np.array([[1, -1, -1]]), emb)[0])


def test_intervals_of_ndcg_and_ild_match_the_per_user_values():
    """``ci95`` is mean +- 1.96 standard errors of the per-user values, and merges exactly."""
    pred, tgt, fb, emb = _random_users(1, users=40, items=30, dim=4)
    whole = SlateMetrics(per_user=[])
    whole.update(pred, tgt, fb, emb)
    ndcg = np.asarray(whole.per_user)
    half = 1.96 * ndcg.std(ddof=1) / np.sqrt(len(ndcg))
    r = whole.result()
    assert r["ci95"]["ndcg5"] == pytest.approx([ndcg.mean() - half, ndcg.mean() + half])
    lo, hi = r["ci95"]["ild"]
    assert lo < r["ild"] < hi
    a, b = SlateMetrics(), SlateMetrics()
    a.update(pred[:15], tgt[:15], fb[:15], emb)
    b.update(pred[15:], tgt[15:], fb[15:], emb)
    merged = a.merge(b).result()["ci95"]
    for key in ("ndcg5", "ild"):
        assert merged[key] == pytest.approx(r["ci95"][key])
    assert np.isnan(SlateMetrics().result()["ci95"]["ndcg5"][0])
