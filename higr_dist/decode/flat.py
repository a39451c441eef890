"""Flat beam search (OneRec / TIGER baseline): one beam over the whole N*L-token slate.

Design
------
Encode the context once, then N*L KV-cached steps of the full-depth decoder over
``B x beam`` rows (b-major). Token t is code ``t % L`` of item ``j = t // L``; the allowed
codes come from :meth:`SidTrie.allowed_at` with the trie node of the item's prefix so far
(carried per beam, one gather per step) and the items this beam already placed (so every
finished item is a real SID, no beam repeats an item, and no beam reaches a dead end). After the last code of an item the beam records its item_idx.
The beam keeps the best ``beam`` partial slates by total log-prob; the answer is the best
full slate (the last token keeps only the top-1 and skips the cache reorder, same result).
Pure beam search, no sampling knobs (METHOD.md pitfall). ``use_cache=False``
recomputes every prefix (a reference for tests).

This is the decoding HiGR is compared against: every step runs the whole
(planner_layers + gen_layers)-deep decoder over every beam, and self-attention grows to N*L
tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from higr_dist.decode.hier import (
    RANKS,
    DecodeResult,
    beam_select,
    check_trie,
    eval_mode,
    rank_by_mass,
)
from higr_dist.decode.trie import SidTrie
from higr_dist.models.flat import Flat
from higr_dist.models.layers import Cache, reorder_cache


@torch.inference_mode()
def flat_beam_decode(model: Flat, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor,
                     trie: SidTrie, beam: int = 10, N: int | None = None,
                     use_cache: bool = True, rank: str = "placed") -> DecodeResult:
    """Beam search over N*L tokens: hist_codes [B, H, L], hist_mask [B, H], hist_fb [B, H] ->
    :class:`DecodeResult` (items [B, N], codes [B, N, L], scores [B, N] per-item log-probs).

    ``rank`` (``higr_dist.decode.hier.RANKS``): ``placed`` returns the best beam's slate;
    ``mass`` returns the N items with the largest summed probability over every beam's
    completed items at every position (each weighted by its whole prefix's probability), the
    flat counterpart of HiGR's ``mass`` ranking."""
    cfg = model.cfg
    N = cfg.N if N is None else int(N)
    if not 1 <= N <= cfg.N or beam < 1:
        raise ValueError(f"need 1 <= N <= {cfg.N} and beam >= 1 (got N={N}, beam={beam})")
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {', '.join(RANKS)}, got {rank!r}")
    L = cfg.L
    check_trie(trie, cfg.K, L, N)
    trie = trie.to(hist_codes.device)
    B, dev = hist_codes.shape[0], hist_codes.device
    scores = torch.zeros(B, 1, dtype=torch.float32, device=dev)  # [B, G]
    tokens = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)  # [B, G, t]
    tok_lp = torch.zeros(B, 1, 0, dtype=torch.float32, device=dev)  # [B, G, t]
    placed = torch.full((B, 1, N), -1, dtype=torch.long, device=dev)  # [B, G, N]
    node = trie.root(B)  # [B*G] trie node of each beam's current item prefix
    cache: Cache | None = None
    cand_items, cand_logw = [], []  # rank "mass": each item boundary's completed items
    with eval_mode(model):
        ctx = model.encode_context(hist_codes, hist_mask, hist_fb, beam=beam)
        for t in range(N * L):
            j, layer = divmod(t, L)
            last = t == N * L - 1
            G = scores.shape[1]
            flat_tokens = tokens.reshape(B * G, t)
            if use_cache:
                logits, cache = model.step(ctx, cache, flat_tokens if t else None)
            else:
                logits = model.full_step(ctx, flat_tokens)
            logp = torch.log_softmax(logits.float(), dim=-1)  # [B*G, K]
            allowed = trie.allowed_at(layer, node, placed.reshape(B * G, N)[:, :j])
            sel = beam_select(scores, logp, allowed, 1 if last and rank == "placed" else beam)
            code = sel.code.reshape(-1)  # [B*G']
            step_lp = logp[sel.rows, code].view(B, -1)  # [B, G']
            pick = sel.parent[..., None]
            tokens = torch.cat([tokens.gather(1, pick.expand(-1, -1, t)), sel.code[..., None]], 2)
            tok_lp = torch.cat([tok_lp.gather(1, pick.expand(-1, -1, t)), step_lp[..., None]], 2)
            placed = placed.gather(1, pick.expand(-1, -1, N))
            scores = sel.scores
            node = trie.child(layer, node[sel.rows], code)
            if cache is not None and not last:  # the final token's cache is never read
                cache = reorder_cache(cache, sel.rows)
            if layer == L - 1:
                placed[:, :, j] = trie.leaf_items(node).view(B, -1)  # -1 only on dead beams
                node = trie.root(node.shape[0])
                cand_items.append(torch.where(torch.isfinite(scores), placed[:, :, j], -1))
                cand_logw.append(scores)
    if not bool(torch.isfinite(scores[:, 0]).all()):
        raise RuntimeError("no allowed slate for some context (catalogue exhausted?)")
    items = placed[:, 0]  # [B, N]
    if bool((items < 0).any()):
        raise RuntimeError("decoding produced a SID outside the trie (bug)")
    if rank == "mass":
        logw = torch.cat(cand_logw, 1)
        top = logw.amax(1, True)  # weights relative to the row's largest: no underflow
        ranked, mass = rank_by_mass(torch.cat(cand_items, 1), (logw - top).exp(), N)
        return DecodeResult(ranked, trie.table[ranked], (mass.log() + top).float())
    codes = tokens[:, 0].reshape(B, N, L)
    return DecodeResult(items, codes, tok_lp[:, 0].reshape(B, N, L).sum(-1))
