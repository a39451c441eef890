"""SASRec baseline (Kang & McAuley 2018): next-item causal self-attention over item ids.

Design
------
Items are dense ``item_idx`` (no SIDs): one embedding table ``[num_items, D]``, tied to the
output layer (full softmax over the catalogue; fine up to ~1e5 items). The training sequence
of a slate sample is its history followed by its N target items; the model predicts every
next item from the prefix before it (CE over all items at every position that has a next
item). Inference reads the history only and returns the top-k scored items of the next
position (distinct by construction; ``exclude_history`` optionally removes seen items).

Layout: sequences are **right-aligned** internally: the history is packed so
that its newest item sits just before the targets, whatever the batch padding; positions are
recency positions (0 = the last input token), so the last token used at inference and in
training has the same position embedding and batch padding never changes a result. Padded
query rows may attend to themselves only (no all-masked rows, so no NaN); their outputs are
never used.

Trade-off: all positions are trained (the standard SASRec objective), including the history's
own next-item transitions, which gives many more training signals per sample than scoring
the 5 targets only.

Large catalogues (``loss.chunk_items``): the full softmax materialises ``[P, num_items]``
logits, P = every position with a next item (B x (H+N-1) at most): ~1.4e10 elements for a
micro-batch of 256 x 54 positions at 10^6 items, plus as much again for their gradient. With
``chunk_items = c > 0`` the model computes the cross-entropy itself, inside its forward (so
ZeRO-3 has the tied table gathered), as a log-sum-exp over catalogue chunks of c items
(:func:`chunked_cross_entropy`): the forward keeps only [P] running statistics, the backward
recomputes each chunk's logits once, so peak memory is P x c instead of P x num_items. The
loss, its gradient and the accuracy are those of the full softmax (same float32 math, summed
in another order: equal to rounding; tests/test_gpu_path.py checks it); the price is the
chunk logits computed twice (+1 matmul of the output layer, ~1/3 of its cost). Sampled
softmax would be cheaper still but biased; chunking keeps the objective exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from higr_dist.models.layers import (
    BlockConfig,
    MLPKind,
    RMSNorm,
    block_param_count,
    init_weights,
    make_blocks,
    run_blocks,
)


@dataclass
class SASRecConfig:
    """The SASRec baseline (the ``model:`` section of stage sasrec)."""

    num_items: int = 0
    """Catalogue size; 0 = read from ``<sid_dir>/sid_meta.json`` when the stage builds."""
    d_model: int = 64
    """Width D (the paper's SASRec uses 50-64)."""
    n_heads: int = 2
    """Attention heads."""
    n_layers: int = 2
    """Self-attention blocks."""
    max_len: int = 64
    """Recency positions (sequences longer than this share the oldest position)."""
    ffn_mult: float = 4.0
    """MLP width multiplier."""
    mlp: MLPKind = "gelu"
    """MLP kind: gelu (as SASRec) or swiglu."""
    dropout: float = 0.2
    """Dropout on attention and residual branches (SASRec's default 0.2)."""
    history_len: int = 50
    """Most recent history items kept per sample by the stage's collate (as HSD's)."""
    N: int = 5
    """Targets per training sample (the ETL's slate size)."""

    def validate(self) -> list[str]:
        problems = []
        if self.num_items < 0:
            problems.append(f"num_items must be >= 0 (0 = from sid_meta), got {self.num_items}")
        if self.d_model < 1 or self.n_heads < 1 or self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} must be a positive multiple of n_heads "
                            f"{self.n_heads}")
        if self.n_layers < 1 or self.max_len < 1:
            problems.append("need n_layers >= 1 and max_len >= 1")
        if self.history_len < 1 or self.N < 1:
            problems.append("need history_len >= 1 and N >= 1")
        if self.ffn_mult <= 0 or not 0.0 <= self.dropout < 1.0:
            problems.append("need ffn_mult > 0 and 0 <= dropout < 1")
        return problems

    def block(self) -> BlockConfig:
        return BlockConfig(d_model=self.d_model, n_heads=self.n_heads, ffn_mult=self.ffn_mult,
                           mlp=self.mlp, dropout=self.dropout, cross=False, causal=True)


def sasrec_param_count(cfg: SASRecConfig) -> int:
    d = cfg.d_model
    return cfg.num_items * d + cfg.max_len * d + cfg.n_layers * block_param_count(cfg.block()) + d


