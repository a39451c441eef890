"""The oracle's likelihoods (``bench/synthetic_oracle.py``) against the synthetic generator.

Each closed form of ``bench/oracle.py`` is checked against what ``higr_dist.etl.synthetic``
actually draws from the same state: next-item and effective-view probabilities, the
history-only filter's item likelihood, prior and drift law.
"""

import sys
from pathlib import Path

import numpy as np

from higr_dist.etl.synthetic import SyntheticConfig, UserState, drift_prefs, init_users, user_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench-only code

from synthetic_oracle import (  # noqa: E402
    drift_log_prob,
    effective_probs,
    item_prob,
    next_item_probs,
    prefs_log_prior,
    sample_prior,
)


def test_synthetic_next_item_probs_match_the_generator():
    """The oracle's exact next-item and effective-view probabilities (bench/oracle.py) agree
    with what ``user_step`` actually draws from the same state."""
    cfg = SyntheticConfig(items=200, drift_prob=0.0)
    users, reps = np.arange(4), 20_000
    exact = init_users(users, cfg)
    shown = next_item_probs(exact, cfg)  # [4, I]
    eff = shown * effective_probs(exact.prefs, cfg, 2.0)  # [4, I]
    np.testing.assert_allclose(shown.sum(axis=1), 1.0, rtol=1e-9)
    state = init_users(np.repeat(users, reps), cfg)
    rng = np.random.default_rng(0)
    n = len(users) * reps
    item, wr, _ = user_step(state, 0, cfg, lambda s, t: rng.random(n),
                            lambda s, t: rng.standard_normal(n))
    who = np.repeat(users, reps)
    emp_shown, emp_eff = np.zeros_like(shown), np.zeros_like(eff)
    np.add.at(emp_shown, (who, item), 1.0 / reps)
    np.add.at(emp_eff, (who, item), (wr >= 2.0) / reps)
    # sampling error of a frequency p over 20k draws: sd = sqrt(p / 20k) <= 0.0035 at p = 0.25
    assert np.abs(emp_shown - shown).max() < 0.012
    assert np.abs(emp_eff - eff).max() < 0.012
    np.testing.assert_allclose(emp_eff.sum(axis=1), eff.sum(axis=1), atol=0.015)


def test_filter_likelihoods_match_the_generator():
    """The pieces of bench/oracle.py's history-only filter agree with the generator:
    item_prob is next_item_probs at one item (per-state weights and a weight grid alike),
    sample_prior draws what prefs_log_prior says, drift_log_prob is drift_prefs' law."""
    cfg = SyntheticConfig(items=200)
    users = np.arange(6)
    state = init_users(users, cfg)
    probs = next_item_probs(state, cfg)  # [6, I]
    w_k = np.diff(state.cum_w, axis=1, prepend=0.0)  # [6, K]
    for item in (0, 17, 199):
        x = np.full(len(users), item)
        np.testing.assert_allclose(item_prob(state.prefs, state.last_sub, w_k, x, cfg),
                                   probs[:, item], rtol=1e-12)
        grid = np.stack([w_k[0], w_k[1], [0.2, 0.3, 0.5]])[None]  # [1, G=3, K]
        on_grid = item_prob(state.prefs, state.last_sub, grid, x, cfg)  # [6, 3]
        other = UserState(state.prefs, np.tile(np.cumsum(w_k[1]), (6, 1)), state.last_sub)
        np.testing.assert_allclose(on_grid[:, 1], next_item_probs(other, cfg)[:, item],
                                   rtol=1e-12)
    # prior: empirical frequencies of the ordered triples vs the closed form
    rng = np.random.default_rng(0)
    S = cfg.num_subtopics
    every = np.stack(np.unravel_index(np.arange(S ** 3), (S, S, S)), axis=1)  # [S^3, K]
    want = np.exp(prefs_log_prior(every, cfg))
    assert abs(want.sum() - 1.0) < 1e-9
    draws = sample_prior(400_000, cfg, rng).prefs
    emp = np.bincount(np.ravel_multi_index(draws.T, (S, S, S)), minlength=S ** 3) / len(draws)
    top = np.argsort(-want)[:20]  # ~300 draws each: sd ~6%
    np.testing.assert_allclose(emp[top], want[top], rtol=0.25)
    # drift: outcomes of one step from a fixed state vs drift_log_prob
    n = 400_000
    old = np.tile(np.array([[5, 6, 30]]), (n, 1))
    new = old.copy()
    drift_prefs(new, rng.random(n) < cfg.drift_prob, *(rng.random(n) for _ in range(4)), cfg=cfg)
    uniq, counts = np.unique(new, axis=0, return_counts=True)
    p = np.exp(drift_log_prob(old[:len(uniq)], uniq, cfg))
    assert abs(p.sum() - 1.0) < 1e-9  # every reachable outcome is accounted for
    big = counts > 200
    np.testing.assert_allclose(counts[big] / n, p[big], rtol=0.2)
    assert np.exp(drift_log_prob(old[:1], np.array([[1, 2, 30]]), cfg))[0] == 0.0
