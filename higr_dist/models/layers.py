"""Transformer building blocks shared by HSD, the flat decoder and SASRec (pure torch).

Design
------
- Pre-norm blocks: ``x += SelfAttn(norm(x))``, optionally ``x += CrossAttn(norm(x), M)``, then
  ``x += MLP(norm(x))``; RMSNorm computed in float32; SwiGLU (default) or GELU MLP.
- Attention is :func:`torch.nn.functional.scaled_dot_product_attention` everywhere (flash /
  memory-efficient kernels on CUDA, the math kernel on CPU); no device-specific code, so the
  same modules run in fp32 or bf16, on CPU or CUDA.
- Incremental decoding: self-attention takes and returns a :class:`KV` cache (``[B, h, T, dh]``
  keys/values of the tokens seen so far). Each step appends; beam search reorders caches with
  :func:`reorder_cache`. Caches are plain tensors concatenated per step. HSD's caches stay
  tiny (<= N planner tokens, <= L generator tokens); the flat decoder's grow to N*L = 15
  tokens over 16 blocks and B*beam rows, and there the per-step concatenation plus the beam
  reorder are a sizeable share of its CPU time (bench/decode.py; figures: docs/BENCHMARKS.md,
  "Figures behind design choices"). A preallocated buffer written in place would remove the
  concatenation, not the reorder copy (the smaller part of that share); not done yet, noted in
  docs/BENCHMARKS.md.
- Cross-attention memory is projected to keys/values once per context (:meth:`CrossAttention.
  project`); decoders keep these projections for every step.
- Absorbed cross-attention for stacks that see few queries per context: projecting an
  M-token memory costs ``2 M D^2`` per block, whereas folding the key projection into the
  query (``q_h . W_k,h m = (W_k,h^T q_h) . m``) and the value projection into the output
  (``sum_i a_i W_v,h m_i = W_v,h sum_i a_i m_i``) costs ``2 D^2 + 2 h M D`` per query against the
  raw memory, plus a re-read of ``W_k, W_v`` per step. :func:`absorb_pays` picks the cheaper
  form from the queries and steps a decoder will send per context and the batch
  (:func:`project_memory`): HSD's slate planner sees only N queries per context, so beyond a
  batch of ~2 it attends to the raw memory; the item generator and the flat decoder (tens to
  hundreds of beam queries per context) keep the projected keys/values at beam 10. Same
  attention up to float rounding (the tests compare both forms); the absorbed form reads the
  ``kv`` weight directly, so it is for inference on plain modules (never ZeRO-3 partitions).
- Grouped queries against one memory: a cross-attention input may hold ``G`` sequences per
  memory row (``x [B*G, T, D]`` against memory ``[B, M, D]``, the G sequences of context b
  stored contiguously, b-major). Cross-attention has no causal structure, so the G sequences
  are folded into the query axis (``[B, G*T]``) and attend to the single copy of the memory:
  the HSD item generator (G = N slate positions, or beams) and slate scoring (G = candidate
  slates) never replicate the context. Trade-off: callers must keep rows b-major.
- Masks are boolean, True = may attend. Every query row must keep at least one key (SDPA
  returns NaN for a fully masked row); the models guarantee it (an always-valid context token,
  the diagonal for padded queries).
- Activation checkpointing: :func:`run_blocks` runs each block under
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` when asked (training only);
  the memory projection is recomputed inside the checkpoint, so nothing memory-sized is saved
  per block.
- Initialisation (GPT-2 style): linear and embedding weights N(0, 0.02); the residual output
  projections of attention and MLP are scaled by ``1/sqrt(2 * n_layers)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from higr_dist.models.params import whole

MLPKind = Literal["swiglu", "gelu"]


class KV(NamedTuple):
    """Keys and values of one attention layer."""

    k: Tensor
    """[B, h, T, dh]"""
    v: Tensor
    """[B, h, T, dh]"""


Cache = list[KV]
"""One :class:`KV` per block of a stack (self-attention only)."""

Memory = KV | Tensor
"""A cross-attention block's view of the memory while decoding: projected keys/values
``KV([B, h, M, dh] x 2)``, or the raw memory ``[B, M, D]`` for the absorbed form."""


@dataclass
class BlockConfig:
    """Shape of one Transformer block (filled by the models from their own configs)."""

    d_model: int = 64
    """Residual width D."""
    n_heads: int = 4
    """Attention heads (D must be divisible by it)."""
    ffn_mult: float = 4.0
    """MLP hidden size = ffn_mult * D (GELU) or 2/3 of it rounded up to a multiple of 8
    (SwiGLU, so both kinds have ~8 D^2 MLP weights)."""
    mlp: MLPKind = "swiglu"
    """MLP kind."""
    dropout: float = 0.0
    """Dropout on attention probabilities and on each residual branch (training only)."""
    cross: bool = False
    """Whether the block has cross-attention to a memory."""
    causal: bool = True
    """Causal self-attention (decoders) or bidirectional (the context encoder)."""


def mlp_hidden(cfg: BlockConfig) -> int:
    """Hidden size of the block's MLP."""
    if cfg.mlp == "swiglu":
        return 8 * math.ceil(cfg.ffn_mult * cfg.d_model * 2 / 3 / 8)
    return int(cfg.ffn_mult * cfg.d_model)


