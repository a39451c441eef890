"""ETL logic that needs no Spark: split positions, sample builders, synthetic RNG, config."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from higr_dist.config import ConfigError, load
from higr_dist.etl import features
from higr_dist.etl.config import EtlConfig
from higr_dist.etl.features import (
    CollabTask,
    ProjectTask,
    cooc_counts,
    pack_partners,
    part_seed,
    project,
    sign_matrix,
    signed_sums,
    xxhash64_long,
)
from higr_dist.etl.sequences import (
    pref_group,
    pref_window_starts,
    pref_windows,
    pref_windows_batch,
    slate_group,
    slate_samples,
    split_target_starts,
    train_target_starts,
)
from higr_dist.etl.synthetic import (
    SyntheticConfig,
    simulate_items,
    simulate_users,
    uniform,
)
from higr_dist.etl.writer import num_shards
from higr_dist.schema import (
    PREF,
    PREF_GROUP,
    SLATE,
    SLATE_BLOCK,
    SLATE_GROUP,
    SLATE_GROUP_BLOCK,
    blocks,
)
from higr_dist.schema.codec import SchemaError


def _cfg(**kw) -> EtlConfig:
    base = dict(history_len=6, min_history=2, stride=5, pref_window=10)
    base.update(kw)
    return EtlConfig(**base)


def test_split_positions_tile_the_sequence():
    cfg = _cfg()
    # n = 22: E = 12; train targets end at 12 and 7; val at 12, test at 17
    assert train_target_starts(22, cfg) == [2, 7]
    assert split_target_starts(22, "val", cfg) == [12]
    assert split_target_starts(22, "test", cfg) == [17]
    assert pref_window_starts(22, cfg) == [2]
    # exactly the minimum (2H + min_history): val and test only
    assert split_target_starts(12, "train", cfg) == []
    assert split_target_starts(12, "val", cfg) == [2]
    # too short: nothing at all
    assert all(split_target_starts(11, s, cfg) == [] for s in ("train", "val", "test"))
    # stride 1: every end position down to min_history + N
    assert train_target_starts(22, _cfg(stride=1)) == list(range(2, 8))


def test_slate_samples_never_contain_their_targets():
    cfg = _cfg()
    n = 40
    items = np.arange(100, 100 + n)
    fb = np.linspace(0, 3, n).round(4)
    ts = 1_600_000_000 + np.arange(n) * 10
    for split in ("train", "val", "test"):
        for _, key, s in slate_samples("u", 7, items, fb, ts, split, cfg):
            assert "." not in key
            assert len(s["target_items"]) == cfg.slate_size
            assert 1 <= len(s["hist_items"]) <= cfg.history_len
            first = s["target_items"][0]
            assert s["hist_items"][-1] == first - 1  # history ends right before the targets
            assert not set(s["hist_items"]) & set(s["target_items"])
            assert s["ts"] == int(ts[first - 100])
            if split == "train":  # training never reaches the val/test blocks
                assert max(s["target_items"]) < 100 + n - 2 * cfg.holdout


def test_pref_sample_orders_by_feedback_and_keeps_negatives():
    cfg = _cfg(max_negatives=2)
    n = 22
    fb = np.full(n, 0.5)
    fb[2:12] = [2.5, 0.1, 1.2, 3.0, 0.05, 1.0, 1.8, 0.15, 1.1, 2.5]
    items = np.arange(n) + 50
    ts = np.arange(n) + 1_600_000_000
    _, key, group = pref_group("u", 1, items, fb, ts, cfg)
    stored = PREF_GROUP.decode(PREF_GROUP.encode(group))  # as the loader reads it
    (s,) = list(PREF_GROUP.unpack(stored, key))
    assert s["__key__"] == f"{key}_{2:07d}"
    assert set(s) - {"__key__", "pos_when"} == set(PREF.field_names)
    # top 5 engaged by feedback desc; the 2.5 tie keeps the earlier one first
    assert s["pos_items"] == [55, 52, 61, 58, 54]
    assert s["pos_when"] == [2, 0, 4, 3, 1]  # in time: 52, 54, 55, 58, 61
    assert s["pos_fb"] == [3.0, 2.5, 2.5, 1.8, 1.2]
    assert s["neg_items"] == [53, 56]  # earliest two of the three negatives
    assert s["hist_items"] == [50, 51] and s["ts"] == 1_600_000_002
    # fewer than N engaged items in the window: no sample
    fb[2:12] = 0.5
    assert pref_group("u", 1, items, fb, ts, cfg) is None


def test_slate_group_unpacks_to_the_per_window_samples():
    """The stored train record unpacks to exactly the samples a per-window layout would hold
    (same fields and keys), after a real encode/decode; it stores each interaction once."""
    cfg = _cfg(stride=2)
    n = 40
    items = np.arange(300, 300 + n)
    fb = np.linspace(0, 3, n).round(4)
    ts = 1_600_000_000 + np.arange(n) * 10
    windows = [dict(SLATE.decode(SLATE.encode(w)), __key__=k)  # as a per-window shard holds
               for _, k, w in slate_samples("u", 9, items, fb, ts, "train", cfg)]
    _, key, group = slate_group("u", 9, items, fb, ts, cfg)
    stored = SLATE_GROUP.decode(SLATE_GROUP.encode(group))
    assert list(SLATE_GROUP.unpack(stored, key)) == windows and len(windows) > 5
    assert SLATE_GROUP.count(group) == len(windows)
    assert len(group["items"]) < n - 2 * cfg.holdout + 1  # never the val/test blocks
    assert slate_group("u", 9, items[:11], fb[:11], ts[:11], cfg) is None  # too short


def test_blocks_round_trip_and_unpack_to_their_records_samples():
    """A block of grouped records (train) and of plain records (val) unpacks, after a real
    encode/decode, to exactly the samples of its records, each under its own key; the writer's
    encode_block (records dumped once) gives the very bytes encode gives."""
    cfg = _cfg(stride=2)
    n = 40
    users = [(f"u{u}", 9 + u, np.arange(300, 300 + n) + u, np.linspace(0, 3, n).round(4) + u,
              1_600_000_000 + np.arange(n) * 10) for u in range(5)]
    groups = [slate_group(u, h, it, fb, ts, cfg)[1:] for u, h, it, fb, ts in users]
    want = [w for k, g in groups
            for w in SLATE_GROUP.unpack(SLATE_GROUP.decode(SLATE_GROUP.encode(g)), k)]
    got = []
    for key, block in blocks(groups, 2):  # blocks of 2, 2 and 1 records
        assert key == block["keys"][0] and len(block["records"]) <= 2
        blob = SLATE_GROUP_BLOCK.encode(block)
        assert blob == SLATE_GROUP_BLOCK.encode_block(
            block["keys"], [SLATE_GROUP.dumps(r) for r in block["records"]])
        stored = SLATE_GROUP_BLOCK.decode(blob)
        assert SLATE_GROUP_BLOCK.count(stored) == sum(SLATE_GROUP.count(r) for r in
                                                      block["records"])
        got += list(SLATE_GROUP_BLOCK.unpack(stored, key))
    assert got == want and len({s["__key__"] for s in got}) == len(got) > 10
    vals = [next(slate_samples(u, h, it, fb, ts, "val", cfg))[1:] for u, h, it, fb, ts in users]
    (key, block), = blocks(vals, 8)
    stored = SLATE_BLOCK.decode(SLATE_BLOCK.encode(block))
    assert list(SLATE_BLOCK.unpack(stored, key)) == [
        dict(SLATE.decode(SLATE.encode(v)), __key__=k) for k, v in vals]
    with pytest.raises(SchemaError, match="2 keys for 1 records"):
        SLATE_BLOCK.encode({"keys": ["a", "b"], "records": [vals[0][1]]})
    with pytest.raises(SchemaError, match="lacks field .keys"):  # a block is not its record
        SLATE_BLOCK.decode(SLATE.encode(vals[0][1]))
    with pytest.raises(ValueError, match="block size"):
        list(blocks(vals, 0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_encoder_refuses_non_finite_floats(bad):
    """orjson would write a non-finite float as null: the encoder must refuse it instead."""
    sample = {"user_id": "u", "split": "val", "ts": 1, "hist_items": [1, 2], "hist_fb": [0.5, 1.0],
              "target_items": [3], "target_fb": [2.0]}
    assert SLATE.decode(SLATE.encode(sample)) == sample
    with pytest.raises(SchemaError, match="hist_fb"):
        SLATE.encode(dict(sample, hist_fb=[0.5, bad]))
    big = dict(sample, hist_fb=[1e308, 1e308])  # a sum that overflows is still finite input
    assert SLATE.decode(SLATE.encode(big))["hist_fb"] == [1e308, 1e308]


def test_numpy_list_fields_encode_as_their_lists():
    """Records built from numpy slices (the ETL's) give the bytes of the same lists, with any
    int or float dtype, and a non-finite float in an array is refused like one in a list."""
    rng = np.random.default_rng(4)
    items, fb = rng.integers(0, 2**40, 9), np.round(rng.random(9) * 3, 3)
    as_lists = {"user_id": "u", "split": "val", "ts": 7, "hist_items": items[:6].tolist(),
                "hist_fb": fb[:6].tolist(), "target_items": items[6:].tolist(),
                "target_fb": fb[6:].tolist()}
    for int_type, float_type in ((np.int64, np.float64), (np.int32, np.float32),
                                 (np.uint16, np.float64)):
        it = items % 60000 if int_type != np.int64 else items
        ft = fb.astype(float_type)
        want = dict(as_lists, hist_items=it[:6].tolist(), target_items=it[6:].tolist(),
                    hist_fb=[float(x) for x in ft[:6]], target_fb=[float(x) for x in ft[6:]])
        arrays = dict(want, hist_items=it[:6].astype(int_type), hist_fb=ft[:6],
                      target_items=it[6:].astype(int_type), target_fb=ft[6:])
        assert SLATE.encode(arrays) == SLATE.encode(want)
    with pytest.raises(SchemaError, match="target_fb"):
        SLATE.encode(dict(as_lists, target_fb=np.array([0.5, np.nan, 1.0])))


def _pref_windows_loop(items, fb, cfg):
    """The preference windows one window at a time: the reference for the vectorised code."""
    N, w = cfg.slate_size, cfg.pref_window
    if len(items) < cfg.min_user_interactions:
        return []
    out = []
    for s in pref_window_starts(len(items), cfg):
        wfb = fb[s:s + w]
        engaged = [i for i in range(len(wfb)) if wfb[i] >= cfg.engaged_threshold]
        if len(engaged) < N:
            continue
        top = sorted(engaged, key=lambda i: (-wfb[i], i))[:N]
        neg = [i for i in range(len(wfb)) if wfb[i] < cfg.negative_threshold][:cfg.max_negatives]
        out.append((s, [s + i for i in top], [s + i for i in neg]))
    return out


@pytest.mark.parametrize("max_negatives", [0, 2, 20])
def test_pref_windows_match_a_window_by_window_loop(max_negatives):
    rng = np.random.default_rng(max_negatives)
    cfg = _cfg(max_negatives=max_negatives)
    for n in (5, 14, 15, 23, 40, 97):
        items = rng.integers(0, 50, n)
        fb = rng.choice([0.0, 0.1, 0.5, 1.0, 1.5, 3.0], n)  # many ties
        got = [(s, t.tolist(), g.tolist()) for s, t, g in pref_windows(items, fb, cfg)]
        assert got == _pref_windows_loop(items, fb, cfg), n


def test_pref_groups_of_a_batch_equal_those_built_user_by_user():
    """The writer computes a whole Arrow batch's windows at once; each user's record must be
    what that user alone gives (users of every length, some with no window)."""
    rng = np.random.default_rng(7)
    cfg = _cfg(max_negatives=2)
    lengths = [40, 3, 0, 14, 15, 23, 97, 31]
    fbs = [rng.choice([0.0, 0.1, 0.5, 1.0, 1.5, 3.0], n) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    windows = pref_windows_batch(offsets, np.concatenate(fbs), cfg)
    assert sum(g is not None for g in (
        pref_group("u", 1, np.arange(n), fb, np.arange(n), cfg) for n, fb in zip(lengths, fbs))) >= 3
    for row, (n, fb) in enumerate(zip(lengths, fbs)):
        items, ts = rng.integers(0, 50, n), 1_600_000_000 + np.arange(n)
        alone = pref_group(f"u{row}", row, items, fb, ts, cfg)
        got = pref_group(f"u{row}", row, items, fb, ts, cfg, windows, row)
        assert (got is None) == (alone is None)
        if alone is not None:  # same order and key, and the same stored bytes
            assert got[:2] == alone[:2]
            assert PREF_GROUP.encode(got[2]) == PREF_GROUP.encode(alone[2])


def test_config_validation_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        load(EtlConfig, None, ["holdout=3", "stride=0", "engaged_threshold=5.0"])
    text = "\n".join(e.value.problems)
    assert "holdout" in text and "stride" in text and "thresholds" in text
    cfg = load(EtlConfig, None, ["samples_per_shard=10", "min_shards=3"])
    assert num_shards(0, cfg) == 3 and num_shards(31, cfg) == 4


def test_synthetic_users_depend_only_on_seed_and_id():
    cfg = SyntheticConfig(users=50, items=60, interactions_per_user=25, top_categories=4,
                          subtopics_per_top=3)
    whole = simulate_users(np.arange(50), cfg)
    part = simulate_users(np.array([17, 3]), cfg)
    m = cfg.interactions_per_user
    for col in ("item_id", "watch_ratio", "timestamp"):
        np.testing.assert_array_equal(part[col][:m], whole[col][17 * m:18 * m])
        np.testing.assert_array_equal(part[col][m:], whole[col][3 * m:4 * m])
    assert np.all(np.diff(whole["timestamp"].reshape(50, m), axis=1) > 0)
    other = simulate_users(np.arange(50), SyntheticConfig(**{**cfg.__dict__, "seed": 1}))
    assert not np.array_equal(other["item_id"], whole["item_id"])
    u = uniform(3, 5, np.arange(10_000))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02


def test_synthetic_structure_is_learnable():
    """Next items come from the user's recent sub-topics far more than from the global head."""
    cfg = SyntheticConfig(users=400, items=300, interactions_per_user=60)
    rows = simulate_users(np.arange(cfg.users), cfg)
    cats = simulate_items(np.arange(cfg.items), cfg)["category"]
    sub = np.array([int(c.split("|")[1]) for c in cats])[rows["item_id"]].reshape(cfg.users, -1)
    recent = np.mean([np.isin(sub[u, 50:], sub[u, 30:50]).mean() for u in range(cfg.users)])
    head = np.argsort(-np.bincount(sub[:, :50].ravel()))[:3]
    popular = np.isin(sub[:, 50:], head).mean()
    assert recent > 0.6 and recent > 3 * popular
    wr = rows["watch_ratio"]
    assert 0.03 < (wr < 0.2).mean() < 0.3  # negative feedback exists
    assert 0.1 < (wr >= 2.0).mean() < 0.5  # effective views exist


def test_cooc_counts_match_a_naive_count():
    rng = np.random.default_rng(0)
    cfg = _cfg(cooc_window=3)
    seqs = [rng.integers(0, 12, n) for n in (30, 11, 25, 12)]  # 11 < min: no training region
    fbs = [rng.choice([0.1, 0.5, 1.5], len(s)) for s in seqs]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    a, b, w = cooc_counts(offsets, np.concatenate(seqs), np.concatenate(fbs), cfg.holdout,
                          cfg.min_user_interactions, cfg.negative_threshold, cfg.cooc_window)
    want = Counter()
    for s, f in zip(seqs, fbs):
        if len(s) < cfg.min_user_interactions:
            continue
        kept = [i for i, x in zip(s[:len(s) - 2 * cfg.holdout], f) if x >= cfg.negative_threshold]
        for p, i in enumerate(kept):
            for j in kept[p + 1:p + 1 + cfg.cooc_window]:
                if i != j:
                    want[(i, j)] += 1
                    want[(j, i)] += 1
    assert dict(zip(zip(a.tolist(), b.tolist()), w.tolist())) == dict(want)


def test_signed_sums_equal_per_row_integer_sums(monkeypatch):
    """The sparse product (signs drawn once per distinct hash, column chunks) gives exactly
    the int64 sum of each row's signs times its count, large counts included."""
    rng = np.random.default_rng(7)
    n, groups, dim = 500, 23, 70
    group = np.sort(rng.integers(0, groups, n))
    h = rng.choice(rng.integers(-(2**63), 2**63 - 1, 40, dtype=np.int64), n)  # repeats
    w = rng.integers(1, 2**40, n)  # int64 sums far above float32's exact range
    want = np.zeros((groups, dim), dtype=np.int64)
    np.add.at(want, group, sign_matrix(h, dim).astype(np.int64) * w[:, None])
    monkeypatch.setattr(features, "_CHUNK", 7)  # several column chunks
    got = signed_sums(group, groups, h, w, dim)
    assert got.dtype == np.float64 and np.array_equal(got.astype(np.int64), want)


@pytest.mark.parametrize("spread", [50, 10**9])  # presence map; np.unique fallback
def test_small_unique_equals_numpy_unique(spread):
    v = np.random.default_rng(spread).integers(0, spread, 300)
    uniq, inverse = features._small_unique(v)
    want, want_inverse = np.unique(v, return_inverse=True)
    assert np.array_equal(uniq, want) and np.array_equal(inverse, want_inverse.ravel())
    assert np.array_equal(uniq[inverse], v)


@pytest.mark.parametrize("top", [5, 2**62])  # one packed key; lexsort fallback
def test_by_group_then_desc_is_a_stable_lexsort(top):
    rng = np.random.default_rng(top % 97)
    group = np.sort(rng.integers(0, 30, 400))
    value = rng.integers(0, 6, 400)
    value[0] = top
    order = features._by_group_then_desc(group, value)
    assert np.array_equal(order, np.lexsort((-value, group)))


def test_collab_task_equals_aggregate_then_project_then_top_p():
    """CollabTask (each sequence batch's packed partial counts, sorted by item and cut into
    Arrow batches anywhere) gives what summing the counts, projecting each item's row and
    ranking its partners separately gives."""
    rng = np.random.default_rng(3)
    n, dim, top_p = 400, 16, 3
    a = rng.integers(0, 9, n)
    b = rng.integers(0, 7, n)
    w = rng.integers(1, 4, n)
    seed = part_seed(5, 2)
    packed = []  # what CoocTask yields: per sequence batch, its distinct (a, b) counts
    for part in np.array_split(np.arange(n), 4):
        key, inv = np.unique((a[part] << 32) | b[part], return_inverse=True)
        packed.append(pack_partners(key >> 32, key & 0xFFFFFFFF,
                                    np.bincount(inv, weights=w[part]).astype(np.int64)))
    rows = pa.Table.from_batches(packed)
    rows = rows.take(np.argsort(rows.column("a").to_numpy(), kind="stable"))  # sort by a
    cuts = [0, 5, 6, 17, rows.num_rows]  # Arrow batches split an item's rows
    batches = [rows.slice(i, j - i).combine_chunks().to_batches()[0]
               for i, j in zip(cuts, cuts[1:])]
    out = pa.Table.from_batches(list(CollabTask(dim, top_p, seed)(iter(batches)))).to_pylist()
    counts = Counter()
    for x, y, c in zip(a.tolist(), b.tolist(), w.tolist()):
        counts[(x, y)] += c
    keys = sorted(counts)
    items, x = project(np.array([k[0] for k in keys]), np.full(len(keys), 2),
                       xxhash64_long(np.array([k[1] for k in keys]), seed),
                       np.array([counts[k] for k in keys]), 0, dim, 1.0)
    vectors = {r["item_idx"]: np.frombuffer(r["x"], "<f4") for r in out if r["positive"] is None}
    assert sorted(vectors) == items.tolist()
    for i, item in enumerate(items):
        np.testing.assert_array_equal(vectors[item], x[i].astype(np.float32))
    pairs = sorted((r["item_idx"], r["rank"], r["positive"], r["weight"]) for r in out
                   if r["positive"] is not None)
    want = []
    for item in items.tolist():
        partners = sorted(((-c, y) for (x_, y), c in counts.items() if x_ == item))[:top_p]
        want += [(item, r + 1, y, float(-c)) for r, (c, y) in enumerate(partners)]
    assert pairs == want


def test_projection_is_split_invariant_and_normalised(monkeypatch):
    """Feature rows split across Arrow batches (and projection chunks) give the same vectors."""
    rng = np.random.default_rng(1)
    n = 300
    item = np.sort(rng.integers(0, 20, n))
    part = rng.integers(0, 3, n)
    order = np.lexsort((part, item))
    item, part = item[order], part[order]
    part[np.searchsorted(item, np.unique(item))] = 0  # every item has a content row
    order = np.lexsort((part, item))
    item, part = item[order], part[order]
    h = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    w = rng.integers(1, 4, n).astype(np.int64)
    task = ProjectTask(content_dim=8, collab_dim=70, caption_weight=0.5)
    whole = task._emit([item, part, h, w])

    def batch(lo, hi):
        return pa.RecordBatch.from_pydict({"item_idx": item[lo:hi], "part": part[lo:hi],
                                           "h": h[lo:hi], "w": w[lo:hi]})

    cuts = [0, 1, 57, 58, 150, 299, n]
    parts = list(task([batch(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]))
    assert pa.Table.from_batches(parts).equals(pa.Table.from_batches([whole]))
    monkeypatch.setattr(features, "_CHUNK", 7)  # the signs drawn 7 distinct hashes at a time
    assert task._emit([item, part, h, w]).equals(whole)
    x = np.stack([np.frombuffer(b, "<f4") for b in whole.column(1).to_pylist()])
    assert x.shape == (len(np.unique(item)), 78)
    np.testing.assert_allclose(np.linalg.norm(x[:, :8], axis=1), 1, rtol=1e-6)
    collab = np.linalg.norm(x[:, 8:], axis=1)
    has = np.isin(np.unique(item), item[part == 2])
    np.testing.assert_allclose(collab[has], 1, rtol=1e-6)
    assert np.all(collab[~has] == 0)
    signs = sign_matrix(h[:5], 70)
    assert signs.shape == (5, 70) and set(np.unique(signs)) == {-1, 1}
