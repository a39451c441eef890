"""HiGR coarse-to-fine slate decoding: greedy planner, trie-constrained beam search per item.

Design
------
Encode the context once (memory + per-block cross-attention keys/values). For slate position
j = 1..N: one KV-cached planner step gives the planned preference P_j; the item generator
beam-searches item j's L codes (beam width ``beam``, KV-cached, ``B`` contexts x beams as one
batch, b-major); the best complete item is placed and its preference embedding p_j is fed
back to the planner. Cost per slate: N planner steps over B rows + N*L generator steps over
B*beam rows of a 2-layer generator, instead of N*L full-depth steps over B*beam rows.

Constraints (:meth:`SidTrie.allowed_at`, each beam carrying the trie node of its prefix): at
every code step only codes that extend the prefix towards a real SID of an item *not yet
placed in this slate* are allowed (count of items below prefix + code, minus the placed ones
below it, > 0). So every finished beam is a real,
new item, and no beam can reach a dead end. Disallowed codes get log-prob -inf before the
top-k; when fewer candidates than ``beam`` are allowed, the surplus beams carry -inf and can
never win. Pure beam search: no sampling, temperature, top-k/top-p knob exists (METHOD.md
pitfall: constraints silently dropped by leaked sampling settings).

Scores are float32 log-probs; ``scores[b, j]`` is the generator's log-prob of the placed
item's L codes. Decoding runs under ``torch.inference_mode`` with the model temporarily in
eval mode (dropout off); the trie is moved to the inputs' device.
``use_cache=False`` recomputes every prefix without KV caches (a reference for tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from higr_dist.decode.trie import SidTrie
from higr_dist.models.hsd import HSD, HSDContext
from higr_dist.models.layers import Cache, reorder_cache


class DecodeResult(NamedTuple):
    items: Tensor
    """[B, N] long item_idx, distinct within each slate, all real items."""
    codes: Tensor
    """[B, N, L] long SIDs of the items."""
    scores: Tensor
    """[B, N] float32 log-prob of each placed item under the decoder."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with ``model.eval()`` and restore the previous mode afterwards."""
    if not model.training:  # the common case: no walk over every module
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(True)


def check_trie(trie: SidTrie, K: int, L: int, N: int) -> None:
    if (trie.K, trie.L) != (K, L):
        raise ValueError(f"trie has K={trie.K}, L={trie.L}; the model K={K}, L={L}")
    if trie.num_items < N:
        raise ValueError(f"catalogue has {trie.num_items} items, fewer than the slate size {N}")


class BeamSelect(NamedTuple):
    scores: Tensor
    """[B, G'] float32 running scores, descending."""
    parent: Tensor
    """[B, G'] long: source beam within its context (0..G-1)."""
    code: Tensor
    """[B, G'] long: chosen code."""
    rows: Tensor
    """[B*G'] long: source row in the flat [B*G] batch (for reordering caches and state)."""


def beam_select(scores: Tensor, logp: Tensor, allowed: Tensor, beam: int) -> BeamSelect:
    """One beam-search expansion: scores [B, G], logp [B*G, K] float32, allowed [B*G, K] bool ->
    the best ``min(beam, G*K)`` continuations per context."""
    B, G = scores.shape
    K = logp.shape[-1]
    total = scores[:, :, None] + logp.masked_fill(~allowed, float("-inf")).view(B, G, K)
    top, idx = total.view(B, G * K).topk(min(beam, G * K), dim=1)  # [B, G']
    parent = torch.div(idx, K, rounding_mode="floor")
    rows = (torch.arange(B, device=idx.device)[:, None] * G + parent).reshape(-1)
    return BeamSelect(top, parent, idx % K, rows)