def block_param_count(cfg: BlockConfig) -> int:
    """Parameters of one :class:`Block` (no biases anywhere; norms have a weight vector)."""
    d, f = cfg.d_model, mlp_hidden(cfg)
    attn = 4 * d * d + d  # qkv + out + norm
    cross = (4 * d * d + d) if cfg.cross else 0
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * f + d
    return attn + cross + mlp


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, T, D] -> [B, h, T, dh]."""
    B, T, D = x.shape
    return x.view(B, T, n_heads, D // n_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """[B, h, T, dh] -> [B, T, D]."""
    B, h, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, h * dh)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an optional KV cache."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} not divisible by n_heads {cfg.n_heads}")
        self.n_heads, self.causal, self.dropout = cfg.n_heads, cfg.causal, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, past: KV | None = None, attn_mask: Tensor | None = None
                ) -> tuple[Tensor, KV]:
        """x [B, T, D]; past keys/values [B, h, P, dh]; ``attn_mask`` bool broadcastable to
        [B, h, T, P+T] (True = attend; overrides the causal rule). Returns (y [B, T, D], cache
        [B, h, P+T, dh])."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (_heads(t, self.n_heads) for t in (q, k, v))  # [B, h, T, dh]
        if past is not None:
            k = torch.cat([past.k, k], dim=2)  # [B, h, P+T, dh]
            v = torch.cat([past.v, v], dim=2)
        T, S = q.shape[2], k.shape[2]
        is_causal = False
        if attn_mask is None and self.causal and T > 1:
            if S == T:
                is_causal = True
            else:  # query i sits at absolute position S - T + i
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                           is_causal=is_causal)  # [B, h, T, dh]
        return self.out(_merge(y)), KV(k, v)