class SASRecOutput(NamedTuple):
    logits: Tensor | None
    """[P, num_items] scores of the P positions that have a next item (row-major over [B, T]);
    None when the loss was computed in chunks (``ce``/``acc`` are set instead)."""
    targets: Tensor
    """[P] long: the next item of each of those positions."""
    ce: Tensor | None = None
    """Mean next-item cross-entropy (float32 scalar), computed in chunks by the model."""
    acc: Tensor | None = None
    """Next-item top-1 accuracy (scalar), computed with ``ce``."""


class _ChunkedLogSumExp(torch.autograd.Function):
    """``logsumexp(h @ weight.T, -1)`` (float32) and its argmax, over row chunks of ``weight``,
    never holding more than ``[P, chunk]`` logits; backward recomputes each chunk's logits.
    ``weight`` is passed whole (not sliced outside) so a ZeRO-3 parameter is saved as itself
    and is gathered again when the backward runs."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        P, n = h.shape[0], weight.shape[0]
        lse = torch.full((P,), float("-inf"), dtype=torch.float32, device=h.device)
        best = torch.full((P,), float("-inf"), dtype=torch.float32, device=h.device)
        arg = torch.zeros(P, dtype=torch.long, device=h.device)
        for start in range(0, n, chunk):
            z = (h @ weight[start:start + chunk].to(h.dtype).T).float()  # [P, c]
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
            m, i = z.max(dim=-1)
            better = m > best  # strict: ties keep the earlier index, as a full argmax does
            best, arg = torch.where(better, m, best), torch.where(better, i + start, arg)
        ctx.save_for_backward(h, weight, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(arg)
        return lse, arg

    @staticmethod
    def backward(ctx, g_lse: Tensor, _g_arg: Tensor) -> tuple[Tensor, Tensor, None]:
        h, weight, lse = ctx.saved_tensors
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, weight.shape[0], ctx.chunk):
            w = weight[start:start + ctx.chunk].to(h.dtype)
            z = (h @ w.T).float()
            dz = (torch.exp(z - lse[:, None]) * g_lse[:, None]).to(h.dtype)  # softmax x grad
            grad_h += (dz @ w).float()
            grad_w[start:start + ctx.chunk] = (dz.T @ h).float()
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None


def chunked_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, chunk: int,
                          label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and top-1 accuracy of the logits ``h @ weight.T`` ([P, D] x [I, D])
    against ``targets`` [P], computed over chunks of ``chunk`` catalogue rows (see the module
    docstring): equal to ``F.cross_entropy(h @ weight.T, targets, label_smoothing=...)`` up to
    float rounding, with ``[P, chunk]`` peak logits memory. Float32 throughout."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    lse, arg = _ChunkedLogSumExp.apply(h, weight, chunk)
    target_logit = (h.float() * weight[targets].float()).sum(-1)  # [P]
    per_row = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing > 0:  # mean over the catalogue of the logits = h . mean row of weight
        per_row = per_row - label_smoothing * (h.float() @ weight.float().mean(0))
    acc = (arg == targets).float().mean()
    return per_row.mean(), acc


def pack_right(items: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's valid entries to the right end, keeping their order:
    items [B, T], mask [B, T] bool -> (items [B, T], mask [B, T])."""
    order = torch.argsort(mask.long(), dim=1, stable=True)  # padding first, valid in order
    return items.gather(1, order), mask.gather(1, order)


