"""Ceilings of the synthetic data: the NDCG@5 of rankers that know how the log was generated.

    python bench/oracle.py --run-dir runs/demo --out bench/results/oracle.json
    python bench/oracle.py --run-dir runs/demo --ranker history \
        --out bench/results/oracle_history.json          # ~20 min on 2 cores
    python bench/oracle.py --run-dir runs/demo --split val --paths 100   # quicker, validation

Why: issue #5 asks the aligned HiGR for >= 1.10x the NDCG@5 of the best baseline. On synthetic
data we can ask how much NDCG@5 there *is* to win: the generator (``higr_dist.etl.synthetic``)
is a known Markov process with known parameters, so two rankers can be written down exactly.

- ``--ranker state`` (the clairvoyant ceiling) sees each user's hidden state itself: the
  preferred sub-topics and weights at the start of the held-out window and the sub-topic of
  the last engaged item. No model can see it.
- ``--ranker history`` (the Bayes ranker) sees what a model sees, the user's logged items and
  watch ratios, plus the generator's parameters (catalogue, popularity, item quality, drift
  and taste laws), and infers the state with a particle filter (:func:`posterior_state`).
  Ranking by the posterior expected relevance is what the best possible model reading the
  history does, so a learned model's NDCG@5 should sit at or below this line (up to the
  NDCG caveat below and the filter's Monte-Carlo error, which the ``filter`` block of the
  JSON and the particle-count runs in docs/RESULTS.md bound).

What the oracle does, per evaluated user:

1. replays the generator's own counter-based draws (``init_users`` + ``user_step``) up to the
   first held-out interaction, giving the exact latent state there (and checks that it
   reproduces the ETL's held-out items: same users, same targets as the models' evaluation);
   ``--ranker history`` instead draws ``--paths`` states from the filter's posterior;
2. from that state (or those), runs ``--paths`` Monte-Carlo continuations of the N held-out
   steps with fresh draws (tastes may drift, the "stay" sub-topic follows engaged items);
3. at every step of every path, adds the *exact* probability of each catalogue item being
   shown and effective (watch ratio >= the effective threshold) given that path's state:
   P(item) from the generator's mixture (stay / explore / preferred sub-topic, Zipf inside a
   sub-topic) times P(log-normal watch ratio >= threshold). Only the state's evolution is
   sampled, so the first step is exact and the estimate's noise is small;
4. ranks items by that expected number of effective showings (distinct items, top 5) and scores
   the slate with the harness's :class:`~higr_dist.eval.metrics.SlateMetrics` against the
   real held-out items.

Ranking by the marginal probability of relevance maximises expected DCG; NDCG's per-user
normaliser (the number of effective held-out items) makes it near-optimal rather than optimal,
so the ceiling is an estimate, not a proof (the bootstrap interval is over users). Models see
only the history (at most ``history_len`` items) and must infer the state. The comparison of
interest is (best baseline x 1.10) against both lines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from higr_dist.config import load  # noqa: E402
from higr_dist.data.loader import iterate_samples  # noqa: E402
from higr_dist.data.shardio import list_shards  # noqa: E402
from higr_dist.etl.synthetic import (  # noqa: E402
    SyntheticConfig,
    UserState,
    drift_prefs,
    init_users,
    normal,
    simulate_users,
    uniform,
    user_step,
)
from higr_dist.eval.metrics import SlateMetrics  # noqa: E402
from higr_dist.layout import EtlLayout, RunLayout  # noqa: E402
from higr_dist.schema import FOLDERS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling bench modules
from synthetic_oracle import (  # noqa: E402
    drift_log_prob,
    effective_probs,
    item_prob,
    next_item_probs,
    prefs_log_prior,
    sample_prior,
    sub_topics,
    watch_log_density,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/demo", help="finished `higr run` folder "
                   "(synthetic source; its etl/ gives the evaluated users and targets)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--ranker", choices=["state", "history"], default="state",
                   help="state: knows each user's latent state (the clairvoyant ceiling); "
                   "history: infers it from the user's logged rows with a particle filter "
                   "(the Bayes ranker any model reading the history is bounded by)")
    p.add_argument("--particles", type=int, default=2000, help="filter particles per user "
                   "(--ranker history)")
    p.add_argument("--history", type=int, default=0, help="logged steps the filter reads "
                   "before the held-out window (0 = all; models read history_len)")
    p.add_argument("--grid", type=int, default=18, help="weight grid resolution of the "
                   "filter: weights are multiples of 1/(grid + K)")
    p.add_argument("--guide", type=float, default=0.1, help="share of the filter's drift "
                   "proposals guided to an engaged item's sub-topic (0 = the generator's drift)")
    p.add_argument("--max-users", type=int, default=0, help="score only the first N users "
                   "(0 = all)")
    p.add_argument("--paths", type=int, default=200, help="Monte-Carlo continuations per user")
    p.add_argument("--chunk", type=int, default=25, help="users per vectorised chunk")
    p.add_argument("--threshold", type=float, default=2.0, help="effective watch ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws")
    p.add_argument("--compare", default=None,
                   help="a run's report.json whose models' NDCG@5 are put next to the oracle "
                   "(default: the run's own)")
    p.add_argument("--out", default="bench/results/oracle.json")
    return p.parse_args(argv)


def synthetic_config(run_dir: Path) -> SyntheticConfig:
    resolved = yaml.safe_load(RunLayout(run_dir).resolved_config.read_text())
    source = resolved["source"]
    if source.get("interactions"):
        raise SystemExit(f"{run_dir} was trained on a user log, not the synthetic source")
    overrides = [f"{k}={v}" for k, v in (source.get("synthetic") or {}).items()]
    return load(SyntheticConfig, None, overrides)


def heldout(etl_dir: Path, split: str) -> tuple[dict[int, tuple[list, list]], dict[int, int]]:
    """user -> (target item_idx, target watch ratios) of ``split``; item_id -> item_idx."""
    import pyarrow.parquet as pq

    etl = EtlLayout(etl_dir)
    t = pq.read_table(etl.item_index, columns=["item_id", "item_idx"])
    idx_of = dict(zip((int(i) for i in t.column("item_id").to_pylist()),
                      t.column("item_idx").to_pylist()))
    users = {}
    kind = f"slates/{split}"
    for s in iterate_samples(list_shards(etl.kind(kind)), FOLDERS[kind]):
        users[int(s["user_id"])] = (list(s["target_items"]), list(s["target_fb"]))
    return users, idx_of


def replay(users: np.ndarray, t0: int, steps: int,
           cfg: SyntheticConfig) -> tuple[UserState, np.ndarray]:
    """Replay the generator's own draws: (the users' true latent state before step ``t0``,
    the items the generator really showed at steps t0..t0+steps-1 [B, steps])."""
    seed = cfg.seed
    state = init_users(users, cfg)

    def draw(stream: int, t: int) -> np.ndarray:
        return uniform(seed, stream, users, t)

    def gauss(stream: int, t: int) -> np.ndarray:
        return normal(seed, stream, users, t)

    for t in range(t0):
        user_step(state, t, cfg, draw, gauss)
    # the real continuation, to check we are scoring the ETL's targets
    real = UserState(state.prefs.copy(), state.cum_w, state.last_sub.copy())
    shown_real = np.stack([user_step(real, t, cfg, draw, gauss)[0]
                           for t in range(t0, t0 + steps)], axis=1)  # [B, steps]
    return state, shown_real


def expected_effective(state: UserState, paths: int, t0: int, steps: int, cfg: SyntheticConfig,
                       threshold: float, rng: np.random.Generator) -> np.ndarray:
    """Expected effective showings of every item over steps t0..t0+steps-1 [B, I], averaged
    over ``paths`` continuations per user: ``state`` holds B*paths rows, user-major (the
    same true state repeated, or draws from a posterior)."""
    n = len(state.last_sub)
    state = UserState(state.prefs.copy(), state.cum_w, state.last_sub.copy())
    score = np.zeros((n, cfg.items))  # [B*R, I]

    def fresh(stream: int, t: int) -> np.ndarray:
        return rng.random(n)

    def fresh_gauss(stream: int, t: int) -> np.ndarray:
        return rng.standard_normal(n)

    for t in range(t0, t0 + steps):
        # user_step drifts the tastes, then draws the item from them and from the last
        # engaged sub-topic *before* this step: score with exactly that state (the drift is
        # the path's sample), then the path moves on with its sampled item
        last_before = state.last_sub.copy()
        user_step(state, t, cfg, fresh, fresh_gauss)
        drawn_from = UserState(state.prefs, state.cum_w, last_before)
        score += next_item_probs(drawn_from, cfg) * effective_probs(state.prefs, cfg, threshold)
    return score.reshape(n // paths, paths, cfg.items).mean(axis=1)


def _systematic(weights: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
    """Per-row systematic resampling: [B, R] normalised weights -> [B, draws] column indices."""
    B, R = weights.shape
    cum = np.cumsum(weights, axis=1)  # [B, R]
    cum[:, -1] = 1.0
    pos = (rng.random((B, 1)) + np.arange(draws)[None, :]) / draws  # [B, draws]
    offset = np.arange(B)[:, None] * 2.0  # rows apart in one flat searchsorted
    flat = np.searchsorted((cum + offset).ravel(), (pos + offset).ravel(), side="left")
    return np.minimum(flat.reshape(B, draws) - np.arange(B)[:, None] * R, R - 1)


def weight_grid(n: int, K: int) -> np.ndarray:
    """[G, K] preference-weight vectors on the simplex, every weight a multiple of 1/(n+K) and
    >= 1/(n+K): equally likely under the generator's Dirichlet(1) (uniform) weights."""
    pts = [c for c in itertools.product(range(1, n + K), repeat=K) if sum(c) == n + K]
    return np.array(pts, dtype=float) / (n + K)