class CrossAttention(nn.Module):
    """Multi-head attention from decoder tokens to a memory, with grouped queries.

    ``x [B*G, T, D]`` holds G sequences per memory row (b-major); they are folded into the
    query axis so the memory is never replicated (see the module docstring).
    """

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} not divisible by n_heads {cfg.n_heads}")
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def project(self, memory: Tensor) -> KV:
        """memory [B, M, D] -> keys/values [B, h, M, dh] (once per context)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return KV(_heads(k, self.n_heads), _heads(v, self.n_heads))

    def forward(self, x: Tensor, mem: Memory, mem_mask: Tensor) -> Tensor:
        """x [B*G, T, D], mem = keys/values [B, h, M, dh] (:meth:`project`) or the raw memory
        [B, M, D] (absorbed form, :meth:`attend_raw`), mem_mask [B, M] bool -> [B*G, T, D]."""
        if isinstance(mem, Tensor):
            return self.attend_raw(x, mem, mem_mask)
        B = mem.k.shape[0]
        BG, T, D = x.shape
        if BG % B:
            raise ValueError(f"cross-attention: {BG} query rows for {B} memory rows")
        q = _heads(self.q(x).reshape(B, (BG // B) * T, D), self.n_heads)  # [B, h, G*T, dh]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, mem.k, mem.v, attn_mask=mem_mask[:, None, None, :],
                                           dropout_p=p)  # [B, h, G*T, dh]
        return self.out(_merge(y).reshape(BG, T, D))

    def attend_raw(self, x: Tensor, memory: Tensor, mem_mask: Tensor) -> Tensor:
        """Absorbed form against the unprojected memory (see the module docstring): x [B*G, T,
        D], memory [B, M, D], mem_mask [B, M] bool -> [B*G, T, D]. Cost per query
        ``2 D^2 + 2 h M D`` instead of ``2 M D^2`` per context for :meth:`project`."""
        B, M, D = memory.shape
        BG, T, _ = x.shape
        if BG % B:
            raise ValueError(f"cross-attention: {BG} query rows for {B} memory rows")
        h = self.n_heads
        dh = D // h
        Q = (BG // B) * T
        q = self.q(x).view(B * Q, h, dh).transpose(0, 1)  # [h, B*Q, dh]
        wk, wv = self.kv.weight.to(x.dtype).view(2, h, dh, D)  # rows of W_k / W_v by head
        qk = torch.bmm(q, wk).view(h, B, Q, D).transpose(0, 1).reshape(B, h * Q, D)
        att = torch.bmm(qk, memory.transpose(1, 2)).float() * dh ** -0.5  # [B, h*Q, M]
        att = att.masked_fill(~mem_mask[:, None, :], float("-inf")).softmax(-1)
        att = F.dropout(att, self.dropout, self.training).to(x.dtype)
        ctx = torch.bmm(att, memory).view(B, h, Q, D).transpose(0, 1).reshape(h, B * Q, D)
        y = torch.bmm(ctx, wv.transpose(1, 2)).transpose(0, 1)  # [B*Q, h, dh]
        return self.out(y.reshape(BG, T, D))


WEIGHT_READ_MACS = 16
"""Cost of reading one weight element, in multiply-adds, for :func:`absorb_pays`: the
absorbed form re-reads ``W_k, W_v`` at every decoding step, which dominates at batch ~1 where
matmuls are memory-bound (~16 on the CPUs measured in bench/decode.py)."""


def absorb_pays(queries: int, steps: int, batch: int, M: int, d_model: int, n_heads: int) -> bool:
    """Whether a decoder sending ``queries`` queries per context over ``steps`` steps, for
    ``batch`` contexts, is cheaper with the absorbed form (``batch * queries * (2 D^2 + 2 h M D)``
    multiply-adds + ``steps`` reads of the ``2 D^2`` key/value weights) than projecting the
    M-token memory (``batch * 2 M D^2`` + one read of those weights)."""
    D, W = d_model, WEIGHT_READ_MACS
    projected = batch * 2 * M * D * D + W * 2 * D * D
    absorbed = batch * queries * (2 * D * D + 2 * n_heads * M * D) + steps * W * 2 * D * D
    return absorbed < projected


class MLP(nn.Module):
    """SwiGLU (``w2(silu(w1 x) * w3 x)``) or GELU MLP, no biases."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.kind = cfg.mlp
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False) if cfg.mlp == "swiglu" else None
        self.out = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.w3 is not None:
            return self.out(F.silu(self.w1(x)) * self.w3(x))
        return self.out(F.gelu(self.w1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: self-attention [+ cross-attention] + MLP."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.norm_attn = RMSNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.norm_cross = RMSNorm(cfg.d_model) if cfg.cross else None
        self.cross = CrossAttention(cfg) if cfg.cross else None
        self.norm_mlp = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mem: Memory | None = None, mem_mask: Tensor | None = None,
                past: KV | None = None, attn_mask: Tensor | None = None) -> tuple[Tensor, KV]:
        """x [B*G, T, D]; mem (:data:`Memory`) + mem_mask [B, M] (cross blocks only); past
        [B*G, h, P, dh]. Returns (x [B*G, T, D], self-attention cache [B*G, h, P+T, dh])."""
        a, kv = self.attn(self.norm_attn(x), past, attn_mask)
        x = x + self._drop(a)
        if self.cross is not None:
            if mem is None or mem_mask is None:
                raise ValueError("a cross-attention block needs mem and mem_mask")
            x = x + self._drop(self.cross(self.norm_cross(x), mem, mem_mask))
        x = x + self._drop(self.mlp(self.norm_mlp(x)))
        return x, kv

    def _drop(self, y: Tensor) -> Tensor:
        """Residual dropout; skipped outright in eval (decoding runs dozens of block calls per
        slate, and an idle module call costs as much as a small op)."""
        return self.drop(y) if self.training and self.drop.p > 0 else y


def make_blocks(cfg: BlockConfig, n_layers: int) -> nn.ModuleList:
    return nn.ModuleList(Block(cfg) for _ in range(n_layers))


def project_memory(blocks: nn.ModuleList, memory: Tensor, queries: int | None = None,
                   steps: int = 1) -> list[Memory]:
    """Per-block cross-attention memory for decoding (once per context): keys/values of
    ``memory [B, M, D]``, or the raw memory itself for every block (absorbed form) when a
    decoder sending ``queries`` queries per context over ``steps`` steps makes
    :func:`absorb_pays` (``queries`` None: always keys/values)."""
    if not blocks:
        return []
    B, M, D = memory.shape
    if queries is not None and absorb_pays(queries, steps, B, M, D, blocks[0].cross.n_heads):
        return [memory for _ in blocks]
    return [b.cross.project(memory) for b in blocks]


def _block_train(block: Block, x: Tensor, memory: Tensor | None, mem_mask: Tensor | None,
                 attn_mask: Tensor | None) -> Tensor:
    mem = block.cross.project(memory) if block.cross is not None and memory is not None else None
    return block(x, mem, mem_mask, None, attn_mask)[0]


def run_blocks(blocks: nn.ModuleList, x: Tensor, memory: Tensor | None = None,
               mem_mask: Tensor | None = None, attn_mask: Tensor | None = None,
               checkpointing: bool = False) -> Tensor:
    """Full-sequence pass (training / scoring, no cache): x [B*G, T, D] -> [B*G, T, D].

    ``memory [B, M, D]`` is projected inside each block; with ``checkpointing`` every block
    (projection included) is recomputed in backward.
    """
    for block in blocks:
        if checkpointing:
            x = checkpoint(_block_train, block, x, memory, mem_mask, attn_mask,
                           use_reentrant=False)
        else:
            x = _block_train(block, x, memory, mem_mask, attn_mask)
    return x


def step_blocks(blocks: nn.ModuleList, x: Tensor, mem: list[Memory] | None,
                mem_mask: Tensor | None, cache: Cache | None) -> tuple[Tensor, Cache]:
    """Incremental pass with KV caches: x [B*G, T, D] (usually T = 1), ``mem`` from
    :func:`project_memory`. Returns (x [B*G, T, D], the extended caches)."""
    new: Cache = []
    for i, block in enumerate(blocks):
        x, kv = block(x, mem[i] if mem is not None else None, mem_mask,
                      cache[i] if cache is not None else None)
        new.append(kv)
    return x, new


def reorder_cache(cache: Cache, index: Tensor) -> Cache:
    """Select/reorder cache rows: ``index [B']`` long into the batch axis (beam search)."""
    return [KV(kv.k.index_select(0, index), kv.v.index_select(0, index)) for kv in cache]


def cache_len(cache: Cache | None) -> int:
    """Tokens already in a cache (0 for None)."""
    return 0 if not cache else int(cache[0].k.shape[2])


def init_weights(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 initialisation of a model built from these layers (in place; partitioned
    parameters are gathered one at a time, ``higr_dist.models.params``)."""
    for name, p in module.named_parameters():
        with whole(p):
            if p.dim() < 2:
                continue  # norm gains stay 1
            if name.endswith("out.weight") and ("attn" in name or "cross" in name
                                                or "mlp" in name):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * max(1, n_layers)))
            else:
                nn.init.normal_(p, 0.0, std)
