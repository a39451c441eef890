"""Per-user chronological sequences, the leave-five-out split, slate and preference samples.

Design
------
Spark builds one row per user (``user_id, uhash, items, fb, ts``: arrays in time order, ties
broken by item_idx then watch ratio, so the order is total and deterministic) with a sorted
``collect_list`` inside the user partitions made by validation (no further shuffle). Sample
construction is plain Python over numpy slices (:func:`slate_samples`, :func:`pref_samples`)
run in the shard writers, so a sample is built once, right where it is encoded.

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


def sample_key(uhash: int, pos: int) -> str:
    """Sample key: user hash + target position (unique per user and kind; no '.')."""
    return f"{uhash & _M64:016x}_{pos:07d}"


def slate_samples(user_id: str, uhash: int, items: np.ndarray, fb: np.ndarray, ts: np.ndarray,
                  split: str, cfg: EtlConfig) -> Iterator[tuple[int, str, dict]]:
    """(order, key, SLATE sample) for every target window of ``split``."""
    N, hl = cfg.slate_size, cfg.history_len
    for s in split_target_starts(len(items), split, cfg):
        h0 = max(0, s - hl)
        yield _order(uhash, s), sample_key(uhash, s), {
            "user_id": user_id, "split": split, "ts": int(ts[s]),
            "hist_items": items[h0:s].tolist(), "hist_fb": fb[h0:s].tolist(),
            "target_items": items[s:s + N].tolist(), "target_fb": fb[s:s + N].tolist(),
        }


def pref_samples(user_id: str, uhash: int, items: np.ndarray, fb: np.ndarray, ts: np.ndarray,
                 cfg: EtlConfig) -> Iterator[tuple[int, str, dict]]:
    """(order, key, PREF sample) for every preference window with >= N engaged items."""
    N, hl, w = cfg.slate_size, cfg.history_len, cfg.pref_window
    if len(items) < cfg.min_user_interactions:
        return
    for s in pref_window_starts(len(items), cfg):
        wfb = fb[s:s + w]
        engaged = np.flatnonzero(wfb >= cfg.engaged_threshold)
        if len(engaged) < N:
            continue
        # top N by feedback desc, ties -> earlier first (stable sort on the negated values)
        top = engaged[np.argsort(-wfb[engaged], kind="stable")[:N]] + s
        neg = (np.flatnonzero(wfb < cfg.negative_threshold)[:cfg.max_negatives] + s
               if cfg.max_negatives else np.zeros(0, dtype=np.int64))
        h0 = max(0, s - hl)
        yield _order(uhash, s), sample_key(uhash, s), {
            "user_id": user_id, "ts": int(ts[s]),
            "hist_items": items[h0:s].tolist(), "hist_fb": fb[h0:s].tolist(),
            "pos_items": items[top].tolist(), "pos_fb": fb[top].tolist(),
            "neg_items": items[neg].tolist(), "neg_fb": fb[neg].tolist(),
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
    row = seq.agg(
        F.sum(F.when(ok, _train_count(n, cfg)).otherwise(0)).alias("train"),
        F.sum(F.when(ok, 1).otherwise(0)).alias("users"),
        F.sum(F.when(ok, _pref_count(n, F.col("fb"), cfg)).otherwise(0)).alias("prefs"),
    ).first()
    users = int(row["users"] or 0)
    return {"slates/train": int(row["train"] or 0), "slates/val": users, "slates/test": users,
            "prefs": int(row["prefs"] or 0), "users": users}