def posterior_state(users: np.ndarray, t0: int, cfg: SyntheticConfig, particles: int,
                    paths: int, history: int, grid: int, guide: float,
                    rng: np.random.Generator) -> tuple[UserState, dict]:
    """Draws from P(state before step t0 | the user's logged items and watch ratios): a
    particle filter over the generator's own dynamics. Returns B*paths states (user-major)
    and diagnostics.

    The filter reads the log rows the ETL reads (``simulate_users``: item and rounded watch
    ratio) at steps ``t0 - history .. t0 - 1`` (``history`` 0 = all of them). A particle is a
    set of preferred sub-topics (they drift) and the "stay" sub-topic; the user's preference
    weights never change, so instead of sampling them each particle carries its log-likelihood
    at every point of a weight grid (:func:`weight_grid`: Rao-Blackwellised, no weight
    degeneracy). The first particles come from the prior of :func:`init_users`, half of them
    with sub-topics drawn from those of the user's engaged items instead (importance-weighted
    back to the prior), so the true tastes are among them. Each step drifts every particle
    with the generator's drift (the proposal), weights it by the exact observation
    likelihood, and resamples a user whose effective sample size falls under half.
    """
    B, R, S, K = len(users), particles, cfg.num_subtopics, cfg.prefs_per_user
    sub_of = sub_topics(cfg)
    M = cfg.interactions_per_user
    log = simulate_users(users, cfg)
    items = log["item_id"].reshape(B, M)
    wr = log["watch_ratio"].reshape(B, M)
    start = max(0, t0 - history) if history else 0
    Wg = weight_grid(grid, K)[None]  # [1, G, K]
    # data-informed proposal: engaged sub-topics of the window, smoothed [B, S]
    engaged = np.zeros((B, S))
    np.add.at(engaged, (np.repeat(np.arange(B), t0 - start), sub_of[items[:, start:t0]].ravel()),
              (wr[:, start:t0] >= 1.0).ravel().astype(float))
    e = (engaged + 0.5) / (engaged + 0.5).sum(axis=1, keepdims=True)
    prefs = sample_prior(B * R, cfg, rng).prefs  # [B*R, K] user-major
    user_of = np.repeat(np.arange(B), R)
    informed = rng.random(B * R) < 0.5
    cdf = np.cumsum(e, axis=1)  # [B, S]
    for k in range(K):
        pick = (cdf[user_of] < rng.random(B * R)[:, None]).sum(axis=1).clip(max=S - 1)
        prefs[informed, k] = pick[informed]
    last_sub = prefs[:, 0].copy()
    log_prior = prefs_log_prior(prefs, cfg)
    log_e = np.log(e[user_of[:, None], prefs]).sum(axis=1)
    base = log_prior - np.logaddexp(np.log(0.5) + log_prior, np.log(0.5) + log_e)  # [B*R]
    acc = np.zeros((B * R, Wg.shape[1]))  # [B*R, G] log-likelihood per weight vector

    def marginal() -> tuple[np.ndarray, np.ndarray]:
        """([B, R] normalised particle weights, [B*R] log-likelihood summed over the grid)."""
        top = acc.max(axis=1)
        grid_lse = top + np.log(np.exp(acc - top[:, None]).sum(axis=1))
        lw = (base + grid_lse).reshape(B, R)
        W = np.exp(lw - lw.max(axis=1, keepdims=True))
        return W / W.sum(axis=1, keepdims=True), grid_lse

    min_ess, resamples = float(R), 0
    for t in range(start, t0):
        x, y = items[user_of, t], wr[user_of, t]
        # proposal: the generator's drift, except that a particle whose tastes miss the
        # sub-topic of an item the user engaged with moves a random slot there with
        # probability `guide` (importance-weighted back to the generator's drift)
        cand = ~(prefs == sub_of[x][:, None]).any(axis=1) & (y >= 1.0)  # [N]
        guided = cand & (rng.random(B * R) < guide)
        old = prefs[cand]
        drift = ~guided & (rng.random(B * R) < cfg.drift_prob)
        if drift.any():
            drift_prefs(prefs, drift, *(rng.random(B * R) for _ in range(4)), cfg=cfg)
        rows = np.flatnonzero(guided)
        prefs[rows, rng.integers(0, K, len(rows))] = sub_of[x[rows]]
        new = prefs[cand]
        log_p = drift_log_prob(old, new, cfg)
        changed = new != old  # [n_cand, K]: at most one slot
        hits_s = (new == sub_of[x[cand]][:, None]) & changed
        g = np.where(changed.any(axis=1), hits_s.any(axis=1) / K, 0.0)
        base[cand] += log_p - np.log((1.0 - guide) * np.exp(log_p) + guide * g)
        acc += np.log(item_prob(prefs, last_sub, Wg, x, cfg))
        base += watch_log_density(prefs, x, y, cfg)
        last_sub = np.where(y >= 1.0, sub_of[x], last_sub)
        W, grid_lse = marginal()
        ess = 1.0 / (W * W).sum(axis=1)  # [B]
        min_ess = min(min_ess, float(ess.min()))
        low = ess < R / 2
        if low.any():
            resamples += int(low.sum())
            cols = np.where(low[:, None], _systematic(W, rng, R), np.arange(R)[None, :])
            idx = (np.arange(B)[:, None] * R + cols).ravel()
            prefs, last_sub, acc = prefs[idx], last_sub[idx], acc[idx]
            # a resampled particle's weight is 1/R: its likelihood now lives in acc only as
            # the shape over the grid (the weights' posterior), so remove its level
            base = np.where(np.repeat(low, R), -grid_lse[idx], base[idx])
    idx = (np.arange(B)[:, None] * R + _systematic(marginal()[0], rng, paths)).ravel()
    post = np.exp(acc[idx] - acc[idx].max(axis=1, keepdims=True))  # [B*paths, G]
    post /= post.sum(axis=1, keepdims=True)
    G = post.shape[1]
    g = (post.cumsum(axis=1) < rng.random(len(idx))[:, None]).sum(axis=1).clip(max=G - 1)
    cum_w = np.cumsum(Wg[0][g], axis=1)
    out = UserState(prefs[idx], cum_w, last_sub[idx])
    return out, {"min_ess": min_ess, "resampled_user_steps": resamples}


