"""Oracle ceiling of the synthetic data: the NDCG@5 of a ranker that knows each user's latent state.

    python bench/oracle.py --run-dir runs/demo --out bench/results/oracle.json
    python bench/oracle.py --run-dir runs/demo --split val --paths 100   # quicker, validation

Why: issue #5 asks the aligned HiGR for >= 1.10x the NDCG@5 of the best baseline. On synthetic
data we can ask how much NDCG@5 there *is* to win: the generator (``higr_dist.etl.synthetic``)
is a known Markov process, so the best any model reading the history can do is bounded by a
ranker that sees the hidden state itself (every user's preferred sub-topics and weights at the
start of the held-out window, the sub-topic of the last engaged item, each item's quality).

What the oracle does, per evaluated user:

1. replays the generator's own counter-based draws (``init_users`` + ``user_step``) up to the
   first held-out interaction, giving the exact latent state there (and checks that it
   reproduces the ETL's held-out items: same users, same targets as the models' evaluation);
2. from that state, runs ``--paths`` Monte-Carlo continuations of the N held-out steps with
   fresh draws (tastes may drift, the "stay" sub-topic follows engaged items);
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
only the history (at most ``history_len`` items) and must infer the state: their NDCG@5 should
sit below this line. The comparison of interest is (best baseline x 1.10) against the oracle.
"""

from __future__ import annotations

import argparse
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
    effective_probs,
    init_users,
    next_item_probs,
    normal,
    uniform,
    user_step,
)
from higr_dist.eval.metrics import SlateMetrics  # noqa: E402
from higr_dist.schema import SLATE  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/demo", help="finished `higr run` folder "
                   "(synthetic source; its etl/ gives the evaluated users and targets)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--paths", type=int, default=200, help="Monte-Carlo continuations per user")
    p.add_argument("--chunk", type=int, default=25, help="users per vectorised chunk")
    p.add_argument("--threshold", type=float, default=2.0, help="effective watch ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws")
    p.add_argument("--compare", default="bench/results/alignment.json",
                   help="alignment bench JSON whose model NDCG@5 are put next to the oracle")
    p.add_argument("--out", default="bench/results/oracle.json")
    return p.parse_args(argv)


def synthetic_config(run_dir: Path) -> SyntheticConfig:
    resolved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    source = resolved["source"]
    if source.get("interactions"):
        raise SystemExit(f"{run_dir} was trained on a user log, not the synthetic source")
    overrides = [f"{k}={v}" for k, v in (source.get("synthetic") or {}).items()]
    return load(SyntheticConfig, None, overrides)


def heldout(etl_dir: Path, split: str) -> tuple[dict[int, tuple[list, list]], dict[int, int]]:
    """user -> (target item_idx, target watch ratios) of ``split``; item_id -> item_idx."""
    import pyarrow.parquet as pq

    t = pq.read_table(etl_dir / "item_index", columns=["item_id", "item_idx"])
    idx_of = dict(zip((int(i) for i in t.column("item_id").to_pylist()),
                      t.column("item_idx").to_pylist()))
    users = {}
    for s in iterate_samples(list_shards(etl_dir / "slates" / split), SLATE):
        users[int(s["user_id"])] = (list(s["target_items"]), list(s["target_fb"]))
    return users, idx_of


def oracle_scores(users: np.ndarray, t0: int, steps: int, cfg: SyntheticConfig,
                  threshold: float, paths: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """users [B] -> (expected effective showings [B, I] over steps t0..t0+steps-1,
    the items the generator really showed there [B, steps])."""
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
    B = len(users)
    state.prefs = np.repeat(state.prefs, paths, axis=0)  # [B*R, K]
    state.cum_w = np.repeat(state.cum_w, paths, axis=0)
    state.last_sub = np.repeat(state.last_sub, paths)
    score = np.zeros((B * paths, cfg.items))  # [B*R, I]

    def fresh(stream: int, t: int) -> np.ndarray:
        return rng.random(B * paths)

    def fresh_gauss(stream: int, t: int) -> np.ndarray:
        return rng.standard_normal(B * paths)

    for t in range(t0, t0 + steps):
        # user_step drifts the tastes, then draws the item from them and from the last
        # engaged sub-topic *before* this step: score with exactly that state (the drift is
        # the path's sample), then the path moves on with its sampled item
        last_before = state.last_sub.copy()
        user_step(state, t, cfg, fresh, fresh_gauss)
        drawn_from = UserState(state.prefs, state.cum_w, last_before)
        score += next_item_probs(drawn_from, cfg) * effective_probs(state.prefs, cfg, threshold)
    return score.reshape(B, paths, cfg.items).mean(axis=1), shown_real


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
    cfg = synthetic_config(run_dir)
    etl = json.loads((run_dir / "etl" / "manifest.json").read_text())
    n = etl["config"]["slate_size"]
    if etl["rows_quarantined"]:
        raise SystemExit("the oracle assumes no quarantined rows (positions = time steps)")
    targets, idx_of = heldout(run_dir / "etl", args.split)
    t0 = cfg.interactions_per_user - n * (1 if args.split == "test" else 2)
    item_of_idx = np.empty(cfg.items, dtype=np.int64)
    for item_id, i in idx_of.items():
        item_of_idx[i] = item_id
    metrics = SlateMetrics(effective_threshold=args.threshold)
    per_user = []
    rng = np.random.default_rng(args.seed)
    users = np.array(sorted(targets), dtype=np.int64)
    t_start = time.perf_counter()
    for lo in range(0, len(users), args.chunk):
        chunk = users[lo:lo + args.chunk]
        score, shown = oracle_scores(chunk, t0, n, cfg, args.threshold, args.paths, rng)
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
        "run_dir": str(run_dir), "split": args.split, "paths": args.paths,
        "users": res["users"], "effective_users": res["effective_users"],
        "oracle": {"ndcg5": res["effective"]["ndcg5"], "ndcg5_ci95": bootstrap(ndcg),
                   "eff_recall5": res["effective"]["recall5"],
                   "imp_recall5": res["impressions"]["recall5"]},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    compare = Path(args.compare)
    if args.split == "test" and compare.exists():
        models = {k: v["effective"]["ndcg5"]
                  for k, v in json.loads(compare.read_text())["metrics"].items()}
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
