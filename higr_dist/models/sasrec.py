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
    logits: Tensor
    """[P, num_items] scores of the P positions that have a next item (row-major over [B, T])."""
    targets: Tensor
    """[P] long: the next item of each of those positions."""


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

    def forward(self, hist_items: Tensor, hist_mask: Tensor, target_items: Tensor
                ) -> SASRecOutput:
        """hist_items [B, H] (any padding), hist_mask [B, H] bool, target_items [B, N] ->
        logits and targets of every position with a next item."""
        items, mask = pack_right(hist_items, hist_mask.bool())
        seq = torch.cat([items, target_items], dim=1)  # [B, H+N]
        valid = torch.cat([mask, torch.ones_like(target_items, dtype=torch.bool)], dim=1)
        h = self.encode(seq[:, :-1], valid[:, :-1])  # [B, T-1, D]
        has_next = valid[:, :-1] & valid[:, 1:]  # [B, T-1]
        return SASRecOutput(self.scores(h[has_next]), seq[:, 1:][has_next])

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

    def validate(self) -> list[str]:
        if not 0.0 <= self.label_smoothing < 1.0:
            return [f"label_smoothing must be in [0, 1), got {self.label_smoothing}"]
        return []


class SASRecLossTerms(NamedTuple):
    total: Tensor
    """Mean next-item CE (scalar)."""
    acc: Tensor
    """Next-item top-1 accuracy."""


class SASRecLoss(nn.Module):
    """Full-softmax next-item cross-entropy (float32), no parameters."""

    def __init__(self, cfg: SASRecLossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, out: SASRecOutput) -> SASRecLossTerms:
        logits = out.logits.float()
        ce = F.cross_entropy(logits, out.targets, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == out.targets).float().mean()
        return SASRecLossTerms(ce, acc)
