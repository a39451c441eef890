"""Flat generative baseline (OneRec / TIGER style): one decoder over the N*L flattened SID tokens.

Design
------
Same context encoder and SID embedding as HSD (:class:`~higr_dist.models.hsd.ContextEncoder`,
:class:`~higr_dist.models.hsd.SidEmbedding`); then one causal decoder with cross-attention to
the memory, of the same width and the same total depth as HSD's planner + generator
(``planner_layers + gen_layers``), over ``[BOS, s_1^1, s_1^2, .., s_N^{L-1}]`` (teacher
forcing) predicting ``s_1^1 .. s_N^L``. Token t is code layer ``t % L`` of item ``t // L``: its
input embedding is that layer's SID table, its output head that layer's head; positions
0..N*L-1 are learned. The model takes :class:`~higr_dist.models.hsd.HSDConfig` so the two
decoders are built from one ``model:`` section and differ only in their decoder structure
(parameter counts within a few per cent: :func:`flat_param_count`).

Decoding (``higr_dist.decode.flat``): :meth:`Flat.encode_context` once, then N*L
:meth:`Flat.step` calls of the full-depth decoder (KV-cached), each over beam rows; this is
the cost HSD's coarse-to-fine decoding avoids. :meth:`Flat.full_step` recomputes the whole
prefix without a cache (reference for tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from higr_dist.models.hsd import (
    ContextEncoder,
    HSDConfig,
    SidEmbedding,
    _context_params,
    positions,
    start_token,
    token_ce,
    token_logprobs,
)
from higr_dist.models.layers import (
    Cache,
    Memory,
    RMSNorm,
    block_param_count,
    cache_len,
    init_weights,
    make_blocks,
    project_memory,
    run_blocks,
    step_blocks,
)


def flat_param_count(cfg: HSDConfig) -> int:
    """Exact parameter count of ``Flat(cfg)``."""
    d, T = cfg.d_model, cfg.N * cfg.L
    depth = cfg.planner_layers + cfg.gen_layers
    decoder = d + T * d + depth * block_param_count(cfg.block(True)) + d + cfg.L * cfg.K * d
    return (cfg.L * cfg.K + cfg.id_buckets) * d + _context_params(cfg) + decoder


class FlatOutput(NamedTuple):
    logits: Tensor
    """[B, N, L, K] next-code logits under teacher forcing."""


class FlatContext(NamedTuple):
    mem_mask: Tensor
    """[B, M] bool memory mask."""
    mem: list[Memory]
    """Per decoder block: cross-attention keys/values [B, h, M, dh], or the raw memory
    [B, M, D] when the beam is narrow enough that the absorbed form is cheaper."""
    start: Tensor
    """[B, 1, D] the decoder's first input (BOS, plus the newest history item when
    ``start_from_last``, as HSD's planner)."""


