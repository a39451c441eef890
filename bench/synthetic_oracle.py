"""The exact likelihoods of the synthetic generator's law, for the oracle benchmark.

``higr_dist.etl.synthetic`` *samples* the interaction log: counter-based draws push each user's
latent state (preferred sub-topics, their weights, the sub-topic of the last engaged item)
through the stay / explore / preferred-sub-topic mixture, the drift of one preference slot and
the log-normal watch ratio. ``bench/oracle.py`` needs the same law the other way round, as
closed-form probabilities and densities, to score what the best possible ranker could do:

- :func:`next_item_probs`, :func:`item_prob`: P(next item shown | state), all items or one;
- :func:`effective_probs`: P(watch ratio >= threshold | tastes), per item;
- :func:`watch_log_density`: the log-normal density of a logged watch ratio (up to a constant
  shared by every state), the observation likelihood of the history-only filter;
- :func:`drift_log_prob`: log P(prefs after one step's drift | prefs before);
- :func:`sample_prior`, :func:`prefs_log_prior`: draws from, and the density of, the state
  before the first interaction (the filter's prior);
- :func:`sub_topics`: the catalogue's sub-topic of every item.

Design and trade-offs
---------------------
Only the benchmark and its tests use these, so they live here, outside the package: the
shipped generator carries just what it samples with. They are written against the generator's
own building blocks, imported from ``higr_dist.etl.synthetic`` (the catalogue ``_world`` /
``_build_world``, the taste law ``_tastes`` / ``taste_level`` / ``taste_log_mean``, the
``UserState`` layout), not re-derived, so a change of the world model changes both sides at
once. The price is a dependency on private names of that module; the unit tests in
``tests/test_synthetic_oracle.py`` compare each likelihood with what the generator actually
draws (Monte-Carlo frequencies against the closed forms), which is what catches a law that
changed on one side only.

The functions are vectorised over a batch of states (numpy, no torch) and exact: any sampling
is in the oracle's continuation of the state, never in these probabilities. Per-item shares
inside a sub-topic and under exploration are derived once per catalogue from the world's CDFs
and cached (:func:`_item_shares`), as the world itself is.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from higr_dist.etl.synthetic import (
    SyntheticConfig,
    UserState,
    _build_world,
    _tastes,
    _world,
    taste_level,
    taste_log_mean,
)


def drift_log_prob(old: np.ndarray, new: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """log P(prefs ``new`` after one step's drift | ``old``) under :func:`drift_prefs` with
    probability ``drift_prob``: [N, K] each -> [N]. ``new`` differs from ``old`` in at most
    one slot (else the probability is 0)."""
    K, P, d = cfg.prefs_per_user, cfg.subtopics_per_top, cfg.drift_prob
    sw = _world(cfg).sub_weight
    changed = new != old  # [N, K]
    n_changed = changed.sum(axis=1)
    k = changed.argmax(axis=1)
    rows = np.arange(len(old))
    cur, to = old[rows, k], new[rows, k]
    p_change = d / K * (0.7 / P * (to // P == cur // P) + 0.3 * sw[to])
    # a drift may land on the slot's own sub-topic: "no change" has that mass too
    p_same = 1.0 - d + d / K * (0.7 * K / P + 0.3 * sw[old].sum(axis=1))
    p = np.where(n_changed == 0, p_same, np.where(n_changed == 1, p_change, 0.0))
    with np.errstate(divide="ignore"):
        return np.log(p)


def sub_topics(cfg: SyntheticConfig) -> np.ndarray:
    """[I] the sub-topic of every item."""
    return _world(cfg).sub_of_item


def next_item_probs(state: UserState, cfg: SyntheticConfig) -> np.ndarray:
    """[B, I]: the exact probability of each item being the next one shown, given the state
    (after this step's drift): the stay / explore / preferred sub-topic mixture of
    :func:`user_step`, Zipf inside a sub-topic. Used by ``bench/oracle.py``."""
    w = _world(cfg)
    B, S = len(state.last_sub), cfg.num_subtopics
    rows = np.arange(B)
    w_k = np.diff(state.cum_w, axis=1, prepend=0.0)  # [B, K] preference weights
    p_sub = np.zeros((B, S))  # [B, S]
    p_sub[rows, state.last_sub] += cfg.stay_prob
    pref_share = 1.0 - cfg.stay_prob - cfg.explore_prob
    for k in range(state.prefs.shape[1]):
        np.add.at(p_sub, (rows, state.prefs[:, k]), pref_share * w_k[:, k])
    p_in_sub, p_global = _item_shares(cfg.seed, cfg.items, S, cfg.zipf_exponent,
                                      cfg.item_quality_std)
    return p_sub[:, w.sub_of_item] * p_in_sub + cfg.explore_prob * p_global


def sample_prior(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> UserState:
    """``n`` independent draws of a user's state before the first interaction, from the same
    distribution as :func:`init_users` but with ``rng``: the prior of ``bench/oracle.py``'s
    history-only filter."""
    T, K = cfg.top_categories, cfg.prefs_per_user
    home = np.minimum((rng.random(n) * T).astype(np.int64), T - 1)  # [n]
    u = np.stack([[rng.random(n) for _ in range(3)] for _ in range(K)], axis=-1)  # [3, n, K]
    prefs = _tastes(home, u[0], u[1], u[2], cfg)  # [n, K]
    weights = rng.exponential(size=(n, K))  # [n, K] -> Dirichlet(1) after normalising
    cum_w = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    return UserState(prefs, cum_w, prefs[:, 0].copy())


def prefs_log_prior(prefs: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """[n, K] ordered preferred sub-topics -> [n] log P(prefs) under :func:`init_users`
    (the home category summed out)."""
    w = _world(cfg)
    T, P = cfg.top_categories, cfg.subtopics_per_top
    in_top = (prefs // P)[:, None, :] == np.arange(T)[None, :, None]  # [n, T, K]
    per_slot = (cfg.home_share / P) * in_top + (1.0 - cfg.home_share) * w.sub_weight[prefs][:, None]
    return np.log(per_slot.prod(axis=2).sum(axis=1) / T)


def item_prob(prefs: np.ndarray, last_sub: np.ndarray, weights: np.ndarray, item: np.ndarray,
              cfg: SyntheticConfig) -> np.ndarray:
    """P(the next item shown is ``item``) for [N] states: :func:`next_item_probs` at one item.

    prefs [N, K], last_sub [N] (before the step), item [N]; weights (not cumulative) [N, K]
    -> [N], or [1, G, K] (G candidate weight vectors shared by every state) -> [N, G].
    """
    p_in_sub, p_global = _item_shares(cfg.seed, cfg.items, cfg.num_subtopics,
                                      cfg.zipf_exponent, cfg.item_quality_std)
    isub = _world(cfg).sub_of_item[item]  # [N]
    hit = (prefs == isub[:, None]).astype(float)  # [N, K]
    if weights.ndim == 3:
        (grid,) = weights  # [G, K]: one shared grid
        pref_mass = hit @ grid.T  # [N, G]
        col = (slice(None), None)  # [N] -> [N, 1]
    else:
        pref_mass, col = (hit * weights).sum(axis=1), slice(None)
    pref_share = 1.0 - cfg.stay_prob - cfg.explore_prob
    stay = cfg.stay_prob * (last_sub == isub)
    return ((stay[col] + pref_share * pref_mass) * p_in_sub[item][col]
            + cfg.explore_prob * p_global[item][col])


def watch_log_density(prefs: np.ndarray, item: np.ndarray, watch_ratio: np.ndarray,
                      cfg: SyntheticConfig) -> np.ndarray:
    """log density of the logged watch ratio under tastes ``prefs`` [N, K], up to a constant
    that is the same for every state (the log-normal of :func:`user_step`) -> [N]."""
    mu = taste_log_mean(prefs, item, cfg) + _world(cfg).quality[item]
    z = (np.log(np.maximum(watch_ratio, 5e-5)) - mu) / cfg.log_std  # rounded to 0: clamp
    return -0.5 * z * z


@functools.lru_cache(maxsize=4)
def _item_shares(seed: int, n_items: int, S: int, zipf_exponent: float,
                 item_quality_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Per item: P(item | its sub-topic) and P(item | explore), from the world's CDFs."""
    w = _build_world(seed, n_items, S, zipf_exponent, item_quality_std)
    pos = np.empty(n_items, dtype=np.int64)  # item -> position in w.sub_items
    pos[w.sub_items] = np.arange(n_items)
    frac = w.sub_cdf - np.repeat(np.arange(S), np.diff(w.sub_start))  # cumulative in-sub share
    p = np.diff(frac, prepend=0.0)
    p[w.sub_start[:-1]] = frac[w.sub_start[:-1]]  # a segment's first item starts from 0
    return p[pos], np.diff(w.global_cdf, prepend=0.0)[pos]


def effective_probs(prefs: np.ndarray, cfg: SyntheticConfig, threshold: float) -> np.ndarray:
    """[B, I]: P(watch ratio >= threshold) of every item under tastes ``prefs`` [B, K]."""
    w = _world(cfg)
    means = np.array([cfg.match_log_mean, cfg.sibling_log_mean, cfg.miss_log_mean])
    z = (means[:, None] + w.quality[None, :] - math.log(threshold)) / cfg.log_std  # [3, I]
    table = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))  # [3, I] normal CDF
    items = np.broadcast_to(np.arange(cfg.items), (len(prefs), cfg.items))  # [B, I]
    return table[taste_level(prefs, items, cfg), items]
