"""Per-user chronological sequences, the leave-five-out split, slate and preference samples.

Design
------
Spark builds one row per user (``user_id, uhash, items, fb, ts``: arrays in time order, ties
broken by item_idx then watch ratio, so the order is total and deterministic) with a sorted
``collect_list`` inside the user partitions made by validation (no further shuffle; the
aggregate is ``higr_dist.etl.validate.by_user``, which also sets the quarantined rows apart).
Record construction is plain Python over numpy slices (:func:`slate_samples` for val/test,
:func:`slate_group` for train, :func:`pref_group` for prefs) run in the shard writers, so a
record is built once, right where it is encoded; list fields stay numpy arrays, which the
codec writes without a Python object per element. Training and preference windows are stored
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
from dataclasses import dataclass

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from higr_dist.etl.config import EtlConfig
from higr_dist.schema.slates import window_key

SPLITS = ("train", "val", "test")
_M64 = (1 << 64) - 1


def build_sequences(users: DataFrame) -> DataFrame:
    """``higr_dist.etl.validate.by_user``'s output -> one row per user with time-ordered arrays
    (``user_id, uhash, items, fb, ts``)."""
    # group 0 of a user with no kept row (short_user, say) has an empty ``ev``
    return users.where((F.col("_grp") == 0) & (F.size("ev") > 0)).select(
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
            "hist_items": items[h0:s], "hist_fb": fb[h0:s],
            "target_items": items[s:s + N], "target_fb": fb[s:s + N],
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
        "items": items[lo:hi], "fb": fb[lo:hi],
        "starts": [s - lo for s in starts], "start_ts": ts[starts],
        "history_len": cfg.history_len, "slate_size": cfg.slate_size,
    }


@dataclass(frozen=True)
class PrefWindows:
    """The preference windows (>= N engaged items) of a batch of users, as flat arrays.
    Positions are user-local (index the user's own sequence); windows are oldest first."""

    user_windows: np.ndarray
    """[U + 1] the windows of user u are ``user_windows[u]:user_windows[u + 1]``"""
    starts: np.ndarray
    """[K] window start"""
    top: np.ndarray
    """[K, N] y+ positions: the engaged items by feedback desc, ties -> earlier first"""
    neg: np.ndarray
    """[M] negative-feedback positions, earliest first, at most max_negatives per window"""
    neg_offsets: np.ndarray
    """[K + 1] the negatives of window k are ``neg[neg_offsets[k]:neg_offsets[k + 1]]``"""


def pref_windows_batch(offsets: np.ndarray, fb: np.ndarray, cfg: EtlConfig) -> PrefWindows:
    """Every user's preference windows at once (list column ``offsets`` [U + 1] into ``fb``).

    One set of numpy calls per Arrow batch instead of per user: the windows tile each user's
    ``[min_history, E)`` from the end, so all of them form one [windows, w] gather.
    """
    N, w, hl = cfg.slate_size, cfg.pref_window, cfg.min_history
    offsets = np.asarray(offsets, dtype=np.int64)
    n = np.diff(offsets)  # [U]
    end = n - 2 * cfg.holdout  # [U] E: first val position
    count = np.where(n >= cfg.min_user_interactions, np.maximum((end - hl) // w, 0), 0)  # [U]
    first = np.concatenate([[0], np.cumsum(count)])  # [U + 1]
    j = np.arange(first[-1]) - np.repeat(first[:-1], count)  # [T] index within the user
    start = np.repeat(end, count) - (np.repeat(count, count) - j) * w  # [T] oldest first
    win = fb[(np.repeat(offsets[:-1], count) + start)[:, None] + np.arange(w)]  # [T, w]
    engaged = win >= cfg.engaged_threshold  # [T, w]
    ok = engaged.sum(axis=1) >= N  # [T] windows that yield a y+
    start, win, engaged = start[ok], win[ok], engaged[ok]
    kept = np.bincount(np.repeat(np.arange(len(n)), count)[ok], minlength=len(n))  # [U]
    # top N by feedback desc, ties -> earlier first: a stable sort of -fb, the rest last
    key = np.where(engaged, -win, np.inf)  # [K, w]
    top = np.argsort(key, axis=1, kind="stable")[:, :N] + start[:, None]  # [K, N]
    neg = win < cfg.negative_threshold  # [K, w]
    neg &= np.cumsum(neg, axis=1) <= cfg.max_negatives  # the earliest max_negatives
    rows, cols = np.nonzero(neg)  # row-major: by window, then position
    return PrefWindows(user_windows=np.concatenate([[0], np.cumsum(kept)]), starts=start,
                       top=top, neg=cols + start[rows],
                       neg_offsets=np.concatenate([[0], np.cumsum(neg.sum(axis=1))]))


def _one_user(fb: np.ndarray, cfg: EtlConfig) -> PrefWindows:
    """:func:`pref_windows_batch` for a batch of one user."""
    return pref_windows_batch(np.array([0, len(fb)]), np.asarray(fb), cfg)


def pref_windows(items: np.ndarray, fb: np.ndarray,
                 cfg: EtlConfig) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(start, y+ positions, negative positions) of every preference window of one user with
    >= N engaged items, oldest first."""
    pw = _one_user(fb, cfg)
    return [(int(pw.starts[k]), pw.top[k], pw.neg[pw.neg_offsets[k]:pw.neg_offsets[k + 1]])
            for k in range(len(pw.starts))]


def pref_group(user_id: str, uhash: int, items: np.ndarray, fb: np.ndarray, ts: np.ndarray,
               cfg: EtlConfig, windows: PrefWindows | None = None, row: int = 0
               ) -> tuple[int, str, dict] | None:
    """(order, key, PREF_GROUP record) with every preference window of the user, or None.

    ``windows``: the user's batch (:func:`pref_windows_batch`) and ``row`` the user's index in
    it; computed for this user alone when omitted.
    """
    if windows is None:
        windows, row = _one_user(fb, cfg), 0
    k0, k1 = int(windows.user_windows[row]), int(windows.user_windows[row + 1])
    if k0 == k1:
        return None
    starts = windows.starts[k0:k1]
    lo = max(0, int(starts[0]) - cfg.history_len)
    hi = min(len(items), int(starts[-1]) + cfg.pref_window)
    n0, n1 = windows.neg_offsets[k0], windows.neg_offsets[k1]
    return _order(uhash, 0), group_key(uhash), {
        "user_id": user_id, "offset": lo,
        "items": items[lo:hi], "fb": fb[lo:hi],
        "starts": starts - lo, "start_ts": ts[starts],
        "history_len": cfg.history_len, "slate_size": cfg.slate_size,
        "pos": windows.top[k0:k1].ravel() - lo,
        "neg": windows.neg[n0:n1] - lo,
        "neg_offsets": windows.neg_offsets[k0:k1 + 1] - n0,
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
    """Samples each kind will get, and ``rows``: the interactions the sequences hold (one
    aggregate row reaches the driver)."""
    n = F.size("items")
    ok = n >= cfg.min_user_interactions
    train = F.when(ok, _train_count(n, cfg)).otherwise(0)
    prefs = F.when(ok, _pref_count(n, F.col("fb"), cfg)).otherwise(0)
    row = seq.agg(
        F.sum(train).alias("train"), F.sum(F.when(train > 0, 1).otherwise(0)).alias("train_g"),
        F.sum(F.when(ok, 1).otherwise(0)).alias("users"),
        F.sum(prefs).alias("prefs"), F.sum(F.when(prefs > 0, 1).otherwise(0)).alias("prefs_g"),
        F.sum(n).alias("rows"),
    ).first()
    users = int(row["users"] or 0)
    return {"slates/train": int(row["train"] or 0), "slates/val": users, "slates/test": users,
            "prefs": int(row["prefs"] or 0), "users": users, "rows": int(row["rows"] or 0),
            # records of the grouped kinds (one per user with >= 1 window)
            "groups": {"slates/train": int(row["train_g"] or 0),
                       "prefs": int(row["prefs_g"] or 0)}}