class Flat(nn.Module):
    """Context encoder + one causal decoder over the flattened slate (see module docstring)."""

    def __init__(self, cfg: HSDConfig):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("HSDConfig: " + "; ".join(problems))
        self.cfg = cfg
        self.gradient_checkpointing = False
        d, T = cfg.d_model, cfg.N * cfg.L
        depth = cfg.planner_layers + cfg.gen_layers
        self.sid_emb = SidEmbedding(cfg.K, cfg.L, d, cfg.id_buckets)
        self.context = ContextEncoder(cfg)
        self.bos = nn.Parameter(torch.empty(1, 1, d))
        self.pos = nn.Embedding(T, d)
        self.decoder = make_blocks(cfg.block(cross=True), depth)
        self.norm = RMSNorm(d)
        self.heads = nn.Parameter(torch.empty(cfg.L, cfg.K, d))
        init_weights(self, cfg.ctx_layers + depth)

    @property
    def _ckpt(self) -> bool:
        return self.gradient_checkpointing and self.training

    def _encode(self, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """-> memory [B, M, D], mask [B, M], start [B, 1, D] (as HSD's)."""
        codes = hist_codes * hist_mask[..., None]  # codes on padding are ignored
        memory, mem_mask = self.context(self.sid_emb.item(codes), hist_mask, hist_fb, self._ckpt)
        return memory, mem_mask, start_token(self.bos, self.sid_emb, codes, hist_mask,
                                             self.cfg.start_from_last, memory.dtype)

    def _inputs(self, start: Tensor, tokens: Tensor) -> Tensor:
        """Decoder inputs for positions 0..t: start [B', 1, D], tokens [B', t] (flattened
        codes) -> [B', t+1, D].

        The input after an item's last code also carries that whole item's hashed identity
        (when ``id_buckets`` > 0), as HSD's planner reads each placed item's identity."""
        Bp, t = tokens.shape
        L = self.cfg.L
        layer = torch.arange(t, device=tokens.device) % L  # [t]
        emb = self.sid_emb(tokens, layer)  # [B', t, D]
        done = t // L  # items complete in the prefix
        if self.sid_emb.ids is not None and done:
            ident = self.sid_emb.identity(tokens[:, : done * L].reshape(Bp, done, L))
            emb = emb.clone()
            emb[:, L - 1: done * L: L] += ident.to(emb.dtype)
        x = torch.cat([start.to(emb.dtype), emb], dim=1)
        return x + positions(self.pos, 0, t + 1, x.device)

    def _logits(self, h: Tensor, start: int) -> Tensor:
        """h [B', T, D] of positions start..start+T-1 -> logits [B', T, K] (head t % L)."""
        T = h.shape[1]
        layer = torch.arange(start, start + T, device=h.device) % self.cfg.L  # [T]
        w = self.heads.to(h.dtype)[layer]  # [T, K, D]
        return torch.einsum("btd,tkd->btk", self.norm(h), w)

    def _teacher(self, memory: Tensor, mem_mask: Tensor, start: Tensor, slates: Tensor
                 ) -> Tensor:
        """start [B, 1, D], slates [B, S, N, L] -> logits [B, S, N, L, K]."""
        B, S, N, L = slates.shape
        if N > self.cfg.N or L != self.cfg.L:
            raise ValueError(f"slates have N={N}, L={L}; the model has N={self.cfg.N}, "
                             f"L={self.cfg.L}")
        tokens = slates.reshape(B * S, N * L)
        x = self._inputs(start.repeat_interleave(S, dim=0), tokens[:, :-1])  # [B*S, N*L, D]
        h = run_blocks(self.decoder, x, memory, mem_mask, checkpointing=self._ckpt)
        return self._logits(h, 0).reshape(B, S, N, L, -1)

    def forward(self, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor,
                target_codes: Tensor) -> FlatOutput:
        """[B, H, L], [B, H], [B, H], target_codes [B, N, L] -> logits [B, N, L, K]."""
        memory, mem_mask, start = self._encode(hist_codes, hist_mask, hist_fb)
        return FlatOutput(self._teacher(memory, mem_mask, start, target_codes[:, None])[:, 0])

    def slate_logprobs(self, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor,
                       slates: Tensor) -> Tensor:
        """slates [B, S, N, L] -> per-token log-probs [B, S, N, L] float32."""
        memory, mem_mask, start = self._encode(hist_codes, hist_mask, hist_fb)
        return token_logprobs(self._teacher(memory, mem_mask, start, slates), slates)

    # ---------------------------------------------------------------- decoding

    def encode_context(self, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor,
                       beam: int | None = None) -> FlatContext:
        """Encode the history once and prepare every block's cross-attention memory in the
        cheaper form for ``1 + (N*L - 1) * beam`` queries per context over N*L steps (projected
        keys/values when ``beam`` is None); the same rule as :meth:`HSD.encode_context`."""
        memory, mem_mask, start = self._encode(hist_codes, hist_mask, hist_fb)
        T = self.cfg.N * self.cfg.L
        queries = None if beam is None else 1 + (T - 1) * beam
        return FlatContext(mem_mask, project_memory(self.decoder, memory, queries=queries,
                                                    steps=T), start)

    def step(self, ctx: FlatContext, cache: Cache | None, tokens: Tensor | None = None
             ) -> tuple[Tensor, Cache]:
        """Token t = len(cache): input BOS (t = 0, B' = B rows) or the previous code, the last
        of ``tokens [B', t]`` (the beam's prefix so far, B' = B*G, b-major; after an item's
        last code its whole SID gives the identity input). Returns (logits [B', K] of token t,
        cache)."""
        t = cache_len(cache)
        L = self.cfg.L
        if t >= self.cfg.N * L:
            raise ValueError(f"step {t}: the slate has N*L={self.cfg.N * L} tokens")
        if t == 0:
            x = ctx.start
        else:
            if tokens is None or tokens.shape[1] != t:
                raise ValueError(f"step {t} needs the {t} tokens so far")
            x = self.sid_emb(tokens[:, -1], (t - 1) % L)[:, None]  # [B', 1, D]
            if t % L == 0 and self.sid_emb.ids is not None:
                x = x + self.sid_emb.identity(tokens[:, -L:])[:, None].to(x.dtype)
        x = x + positions(self.pos, t, t + 1, x.device)
        h, cache = step_blocks(self.decoder, x, ctx.mem, ctx.mem_mask, cache)
        return self._logits(h, t)[:, 0], cache

    def full_step(self, ctx: FlatContext, tokens: Tensor) -> Tensor:
        """Uncached reference of :meth:`step`: tokens [B', t] so far -> logits [B', K] of token t."""
        start = ctx.start.repeat_interleave(tokens.shape[0] // ctx.start.shape[0], dim=0)
        h, _ = step_blocks(self.decoder, self._inputs(start, tokens), ctx.mem, ctx.mem_mask, None)
        return self._logits(h[:, -1:], tokens.shape[1])[:, 0]


@dataclass
class FlatLossConfig:
    """The flat baseline's loss (the ``loss:`` section of stage flat)."""

    label_smoothing: float = 0.0
    """Label smoothing of the SID-token cross-entropy (0 = plain CE)."""

    def validate(self) -> list[str]:
        if not 0.0 <= self.label_smoothing < 1.0:
            return [f"label_smoothing must be in [0, 1), got {self.label_smoothing}"]
        return []


class FlatLossTerms(NamedTuple):
    total: Tensor
    """Mean CE over all B*N*L tokens."""
    acc: Tensor
    """Token accuracy."""


class FlatLoss(nn.Module):
    """Mean CE over all N*L SID tokens (float32), no parameters."""

    def __init__(self, cfg: FlatLossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, out: FlatOutput, target_codes: Tensor) -> FlatLossTerms:
        ce, acc = token_ce(out.logits, target_codes, self.cfg.label_smoothing)
        return FlatLossTerms(ce, acc)
