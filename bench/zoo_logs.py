"""The zoo's synthetic logs: small worlds whose signal sits in different places.

    python bench/zoo_logs.py --log transition --out /tmp/zoo/transition   # writes 2 CSVs

Each generator writes ``interactions.csv`` (``user_id,item_id,timestamp,watch_ratio``) and
``items.csv`` (``item_id,category,caption``) in the generic schema, from a seed, with numpy
only (seconds; no Spark). The demo's own generator (``taste``) is the pipeline's Spark job and
MovieLens is real data: ``bench/zoo.py`` handles those two.

- ``transition``: what a user watches next is mostly one of a few likely *successors* of what
  they just watched (a sparse item-to-item graph, half of the edges inside the category);
  item content is one category and a short caption. Sequential, item-level signal: content
  says little, the last item says a lot.
- ``trend``: items are released over time and their popularity rises and decays; most views
  go to what is trending *at the user's time*, the rest to two favourite categories. Global
  popularity is a blurred average; the signal is "what is hot now", which a model can only
  read from the history.
- ``content``: items belong to fine topics that their captions spell out; users like a few
  topics and pick items inside them nearly uniformly, from a catalogue larger than the log
  can teach item by item. Content predicts taste; item-level co-occurrence is sparse.

Watch ratios are log-normal, high when the pick follows the log's signal and low otherwise, so
effective views (>= 2.0) mark the items a good model should find.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_WORDS = [a + b for a in ("ka", "lo", "mi", "ne", "su", "ra", "to", "vi", "ze", "po", "qu",
                          "da", "fe", "gi", "hu", "ja")
          for b in ("n", "r", "l", "s", "t", "m", "x", "k")]


@dataclass
class Log:
    """A generated log: per-row arrays and the items table."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    wr: np.ndarray
    category: list[str]
    caption: list[str]


def _zipf(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w / w.sum())


def _watch(rng: np.random.Generator, good: np.ndarray, good_mu: float, bad_mu: float,
           sd: float = 0.7) -> np.ndarray:
    mu = np.where(good, good_mu, bad_mu)
    return np.round(np.exp(rng.normal(mu, sd)), 4)


def _caption(rng: np.random.Generator, vocab: list[str], k: int, noise: int) -> str:
    words = list(rng.choice(vocab, size=k)) + list(rng.choice(_WORDS, size=noise))
    return " ".join(words)


def _times(rng: np.random.Generator, users: int, steps: int, start: np.ndarray,
           gap_s: float) -> np.ndarray:
    gaps = rng.exponential(gap_s, size=(users, steps)) + 1.0
    return (start[:, None] + np.cumsum(gaps, axis=1)).astype(np.int64)


def transition(seed: int = 1, users: int = 2000, items: int = 2000, categories: int = 40,
               steps: int = 50, successors: int = 3, follow: float = 0.75) -> Log:
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, categories, size=items)
    by_cat = [np.flatnonzero(cat == c) for c in range(categories)]
    succ = np.empty((items, successors), dtype=np.int64)
    for i in range(items):
        same = rng.random(successors) < 0.5
        pool = by_cat[cat[i]]
        succ[i] = np.where(same, rng.choice(pool, successors), rng.integers(0, items, successors))
    succ_p = np.array([0.5, 0.3, 0.2])[:successors]
    succ_p = succ_p / succ_p.sum()
    pop = _zipf(items, 0.8, rng)
    seq = np.empty((users, steps), dtype=np.int64)
    good = np.empty((users, steps), dtype=bool)
    cur = rng.choice(items, size=users, p=pop)
    for t in range(steps):
        moves = rng.random(users) < follow
        pick = succ[cur, rng.choice(successors, size=users, p=succ_p)]
        jump = rng.choice(items, size=users, p=pop)
        cur = np.where(moves, pick, jump)
        seq[:, t], good[:, t] = cur, moves
    vocab = [[f"{w}{c}" for w in rng.choice(_WORDS, 6, replace=False)] for c in range(categories)]
    start = 1_700_000_000 + rng.integers(0, 30 * 86400, size=users)
    return Log(user=np.repeat(np.arange(users), steps), item=seq.ravel(),
               ts=_times(rng, users, steps, start, 900.0).ravel(),
               wr=_watch(rng, good, 0.5, -0.8).ravel(),
               category=[str(c) for c in cat],
               caption=[_caption(rng, vocab[c], 3, 1) for c in cat])


