"""Offline slate metrics under the leave-five-out protocol (METHOD.md, "Evaluation protocol").

For each test user we hold out the last 5 interactions (the target slate) and compare the
model's generated slate of 5 items against them, ranking over the full catalogue (never sampled
negatives):

- impressions hit@5 / recall@5: against all held-out items;
- effective hit@5 / recall@5 / NDCG@5: against the held-out items whose watch ratio is at least
  ``effective_threshold`` (default 2.0, KuaiRec's own "like" rule); users with no effective
  held-out item are left out of these three (their count is reported);
- ILD: mean pairwise (1 - cosine) between the generated items' feature vectors.

Design: :class:`SlateMetrics` accumulates *sums and counts*, never per-batch means, so results are
exact whatever the batch sizes, and two accumulators (e.g. from two ranks) merge by adding
(METHOD.md pitfall: averaging per-rank means is wrong when ranks hold different user counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

K_AT = 5


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(k) + 2.0)  # [k]: 1/log2(rank+1), rank from 1


def slate_ild(pred_items: np.ndarray, item_emb: np.ndarray) -> np.ndarray:
    """Per-slate intra-list diversity: mean over pairs i<j of 1 - cos(e_i, e_j).

    pred_items: [B, N] int item_idx (-1 = empty slot, ignored); item_emb: [num_items, D].
    Returns [B] float64 (NaN for slates with fewer than two items).
    """
    pred_items = np.asarray(pred_items)
    out = np.full(pred_items.shape[0], np.nan)
    for b, row in enumerate(pred_items):
        row = row[row >= 0]
        if len(row) < 2:
            continue
        e = np.asarray(item_emb[row], dtype=np.float64)  # [n, D]
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T  # [n, n]
        iu = np.triu_indices(len(row), k=1)
        out[b] = float(np.mean(1.0 - sim[iu]))
    return out


@dataclass
class SlateMetrics:
    """Exact, mergeable accumulator of the leave-five-out slate metrics."""

    effective_threshold: float = 2.0
    k: int = K_AT
    sums: dict[str, float] = field(default_factory=lambda: {
        "imp_hit": 0.0, "imp_recall": 0.0, "eff_hit": 0.0, "eff_recall": 0.0, "eff_ndcg": 0.0,
        "ild": 0.0, "eff_ndcg_sq": 0.0, "ild_sq": 0.0})
    counts: dict[str, int] = field(default_factory=lambda: {"users": 0, "eff_users": 0, "ild_users": 0})
    per_user: list[float] | None = None
    """When a list: each effective user's NDCG@5 is appended, in update order (for paired
    comparisons of models scored on the same users, :func:`paired_bootstrap`)."""

    def update(self, pred_items: np.ndarray, target_items: np.ndarray, target_fb: np.ndarray,
               item_emb: np.ndarray | None = None) -> None:
        """pred_items [B, k] (ranked; -1 = empty), target_items [B, T], target_fb [B, T]."""
        pred_items = np.asarray(pred_items)[:, : self.k]
        target_items = np.asarray(target_items)
        target_fb = np.asarray(target_fb, dtype=np.float64)
        disc = _discounts(self.k)
        for b in range(pred_items.shape[0]):
            pred = [int(i) for i in pred_items[b] if i >= 0]
            targets = {int(i) for i in target_items[b] if i >= 0}
            if not targets:
                raise ValueError("a test user with no held-out items")
            n_hit = len(set(pred) & targets)
            self.counts["users"] += 1
            self.sums["imp_hit"] += float(n_hit > 0)
            self.sums["imp_recall"] += n_hit / len(targets)
            eff = {int(i) for i, f in zip(target_items[b], target_fb[b])
                   if i >= 0 and f >= self.effective_threshold}
            if eff:
                eff_hits = [p in eff for p in pred]
                n_eff = len(set(pred) & eff)
                dcg = float(sum(d for d, h in zip(disc, eff_hits) if h))
                idcg = float(disc[: min(len(eff), self.k)].sum())
                self.counts["eff_users"] += 1
                self.sums["eff_hit"] += float(n_eff > 0)
                self.sums["eff_recall"] += n_eff / len(eff)
                self.sums["eff_ndcg"] += dcg / idcg
                self.sums["eff_ndcg_sq"] += (dcg / idcg) ** 2
                if self.per_user is not None:
                    self.per_user.append(dcg / idcg)
        if item_emb is not None:
            ild = slate_ild(pred_items, item_emb)
            ok = ~np.isnan(ild)
            self.sums["ild"] += float(ild[ok].sum())
            self.sums["ild_sq"] += float((ild[ok] ** 2).sum())
            self.counts["ild_users"] += int(ok.sum())

    def merge(self, other: SlateMetrics) -> SlateMetrics:
        for k, v in other.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        for k, v in other.counts.items():
            self.counts[k] += v
        return self

    def state(self) -> dict:
        """Sums and counts, for gathering across ranks."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def ci95(self, s: str, c: str) -> list[float]:
        """95% interval of a per-user mean (normal approximation from the sum and the sum of
        squares: mean +- 1.96 standard errors); NaNs with fewer than two users."""
        n = self.counts[c]
        if n < 2:
            return [math.nan, math.nan]
        mean = self.sums[s] / n
        var = max(self.sums.get(f"{s}_sq", 0.0) - n * mean * mean, 0.0) / (n - 1)
        half = 1.96 * math.sqrt(var / n)
        return [mean - half, mean + half]

    def result(self) -> dict:
        """The report's nested dict: impressions.{hit5,recall5}, effective.{hit5,recall5,ndcg5},
        ild, and ``ci95.{ndcg5,ild}`` (95% intervals of those two means over users)."""
        def ratio(s: str, c: str) -> float:
            return self.sums[s] / self.counts[c] if self.counts[c] else math.nan

        return {
            "impressions": {"hit5": ratio("imp_hit", "users"), "recall5": ratio("imp_recall", "users")},
            "effective": {"hit5": ratio("eff_hit", "eff_users"),
                          "recall5": ratio("eff_recall", "eff_users"),
                          "ndcg5": ratio("eff_ndcg", "eff_users")},
            "ild": ratio("ild", "ild_users"),
            "ci95": {"ndcg5": self.ci95("eff_ndcg", "eff_users"),
                     "ild": self.ci95("ild", "ild_users")},
            "users": self.counts["users"],
            "effective_users": self.counts["eff_users"],
        }


def paired_bootstrap(a: list[float] | np.ndarray, b: list[float] | np.ndarray, reps: int = 2000,
                     seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired users with a 95% percentile-bootstrap interval (users
    resampled with replacement, the same users for both; NaN pairs dropped):
    ``{"diff", "ci95": [lo, hi], "users"}``."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values differ in shape: {x.shape} vs {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    d = x[ok] - y[ok]
    if len(d) == 0:
        return {"diff": math.nan, "ci95": [math.nan, math.nan], "users": 0}
    rng = np.random.default_rng(seed)
    means = np.empty(reps)
    for r in range(0, reps, 256):  # bounded memory: [256, n] indices at a time
        idx = rng.integers(0, len(d), (min(256, reps - r), len(d)))
        means[r: r + idx.shape[0]] = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "users": int(len(d))}
