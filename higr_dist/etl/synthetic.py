"""Synthetic interaction logs with learnable structure, generated inside Spark executors.

Design
------
A Spark job: ``spark.range(users, numPartitions=P).mapInArrow(...)`` simulates the users of
each Arrow batch in the executors (``spark.range(items)`` likewise for the items table), so
nothing but the job plan lives on the driver and the output scales with the cores (10^9 rows
is 10^9 / (rows/s per core x cores) seconds; the simulation is vectorised over the users of a
batch and loops only over time steps).

Randomness is *counter-based*: every random number is ``splitmix64(seed, stream, user, step)``
(vectorised numpy over uint64). Each user's stream is therefore a pure function of
(seed, user_id), whatever the partitioning or batch size, and stable across numpy versions
(no reliance on ``numpy.random`` stream compatibility). The catalogue (which item belongs to
which sub-topic, its popularity) is a pure function of the seed too, rebuilt in each worker.

World model
-----------
- ``top_categories`` x ``subtopics_per_top`` sub-topics; item i has one sub-topic (category
  field "top|sub", sub ids numbered after the top ids); within a sub-topic, popularity is Zipf
  (``zipf_exponent``) over a hashed rank, sub-topics themselves mildly skewed.
- a user has ``prefs_per_user`` preferred sub-topics (mostly inside one home top category)
  with random weights; each step one preference drifts with ``drift_prob`` (usually to a
  sibling sub-topic), so tastes move slowly over time.
- next item: with ``stay_prob`` from the sub-topic of the last engaged item (short-range
  sequential correlation), with ``explore_prob`` a globally popular item (exposure outside the
  tastes), else from a preferred sub-topic drawn by weight; the item inside the sub-topic by
  Zipf popularity.
- watch ratio: log-normal; the mean is high when the item's sub-topic is a current
  preference, medium for a sibling of one, low otherwise (many < 0.2: negative feedback), plus
  a per-item quality term. Heavy-tailed: a good share > 2 (effective views).
- captions: words drawn from the sub-topic's vocabulary plus noise words from a shared pool.

So the next items come mostly from the user's *current* sub-topics: a model reading the history
beats popularity, which only knows the global head.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ra", "to", "vi", "ze", "po", "qu", "da", "fe",
              "gi", "hu", "ja", "ba", "co", "di", "ru")

# stream ids of the counter-based RNG (one per kind of draw)
(_S_ITEM_SUB, _S_ITEM_RANK, _S_ITEM_Q, _S_HOME, _S_PREF, _S_PREF_W, _S_PREF_SIB, _S_DRIFT,
 _S_DRIFT_SLOT, _S_DRIFT_KIND, _S_DRIFT_SUB, _S_MODE, _S_SLOT, _S_ITEM, _S_WR1, _S_WR2, _S_GAP,
 _S_START, _S_CAP) = range(19)


@dataclass
class SyntheticConfig:
    """Size and shape of the synthetic world (all draws derive from ``seed``)."""

    users: int = 2000
    """number of users (user_id 0..users-1)"""
    items: int = 1000
    """catalogue size (item_id 0..items-1)"""
    interactions_per_user: int = 80
    """rows per user (exact: the log has users x interactions_per_user rows)"""
    seed: int = 0
    """master seed"""
    top_categories: int = 10
    """top-level categories"""
    subtopics_per_top: int = 4
    """sub-topics per top category"""
    zipf_exponent: float = 1.1
    """popularity exponent inside a sub-topic"""
    prefs_per_user: int = 3
    """preferred sub-topics per user"""
    home_share: float = 0.7
    """probability that a preference lies in the user's home top category"""
    stay_prob: float = 0.45
    """next item from the sub-topic of the last engaged item"""
    explore_prob: float = 0.15
    """next item drawn by global popularity (exposure outside the tastes)"""
    drift_prob: float = 0.015
    """per step, probability that one preference changes"""
    match_log_mean: float = 0.35
    """log-mean watch ratio for an item of a current preference (median ~1.4)"""
    sibling_log_mean: float = -0.5
    """log-mean for an item of a sibling sub-topic of a preference"""
    miss_log_mean: float = -1.8
    """log-mean for an item outside the tastes (median ~0.17: mostly negatives)"""
    log_std: float = 0.65
    """log-std of the watch ratio"""
    item_quality_std: float = 0.25
    """std of the per-item quality term added to the log-mean"""
    start_ts: int = 1672531200
    """earliest user start (2023-01-01, epoch seconds)"""
    start_span_days: int = 30
    """user starts spread over this many days"""
    mean_gap_s: float = 600.0
    """mean seconds between two interactions of a user (exponential)"""
    caption_words: int = 4
    """words of a caption drawn from the sub-topic's vocabulary"""
    caption_noise_words: int = 2
    """words of a caption drawn from the shared pool"""
    vocab_per_subtopic: int = 12
    """vocabulary size of one sub-topic"""
    noise_vocab: int = 200
    """size of the shared noise vocabulary"""
    partitions: int = 0
    """Spark partitions of the user range (0 = the context's default parallelism)"""
    max_batch_rows: int = 1_000_000
    """most rows simulated at once in one worker (memory bound)"""
    format: Literal["parquet", "csv"] = "parquet"
    """output format of both tables"""

    def validate(self) -> list[str]:
        problems = []
        for name in ("users", "items", "interactions_per_user", "top_categories",
                     "subtopics_per_top", "prefs_per_user", "caption_words",
                     "vocab_per_subtopic", "noise_vocab", "max_batch_rows"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("home_share", "stay_prob", "explore_prob", "drift_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.stay_prob + self.explore_prob > 1.0:
            problems.append("stay_prob + explore_prob must be <= 1")
        if self.items < self.num_subtopics:
            problems.append(f"items ({self.items}) must be >= top_categories x "
                            f"subtopics_per_top ({self.num_subtopics}): no empty sub-topic")
        if self.partitions < 0:
            problems.append("partitions must be >= 0")
        return problems

    @property
    def num_subtopics(self) -> int:
        return self.top_categories * self.subtopics_per_top


# --------------------------------------------------------------------------------------------
# counter-based random numbers
# --------------------------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _bits(seed: int, stream: int, ids: np.ndarray, step: int | np.ndarray = 0) -> np.ndarray:
    """64 random bits per id: a pure function of (seed, stream, id, step)."""
    ids = np.asarray(ids).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(stream))
        h = _mix(ids ^ key)
        return _mix(h + np.asarray(step).astype(np.uint64) * np.uint64(0xD1B54A32D192ED03))


def uniform(seed: int, stream: int, ids: np.ndarray, step: int | np.ndarray = 0) -> np.ndarray:
    """U[0, 1) doubles, one per id (53 random bits)."""
    return (_bits(seed, stream, ids, step) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def normal(seed: int, stream: int, ids: np.ndarray, step: int | np.ndarray = 0) -> np.ndarray:
    """N(0, 1), Box-Muller over two independent uniforms."""
    u1 = uniform(seed, stream, ids, step)
    u2 = uniform(seed, stream + 1000, ids, step)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


# --------------------------------------------------------------------------------------------
# the catalogue (a pure function of the config, rebuilt in each worker)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _World:
    sub_of_item: np.ndarray  # [I] sub-topic of each item
    quality: np.ndarray  # [I] per-item log-mean offset
    sub_items: np.ndarray  # [I] item ids grouped by sub-topic, by popularity rank
    sub_start: np.ndarray  # [S+1] segment offsets of each sub-topic in sub_items
    sub_cdf: np.ndarray  # [I] s + cumulative popularity inside sub-topic s (in (s, s+1])
    global_cdf: np.ndarray  # [I] cumulative global popularity over sub_items
    sub_weight: np.ndarray  # [S] sub-topic popularity


def _world(cfg: SyntheticConfig) -> _World:
    """The catalogue of ``cfg`` (cached per worker process: it depends on a few fields only)."""
    return _build_world(cfg.seed, cfg.items, cfg.num_subtopics, cfg.zipf_exponent,
                        cfg.item_quality_std)


@functools.lru_cache(maxsize=4)
def _build_world(seed: int, n_items: int, S: int, zipf_exponent: float,
                 item_quality_std: float) -> _World:
    ids = np.arange(n_items, dtype=np.int64)
    sub_weight = 1.0 / np.sqrt(np.arange(1, S + 1))  # mildly skewed sub-topic sizes
    sub_weight /= sub_weight.sum()
    picked = np.searchsorted(np.cumsum(sub_weight), uniform(seed, _S_ITEM_SUB, ids),
                             side="right")
    sub_of_item = np.where(ids < S, ids % S, np.minimum(picked, S - 1))  # no empty sub-topic
    rank_key = uniform(seed, _S_ITEM_RANK, ids)
    order = np.lexsort((rank_key, sub_of_item))  # grouped by sub-topic, random rank inside
    sub_items = ids[order]
    counts = np.bincount(sub_of_item, minlength=S)
    sub_start = np.concatenate([[0], np.cumsum(counts)])
    rank = np.arange(n_items) - np.repeat(sub_start[:-1], counts)
    pop = 1.0 / (rank + 1.0) ** zipf_exponent  # [I] in sub_items order
    seg_tot = np.add.reduceat(pop, sub_start[:-1])
    within = np.cumsum(pop) - np.repeat(np.cumsum(pop)[sub_start[:-1]] - pop[sub_start[:-1]],
                                        counts)
    sub_cdf = np.repeat(np.arange(S), counts) + within / np.repeat(seg_tot, counts)
    gpop = pop / np.repeat(seg_tot, counts) * np.repeat(sub_weight, counts)
    global_cdf = np.cumsum(gpop) / gpop.sum()
    quality = normal(seed, _S_ITEM_Q, ids) * item_quality_std
    return _World(sub_of_item, quality, sub_items, sub_start, sub_cdf, global_cdf, sub_weight)


def _pick_in_sub(w: _World, sub: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Zipf draw of an item inside each given sub-topic."""
    pos = np.searchsorted(w.sub_cdf, sub + u, side="left")
    pos = np.clip(pos, w.sub_start[sub], w.sub_start[sub + 1] - 1)
    return w.sub_items[pos]


def _random_sub(w: _World, u: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(w.sub_weight)
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


# --------------------------------------------------------------------------------------------
# users
# --------------------------------------------------------------------------------------------


@dataclass
class UserState:
    """The latent state of a batch of users between two steps (what the log never shows)."""

    prefs: np.ndarray  # [B, K] preferred sub-topics (drift in place)
    cum_w: np.ndarray  # [B, K] cumulative preference weights (fixed per user)
    last_sub: np.ndarray  # [B] sub-topic of the last engaged item


def _tastes(home: np.ndarray, u_in_home: np.ndarray, u_sib: np.ndarray, u_far: np.ndarray,
            cfg: SyntheticConfig) -> np.ndarray:
    """Preferred sub-topics [B, K] from the home categories [B] and three [B, K] uniforms:
    a slot lies in the home category with probability ``home_share`` (a uniform sibling
    there), else it is a random sub-topic by popularity. The law of :func:`init_users`,
    shared with ``sample_prior`` in ``bench/synthetic_oracle.py``."""
    P = cfg.subtopics_per_top
    sib = home[:, None] * P + np.minimum((u_sib * P).astype(np.int64), P - 1)
    return np.where(u_in_home < cfg.home_share, sib, _random_sub(_world(cfg), u_far))


def init_users(users: np.ndarray, cfg: SyntheticConfig) -> UserState:
    """Each user's tastes before the first interaction (a pure function of seed and id)."""
    seed = cfg.seed
    T, K = cfg.top_categories, cfg.prefs_per_user
    home = np.minimum((uniform(seed, _S_HOME, users) * T).astype(np.int64), T - 1)  # [B]
    uk = users[:, None] * K + np.arange(K)  # [B, K] one counter per (user, slot)
    prefs = _tastes(home, uniform(seed, _S_PREF, uk), uniform(seed, _S_PREF_SIB, uk),
                    uniform(seed, _S_PREF + 500, uk), cfg)  # [B, K] preferred sub-topics
    weights = -np.log1p(-np.stack([uniform(seed, _S_PREF_W, users * K + k) for k in range(K)],
                                  axis=1))  # [B, K] exponential -> Dirichlet(1) after norm
    cum_w = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)  # [B, K]
    return UserState(prefs, cum_w, prefs[:, 0].copy())


#: draw(stream, t) -> [B] uniforms in [0, 1); gauss(stream, t) -> [B] standard normals
Draw = Callable[[int, int], np.ndarray]


def drift_prefs(prefs: np.ndarray, drift: np.ndarray, u_slot: np.ndarray, u_sib: np.ndarray,
                u_far: np.ndarray, u_kind: np.ndarray, cfg: SyntheticConfig) -> None:
    """Move one preference slot of each ``drift`` row of ``prefs`` [B, K] in place: with
    probability 0.7 to a sibling of the slot's sub-topic, else to a random one. The four
    uniforms are [B] (one per row, drifting or not)."""
    K, P = cfg.prefs_per_user, cfg.subtopics_per_top
    rows = np.arange(len(prefs))
    slot = np.minimum((u_slot * K).astype(np.int64), K - 1)
    cur = prefs[rows, slot]
    sib = (cur // P) * P + np.minimum((u_sib * P).astype(np.int64), P - 1)
    far = _random_sub(_world(cfg), u_far)
    new = np.where(u_kind < 0.7, sib, far)
    prefs[rows[drift], slot[drift]] = new[drift]


def user_step(state: UserState, t: int, cfg: SyntheticConfig, draw: Draw,
              gauss: Draw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One interaction of every user in ``state`` (updated in place).

    The generator draws with the counter-based RNG; ``bench/oracle.py`` replays the same
    dynamics with fresh draws to estimate what comes next from the true latent state.
    Returns ``(item [B], watch_ratio [B] unrounded, log_mean [B])``: log_mean is the
    log-normal's mean for the drawn item under the tastes at this step.
    """
    w = _world(cfg)
    K = cfg.prefs_per_user
    prefs, rows = state.prefs, np.arange(len(state.last_sub))
    # drift: one slot moves, usually to a sibling sub-topic
    drift = draw(_S_DRIFT, t) < cfg.drift_prob
    if drift.any():
        drift_prefs(prefs, drift, draw(_S_DRIFT_SLOT, t), draw(_S_DRIFT_SUB, t),
                    draw(_S_DRIFT_SUB + 500, t), draw(_S_DRIFT_KIND, t), cfg)
    mode = draw(_S_MODE, t)
    slot = np.minimum((state.cum_w < draw(_S_SLOT, t)[:, None]).sum(axis=1), K - 1)
    sub = np.where(mode < cfg.stay_prob, state.last_sub, prefs[rows, slot])
    u_item = draw(_S_ITEM, t)
    item = _pick_in_sub(w, sub, u_item)
    explore = (mode >= cfg.stay_prob) & (mode < cfg.stay_prob + cfg.explore_prob)
    if explore.any():
        g = np.minimum(np.searchsorted(w.global_cdf, u_item[explore], side="right"),
                       len(w.global_cdf) - 1)
        item[explore] = w.sub_items[g]
    mu = taste_log_mean(prefs, item, cfg) + w.quality[item]
    wr = np.exp(mu + cfg.log_std * gauss(_S_WR1, t))
    state.last_sub = np.where(wr >= 1.0, w.sub_of_item[item], state.last_sub)
    return item, wr, mu


def taste_level(prefs: np.ndarray, items: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """0 = item in a current preference, 1 = in a sibling of one, 2 = outside the tastes.

    prefs [B, K], items [B] or [B, J] -> int codes of the items' shape.
    """
    P = cfg.subtopics_per_top
    isub = _world(cfg).sub_of_item[items]
    extra = (slice(None),) + (None,) * (isub.ndim - 1) + (slice(None),)
    p = prefs[extra]  # [B, 1.., K]
    match = (p == isub[..., None]).any(axis=-1)
    sibling = ((p // P) == (isub // P)[..., None]).any(axis=-1)
    return np.where(match, 0, np.where(sibling, 1, 2))


def taste_log_mean(prefs: np.ndarray, items: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """Log-mean watch ratio from taste alone (no item quality), shaped like ``items``."""
    means = np.array([cfg.match_log_mean, cfg.sibling_log_mean, cfg.miss_log_mean])
    return means[taste_level(prefs, items, cfg)]


def simulate_users(users: np.ndarray, cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Interaction rows of the given user ids (time order per user): column -> array."""
    seed, M = cfg.seed, cfg.interactions_per_user
    users = users.astype(np.int64)
    B = len(users)
    state = init_users(users, cfg)
    ts = (cfg.start_ts + uniform(seed, _S_START, users) * cfg.start_span_days * 86400.0)
    out_item = np.empty((B, M), dtype=np.int64)
    out_wr = np.empty((B, M), dtype=np.float64)
    out_ts = np.empty((B, M), dtype=np.int64)

    def draw(stream: int, t: int) -> np.ndarray:
        return uniform(seed, stream, users, t)

    def gauss(stream: int, t: int) -> np.ndarray:
        return normal(seed, stream, users, t)

    for t in range(M):
        item, wr, _ = user_step(state, t, cfg, draw, gauss)
        ts = ts + -np.log1p(-uniform(seed, _S_GAP, users, t)) * cfg.mean_gap_s + 1.0
        out_item[:, t], out_wr[:, t], out_ts[:, t] = item, np.round(wr, 4), ts.astype(np.int64)
    return {"user_id": np.repeat(users, M), "item_id": out_item.ravel(),
            "timestamp": out_ts.ravel(), "watch_ratio": out_wr.ravel()}


def _word(v: np.ndarray) -> list[str]:
    """Pseudo-words: 2-3 syllables from the bits of a hash of the word id."""
    h = _bits(7, _S_CAP, v)
    out = []
    for x in h.tolist():
        n = 2 + (x & 1)
        out.append("".join(_SYLLABLES[(x >> (8 * k + 1)) % len(_SYLLABLES)] for k in range(n)))
    return out


def simulate_items(items: np.ndarray, cfg: SyntheticConfig) -> dict[str, list]:
    """Items-table rows: item_id, category "top|sub", caption."""
    w, seed = _world(cfg), cfg.seed
    items = items.astype(np.int64)
    sub = w.sub_of_item[items]
    top = sub // cfg.subtopics_per_top
    V, C, Z = cfg.vocab_per_subtopic, cfg.caption_words, cfg.caption_noise_words
    topic_words = [sub * V + np.minimum((uniform(seed, _S_CAP, items * (C + Z) + j) * V)
                                        .astype(np.int64), V - 1) for j in range(C)]
    noise_base = cfg.num_subtopics * V
    noise_words = [noise_base + np.minimum((uniform(seed, _S_CAP, items * (C + Z) + C + j)
                                            * cfg.noise_vocab).astype(np.int64),
                                           cfg.noise_vocab - 1) for j in range(Z)]
    words = [_word(ids) for ids in topic_words + noise_words]
    captions = [" ".join(ws) for ws in zip(*words)] if words else [""] * len(items)
    return {"item_id": items.tolist(),
            "category": [f"{a}|{cfg.top_categories + b}" for a, b in zip(top.tolist(),
                                                                         sub.tolist())],
            "caption": captions}


# --------------------------------------------------------------------------------------------
# Spark job
# --------------------------------------------------------------------------------------------

INTERACTIONS_SCHEMA = "user_id long, item_id long, timestamp long, watch_ratio double"
ITEMS_SCHEMA = "item_id long, category string, caption string"


@dataclass(frozen=True)
class _UserTask:
    cfg: SyntheticConfig

    def __call__(self, batches):
        import pyarrow as pa

        per = max(1, self.cfg.max_batch_rows // self.cfg.interactions_per_user)
        for batch in batches:
            ids = batch.column(0).to_numpy()
            for lo in range(0, len(ids), per):
                cols = simulate_users(ids[lo:lo + per], self.cfg)
                yield pa.RecordBatch.from_pydict({
                    "user_id": pa.array(cols["user_id"], pa.int64()),
                    "item_id": pa.array(cols["item_id"], pa.int64()),
                    "timestamp": pa.array(cols["timestamp"], pa.int64()),
                    "watch_ratio": pa.array(cols["watch_ratio"], pa.float64())})


@dataclass(frozen=True)
class _ItemTask:
    cfg: SyntheticConfig

    def __call__(self, batches):
        import pyarrow as pa

        for batch in batches:
            cols = simulate_items(batch.column(0).to_numpy(), self.cfg)
            yield pa.RecordBatch.from_pydict({
                "item_id": pa.array(cols["item_id"], pa.int64()),
                "category": pa.array(cols["category"], pa.string()),
                "caption": pa.array(cols["caption"], pa.string())})


def _write(df, path: str, fmt: str) -> None:
    writer = df.write.mode("overwrite")
    if fmt == "csv":
        writer.option("header", "true").csv(path)
    else:
        writer.parquet(path)


def generate(spark, cfg: SyntheticConfig, out_dir: str) -> tuple[str, str]:
    """Write the synthetic log and items table under ``out_dir`` (any Hadoop-FS URI).

    Returns ``(interactions_path, items_path)``: ``<out_dir>/interactions`` and
    ``<out_dir>/items`` (Parquet or CSV folders).
    """
    problems = cfg.validate()
    if problems:
        raise ValueError("invalid SyntheticConfig: " + "; ".join(problems))
    parts = cfg.partitions or spark.sparkContext.defaultParallelism
    out = out_dir.rstrip("/")
    inter_path, items_path = f"{out}/interactions", f"{out}/items"
    users = spark.range(0, cfg.users, numPartitions=min(parts, cfg.users))
    _write(users.mapInArrow(_UserTask(cfg), INTERACTIONS_SCHEMA), inter_path, cfg.format)
    item_parts = max(1, min(parts, cfg.items // 10000 + 1))
    items = spark.range(0, cfg.items, numPartitions=item_parts)
    _write(items.mapInArrow(_ItemTask(cfg), ITEMS_SCHEMA), items_path, cfg.format)
    return inter_path, items_path


def main(argv: list[str] | None = None) -> int:
    from higr_dist.config import ConfigError, load
    from higr_dist.etl.spark import get_spark

    p = argparse.ArgumentParser(prog="synthetic.py", description="Synthetic HiGR interaction log")
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--interactions-per-user", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--output", required=True, help="output folder (any Hadoop-FS URI)")
    p.add_argument("--config", default=None, help="SyntheticConfig YAML")
    p.add_argument("--master", default=None, help="Spark master when run as plain python")
    p.add_argument("overrides", nargs="*", help="key=value overrides of SyntheticConfig")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    for key, value in (("users", args.users), ("items", args.items),
                       ("interactions_per_user", args.interactions_per_user),
                       ("seed", args.seed)):
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        cfg = load(SyntheticConfig, args.config, overrides)
        problems = cfg.validate()
        if problems:
            raise ConfigError(problems)
        spark = get_spark(app_name="higr-synthetic", master=args.master)
        inter, items = generate(spark, cfg, args.output)
    except ValueError as e:  # ConfigError included: one line, exit status 2
        msg = ("invalid config: " + "; ".join(e.problems) if isinstance(e, ConfigError)
               else str(e).strip().splitlines()[0])
        print(f"synthetic.py: error: {msg}", file=sys.stderr)
        return 2
    print(json.dumps({"interactions": inter, "items": items,
                      "rows": cfg.users * cfg.interactions_per_user}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
