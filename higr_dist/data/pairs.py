"""Slate preference pairs for listwise alignment (ORPO/DPO), built in the streaming path.

Design
------
A PREF sample (``higr_dist.schema.prefs``) stores only what the logs say: the user's history,
the engaged items of one window ordered by feedback (the chosen slate y+) and the window's
negative-feedback items. The rejected slates y- are derived here, per sample, inside the
loader's collate (METHOD.md, Stage 3):

- **O1 ranking fidelity**: a random permutation of y+ that differs from y+;
- **O2 genuine interest**: y+ with ``ceil(fraction * N)`` positions replaced by the user's
  negative-feedback items (masked out when the sample has none);
- **O3 diversity**: y+[0] followed by its N-1 most similar catalogue items. Similarity
  ``sid_prefix`` (default): longest shared SID prefix first, ties broken by cosine similarity
  of an item embedding (``o3_embedding``, the tokenizer's ``item_emb.npy`` by default) or by
  ascending item_idx. Similarity ``embedding``: the N-1 nearest items by cosine of that
  embedding (e.g. ``item_features.npy``, the ETL's features, the space ILD is measured in).

Deriving negatives at load time (instead of in the ETL) keeps the shards small, lets the SID
table change without re-running the ETL, and makes the objectives a config switch. Randomness
(O1, O2) is drawn from a per-sample generator seeded by a stable hash of (user_id, ts) with the
configured seed and an epoch: batches are reproducible, resume-safe (the draw depends on the
sample only, never on worker or position) and independent of ``PYTHONHASHSEED``.

Why two O3 similarities: O3 rewards diversity only if its negatives are *more repetitive* than
y+. With a coarse tokenizer (tiny demo: K=32, 1000 items) SID-prefix neighbours can be less
alike in feature space than a user's own engaged slate (it happened on the demo:
docs/BENCHMARKS.md, "Figures behind design choices"), and O3 then teaches the opposite of
diversity; nearest neighbours in feature space are repetitive by construction. Compare the
two on validation with
``bench/sweep.py --stage orpo --variant ...=loss.pairs.o3_similarity=...`` before choosing.

The O3 neighbour table is catalogue-sized (``int64 [num_items, N-1]``) and built lazily, once
per loader worker, from the memory-mapped SID table (or the embedding file). Items are sorted lexicographically by SID;
in that order the shared-prefix length with an anchor never increases moving away from it, so
the anchor's top-(N-1) items by shared prefix always lie within N-1 sorted positions of it.
We score a window of ``o3_window`` positions on each side by (shared prefix, similarity) and
keep the best N-1: exact for the prefix criterion, and the similarity tie-break is exact among
the window (a prefix group larger than the window is tie-broken among its nearest members in
SID order). Cost: O(num_items * window * (L + d)), vectorised, chunked to bounded memory.
The ``embedding`` similarity is an exact brute-force cosine top-k: O(num_items^2 * d), chunked
(quadratic in the catalogue: fine at 10^4 items; use ``sid_prefix`` for catalogues of
millions).

A rejected slate that cannot be built (O2 without negatives, O3 on a catalogue of < N items,
O1 on a constant slate, or a negative that happens to equal y+) is filled with y+ (a valid
input for the model) and flagged False in ``rejected_mask``: the losses ignore it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from higr_dist.data.sids import load_sid_table, map_items

Objective = Literal["o1", "o2", "o3"]
OBJECTIVES: tuple[str, ...] = ("o1", "o2", "o3")


@dataclass
class PairConfig:
    """How rejected slates are derived from a PREF sample (the ``loss.pairs:`` config section)."""

    objectives: list[Objective] = field(default_factory=lambda: ["o1", "o2", "o3"])
    """Enabled negatives, in this order along the batch's R axis: o1 permutation, o2 negative
    feedback replacement, o3 similar items (paper Table 6: all three together is best)."""
    chosen_order: Literal["feedback", "time"] = "feedback"
    """Order of the chosen slate y+: by feedback, descending (the paper's), or as the user
    consumed the items (the order pretraining's target slates have)."""
    o2_replace_fraction: float = 0.5
    """Share of y+ positions O2 replaces with negative-feedback items: ceil(fraction * N),
    at least 1, at most the number of distinct usable negatives (paper value lost; 0.5 here)."""
    o3_similarity: Literal["sid_prefix", "embedding"] = "sid_prefix"
    """How O3 finds an anchor's most similar items: longest shared SID prefix (ties by
    ``o3_tie_break``), or nearest by cosine of the ``o3_embedding`` vectors."""
    o3_embedding: str = "item_emb.npy"
    """Embedding file in ``sid_dir`` for O3 (tie-breaks or the similarity itself):
    ``item_emb.npy`` (tokenizer's quantised z_q) or ``item_features.npy`` (the ETL's features)."""
    o3_tie_break: Literal["embedding", "item_idx"] = "embedding"
    """With ``o3_similarity: sid_prefix``, order among items with the same shared-prefix
    length: cosine similarity of ``<sid_dir>/<o3_embedding>`` (must exist) or item_idx."""
    o3_window: int = 64
    """Sorted-SID positions scored on each side of an anchor when building the O3 neighbour
    table (raised to N-1 if smaller). Larger = exact similarity tie-break in bigger groups."""
    seed: int = 0
    """Seed mixed into every per-sample generator (O1 permutation, O2 positions/items)."""

    def validate(self) -> list[str]:
        problems = []
        if not self.objectives:
            problems.append("pairs.objectives: enable at least one of o1, o2, o3")
        if len(set(self.objectives)) != len(self.objectives):
            problems.append(f"pairs.objectives: duplicates in {self.objectives}")
        if not 0.0 < self.o2_replace_fraction <= 1.0:
            problems.append(f"pairs.o2_replace_fraction must be in (0, 1], got {self.o2_replace_fraction}")
        if self.o3_similarity not in ("sid_prefix", "embedding"):
            problems.append(f"pairs.o3_similarity must be sid_prefix or embedding, "
                            f"got {self.o3_similarity!r}")
        if not self.o3_embedding.endswith(".npy") or "/" in self.o3_embedding:
            problems.append(f"pairs.o3_embedding must be a .npy file name in sid_dir, "
                            f"got {self.o3_embedding!r}")
        if self.o3_window < 1:
            problems.append(f"pairs.o3_window must be >= 1, got {self.o3_window}")
        return problems


# ---------------------------------------------------------------------------------------------
# per-sample negatives (numpy, item_idx space)
# ---------------------------------------------------------------------------------------------


def sample_rng(user_id: str, ts: int, seed: int, epoch: int = 0) -> np.random.Generator:
    """Deterministic generator for one sample: stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{user_id}\x1f{int(ts)}".encode(), digest_size=8).digest()
    return np.random.default_rng([int(seed), int(epoch), int.from_bytes(digest, "little")])


def o1_permutation(pos: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A random reordering of y+ ``[N]`` that differs from y+; None when impossible (N < 2 or
    all items equal)."""
    if len(pos) < 2:
        return None
    out = pos[rng.permutation(len(pos))]
    if np.array_equal(out, pos):
        out = np.roll(pos, 1)  # differs from pos unless pos is constant
    return None if np.array_equal(out, pos) else out


def o2_replace(pos: np.ndarray, neg: np.ndarray, rng: np.random.Generator,
               fraction: float) -> np.ndarray | None:
    """y+ ``[N]`` with ceil(fraction*N) random positions replaced by distinct negative-feedback
    items (items already in y+ are not usable); None when there is no usable negative."""
    usable = np.unique(neg[~np.isin(neg, pos)]) if len(neg) else neg
    if len(usable) == 0 or len(pos) == 0:
        return None
    k = min(max(1, math.ceil(fraction * len(pos))), len(usable), len(pos))
    where = np.sort(rng.choice(len(pos), size=k, replace=False))
    out = pos.copy()
    out[where] = rng.choice(usable, size=k, replace=False)
    return out


def o3_similar(pos: np.ndarray, neighbours: np.ndarray) -> np.ndarray | None:
    """[y+[0], its N-1 nearest items] from the neighbour table ``[num_items, >= N-1]``; None when
    the table has no full row for y+[0] or the result equals y+."""
    if len(pos) == 0:
        return None
    nbr = neighbours[pos[0], : len(pos) - 1]
    if len(nbr) < len(pos) - 1 or (nbr < 0).any():
        return None
    out = np.concatenate([pos[:1], nbr]).astype(np.int64)
    return None if np.array_equal(out, pos) else out


def make_negatives(pos: np.ndarray, neg: np.ndarray, rng: np.random.Generator, cfg: PairConfig,
                   neighbours: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Rejected slates of one sample: (items ``[R, N]`` int64, mask ``[R]`` bool), R =
    len(cfg.objectives). Rows that cannot be built hold y+ and mask False.

    The generator is consumed in a fixed order (O1 then O2) only for enabled objectives.
    """
    pos = np.asarray(pos, dtype=np.int64)
    neg = np.asarray(neg, dtype=np.int64)
    rows, mask = [], []
    for obj in cfg.objectives:
        if obj == "o1":
            y = o1_permutation(pos, rng)
        elif obj == "o2":
            y = o2_replace(pos, neg, rng, cfg.o2_replace_fraction)
        elif obj == "o3":
            if neighbours is None:
                raise ValueError("objective o3 needs the neighbour table")
            y = o3_similar(pos, neighbours)
        else:
            raise ValueError(f"unknown objective {obj!r}; known: {', '.join(OBJECTIVES)}")
        rows.append(pos if y is None else y)
        mask.append(y is not None)
    return np.stack(rows).astype(np.int64), np.asarray(mask, dtype=bool)


# ---------------------------------------------------------------------------------------------
# O3 neighbour table (catalogue-sized)
# ---------------------------------------------------------------------------------------------


def shared_prefix_len(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Length of the common leading run of codes: a, b ``[..., L]`` -> ``[...]`` int64."""
    return np.cumprod(a == b, axis=-1).sum(axis=-1)


def build_neighbour_table(sid_table: np.ndarray, k: int, item_emb: np.ndarray | None = None,
                          window: int = 64, chunk_floats: int = 1 << 22) -> np.ndarray:
    """For every item its ``k`` most similar other items: ``int64 [num_items, k]``, -1 where the
    catalogue has fewer than k other items.

    Order: longest shared SID prefix first; ties by cosine similarity of ``item_emb``
    ``[num_items, d]`` when given, else by ascending item_idx. See the module docstring for the
    sorted-window search (exact in the prefix criterion).
    """
    table = np.asarray(sid_table, dtype=np.int64)  # [I, L]
    num_items, L = table.shape
    out = np.full((num_items, k), -1, dtype=np.int64)
    if k == 0 or num_items < 2:
        return out
    if item_emb is not None and item_emb.shape[0] != num_items:
        raise ValueError(f"item_emb has {item_emb.shape[0]} rows, SID table {num_items}")
    w = max(window, k)
    order = np.lexsort(table.T[::-1])  # [I] item_idx in lexicographic SID order
    codes = table[order]  # [I, L]
    unit = None
    if item_emb is not None:
        emb = np.asarray(item_emb, dtype=np.float32)[order]  # [I, d]
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    offsets = np.concatenate([np.arange(-w, 0), np.arange(1, w + 1)])  # [2w]
    per_row = 2 * w * max(L, unit.shape[1] if unit is not None else 1)
    step = max(1, chunk_floats // per_row)
    for start in range(0, num_items, step):
        p = np.arange(start, min(start + step, num_items))  # [C] sorted positions
        cand = p[:, None] + offsets[None, :]  # [C, 2w]
        valid = (cand >= 0) & (cand < num_items)
        cand_c = np.clip(cand, 0, num_items - 1)
        lcp = shared_prefix_len(codes[cand_c], codes[p][:, None, :])  # [C, 2w]
        if unit is not None:
            tie = np.einsum("cwd,cd->cw", unit[cand_c], unit[p])  # [C, 2w] in [-1, 1]
        else:
            tie = -order[cand_c] / num_items  # [C, 2w] in (-1, 0]: smaller item_idx first
        score = np.where(valid, lcp * 4.0 + tie, -np.inf)  # prefix dominates (|tie| <= 1)
        top = np.argsort(-score, axis=1, kind="stable")[:, :k]  # [C, k]
        picked = np.take_along_axis(cand_c, top, axis=1)  # [C, k] sorted positions
        ok = np.take_along_axis(valid, top, axis=1)
        out[order[p]] = np.where(ok, order[picked], -1)
    return out


def build_embedding_neighbours(item_emb: np.ndarray, k: int, chunk_floats: int = 1 << 22
                               ) -> np.ndarray:
    """For every item its ``k`` nearest other items by cosine of ``item_emb`` ``[I, d]``:
    ``int64 [I, k]`` (most similar first, ties by ascending item_idx), -1 where the catalogue
    has fewer than k other items. Exact brute force, chunked to ~``chunk_floats`` floats."""
    emb = np.asarray(item_emb, dtype=np.float32)  # [I, d]
    num_items = emb.shape[0]
    out = np.full((num_items, k), -1, dtype=np.int64)
    if k == 0 or num_items < 2:
        return out
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # [I, d]
    kk = min(k, num_items - 1)
    step = max(1, chunk_floats // num_items)
    for start in range(0, num_items, step):
        rows = np.arange(start, min(start + step, num_items))  # [C]
        sim = unit[rows] @ unit.T  # [C, I]
        sim[np.arange(len(rows)), rows] = -np.inf  # never the anchor itself
        top = np.argsort(-sim, axis=1, kind="stable")[:, :kk]  # [C, kk], ties: lower idx first
        out[rows, :kk] = top
    return out


# ---------------------------------------------------------------------------------------------
# batch + collate
# ---------------------------------------------------------------------------------------------


@dataclass
class PrefBatch:
    """One micro-batch of preference material (chosen and rejected slates of each context)."""

    hist_codes: torch.Tensor
    """[B, H, L] long: history SIDs, right-padded with 0 (oldest first)."""
    hist_mask: torch.Tensor
    """[B, H] bool: True for real history items."""
    hist_fb: torch.Tensor
    """[B, H] float32: history watch ratios (0 on padding)."""
    chosen_items: torch.Tensor
    """[B, N] long: y+ item_idx."""
    chosen_codes: torch.Tensor
    """[B, N, L] long: y+ SIDs."""
    rejected_items: torch.Tensor
    """[B, R, N] long: y- item_idx per enabled objective (y+ where masked)."""
    rejected_codes: torch.Tensor
    """[B, R, N, L] long: y- SIDs."""
    rejected_mask: torch.Tensor
    """[B, R] bool: which rejected slates are real negatives."""
    objectives: tuple[str, ...] = ()
    """Names of the R axis (e.g. ("o1", "o2", "o3"))."""

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> PrefBatch:
        """Move to ``device``. Feedback stays float32 (the model bucketizes it; bf16 would move
        watch ratios across bucket edges), as in ``SlateBatch``; ``float_dtype`` is accepted
        for the Batch protocol and changes nothing here."""
        return PrefBatch(
            hist_codes=self.hist_codes.to(device), hist_mask=self.hist_mask.to(device),
            hist_fb=self.hist_fb.to(device),
            chosen_items=self.chosen_items.to(device), chosen_codes=self.chosen_codes.to(device),
            rejected_items=self.rejected_items.to(device),
            rejected_codes=self.rejected_codes.to(device),
            rejected_mask=self.rejected_mask.to(device), objectives=self.objectives)

    @property
    def slates(self) -> torch.Tensor:
        """[B, 1+R, N, L]: chosen first, then the rejected slates (one model call for all)."""
        return torch.cat([self.chosen_codes[:, None], self.rejected_codes], dim=1)

    @property
    def num_samples(self) -> int:
        return int(self.hist_codes.shape[0])

    @property
    def num_tokens(self) -> int:
        """SID tokens scored: B * (1+R) * N * L (masked rejected slates are still computed)."""
        B, R, N, L = self.rejected_codes.shape
        return int(B * (1 + R) * N * L)


def pack_history(hists: list[list[int]], fbs: list[list[float]], history_len: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep each history's last ``history_len`` items; right-pad to the batch's longest.

    Returns (items ``[B, H]`` int64 (0 on padding), mask ``[B, H]`` bool, fb ``[B, H]`` float32).
    """
    cut = [(list(h)[-history_len:], list(f)[-history_len:]) for h, f in zip(hists, fbs)]
    for h, f in cut:
        if len(h) != len(f):
            raise ValueError(f"history has {len(h)} items but {len(f)} feedback values")
    H = max(1, max((len(h) for h, _ in cut), default=1))
    items = np.zeros((len(cut), H), dtype=np.int64)
    mask = np.zeros((len(cut), H), dtype=bool)
    fb = np.zeros((len(cut), H), dtype=np.float32)
    for b, (h, f) in enumerate(cut):
        items[b, : len(h)] = h
        mask[b, : len(h)] = True
        fb[b, : len(f)] = f
    return items, mask, fb


class PrefCollate:
    """Picklable ``list[PREF sample dict] -> PrefBatch`` for loader workers.

    The SID table (memory map), the optional item embeddings and the O3 neighbour table are
    opened/built lazily on the first call in each process and never pickled.
    """

    def __init__(self, sid_dir: str | Path, cfg: PairConfig, slate_size: int, history_len: int,
                 epoch: int = 0):
        problems = cfg.validate()
        if problems:
            raise ValueError("; ".join(problems))
        self.sid_dir = str(sid_dir)
        self.cfg = cfg
        self.slate_size = int(slate_size)
        self.history_len = int(history_len)
        self.epoch = int(epoch)
        self._table: np.ndarray | None = None
        self._neighbours: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_table"] = None
        state["_neighbours"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Change the epoch mixed into per-sample seeds (new O1/O2 draws per epoch)."""
        self.epoch = int(epoch)

    @property
    def sid_table(self) -> np.ndarray:
        if self._table is None:
            self._table = load_sid_table(self.sid_dir)
        return self._table

    @property
    def neighbours(self) -> np.ndarray:
        """O3 neighbour table ``[num_items, N-1]``, built on first use."""
        if self._neighbours is None:
            k = self.slate_size - 1
            if self.cfg.o3_similarity == "embedding":
                emb = self._o3_embedding()
                if emb.shape[0] != self.sid_table.shape[0]:
                    raise ValueError(f"{self.cfg.o3_embedding} has {emb.shape[0]} rows, the SID "
                                     f"table {self.sid_table.shape[0]}")
                self._neighbours = build_embedding_neighbours(emb, k)
            else:
                emb = self._o3_embedding() if self.cfg.o3_tie_break == "embedding" else None
                self._neighbours = build_neighbour_table(self.sid_table, k, emb,
                                                         window=self.cfg.o3_window)
        return self._neighbours

    def _o3_embedding(self) -> np.ndarray:
        path = Path(self.sid_dir) / self.cfg.o3_embedding
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (pairs.o3_embedding)")
        return np.load(path, mmap_mode="r")

    def __call__(self, samples: list[dict]) -> PrefBatch:
        if not samples:
            raise ValueError("PrefCollate got an empty list of samples")
        N = self.slate_size
        nbr = self.neighbours if "o3" in self.cfg.objectives else None
        chosen, rejected, masks = [], [], []
        for s in samples:
            pos = np.asarray(s["pos_items"], dtype=np.int64)
            if len(pos) < N:
                raise ValueError(f"pref sample of user {s['user_id']!r} at ts {s['ts']} has "
                                 f"{len(pos)} pos_items, the slate size is {N}")
            pos = pos[:N]
            if self.cfg.chosen_order == "time" and s.get("pos_when") is not None:
                pos = pos[np.argsort(np.asarray(s["pos_when"][:N]), kind="stable")]
            rng = sample_rng(s["user_id"], s["ts"], self.cfg.seed, self.epoch)
            rej, mask = make_negatives(pos, np.asarray(s["neg_items"], dtype=np.int64), rng,
                                       self.cfg, nbr)
            chosen.append(pos)
            rejected.append(rej)
            masks.append(mask)
        hist, hist_mask, hist_fb = pack_history([s["hist_items"] for s in samples],
                                                [s["hist_fb"] for s in samples], self.history_len)
        table = self.sid_table
        chosen_np = np.stack(chosen)  # [B, N]
        rejected_np = np.stack(rejected)  # [B, R, N]
        return PrefBatch(
            hist_codes=torch.from_numpy(map_items(table, hist) * hist_mask[..., None]),
            hist_mask=torch.from_numpy(hist_mask),
            hist_fb=torch.from_numpy(hist_fb),
            chosen_items=torch.from_numpy(chosen_np),
            chosen_codes=torch.from_numpy(map_items(table, chosen_np)),
            rejected_items=torch.from_numpy(rejected_np),
            rejected_codes=torch.from_numpy(map_items(table, rejected_np)),
            rejected_mask=torch.from_numpy(np.stack(masks)),
            objectives=tuple(self.cfg.objectives),
        )
