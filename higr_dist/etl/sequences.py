"""Per-user chronological sequences, the leave-five-out split, slate and preference samples.

Design
------
Spark builds one row per user (``user_id, uhash, items, fb, ts``: arrays in time order, ties
broken by item_idx then watch ratio, so the order is total and deterministic) with a sorted
``collect_list`` inside the user partitions made by validation (no further shuffle). Record
construction is plain Python over numpy slices (:func:`slate_samples` for val/test,
:func:`slate_group` for train, :func:`pref_group` for prefs) run in the shard writers, so a
record is built once, right where it is encoded. Training and preference windows are stored
one record per user (``higr_dist.schema.slates``): the split and the y+/negative selection
are decided here, the loader only cuts the windows out.

Split of a user with ``n`` valid interactions (H = holdout = N = slate size, oldest first)::

    [ .. training region .. | val targets (H) | test targets (H) ]
    0                       E = n - 2H        n - H              n

- test: targets ``[n-H, n)``, history = up to ``history_len`` items before ``n-H``;
- val: targets ``[E, n-H)``, history before ``E``;
- train: targets ``[e-N, e)`` for ``e = E, E - stride, ...`` while ``e - N >= min_history``
  (aligned to the end, so the most recent data is always used); history before ``e-N``;
- prefs: windows ``[s, s + pref_window)`` for ``s = E - w, E - 2w, ...`` while
  ``s >= min_history``; y+ = the window's engaged items (watch ratio >= engaged_threshold),
  top N by watch ratio desc (ties: earlier first), emitted only when >= N are engaged;
  negatives = the window's negative-feedback items (earliest first, at most max_negatives).

Histories never include their targets, and train/prefs never look at the val/test blocks.
:func:`sample_counts` gives the same counts as Spark expressions (to size shards before
writing); the writers report the real counts.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from higr_dist.etl.config import EtlConfig
from higr_dist.schema.slates import window_key

SPLITS = ("train", "val", "test")
_M64 = (1 << 64) - 1


def build_sequences(valid: DataFrame) -> DataFrame:
    """Valid rows (``_user, _idx, _ts, _wr``) -> one row per user with time-ordered arrays."""
    ev = F.sort_array(F.collect_list(F.struct(
        F.col("_ts").alias("t"), F.col("_idx").alias("i"), F.col("_wr").alias("w"))))
    return valid.groupBy("_user").agg(ev.alias("ev")).select(
        F.col("_user").alias("user_id"),
        F.xxhash64("_user").alias("uhash"),
        F.col("ev.i").alias("items"),
        F.col("ev.w").alias("fb"),
        F.col("ev.t").alias("ts"),
    )


# --------------------------------------------------------------------------------------------
# positions (pure python; the single definition of the split)
# --------------------------------------------------------------------------------------------


def train_target_starts(n: int, cfg: EtlConfig) -> list[int]:
    """Start positions of the training target windows, oldest first."""
    N, end = cfg.slate_size, n - 2 * cfg.holdout
    starts = []
    e = end
    while e - N >= cfg.min_history:
        starts.append(e - N)
        e -= cfg.stride
    return starts[::-1]


def pref_window_starts(n: int, cfg: EtlConfig) -> list[int]:
    """Start positions of the preference windows, oldest first."""
    w, end = cfg.pref_window, n - 2 * cfg.holdout
    starts = []
    s = end - w
    while s >= cfg.min_history:
        starts.append(s)
        s -= w
    return starts[::-1]


def split_target_starts(n: int, split: str, cfg: EtlConfig) -> list[int]:
    """Target start positions of ``split`` for a user with ``n`` valid interactions."""
    if n < cfg.min_user_interactions:
        return []
    if split == "train":
        return train_target_starts(n, cfg)
    if split == "val":
        return [n - 2 * cfg.holdout]
    if split == "test":
        return [n - cfg.holdout]
    raise ValueError(f"unknown split {split!r}")


def _order(uhash: int, pos: int) -> int:
    """A well-mixed 64-bit sort key of (user, position): interleaves users inside a shard."""
    z = (uhash + 0x9E3779B97F4A7C15 * (pos + 1)) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def group_key(uhash: int) -> str:
    """Record key of a user's grouped record (``slate_group``, ``pref_group``; no '.')."""
    return f"{uhash & _M64:016x}"


def sample_key(uhash: int, pos: int) -> str:
    """Sample key: user hash + target position (unique per user and kind; no '.'); the key a
    grouped record's window unpacks to (``higr_dist.schema.slates.window_key``)."""
    return window_key(group_key(uhash), pos)


def slate_samples(user_id: str, uhash: int, items: np.ndarray, fb: np.ndarray, ts: np.ndarray,
                  split: str, cfg: EtlConfig) -> Iterator[tuple[int, str, dict]]:
    """(order, key, SLATE sample) for every target window of ``split`` (val/test: one)."""
    N, hl = cfg.slate_size, cfg.history_len
    for s in split_target_starts(len(items), split, cfg):
        h0 = max(0, s - hl)
        yield _order(uhash, s), sample_key(uhash, s), {
            "user_id": user_id, "split": split, "ts": int(ts[s]),
            "hist_items": items[h0:s].tolist(), "hist_fb": fb[h0:s].tolist(),
            "target_items": items[s:s + N].tolist(), "target_fb": fb[s:s + N].tolist(),
        }