class SASRec(nn.Module):
    """Causal self-attention next-item model (see the module docstring)."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        problems = cfg.validate()
        if cfg.num_items < 1:
            problems.append("num_items must be set (>= 1) to build the model")
        if problems:
            raise ValueError("SASRecConfig: " + "; ".join(problems))
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.item_emb = nn.Parameter(torch.empty(cfg.num_items, cfg.d_model))  # in and out
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = make_blocks(cfg.block(), cfg.n_layers)
        self.norm = RMSNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        init_weights(self, cfg.n_layers)

    def encode(self, items: Tensor, mask: Tensor) -> Tensor:
        """Right-packed items [B, T], mask [B, T] -> hidden states [B, T, D]."""
        T = items.shape[1]
        recency = (T - 1 - torch.arange(T, device=items.device)).clamp(max=self.cfg.max_len - 1)
        x = F.embedding(items * mask, self.item_emb) + self.pos(recency)  # [B, T, D]
        x = self.drop(x * mask[..., None].to(x.dtype))
        causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=items.device)
        attn = (causal & mask[:, None, :]) | eye  # [B, T, T]: valid past keys, or self
        x = run_blocks(self.blocks, x, attn_mask=attn[:, None],
                       checkpointing=self.gradient_checkpointing and self.training)
        return self.norm(x)

    def scores(self, h: Tensor) -> Tensor:
        """h [..., D] -> [..., num_items] (tied output embedding)."""
        return h @ self.item_emb.to(h.dtype).T

    def forward(self, hist_items: Tensor, hist_mask: Tensor, target_items: Tensor,
                loss_chunk: int = 0, label_smoothing: float = 0.0) -> SASRecOutput:
        """hist_items [B, H] (any padding), hist_mask [B, H] bool, target_items [B, N] ->
        logits and targets of every position with a next item; with ``loss_chunk > 0`` the
        cross-entropy (with ``label_smoothing``) and accuracy in catalogue chunks of that many
        items instead of the logits (see the module docstring)."""
        items, mask = pack_right(hist_items, hist_mask.bool())
        seq = torch.cat([items, target_items], dim=1)  # [B, H+N]
        valid = torch.cat([mask, torch.ones_like(target_items, dtype=torch.bool)], dim=1)
        h = self.encode(seq[:, :-1], valid[:, :-1])  # [B, T-1, D]
        has_next = valid[:, :-1] & valid[:, 1:]  # [B, T-1]
        targets = seq[:, 1:][has_next]
        if loss_chunk > 0:
            ce, acc = chunked_cross_entropy(h[has_next], self.item_emb, targets, loss_chunk,
                                            label_smoothing)
            return SASRecOutput(None, targets, ce, acc)
        return SASRecOutput(self.scores(h[has_next]), targets)

    @torch.no_grad()
    def recommend(self, hist_items: Tensor, hist_mask: Tensor, k: int = 5,
                  exclude_history: bool = False) -> Tensor:
        """Top-k next items after the history: [B, H], [B, H] -> [B, k] item_idx (distinct).
        Call in eval mode (dropout). A row with an empty history scores from the position
        embedding alone."""
        items, mask = pack_right(hist_items, hist_mask.bool())
        s = self.scores(self.encode(items, mask)[:, -1]).float()  # [B, num_items]
        if exclude_history:
            hit = torch.zeros_like(s, dtype=torch.bool)
            hit.scatter_(1, items, mask)
            s = s.masked_fill(hit, float("-inf"))
        return s.topk(k, dim=1).indices


@dataclass
class SASRecLossConfig:
    """The SASRec loss (the ``loss:`` section of stage sasrec)."""

    label_smoothing: float = 0.0
    """Label smoothing of the next-item cross-entropy (0 = plain CE)."""
    chunk_items: int = 0
    """0 = full softmax (``[positions x num_items]`` logits). > 0: the model computes the same
    cross-entropy over catalogue chunks of this many items, peak memory positions x
    chunk_items, for large catalogues (see ``higr_dist.models.sasrec``); e.g. 65536 at 10^6
    items."""

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.chunk_items < 0:
            problems.append(f"chunk_items must be >= 0 (0 = full softmax), got "
                            f"{self.chunk_items}")
        return problems


class SASRecLossTerms(NamedTuple):
    total: Tensor
    """Mean next-item CE (scalar)."""
    acc: Tensor
    """Next-item top-1 accuracy."""


class SASRecLoss(nn.Module):
    """Next-item cross-entropy (float32), no parameters: from the full logits, or the chunked
    value the model computed (``chunk_items``; the stage passes it to the model's forward)."""

    def __init__(self, cfg: SASRecLossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, out: SASRecOutput) -> SASRecLossTerms:
        if out.logits is None:
            if out.ce is None or out.acc is None:
                raise ValueError("SASRecOutput has neither logits nor a chunked loss")
            return SASRecLossTerms(out.ce, out.acc)
        logits = out.logits.float()
        ce = F.cross_entropy(logits, out.targets, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == out.targets).float().mean()
        return SASRecLossTerms(ce, acc)