def generate_item(model: HSD, ctx: HSDContext, plan: Tensor, trie: SidTrie, placed: Tensor,
                  beam: int, use_cache: bool = True, keep: int = 1
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Beam-search one item per context: plan [B, D] (P_j), placed [B, j] item_idx (excluded)
    -> the ``keep`` best allowed complete items, best first: (codes [B, keep, L], log-probs
    [B, keep] float32 (-inf where fewer were allowed), item_idx [B, keep] (-1 there)).

    Each beam carries its trie node, so a step's constraint is one :meth:`SidTrie.allowed_at`
    query; the last code only needs the best ``keep`` completions (top-1 for placement alone),
    and nothing is reordered after it (the generator cache dies with the item)."""
    B, L = plan.shape[0], model.cfg.L
    scores = torch.zeros(B, 1, dtype=torch.float32, device=plan.device)  # [B, G]
    prefix = torch.zeros(B, 1, 0, dtype=torch.long, device=plan.device)  # [B, G, l]
    node = trie.root(B)  # [B*G] trie node of each beam's prefix
    plan_rows, excl = plan, placed  # [B*G, D], [B*G, j]
    prev: Tensor | None = None  # [B*G] last chosen code of each beam
    cache: Cache | None = None
    for layer in range(L):
        last = layer == L - 1
        if use_cache:
            logits, cache = model.generator_step(ctx, cache, plan=plan_rows if layer == 0 else None,
                                                 prev_code=prev)
        else:
            logits = model.generator_full(ctx, plan_rows, prefix.reshape(plan_rows.shape[0], layer))
        logp = torch.log_softmax(logits.float(), dim=-1)  # [B*G, K]
        sel = beam_select(scores, logp, trie.allowed_at(layer, node, excl), keep if last else beam)
        prev = sel.code.reshape(-1)  # [B*G']
        prefix = torch.cat([prefix.gather(1, sel.parent[..., None].expand(-1, -1, layer)),
                            sel.code[..., None]], dim=2)  # [B, G', l+1]
        scores = sel.scores
        node = trie.child(layer, node[sel.rows], prev)
        if not last:
            plan_rows, excl = plan_rows[sel.rows], excl[sel.rows]
            if cache is not None:
                cache = reorder_cache(cache, sel.rows)
    if not bool(torch.isfinite(scores[:, 0]).all()):
        raise RuntimeError("no allowed item left for some context (catalogue exhausted?)")
    items = torch.where(torch.isfinite(scores), trie.leaf_items(node).view(B, -1), -1)
    return prefix, scores, items


def rank_by_mass(cand: Tensor, weight: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` items with the largest summed weight per row: cand [B, C] item_idx (-1 =
    none), weight [B, C] >= 0 -> (items [B, n], mass [B, n]), descending. Ties: smaller
    item_idx first. A row must hold at least ``n`` distinct items."""
    B, C = cand.shape
    w = torch.where(cand >= 0, weight, 0.0)
    order = torch.argsort(cand, dim=1, stable=True)  # group equal items
    items = cand.gather(1, order)
    w = w.gather(1, order)
    new = torch.ones_like(items, dtype=torch.bool)
    new[:, 1:] = items[:, 1:] != items[:, :-1]
    seg = new.long().cumsum(1) - 1  # [B, C] segment of each candidate
    mass = torch.zeros(B, C, dtype=w.dtype, device=w.device).scatter_add_(1, seg, w)
    first = torch.full((B, C), -1, dtype=torch.long, device=cand.device)
    first.scatter_(1, seg, items)  # the item of each segment (same for all its members)
    valid = (torch.arange(C, device=cand.device)[None] <= seg[:, -1:]) & (first >= 0)
    mass = torch.where(valid, mass, float("-inf"))
    # descending mass, ties by ascending item: sort by item first (already), then stable mass
    top = torch.argsort(-mass, dim=1, stable=True)[:, :n]
    out_mass = mass.gather(1, top)
    if not bool(torch.isfinite(out_mass).all()):
        raise RuntimeError(f"fewer than {n} distinct candidate items for some context")
    return first.gather(1, top), out_mass


@torch.inference_mode()
def coarse_to_fine_decode(model: HSD, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor,
                          trie: SidTrie, beam: int = 10, N: int | None = None,
                          use_cache: bool = True, rank: str = "placed") -> DecodeResult:
    """HiGR decoding of one slate per context: hist_codes [B, H, L], hist_mask [B, H],
    hist_fb [B, H] -> :class:`DecodeResult` (items [B, N], codes [B, N, L], scores [B, N]).

    ``rank``: ``placed`` returns the items in the order the planner placed them (the paper's
    slate; ``scores`` = each item's log-prob); ``mass`` walks the same greedy plan but returns
    the N candidates with the largest expected presence in the slate (:data:`RANKS`;
    ``scores`` = the log of that summed weight, descending)."""
    cfg = model.cfg
    N = cfg.N if N is None else int(N)
    if not 1 <= N <= cfg.N or beam < 1:
        raise ValueError(f"need 1 <= N <= {cfg.N} and beam >= 1 (got N={N}, beam={beam})")
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {', '.join(RANKS)}, got {rank!r}")
    check_trie(trie, cfg.K, cfg.L, N)
    trie = trie.to(hist_codes.device)
    B = hist_codes.shape[0]
    dev = hist_codes.device
    keep = beam if rank == "mass" else 1
    items = torch.full((B, N), -1, dtype=torch.long, device=dev)
    codes = torch.zeros(B, N, cfg.L, dtype=torch.long, device=dev)
    scores = torch.zeros(B, N, dtype=torch.float32, device=dev)
    cand_items, cand_logw = [], []  # per position: [B, keep] candidates and log-weights
    path = torch.zeros(B, dtype=torch.float32, device=dev)  # log P(items placed so far)
    with eval_mode(model):
        ctx = model.encode_context(hist_codes, hist_mask, hist_fb, beam=beam)
        pcache: Cache | None = None
        for j in range(N):
            if use_cache:
                plan, pcache = model.planner_step(ctx, codes[:, j - 1] if j else None, pcache)
            else:
                plan = model.planner_full(ctx, codes[:, :j])
            c, lp, it = generate_item(model, ctx, plan, trie, items[:, :j], beam, use_cache, keep)
            codes[:, j], scores[:, j], items[:, j] = c[:, 0], lp[:, 0], it[:, 0]
            cand_items.append(it)
            cand_logw.append(path[:, None] + lp)
            path = path + lp[:, 0]
    if bool((items < 0).any()):
        raise RuntimeError("decoding produced a SID outside the trie (bug)")
    if rank == "mass":
        logw = torch.cat(cand_logw, 1)
        top = logw.amax(1, True)  # weights relative to the row's largest: no underflow
        ranked, mass = rank_by_mass(torch.cat(cand_items, 1), (logw - top).exp(), N)
        return DecodeResult(ranked, trie.table[ranked], (mass.log() + top).float())
    return DecodeResult(items, codes, scores)


RANKS = ("placed", "mass")
"""How a decoded slate is ordered and filled.

- ``placed``: the N items the planner placed, in placement order (METHOD.md's decoding).
- ``mass``: the same greedy walk, but every position's ``beam`` best complete items are kept as
  candidates, weighted by ``P(items placed before) x p(item | context, placed before)``, and
  the N candidates with the largest summed weight are returned, best first. That weight is
  the model's probability of the item appearing at that position along the greedy plan, so
  the slate maximises the expected number of its items the user goes on to engage with
  (NDCG and recall reward exactly that), rather than following the single most likely
  chain: where the next steps branch (a user moves from an item to one of several
  successors) the placed chain commits to one branch after the first item, while the mass
  ranking keeps the likely alternatives. Same cost as ``placed`` plus a top-``beam`` at the
  last code of each item.
"""
