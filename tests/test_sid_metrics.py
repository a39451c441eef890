"""SID quality metrics on hand-made tables with values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from higr_dist.tokenizer.metrics import (
    collision_rate,
    concentration,
    consistency,
    layer_usage,
    pack_codes,
    prefix_groups,
    sid_report,
)

# L = 2, K = 4. Items 3 and 4 share the SID (1, 0).
CODES = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 0], [2, 3]])
CATS = np.array([7, 7, 9, 9, 9, 5])  # A A B B B C


def test_pack_codes_is_base_k():
    assert pack_codes(np.array([[1, 2], [3, 0]]), K=4).tolist() == [1 * 4 + 2, 3 * 4 + 0]
    assert pack_codes(np.zeros((3, 0), dtype=np.int64), K=4).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="outside"):
        pack_codes(np.array([[4]]), K=4)


def test_prefix_groups():
    assert prefix_groups(CODES, 1).tolist() == [0, 0, 0, 1, 1, 2]
    assert len(set(prefix_groups(CODES, 2).tolist())) == 5


def test_collision_rate_by_hand():
    assert collision_rate(CODES) == pytest.approx(2 / 6)
    assert collision_rate(np.array([[0, 0], [0, 1]])) == 0.0
    assert collision_rate(np.array([[1, 1], [1, 1], [1, 1]])) == 1.0


def test_concentration_by_hand():
    # groups by first code: {0,1,2}: A A B -> 2; {3,4}: B B -> 2; {5}: C -> 1  => 5/6
    assert concentration(CODES, CATS, 1) == pytest.approx(5 / 6)
    # full SIDs: all groups pure except none mixed -> 1.0
    assert concentration(CODES, CATS, 2) == pytest.approx(1.0)


def test_consistency_by_hand():
    # group {0,1,2}: 3 pairs, 1 same-category -> 1/3; group {3,4}: 1 pair, same -> 1;
    # singleton {5} has no pair and is left out  => (1/3 + 1) / 2
    assert consistency(CODES, CATS, 1) == pytest.approx((1 / 3 + 1) / 2)
    # at p = 2 only the collision group {3,4} has a pair, and it agrees
    assert consistency(CODES, CATS, 2) == pytest.approx(1.0)
    assert consistency(np.array([[0], [1]]), np.array([1, 1]), 1) is None


def test_layer_usage_by_hand():
    u = layer_usage(CODES, K=4)
    assert [x["used"] for x in u] == [3, 4]
    assert u[0]["usage"] == pytest.approx(0.75)
    probs = [3 / 6, 2 / 6, 1 / 6]
    assert u[0]["perplexity"] == pytest.approx(math.exp(-sum(p * math.log(p) for p in probs)))
    probs2 = [3 / 6, 1 / 6, 1 / 6, 1 / 6]
    assert u[1]["perplexity"] == pytest.approx(math.exp(-sum(p * math.log(p) for p in probs2)))


def test_sid_report_three_layers():
    # L = 3, K = 2: prefix metrics at p = 1 and p = 2
    codes = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 1, 1], [1, 1, 1]])
    cats = np.array([1, 1, 2, 3, 4])
    rep = sid_report(codes, cats, K=2)
    assert rep["collision"] == pytest.approx(2 / 5) and rep["colliding_items"] == 2
    assert rep["unique_sids"] == 4
    # p=1: {0,1,2}: 1 1 2 -> 2 ; {3,4}: 3 4 -> 1   => 3/5
    assert rep["concentration_by_prefix"]["1"] == pytest.approx(3 / 5)
    # p=2: {0,1}: pure -> 2 ; {2}: 1 ; {3,4}: 1   => 4/5
    assert rep["concentration_by_prefix"]["2"] == pytest.approx(4 / 5)
    # p=1: {0,1,2}: 1/3 ; {3,4}: 0   => 1/6 ; p=2: {0,1}: 1 ; {3,4}: 0  => 1/2
    assert rep["consistency_by_prefix"]["1"] == pytest.approx(1 / 6)
    assert rep["consistency_by_prefix"]["2"] == pytest.approx(1 / 2)
    assert rep["concentration"] == rep["concentration_by_prefix"]["1"]
    assert rep["used_codes"] == [2, 2, 2]
    assert sid_report(codes, cats, K=2, headline_prefix=2)["consistency"] == pytest.approx(0.5)
