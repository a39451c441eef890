"""SID quality metrics (METHOD.md, paper Table 2), on numpy SID tables.

Definitions (codes ``[N, L]`` int, one primary category per item):

- **collision**: share of items whose full SID is shared with at least one other item.
- **concentration@p**: group items by their length-p SID prefix; the share of a group's
  majority category, averaged over *items* (= sum over groups of the majority count / N).
  Singleton groups count as pure.
- **consistency@p**: within each prefix group of >= 2 items, the fraction of unordered item pairs
  that share a category; averaged over those groups with equal weight (a group is one
  "semantic cluster" the decoder can select). ``None`` when no group has two items.
- **usage / perplexity per layer**: share of the K codes used, and exp(entropy) of the code
  distribution (K = perfectly uniform, 1 = collapse).

Prefix length: reported for every p in 1..L-1. The headline (``concentration`` and
``consistency`` keys of :func:`sid_report`) is p = 1 by default: with K = 256 and 1e4-1e5 items,
longer prefixes leave mostly singleton groups, so p = 1 is the only level with groups big enough
to measure, and it is the coarsest level the decoder plans with. Callers may pick another.
"""

from __future__ import annotations

import math

import numpy as np


def pack_codes(codes: np.ndarray, K: int) -> np.ndarray:
    """codes [N, p] (values < K) -> int64 keys [N] (row-major base-K number; p = 0 gives 0)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [N, p], got shape {codes.shape}")
    if codes.shape[1] and math.log2(K) * codes.shape[1] > 63:
        raise ValueError(f"K^p = {K}^{codes.shape[1]} overflows an int64 key")
    if codes.size and (codes.min() < 0 or codes.max() >= K):
        raise ValueError(f"codes outside [0, {K})")
    keys = np.zeros(codes.shape[0], dtype=np.int64)
    for col in range(codes.shape[1]):
        keys = keys * K + codes[:, col]
    return keys


def prefix_groups(codes: np.ndarray, p: int) -> np.ndarray:
    """Dense group id [N] of each item's length-p prefix (groups numbered in key order)."""
    codes = np.asarray(codes)
    if not 0 <= p <= codes.shape[1]:
        raise ValueError(f"prefix length {p} outside 0..{codes.shape[1]}")
    prefix = np.ascontiguousarray(codes[:, :p]).astype(np.int64)
    if p == 0:
        return np.zeros(codes.shape[0], dtype=np.int64)
    _, inv = np.unique(prefix, axis=0, return_inverse=True)
    return inv.reshape(-1).astype(np.int64)


def collision_rate(codes: np.ndarray) -> float:
    """Share of items whose full SID is shared with another item."""
    return float(colliding_mask(codes).mean()) if len(codes) else 0.0


def colliding_mask(codes: np.ndarray) -> np.ndarray:
    """[N] bool: True for items whose full SID some other item also has."""
    codes = np.asarray(codes)
    if len(codes) == 0:
        return np.zeros(0, dtype=bool)
    _, inv, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inv.reshape(-1)] > 1


def _group_category_counts(codes: np.ndarray, categories: np.ndarray,
                           p: int) -> tuple[np.ndarray, np.ndarray]:
    """(group id, count) per non-empty (group, category) cell."""
    categories = np.asarray(categories).reshape(-1)
    if categories.shape[0] != len(codes):
        raise ValueError(f"{categories.shape[0]} categories for {len(codes)} items")
    g = prefix_groups(codes, p)
    _, cat = np.unique(categories, return_inverse=True)
    cells, counts = np.unique(np.stack([g, cat.reshape(-1)], axis=1), axis=0, return_counts=True)
    return cells[:, 0], counts


def concentration(codes: np.ndarray, categories: np.ndarray, p: int) -> float:
    """Majority-category share of each length-p prefix group, averaged over items."""
    if len(codes) == 0:
        return 0.0
    group, counts = _group_category_counts(codes, categories, p)
    majority = np.zeros(group.max() + 1, dtype=np.int64)
    np.maximum.at(majority, group, counts)
    return float(majority.sum() / len(codes))


def consistency(codes: np.ndarray, categories: np.ndarray, p: int) -> float | None:
    """Same-category share of item pairs within each length-p prefix group (>= 2 items),
    averaged over those groups; None when every group is a singleton."""
    if len(codes) == 0:
        return None
    group, counts = _group_category_counts(codes, categories, p)
    n_groups = group.max() + 1
    size = np.bincount(group, weights=counts, minlength=n_groups)  # [G]
    same = np.bincount(group, weights=counts * (counts - 1) / 2.0, minlength=n_groups)  # [G]
    multi = size >= 2
    if not multi.any():
        return None
    pairs = size[multi] * (size[multi] - 1) / 2.0
    return float((same[multi] / pairs).mean())


def layer_usage(codes: np.ndarray, K: int) -> list[dict]:
    """Per layer: ``used`` codes, ``usage`` = used / K, ``perplexity`` = exp(entropy)."""
    codes = np.asarray(codes)
    out = []
    for col in range(codes.shape[1]):
        counts = np.bincount(codes[:, col], minlength=K).astype(np.float64)
        prob = counts / max(counts.sum(), 1.0)
        nz = prob[prob > 0]
        out.append({"used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
                    "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))})
    return out


def sid_report(codes: np.ndarray, categories: np.ndarray, K: int,
               headline_prefix: int = 1) -> dict:
    """All SID metrics of one table as JSON-able data (see the module docstring).

    ``codes`` should be the table *before* collision resolution for ``collision`` to mean
    anything; prefix metrics for p <= L-1 are unchanged by resolution (it only moves last codes).
    """
    codes = np.asarray(codes)
    L = codes.shape[1]
    prefixes = list(range(1, L)) or [L]
    if headline_prefix not in prefixes:
        raise ValueError(f"headline_prefix {headline_prefix} not in {prefixes}")
    conc = {str(p): concentration(codes, categories, p) for p in prefixes}
    cons = {str(p): consistency(codes, categories, p) for p in prefixes}
    mask = colliding_mask(codes)
    usage = layer_usage(codes, K)
    return {
        "num_items": int(len(codes)),
        "K": int(K),
        "L": int(L),
        "collision": float(mask.mean()) if len(codes) else 0.0,
        "colliding_items": int(mask.sum()),
        "unique_sids": int(len(np.unique(codes, axis=0))) if len(codes) else 0,
        "headline_prefix": int(headline_prefix),
        "concentration": conc[str(headline_prefix)],
        "consistency": cons[str(headline_prefix)],
        "concentration_by_prefix": conc,
        "consistency_by_prefix": cons,
        "usage": [u["usage"] for u in usage],
        "used_codes": [u["used"] for u in usage],
        "perplexity": [u["perplexity"] for u in usage],
    }
