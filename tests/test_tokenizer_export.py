"""Collision resolution, SID index, RQ-KMeans, and the stage's export over real ITEM shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from higr_dist.data.shardio import write_listing, write_shard
from higr_dist.models.pcrq_vae import PCRQVAEConfig, PCRQVAELossConfig
from higr_dist.schema.items import ITEM
from higr_dist.stages.base import StageInputs
from higr_dist.stages.tokenizer import tokenizer_stage
from higr_dist.tokenizer.export import (
    CollisionError,
    build_sid_index,
    load_items,
    lookup_sids,
    resolve_collisions,
)
from higr_dist.tokenizer.metrics import colliding_mask
from higr_dist.tokenizer.rq_kmeans import RQKMeans, RQKMeansConfig, fit_rq_kmeans, tensor_chunks

# ---------------------------------------------------------------------------------------------
# collisions
# ---------------------------------------------------------------------------------------------


def test_resolution_by_hand_nearest_free_code():
    codes = np.array([[0, 1], [0, 1], [0, 2], [1, 1]])
    book = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # layer-L codewords
    resid = np.array([[0.9, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    res = resolve_collisions(codes, 4, resid, book)
    # item 1 is nearest to codeword 1 and keeps it; item 0 takes the nearest free code (0)
    assert res.sids.tolist() == [[0, 0], [0, 1], [0, 2], [1, 1]]
    assert (res.collisions_before, res.collision_rate_before, res.moved) == (2, 0.5, 1)


def test_resolution_without_residuals_keeps_lowest_item():
    codes = np.array([[2, 0], [2, 0], [2, 0], [2, 1]])
    res = resolve_collisions(codes, 4)
    assert res.sids.tolist() == [[2, 0], [2, 2], [2, 3], [2, 1]]


def test_resolution_fails_clearly_only_when_the_catalogue_exceeds_k_to_the_l():
    with pytest.raises(CollisionError, match="increase K or L"):
        resolve_collisions(np.zeros((5, 2), dtype=np.int64), K=2)


def test_overfull_prefix_spills_to_the_nearest_sibling_with_room():
    # 3 identical items, K=2, L=2: prefix [0] can hold 2, the third spills to prefix [1]
    res = resolve_collisions(np.zeros((3, 2), dtype=np.int64), K=2)
    assert res.sids.tolist() == [[0, 0], [0, 1], [1, 0]]
    assert (res.spilled, res.collisions_before) == (1, 3)
    # a sibling that is itself full is skipped: codes 0 and 1 full (K=3, cap 3), 2 has room
    codes = np.array([[0, 0]] * 4 + [[1, 0], [1, 1], [1, 2]])
    res = resolve_collisions(codes, K=3)
    assert len(np.unique(res.sids, axis=0)) == 7 and res.spilled == 1
    assert res.sids[3, 0] == 2  # cyclic distance: 0 -> 2 is 1 step, like 0 -> 1 (full)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 3), st.integers(1, 40), st.integers(0, 10_000))
def test_resolution_properties(K, L, n, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, K, size=(n, L))
    codes[:, : L - 1] = rng.integers(0, 2, size=(n, L - 1))  # few prefixes: many collisions
    resid, book = rng.normal(size=(n, 3)), rng.normal(size=(K, 3))
    if n > K ** L:
        with pytest.raises(CollisionError):
            resolve_collisions(codes, K, resid, book)
        return
    prefix_sizes = np.unique(codes[:, : L - 1], axis=0, return_counts=True)[1]
    res = resolve_collisions(codes, K, resid, book)
    again = resolve_collisions(codes.copy(), K, resid.copy(), book.copy())
    assert np.array_equal(res.sids, again.sids)  # deterministic
    assert len(np.unique(res.sids, axis=0)) == n  # unique
    if prefix_sizes.max() <= K:  # nothing to spill: prefixes untouched
        assert res.spilled == 0
        assert np.array_equal(res.sids[:, : L - 1], codes[:, : L - 1])
    else:
        assert res.spilled == int((res.sids[:, : L - 1] != codes[:, : L - 1]).any(1).sum()) > 0
    untouched = ~colliding_mask(codes)
    if res.spilled == 0:  # a spilled item may take a code a unique item held; else none move
        assert np.array_equal(res.sids[untouched], codes[untouched])  # non-colliding unchanged
    assert res.sids.min() >= 0 and res.sids.max() < K


def test_sid_index_lookup():
    sids = np.array([[1, 2], [0, 3], [3, 3]])
    keys, items = build_sid_index(sids, 4)
    assert keys.tolist() == sorted(keys.tolist())
    got = lookup_sids(keys, items, np.array([[[0, 3], [1, 2]], [[2, 2], [3, 3]]]), 4)
    assert got.tolist() == [[1, 0], [-1, 2]]
    assert lookup_sids(keys, items, np.array([[9, 0]]), 4).tolist() == [-1]
    with pytest.raises(ValueError, match="not unique"):
        build_sid_index(np.array([[1, 1], [1, 1]]), 4)


# ---------------------------------------------------------------------------------------------
# RQ-KMeans
# ---------------------------------------------------------------------------------------------


def _clusters(n_per: int = 30, k: int = 6, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 10
    labels = torch.arange(k).repeat_interleave(n_per)
    return centers[labels] + 0.1 * torch.randn(k * n_per, d, generator=g), labels


def test_rq_kmeans_is_deterministic_and_recovers_clusters():
    x, labels = _clusters()
    cfg = RQKMeansConfig(K=6, L=2, iters=10, seed=3)
    a = RQKMeans(cfg).fit(tensor_chunks(x, 50))
    b = RQKMeans(cfg).fit(tensor_chunks(x, 50))
    assert torch.equal(a.centers, b.centers)
    codes, z_q, last = a.encode(x)
    # layer 1 = the generating clusters (a bijection between labels and codes)
    pairs = set(zip(labels.tolist(), codes[:, 0].tolist()))
    assert len(pairs) == 6 and len({c for _, c in pairs}) == 6
    assert torch.allclose(z_q, a.centers[0][codes[:, 0]] + a.centers[1][codes[:, 1]], atol=1e-5)
    assert torch.allclose(last, x - a.centers[0][codes[:, 0]], atol=1e-5)
    # chunking does not change the result beyond float rounding
    c = RQKMeans(cfg).fit(tensor_chunks(x, 17))
    assert torch.allclose(a.centers, c.centers, atol=1e-4)
    # the rq_kmeans-mode model encodes like the fitted object
    model = a.to_model(input_dim=5)
    assert torch.equal(model.encode(x).codes, codes)


# ---------------------------------------------------------------------------------------------
# export over real ITEM shards
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def etl_dir(tmp_path):
    x, labels = _clusters(n_per=20, k=5, d=6, seed=1)
    x = x.numpy().astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))  # shards not in item_idx order
    items = tmp_path / "items"
    items.mkdir()
    listing = []
    for shard, part in enumerate(np.array_split(order, 2)):
        samples = [(f"i{i:05d}", {"item_idx": int(i), "item_id": f"v{i}",
                                  "categories": [int(labels[i]), 99], "x": x[i]}) for i in part]
        listing.append(write_shard(items / f"shard-{shard:06d}.tar", ITEM, samples))
    write_listing(items, listing)
    return tmp_path, x, labels.numpy()


def test_load_items_orders_by_item_idx(etl_dir):
    root, x, labels = etl_dir
    items = load_items(root / "items")
    assert np.array_equal(items.x, x) and np.array_equal(items.categories, labels)


def _check_export(out, n, L, K, emb_dim, x, labels):
    table = np.load(out / "sid_table.npy")
    assert table.shape == (n, L) and table.dtype == np.int64
    assert len(np.unique(table, axis=0)) == n
    meta = json.loads((out / "sid_meta.json").read_text())
    assert (meta["K"], meta["L"], meta["num_items"]) == (K, L, n)
    assert 0.0 <= meta["collision_rate_before"] <= 1.0 and "resolution" in meta
    assert np.load(out / "item_emb.npy").shape == (n, emb_dim)
    assert np.array_equal(np.load(out / "item_features.npy"), x)
    assert np.array_equal(np.load(out / "item_categories.npy"), labels)
    report = json.loads((out / "sid_report.json").read_text())
    assert report["collision_after"] == 0.0 and len(report["perplexity"]) == L
    keys, items = np.load(out / "sid_index_keys.npy"), np.load(out / "sid_index_items.npy")
    assert np.array_equal(lookup_sids(keys, items, table, K), np.arange(n))
    return report


def test_stage_finalize_exports_trained_tokenizer(etl_dir, tmp_path):
    root, x, labels = etl_dir
    stage = tokenizer_stage()
    inputs = StageInputs(etl_dir=str(root))
    cfg = PCRQVAEConfig(input_dim=6, hidden_dims=[16], latent_dim=4, K=16, L=3)
    assert stage.validate(cfg, PCRQVAELossConfig(), inputs) == []
    bad = stage.validate(PCRQVAEConfig(input_dim=7), PCRQVAELossConfig(), inputs)
    assert any("has 6 features" in p or "have 6 features" in p for p in bad)
    assert any("etl_dir" in p for p in stage.validate(cfg, PCRQVAELossConfig(), StageInputs()))
    torch.manual_seed(0)
    model, _ = stage.build(cfg, PCRQVAELossConfig(), inputs)
    model.train()(torch.from_numpy(x))  # first training forward: k-means init
    summary = stage.finalize(model, cfg, PCRQVAELossConfig(), inputs, tmp_path / "export")
    report = _check_export(tmp_path / "export", 100, 3, 16, 4, x, labels)
    assert summary["num_items"] == 100 and summary["concentration"] == report["concentration"]


def test_rq_kmeans_through_stage_and_function(etl_dir, tmp_path):
    root, x, labels = etl_dir
    stage = tokenizer_stage()
    cfg = PCRQVAEConfig(input_dim=6, K=8, L=3, mode="rq_kmeans", kmeans_iters=10)
    model, _ = stage.build(cfg, PCRQVAELossConfig(), StageInputs(etl_dir=str(root)))
    summary = stage.finalize(model, cfg, PCRQVAELossConfig(), StageInputs(etl_dir=str(root)),
                             tmp_path / "a")
    report = _check_export(tmp_path / "a", 100, 3, 8, 6, x, labels)
    # 5 well-separated clusters (= categories) and K = 8: every layer-1 group is pure
    assert report["concentration"] == 1.0 and report["consistency"] == 1.0
    assert summary["num_items"] == 100
    fit_rq_kmeans(root / "items", cfg, tmp_path / "b")
    for name in ("sid_table.npy", "item_emb.npy"):  # deterministic
        assert np.array_equal(np.load(tmp_path / "a" / name), np.load(tmp_path / "b" / name))