def _map_hits(start: UserState, truth: UserState, paths: int) -> int:
    """Users whose most frequent taste set among their posterior draws is the true one."""
    hits = 0
    for b in range(len(truth.last_sub)):
        sets = np.sort(start.prefs[b * paths:(b + 1) * paths], axis=1)
        uniq, counts = np.unique(sets, axis=0, return_counts=True)
        hits += bool((uniq[counts.argmax()] == np.sort(truth.prefs[b])).all())
    return hits


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    """[B, I] -> [B, k] item indices, highest first (ties: lower index)."""
    order = np.argsort(-score, axis=1, kind="stable")
    return order[:, :k]


def bootstrap(values: np.ndarray, reps: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(reps)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    layout = RunLayout(run_dir)
    cfg = synthetic_config(run_dir)
    etl = json.loads(layout.etl.manifest.read_text())
    n = etl["config"]["slate_size"]
    if etl["rows_quarantined"]:
        raise SystemExit("the oracle assumes no quarantined rows (positions = time steps)")
    targets, idx_of = heldout(layout.etl.root, args.split)
    t0 = cfg.interactions_per_user - n * (1 if args.split == "test" else 2)
    item_of_idx = np.empty(cfg.items, dtype=np.int64)
    for item_id, i in idx_of.items():
        item_of_idx[i] = item_id
    metrics = SlateMetrics(effective_threshold=args.threshold)
    per_user = []
    rng = np.random.default_rng(args.seed)
    users = np.array(sorted(targets), dtype=np.int64)
    if args.max_users:
        users = users[:args.max_users]
    min_ess, resampled, found = float(args.particles), 0, 0
    t_start = time.perf_counter()
    for lo in range(0, len(users), args.chunk):
        chunk = users[lo:lo + args.chunk]
        truth, shown = replay(chunk, t0, n, cfg)
        if args.ranker == "state":
            start = UserState(np.repeat(truth.prefs, args.paths, axis=0),
                              np.repeat(truth.cum_w, args.paths, axis=0),
                              np.repeat(truth.last_sub, args.paths))
        else:
            start, diag = posterior_state(chunk, t0, cfg, args.particles, args.paths,
                                          args.history, args.grid, args.guide, rng)
            min_ess = min(min_ess, diag["min_ess"])
            resampled += diag["resampled_user_steps"]
            # how often the posterior's most likely taste set is the true one
            found += _map_hits(start, truth, args.paths)
        score = expected_effective(start, args.paths, t0, n, cfg, args.threshold, rng)
        pred = top_k(score, n)  # [B, n] item_id (the synthetic ids are 0..items-1)
        for b, u in enumerate(chunk.tolist()):
            tgt_idx, tgt_fb = targets[u]
            if [int(item_of_idx[i]) for i in tgt_idx] != shown[b].tolist():
                raise RuntimeError(f"user {u}: replayed items {shown[b].tolist()} differ from "
                                   "the ETL's held-out items: the run's synthetic config?")
            pred_idx = np.array([[idx_of[int(i)] for i in pred[b]]])
            one = SlateMetrics(effective_threshold=args.threshold)
            one.update(pred_idx, np.array([tgt_idx]), np.array([tgt_fb]))
            metrics.merge(one)
            if one.counts["eff_users"]:
                per_user.append(one.sums["eff_ndcg"])
    res = metrics.result()
    ndcg = np.array(per_user)
    out = {
        "bench": "oracle",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
        "command": "python bench/oracle.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "run_dir": str(run_dir), "split": args.split, "ranker": args.ranker,
        "paths": args.paths,
        "users": res["users"], "effective_users": res["effective_users"],
        "oracle": {"ndcg5": res["effective"]["ndcg5"], "ndcg5_ci95": bootstrap(ndcg),
                   "eff_recall5": res["effective"]["recall5"],
                   "imp_recall5": res["impressions"]["recall5"]},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.ranker == "history":
        out["filter"] = {"particles": args.particles, "history": args.history or t0,
                         "guide": args.guide,
                         "grid_points": len(weight_grid(args.grid, cfg.prefs_per_user)),
                         "min_ess": round(min_ess, 1), "resampled_user_steps": resampled,
                         "map_tastes_true_share": found / len(users)}
    compare = Path(args.compare) if args.compare else layout.report_json
    if args.split == "test" and compare.exists():
        models = {k: v["effective"]["ndcg5"]
                  for k, v in json.loads(compare.read_text())["eval"].items()}
        out["models_ndcg5"] = models
        out["models_over_oracle"] = {k: v / out["oracle"]["ndcg5"] for k, v in models.items()}
        best = max(models.get("flat", 0.0), models.get("sasrec", 0.0))
        out["best_baseline_x1.10"] = 1.10 * best
        out["x1.10_over_oracle"] = 1.10 * best / out["oracle"]["ndcg5"]
    print(json.dumps(out, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