def trend(seed: int = 2, users: int = 2000, items: int = 3000, categories: int = 30,
          steps: int = 40, days: int = 60, half_life_days: float = 4.0,
          trending: float = 0.7) -> Log:
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, categories, size=items)
    release = rng.uniform(-15, days, size=items)  # day of release
    appeal = _zipf(items, 1.0, rng) * items  # mean 1
    fav = np.stack([rng.choice(categories, 2, replace=False) for _ in range(users)])
    user_day = rng.uniform(0, days - 8, size=users)  # each user is active ~1 week
    seq = np.empty((users, steps), dtype=np.int64)
    good = np.empty((users, steps), dtype=bool)
    ts = np.empty((users, steps), dtype=np.int64)
    # popularity at a day: appeal x decay since release (0 before release), on a day grid
    grid = np.arange(days + 1)
    age = grid[:, None] - release[None, :]
    hot = np.where(age >= 0, appeal * 0.5 ** (age / half_life_days), 0.0)  # [days+1, items]
    hot /= hot.sum(1, keepdims=True)
    cat_mask = np.eye(categories, dtype=bool)[cat].T  # [categories, items]
    for u in range(users):
        day = user_day[u] + np.sort(rng.uniform(0, 7, size=steps))
        d = np.minimum(day.astype(int), days)
        follow = rng.random(steps) < trending
        for t in range(steps):
            p = hot[d[t]]
            if not follow[t]:
                p = p * (cat_mask[fav[u, 0]] | cat_mask[fav[u, 1]]) + 1e-12
                p = p / p.sum()
            seq[u, t] = rng.choice(items, p=p)
        in_fav = np.isin(cat[seq[u]], fav[u])
        good[u] = in_fav | follow & (rng.random(steps) < 0.6)
        ts[u] = (1_700_000_000 + day * 86400).astype(np.int64)
    vocab = [[f"{w}{c}" for w in rng.choice(_WORDS, 6, replace=False)] for c in range(categories)]
    return Log(user=np.repeat(np.arange(users), steps), item=seq.ravel(), ts=ts.ravel(),
               wr=_watch(rng, good, 0.5, -0.6).ravel(), category=[str(c) for c in cat],
               caption=[_caption(rng, vocab[c], 3, 2) for c in cat])


def content(seed: int = 3, users: int = 1500, items: int = 4000, groups: int = 12,
            topics_per_group: int = 6, steps: int = 40, prefs: int = 3,
            on_taste: float = 0.85) -> Log:
    rng = np.random.default_rng(seed)
    topics = groups * topics_per_group
    topic = rng.integers(0, topics, size=items)
    by_topic = [np.flatnonzero(topic == k) for k in range(topics)]
    vocab = [[f"{w}{k}" for w in rng.choice(_WORDS, 8, replace=False)] for k in range(topics)]
    pop = _zipf(items, 0.6, rng)
    seq = np.empty((users, steps), dtype=np.int64)
    good = np.empty((users, steps), dtype=bool)
    for u in range(users):
        home = rng.integers(0, groups)
        mine = np.where(rng.random(prefs) < 0.7,
                        home * topics_per_group + rng.integers(0, topics_per_group, prefs),
                        rng.integers(0, topics, prefs))
        w = rng.dirichlet(np.ones(prefs))
        on = rng.random(steps) < on_taste
        k = mine[rng.choice(prefs, size=steps, p=w)]
        for t in range(steps):
            if on[t]:
                pool = by_topic[k[t]]
                seq[u, t] = pool[rng.integers(0, len(pool))]
            else:
                seq[u, t] = rng.choice(items, p=pop)
        good[u] = np.isin(topic[seq[u]], mine)
    start = 1_700_000_000 + rng.integers(0, 30 * 86400, size=users)
    return Log(user=np.repeat(np.arange(users), steps), item=seq.ravel(),
               ts=_times(rng, users, steps, start, 1200.0).ravel(),
               wr=_watch(rng, good, 0.6, -1.0).ravel(),
               category=[str(k // topics_per_group) for k in topic],
               caption=[_caption(rng, vocab[k], 4, 1) for k in topic])


GENERATORS: dict[str, Callable[..., Log]] = {
    "transition": transition, "trend": trend, "content": content}


def write(log: Log, out: Path) -> tuple[Path, Path]:
    """Write ``interactions.csv`` and ``items.csv`` under ``out``; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    inter, items = out / "interactions.csv", out / "items.csv"
    order = np.lexsort((log.ts, log.user))
    with open(inter, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "timestamp", "watch_ratio"])
        w.writerows(zip(log.user[order].tolist(), log.item[order].tolist(),
                        log.ts[order].tolist(), log.wr[order].tolist()))
    with open(items, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "category", "caption"])
        w.writerows((i, c, cap) for i, (c, cap) in enumerate(zip(log.category, log.caption)))
    return inter, items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, choices=sorted(GENERATORS))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    kw = {} if args.seed is None else {"seed": args.seed}
    inter, items = write(GENERATORS[args.log](**kw), Path(args.out))
    print(inter, items)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