def slate_group(user_id: str, uhash: int, items: np.ndarray, fb: np.ndarray, ts: np.ndarray,
                cfg: EtlConfig) -> tuple[int, str, dict] | None:
    """(order, key, SLATE_GROUP record) holding every training window of the user, or None
    when the user has none. Unpacks to what :func:`slate_samples` gives for ``train``."""
    starts = split_target_starts(len(items), "train", cfg)
    if not starts:
        return None
    lo, hi = max(0, starts[0] - cfg.history_len), starts[-1] + cfg.slate_size
    return _order(uhash, 0), group_key(uhash), {
        "user_id": user_id, "offset": lo,
        "items": items[lo:hi].tolist(), "fb": fb[lo:hi].tolist(),
        "starts": [s - lo for s in starts], "start_ts": ts[starts].tolist(),
        "history_len": cfg.history_len, "slate_size": cfg.slate_size,
    }


def pref_windows(items: np.ndarray, fb: np.ndarray,
                 cfg: EtlConfig) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(start, y+ positions, negative positions) of every preference window with >= N engaged
    items, oldest first; positions index the user's whole sequence. Vectorised over the
    user's windows (the windows tile ``[min_history, E)``, so they form one [K, w] view)."""
    N, w = cfg.slate_size, cfg.pref_window
    if len(items) < cfg.min_user_interactions:
        return []
    starts = np.asarray(pref_window_starts(len(items), cfg), dtype=np.int64)  # [K]
    if not len(starts):
        return []
    win = fb[starts[:, None] + np.arange(w)]  # [K, w] feedback of each window
    engaged = win >= cfg.engaged_threshold  # [K, w]
    ok = engaged.sum(axis=1) >= N  # [K] windows that yield a y+
    starts, win, engaged = starts[ok], win[ok], engaged[ok]
    # top N by feedback desc, ties -> earlier first: a stable sort of -fb, the rest last
    key = np.where(engaged, -win, np.inf)  # [K', w]
    top = np.argsort(key, axis=1, kind="stable")[:, :N] + starts[:, None]  # [K', N]
    if cfg.max_negatives:
        neg = win < cfg.negative_threshold  # [K', w]
        neg &= np.cumsum(neg, axis=1) <= cfg.max_negatives  # the earliest max_negatives
        rows, cols = np.nonzero(neg)  # row-major: by window, then position
        negs = np.split(cols + starts[rows], np.cumsum(neg.sum(axis=1))[:-1])
    else:
        negs = [np.zeros(0, dtype=np.int64)] * len(starts)
    return [(int(s), t, n) for s, t, n in zip(starts, top, negs)]


def pref_group(user_id: str, uhash: int, items: np.ndarray, fb: np.ndarray, ts: np.ndarray,
               cfg: EtlConfig) -> tuple[int, str, dict] | None:
    """(order, key, PREF_GROUP record) with every preference window of the user, or None."""
    windows = pref_windows(items, fb, cfg)
    if not windows:
        return None
    starts = [s for s, _, _ in windows]
    lo = max(0, starts[0] - cfg.history_len)
    hi = min(len(items), starts[-1] + cfg.pref_window)
    neg_offsets = np.concatenate([[0], np.cumsum([len(n) for _, _, n in windows])])
    return _order(uhash, 0), group_key(uhash), {
        "user_id": user_id, "offset": lo,
        "items": items[lo:hi].tolist(), "fb": fb[lo:hi].tolist(),
        "starts": [s - lo for s in starts], "start_ts": ts[starts].tolist(),
        "history_len": cfg.history_len, "slate_size": cfg.slate_size,
        "pos": (np.concatenate([t for _, t, _ in windows]) - lo).tolist(),
        "neg": (np.concatenate([n for _, _, n in windows]) - lo).tolist(),
        "neg_offsets": neg_offsets.tolist(),
    }


# --------------------------------------------------------------------------------------------
# counts as Spark expressions (shard sizing)
# --------------------------------------------------------------------------------------------


def _train_count(n: Column, cfg: EtlConfig) -> Column:
    room = n - 2 * cfg.holdout - cfg.slate_size - cfg.min_history
    return F.when(room >= 0, F.floor(room / cfg.stride) + 1).otherwise(0)


def _pref_count(n: Column, fb: Column, cfg: EtlConfig) -> Column:
    """Windows with >= N engaged items (higher-order functions over the fb array)."""
    w, end = cfg.pref_window, n - 2 * cfg.holdout
    windows = F.floor((end - cfg.min_history) / w)

    def engaged(j: Column) -> Column:
        start = end - (j + 1) * w  # 0-based window start
        return F.size(F.filter(F.slice(fb, start + 1, w), lambda x: x >= cfg.engaged_threshold))

    per_window = F.transform(F.sequence(F.lit(0), windows - 1), engaged)
    hits = F.size(F.filter(per_window, lambda c: c >= cfg.slate_size))
    return F.when((n >= cfg.min_user_interactions) & (windows > 0), hits).otherwise(0)


def sample_counts(seq: DataFrame, cfg: EtlConfig) -> dict[str, int]:
    """Samples each kind will get (one aggregate row reaches the driver)."""
    n = F.size("items")
    ok = n >= cfg.min_user_interactions
    train = F.when(ok, _train_count(n, cfg)).otherwise(0)
    prefs = F.when(ok, _pref_count(n, F.col("fb"), cfg)).otherwise(0)
    row = seq.agg(
        F.sum(train).alias("train"), F.sum(F.when(train > 0, 1).otherwise(0)).alias("train_g"),
        F.sum(F.when(ok, 1).otherwise(0)).alias("users"),
        F.sum(prefs).alias("prefs"), F.sum(F.when(prefs > 0, 1).otherwise(0)).alias("prefs_g"),
    ).first()
    users = int(row["users"] or 0)
    return {"slates/train": int(row["train"] or 0), "slates/val": users, "slates/test": users,
            "prefs": int(row["prefs"] or 0), "users": users,
            # records of the grouped kinds (one per user with >= 1 window)
            "groups": {"slates/train": int(row["train_g"] or 0),
                       "prefs": int(row["prefs_g"] or 0)}}
