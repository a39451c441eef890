"""Tokenizer export: item table in, SID table out (collisions counted, then resolved).

Design
------
:func:`export_tokenizer` reads nothing but the model and an :class:`ItemTable`; it encodes the
catalogue in batches (eval mode: no codebook surgery, no collectives, float32), counts
collisions on the raw codes, resolves them, computes the SID report and writes the DESIGN.md
export (``sid_table.npy``, ``sid_meta.json``, ``item_emb.npy``, ``item_features.npy``,
``item_categories.npy``, ``sid_report.json``) plus the SID -> item index
(``sid_index_keys.npy`` sorted packed keys, ``sid_index_items.npy`` the item of each key).
Every file is written to a temporary name and renamed into place.

Collision resolution keeps L codes (no extra disambiguation code, so decoders and tries keep
a fixed depth). Within each (L-1)-prefix group that holds a collision:

1. for every last-layer code used by several items, the item whose last residual r^{L-1} is
   nearest to that codeword keeps it (ties: lowest item_idx); items with a unique SID keep it;
2. the other colliding items, in item_idx order, take the nearest *free* last-layer code of
   their group (distance of r^{L-1} to each layer-L codeword; ties: lowest code).

Only colliding items move and equal inputs give equal outputs. Without residuals
(``last_residual=None``), step 1 keeps the lowest item_idx and step 2 takes the lowest free code.

A group larger than its capacity (an (L-1)-prefix holding more than K items; real catalogues
have them: KuaiRec has 277 items with identical, empty text in one prefix) cannot be made unique
by the last code alone. Before the steps above, :func:`spill_overfull` walks the layers top-down
and moves the excess of every over-full prefix (the highest item_idx first) to the nearest
sibling code (cyclic code distance) whose subtree has room. Only those items change a prefix
code; their count is reported as ``spilled``. Only a catalogue larger than K^L raises a
:class:`CollisionError` (increase K or L).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from higr_dist.models.pcrq_vae import PCRQVAE
from higr_dist.tokenizer.metrics import colliding_mask, pack_codes, sid_report


class CollisionError(ValueError):
    """Collisions cannot be resolved with the current K and L."""


# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------


@dataclass
class ItemTable:
    """The catalogue in item_idx order (row i is item i)."""

    x: np.ndarray
    """float32 [N, D] tokenizer input features."""
    categories: np.ndarray
    """int64 [N] primary category (first of the item's categories; -1 when it has none)."""

    @property
    def num_items(self) -> int:
        return int(self.x.shape[0])


def load_items(items_dir: str | Path) -> ItemTable:
    """Stream the ITEM shards of ``items_dir`` into an :class:`ItemTable`.

    Raises when item_idx is not exactly 0..N-1 (missing or duplicate items).
    """
    from higr_dist.data.loader import iterate_samples
    from higr_dist.data.shardio import list_shards
    from higr_dist.schema.items import ITEM

    idx, xs, cats = [], [], []
    for s in iterate_samples(list_shards(items_dir), ITEM):
        idx.append(int(s["item_idx"]))
        xs.append(np.asarray(s["x"], dtype=np.float32))
        cats.append(int(s["categories"][0]) if len(s["categories"]) else -1)
    if not idx:
        raise ValueError(f"no items in {items_dir}")
    order = np.argsort(np.asarray(idx, dtype=np.int64), kind="stable")
    idx_sorted = np.asarray(idx, dtype=np.int64)[order]
    if not np.array_equal(idx_sorted, np.arange(len(idx))):
        dup = int(len(idx) - len(np.unique(idx_sorted)))
        raise ValueError(f"{items_dir}: item_idx must be 0..N-1 exactly once; got {len(idx)} "
                         f"items, {dup} duplicates, max {int(idx_sorted[-1])}")
    dims = {x.shape[0] for x in xs}
    if len(dims) != 1:
        raise ValueError(f"{items_dir}: items have feature sizes {sorted(dims)}")
    x = np.stack(xs)[order]
    return ItemTable(x=np.ascontiguousarray(x, dtype=np.float32),
                     categories=np.asarray(cats, dtype=np.int64)[order])


# --------------------------------------------------------------------------------------------
# Collisions
# --------------------------------------------------------------------------------------------


@dataclass
class Resolution:
    sids: np.ndarray
    """int64 [N, L] unique SIDs."""
    collisions_before: int
    """Items whose raw SID was shared with another item."""
    collision_rate_before: float
    """collisions_before / N."""
    moved: int
    """Items that received a new last code."""
    spilled: int = 0
    """Items moved to another prefix because their prefix held more items than it can
    separate (see :func:`spill_overfull`)."""


def resolve_collisions(codes: np.ndarray, K: int, last_residual: np.ndarray | None = None,
                       last_codebook: np.ndarray | None = None) -> Resolution:
    """Make every SID unique by moving colliding items to free last-layer codes (module doc).

    codes [N, L] int; last_residual [N, d] the input r^{L-1} of the last layer; last_codebook
    [K, d] the layer-L codewords.
    """
    codes = np.asarray(codes, dtype=np.int64)
    N, L = codes.shape
    if (last_residual is None) != (last_codebook is None):
        raise ValueError("give both last_residual and last_codebook, or neither")
    raw_mask = colliding_mask(codes)
    before, rate = int(raw_mask.sum()), float(raw_mask.mean())
    if not raw_mask.any():
        return Resolution(codes.copy(), 0, 0.0, 0)
    codes, spilled = spill_overfull(codes, K)  # every (L-1)-prefix now holds <= K items
    out = codes.copy()
    mask = colliding_mask(codes)
    if not mask.any():
        return Resolution(out, before, rate, 0, spilled)
    prefix = pack_codes(codes[:, : L - 1], K)  # [N]
    order = np.lexsort((np.arange(N), prefix))  # items by (prefix, item_idx)
    starts = np.searchsorted(prefix[order], np.unique(prefix[mask]))
    ends = np.searchsorted(prefix[order], np.unique(prefix[mask]), side="right")
    moved = 0
    for lo, hi in zip(starts, ends):
        members = order[lo:hi]  # item_idx ascending
        if len(members) > K:  # pragma: no cover - spill_overfull caps every group at K
            raise CollisionError(f"SID prefix {codes[members[0], : L - 1].tolist()} still holds "
                                 f"{len(members)} > K={K} items after spilling (bug)")
        moved += _resolve_group(out, members, last_residual, last_codebook, K)
    return Resolution(out, before, rate, moved, spilled)


def spill_overfull(codes: np.ndarray, K: int) -> tuple[np.ndarray, int]:
    """Move the excess of over-full prefixes to sibling codes with room (module doc).

    codes [N, L] -> (codes' [N, L], number of items whose prefix changed). Level j (0-based
    code column, j < L-1) caps every group of items sharing codes[:, :j+1] at K^(L-1-j) items;
    levels are fixed top-down, so the parent of every group already fits when it is visited.
    """
    codes = np.asarray(codes, dtype=np.int64).copy()
    N, L = codes.shape
    if N > K ** L:
        raise CollisionError(f"{N} items cannot have unique SIDs with K={K}, L={L} "
                             f"(K^L = {K ** L}): increase K or L")
    changed = np.zeros(N, dtype=bool)
    for j in range(L - 1):
        cap = K ** (L - 1 - j)
        parent = pack_codes(codes[:, :j], K) if j else np.zeros(N, dtype=np.int64)
        for p in np.unique(parent):
            members = np.nonzero(parent == p)[0]  # item_idx ascending
            counts = np.bincount(codes[members, j], minlength=K)
            if counts.max() <= cap:
                continue
            for code in np.nonzero(counts > cap)[0]:
                holders = members[codes[members, j] == code]
                for item in holders[cap:]:  # the highest item_idx spill
                    dist = (np.arange(K) - code) % K
                    dist = np.minimum(dist, K - dist)
                    for alt in np.lexsort((np.arange(K), dist)):
                        if counts[alt] < cap:
                            counts[alt] += 1
                            counts[code] -= 1
                            codes[item, j] = alt
                            changed[item] = True
                            break
    return codes, int(changed.sum())


def _resolve_group(out: np.ndarray, members: np.ndarray, last_residual: np.ndarray | None,
                   last_codebook: np.ndarray | None, K: int) -> int:
    """Resolve one (L-1)-prefix group in place; returns how many items moved."""
    last = out[members, -1]  # [n]
    if last_residual is not None:
        diff = last_residual[members][:, None, :] - last_codebook[None, :, :]  # [n, K, d]
        dist = (diff.astype(np.float64) ** 2).sum(-1)  # [n, K]
    else:
        dist = np.tile(np.arange(K, dtype=np.float64), (len(members), 1))  # lowest code first
    taken = np.zeros(K, dtype=bool)
    movers = []
    for code in np.unique(last):
        holders = np.nonzero(last == code)[0]  # positions in members, item_idx ascending
        keep = holders[np.argmin(dist[holders, code])]  # argmin: first (lowest item) on ties
        taken[code] = True
        movers.extend(int(h) for h in holders if h != keep)
    for pos in sorted(movers):  # members are item_idx-ascending, so this is item_idx order
        for code in np.argsort(dist[pos], kind="stable"):
            if not taken[code]:
                taken[code] = True
                out[members[pos], -1] = code
                break
        else:  # pragma: no cover - excluded by the len(members) <= K check
            raise CollisionError("no free last-layer code left")
    return len(movers)


def build_sid_index(sids: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """SID -> item index: (packed keys sorted ascending [N], item_idx of each key [N])."""
    keys = pack_codes(sids, K)
    order = np.argsort(keys, kind="stable")
    if len(keys) and np.any(keys[order][1:] == keys[order][:-1]):
        raise ValueError("SID table is not unique; resolve collisions first")
    return keys[order], order.astype(np.int64)


def lookup_sids(keys: np.ndarray, items: np.ndarray, codes: np.ndarray, K: int) -> np.ndarray:
    """codes [..., L] -> item_idx [...] through the index, -1 where the SID is not a real item."""
    codes = np.asarray(codes, dtype=np.int64)
    flat = codes.reshape(-1, codes.shape[-1])  # [M, L]
    found = np.full(flat.shape[0], -1, dtype=np.int64)
    ok = ((flat >= 0) & (flat < K)).all(axis=1)  # [M]
    if len(keys) and ok.any():
        q = pack_codes(flat[ok], K)
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        found[ok] = np.where(keys[pos] == q, items[pos], -1)
    return found.reshape(codes.shape[:-1])


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_items(model: PCRQVAE, x: np.ndarray,
                 batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [N, D] -> (codes int64 [N, L], z_q float32 [N, d], last residual float32 [N, d])."""
    device = next(model.parameters()).device
    codes, zq, last = [], [], []
    for i in range(0, x.shape[0], batch_size):
        q = model.encode(torch.from_numpy(x[i:i + batch_size]).to(device))
        codes.append(q.codes.cpu().numpy().astype(np.int64))
        zq.append(q.z_q.cpu().numpy().astype(np.float32))
        last.append(q.residuals[-1].cpu().numpy().astype(np.float32))
    return np.concatenate(codes), np.concatenate(zq), np.concatenate(last)


def export_tokenizer(model: PCRQVAE, items: ItemTable, out_dir: str | Path,
                     batch_size: int = 4096, extra_meta: dict | None = None) -> dict:
    """Encode the catalogue, resolve collisions, write the export; return a JSON-able summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    K, L = model.cfg.K, model.cfg.L
    codes, z_q, last_res = encode_items(model, items.x, batch_size)
    last_book = model.quantizer.codebooks()[L - 1].detach().cpu().numpy()  # [K, d]
    res = resolve_collisions(codes, K, last_res, last_book)
    report = sid_report(codes, items.categories, K)
    report.update({"collision_after": float(colliding_mask(res.sids).mean()),
                   "moved_by_resolution": res.moved, "spilled_by_resolution": res.spilled})
    meta = {"K": K, "L": L, "num_items": items.num_items,
            "collisions_before": res.collisions_before,
            "collision_rate_before": res.collision_rate_before,
            "resolution": "nearest free last-layer code within the (L-1)-prefix group",
            "moved": res.moved, "spilled": res.spilled, "emb_dim": int(z_q.shape[1]),
            "feature_dim": int(items.x.shape[1]), **(extra_meta or {})}
    keys, index_items = build_sid_index(res.sids, K)
    _save_npy(out / "sid_table.npy", res.sids.astype(np.int64))
    _save_npy(out / "item_emb.npy", z_q.astype(np.float32))
    _save_npy(out / "item_features.npy", items.x.astype(np.float32))
    _save_npy(out / "item_categories.npy", items.categories.astype(np.int64))
    _save_npy(out / "sid_index_keys.npy", keys)
    _save_npy(out / "sid_index_items.npy", index_items)
    _save_json(out / "sid_report.json", report)
    _save_json(out / "sid_meta.json", meta)  # last: its presence marks a complete export
    return {"num_items": items.num_items, "collision_rate_before": res.collision_rate_before,
            "moved": res.moved, "concentration": report["concentration"],
            "consistency": report["consistency"], "perplexity": report["perplexity"],
            "usage": report["usage"]}


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_json(path: Path, data: dict) -> None:
    tmp = _tmp(path)
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
