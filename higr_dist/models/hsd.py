"""HSD, the hierarchical slate decoder (HiGR stage 2; METHOD.md eq. 5-12).

Design
------
Three parts, all sharing one width D and one SID embedding (one table per SID layer, an item
is the sum of its L code embeddings, eq. 5-6):

- **Context encoder** (:class:`ContextEncoder`): a bidirectional Transformer over the history
  (item SID embedding + recency position + bucketed watch-ratio embedding) behind one learned,
  always-valid context token -> memory ``M [B, 1+H, D]`` and its mask. The context token keeps
  every attention row non-empty (a user with no history still has one key), and recency
  positions (0 = the newest item) make the encoding independent of how the batch is padded.
- **Slate planner**: causal Transformer with cross-attention to M over
  ``[BOS, p_1 .. p_{N-1}]`` (learned slate positions), ``p_j = sum_l Emb_l(s_j^l)``; output
  ``h_1..h_N`` and the planned preferences ``P_j = W h_j`` (eq. 7).
- **Item generator** (shared by all positions): causal Transformer with cross-attention to M
  over ``[P_j, Emb_1(s_j^1) .. Emb_{L-1}(s_j^{L-1})]`` (learned code positions), one output
  head per SID layer predicting ``s_j^1 .. s_j^L`` (eq. 8-9). The N positions (and any number
  of candidate slates) run as one batch of short sequences whose cross-attention folds them
  onto a single copy of the memory (:class:`~higr_dist.models.layers.CrossAttention`).

Teacher forcing (:meth:`HSD.forward`, :meth:`HSD.slate_logprobs`) runs planner and generator
once over whole slates. Decoding (``higr_dist.decode.hier``) uses :meth:`HSD.encode_context`
(memory and the per-layer cross-attention keys/values, once per context),
:meth:`HSD.planner_step` and :meth:`HSD.generator_step` (one token each, KV-cached): N
planner steps and N*L generator steps per slate.

Loss (:class:`HSDLoss`, eq. 10-12): mean CE over all N*L tokens (float32 logits) +
``lambda_ild * L_ild`` with ``L_ild = 2/(N(N-1)) sum_{i<j} cos(P_i, P_j)``.

Outputs are NamedTuples (DeepSpeed walks tuples to hook ZeRO-3 backward; it skips dataclasses).
Trade-offs: output heads are not tied to the SID embeddings (L*K*D extra weights, < 2% of the
25M model) so input and output code spaces can differ; the context encoder's depth is its
own knob (``ctx_layers``), outside the paper's 16-layer planner+generator budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from higr_dist.models.layers import (
    BlockConfig,
    Cache,
    Memory,
    MLPKind,
    RMSNorm,
    block_param_count,
    cache_len,
    init_weights,
    make_blocks,
    project_memory,
    run_blocks,
    step_blocks,
)

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class HSDConfig:
    """The HSD model (the ``model:`` section of stages hsd, flat, orpo and dpo)."""

    K: int = 256
    """Codebook size per SID layer (must match the tokenizer's sid_meta.json)."""
    L: int = 3
    """Codes per item (paper: 3; must match the tokenizer)."""
    N: int = 5
    """Slate size (paper: 5)."""
    d_model: int = 288
    """Width D of every part (context encoder, planner, generator)."""
    n_heads: int = 4
    """Attention heads (d_model must be divisible by it)."""
    ctx_layers: int = 4
    """Context encoder depth (bidirectional self-attention over the history)."""
    planner_layers: int = 14
    """Slate planner depth L_p (paper default 14 of a total 16)."""
    gen_layers: int = 2
    """Item generator depth L_g (paper default 2). The flat baseline uses one decoder of depth
    planner_layers + gen_layers."""
    history_len: int = 50
    """Most recent history items kept (recency positions 0..history_len-1)."""
    ffn_mult: float = 4.0
    """MLP width multiplier (SwiGLU uses 2/3 of it, so both MLP kinds cost ~8 D^2)."""
    mlp: MLPKind = "swiglu"
    """MLP kind: swiglu or gelu."""
    dropout: float = 0.1
    """Dropout on attention probabilities and residual branches (training only)."""
    fb_boundaries: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0, 2.0, 4.0])
    """Watch-ratio bucket edges for the history feedback embedding (len+1 buckets; a value
    equal to an edge falls in the upper bucket). Defaults follow DESIGN.md's negative (0.2),
    engaged (1.0) and effective (2.0) thresholds."""
    start_from_last: bool = True
    """The decoders' first input (BOS) also carries the embedding of the newest history item,
    so a slate continues the sequence where it stopped (:func:`newest_item`); without it the
    newest item reaches the planner only through cross-attention over the whole memory."""
    id_buckets: int = 0
    """Rows of the hashed item-identity table (:class:`HashedIdEmbedding`) added to every
    item embedding the model *reads* (history items, the planner's placed items); 0 = no
    identity embedding, items are only the sum of their code embeddings."""

    def validate(self) -> list[str]:
        problems = []
        if self.K < 2 or self.L < 1 or self.N < 1:
            problems.append(f"need K >= 2, L >= 1, N >= 1 (got K={self.K}, L={self.L}, N={self.N})")
        elif self.L * math.log2(self.K) > 62:
            problems.append(f"K^L = {self.K}^{self.L} does not fit a packed int64 SID key")
        if self.d_model < 1 or self.n_heads < 1 or self.d_model % self.n_heads:
            problems.append(f"d_model {self.d_model} must be a positive multiple of n_heads "
                            f"{self.n_heads}")
        if self.ctx_layers < 0 or self.planner_layers < 1 or self.gen_layers < 1:
            problems.append("need ctx_layers >= 0, planner_layers >= 1, gen_layers >= 1")
        if self.history_len < 1:
            problems.append(f"history_len must be >= 1, got {self.history_len}")
        if self.ffn_mult <= 0 or not 0.0 <= self.dropout < 1.0:
            problems.append("need ffn_mult > 0 and 0 <= dropout < 1")
        if list(self.fb_boundaries) != sorted(self.fb_boundaries):
            problems.append(f"fb_boundaries must be ascending, got {self.fb_boundaries}")
        if self.id_buckets < 0:
            problems.append(f"id_buckets must be >= 0 (0 = off), got {self.id_buckets}")
        return problems

    def block(self, cross: bool, causal: bool = True) -> BlockConfig:
        return BlockConfig(d_model=self.d_model, n_heads=self.n_heads, ffn_mult=self.ffn_mult,
                           mlp=self.mlp, dropout=self.dropout, cross=cross, causal=causal)


def _context_params(cfg: HSDConfig) -> int:
    d = cfg.d_model
    embeds = d * (1 + cfg.history_len + len(cfg.fb_boundaries) + 1)  # ctx token, pos, fb
    return embeds + cfg.ctx_layers * block_param_count(cfg.block(cross=False, causal=False)) + d


def param_count(cfg: HSDConfig) -> int:
    """Exact parameter count of ``HSD(cfg)`` (the tests check it against the module)."""
    d = cfg.d_model
    sid = (cfg.L * cfg.K + cfg.id_buckets) * d
    planner = d * (1 + cfg.N) + cfg.planner_layers * block_param_count(cfg.block(True)) + d + d * d
    gen = cfg.L * d + cfg.gen_layers * block_param_count(cfg.block(True)) + d + cfg.L * cfg.K * d
    return sid + _context_params(cfg) + planner + gen


def _ladder(d: int, heads: int, ctx: int, planner: int, gen: int) -> HSDConfig:
    return HSDConfig(d_model=d, n_heads=heads, ctx_layers=ctx, planner_layers=planner,
                     gen_layers=gen)


PRESETS: dict[str, HSDConfig] = {
    # CPU tests and the demo: fast steps on 2 cores (docs/BENCHMARKS.md, "Engine overhead")
    "tiny": HSDConfig(K=32, L=3, N=5, d_model=32, n_heads=2, ctx_layers=1, planner_layers=2,
                      gen_layers=1, history_len=20, dropout=0.0),
    # the paper's sizes: planner + generator depth 16 (14 + 2), K=256, L=3, N=5
    "25m": _ladder(288, 4, 4, 14, 2),
    "100m": _ladder(576, 9, 4, 14, 2),
    # scaling ladder (same 14:2 planner:generator ratio while depth grows; head_dim 64)
    "0.05b": _ladder(384, 6, 6, 14, 2),
    "0.1b": _ladder(576, 9, 4, 14, 2),
    "0.2b": _ladder(768, 12, 6, 14, 2),
    "0.5b": _ladder(1024, 16, 6, 21, 3),
    "1b": _ladder(1280, 20, 8, 28, 4),
    "2b": _ladder(1664, 26, 8, 35, 5),
}
"""Named model sizes; :func:`preset` returns a copy. Parameter counts: see :func:`param_count`."""


def preset(name: str) -> HSDConfig:
    """A fresh copy of the named preset (``tiny``, ``25m``, ``100m``, ``0.05b`` .. ``2b``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown HSD preset {name!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return replace(cfg, fb_boundaries=list(cfg.fb_boundaries))


# --------------------------------------------------------------------------------------------
# Shared pieces (also used by the flat baseline)
# --------------------------------------------------------------------------------------------


#: universal hashing of packed SID keys: ((key mod P) * a + b) mod P, P = 2^31 - 1, so every
#: product stays below 2^62 in int64
_HASH_P = (1 << 31) - 1
_HASH_AB = ((1_103_515_245, 12_345), (2_147_483_629, 40_503))


class HashedIdEmbedding(nn.Module):
    """Item identity from its full SID: two hashes of the packed SID into one table, summed.

    After collision resolution an item's L codes are unique, so the packed SID *is* an item
    id, known wherever codes are (history, teacher forcing, every decoding step) without a
    second id input. Sparse id features of this kind are what industrial generative
    recommenders put next to semantic ids on the history side: code embeddings are shared by
    every item under a prefix, so on their own they blur items that a user's next step tells
    apart (an item-to-item log, METHOD.md "When semantic IDs lose to item IDs"). Two hashes
    into one table ("hash embeddings") make a full collision of two items rare
    (~2 / buckets^2) while the table stays at ``buckets`` rows for any catalogue.
    """

    def __init__(self, K: int, L: int, buckets: int, d: int):
        super().__init__()
        self.K, self.L, self.buckets = K, L, buckets
        self.weight = nn.Parameter(torch.empty(buckets, d))

    def hashes(self, codes: Tensor) -> Tensor:
        """codes [..., L] long -> bucket ids [..., 2] long."""
        key = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for i in range(self.L):
            key = (key * self.K + codes[..., i]) % _HASH_P
        return torch.stack([((key * a + b) % _HASH_P) % self.buckets for a, b in _HASH_AB], -1)

    def forward(self, codes: Tensor) -> Tensor:
        """codes [..., L] -> [..., D]."""
        return F.embedding(self.hashes(codes), self.weight).sum(-2)


class SidEmbedding(nn.Module):
    """One embedding table per SID layer, stored as one ``[L*K, D]`` table, plus the optional
    hashed identity table (``id_buckets`` > 0) that :meth:`item` adds.

    Every lookup goes through a module's ``forward`` (the helpers call ``self(...)``), so
    DeepSpeed ZeRO-3 gathers the tables whenever they are used.
    """

    def __init__(self, K: int, L: int, d: int, id_buckets: int = 0):
        super().__init__()
        self.K, self.L = K, L
        self.weight = nn.Parameter(torch.empty(L * K, d))
        self.ids = HashedIdEmbedding(K, L, id_buckets, d) if id_buckets else None
        self.register_buffer("layer_ids", torch.arange(L), persistent=False)  # [L]

    def forward(self, codes: Tensor, layer: Tensor | int) -> Tensor:
        """``Emb_layer(codes)``: codes [...] long, 0-based ``layer`` broadcastable to codes ->
        [..., D]."""
        return F.embedding(codes + layer * self.K, self.weight)

    def item(self, codes: Tensor) -> Tensor:
        """Embedding of a whole item as input: ``sum_l Emb_l(s^l)`` (eq. 5-6) plus its hashed
        identity when enabled: codes [..., L] -> [..., D]."""
        emb = self(codes, self.layer_ids).sum(-2)
        return emb if self.ids is None else emb + self.ids(codes)

    def identity(self, codes: Tensor) -> Tensor:
        """The hashed identity part alone (zeros when disabled): codes [..., L] -> [..., D]."""
        if self.ids is None:
            return self.weight.new_zeros(*codes.shape[:-1], self.weight.shape[-1])
        return self.ids(codes)

    def layers(self, codes: Tensor) -> Tensor:
        """Per-layer embeddings: codes [..., l] (layers 0..l-1) -> [..., l, D]."""
        return self(codes, self.layer_ids[: codes.shape[-1]])


def positions(table: nn.Embedding, start: int, stop: int, device: torch.device) -> Tensor:
    """Rows start..stop-1 of a position table, looked up through its forward (ZeRO-3 safe):
    -> [stop - start, D]."""
    return table(torch.arange(start, stop, device=device))


def recency_positions(mask: Tensor, max_pos: int) -> Tensor:
    """mask [B, H] bool -> [B, H] long: 0 for the newest valid item, 1 for the one before ...
    (clamped to max_pos - 1; 0 on padding). Independent of where the padding sits."""
    after = mask.flip(-1).long().cumsum(-1).flip(-1) - 1  # valid items at or after i, minus 1
    return (after * mask).clamp(0, max_pos - 1)


def newest_item(hist_codes: Tensor, hist_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The newest valid history item of each row (histories are oldest first, any padding):
    hist_codes [B, H, L], hist_mask [B, H] -> (codes [B, L], present [B] bool)."""
    mask = hist_mask.bool()
    H = mask.shape[1]
    idx = torch.where(mask, torch.arange(H, device=mask.device), -1).amax(1)  # [B], -1 = none
    present = idx >= 0
    codes = hist_codes.gather(1, idx.clamp(min=0)[:, None, None].expand(-1, 1, hist_codes.shape[-1]))
    return codes[:, 0] * present[:, None], present


def start_token(bos: Tensor, sid_emb: SidEmbedding, hist_codes: Tensor, hist_mask: Tensor,
                from_last: bool, dtype: torch.dtype) -> Tensor:
    """A decoder's first input: the learned BOS [1, 1, D], plus (``from_last``) the input
    embedding of each row's newest history item -> [B, 1, D]."""
    B = hist_codes.shape[0]
    start = bos.to(dtype).expand(B, 1, -1)
    if not from_last:
        return start
    codes, present = newest_item(hist_codes, hist_mask)
    last = sid_emb.item(codes).to(dtype) * present[:, None].to(dtype)  # [B, D]
    return start + last[:, None]


class ContextEncoder(nn.Module):
    """History -> memory ``[B, 1+H, D]`` and mask ``[B, 1+H]`` (slot 0 = context token)."""

    def __init__(self, cfg: HSDConfig):
        super().__init__()
        d = cfg.d_model
        self.history_len = cfg.history_len
        self.ctx_token = nn.Parameter(torch.empty(1, 1, d))
        self.pos = nn.Embedding(cfg.history_len, d)
        self.register_buffer("fb_edges", torch.tensor(list(cfg.fb_boundaries), dtype=torch.float32),
                             persistent=False)
        self.fb = nn.Embedding(len(cfg.fb_boundaries) + 1, d)
        self.blocks = make_blocks(cfg.block(cross=False, causal=False), cfg.ctx_layers)
        self.norm = RMSNorm(d)

    def forward(self, item_emb: Tensor, hist_mask: Tensor, hist_fb: Tensor,
                checkpointing: bool = False) -> tuple[Tensor, Tensor]:
        """item_emb [B, H, D], hist_mask [B, H] bool, hist_fb [B, H] watch ratios ->
        (memory [B, 1+H, D], mask [B, 1+H] bool)."""
        B = item_emb.shape[0]
        mask = hist_mask.bool()
        bucket = torch.bucketize(hist_fb.float(), self.fb_edges, right=True)  # [B, H]
        x = item_emb + self.pos(recency_positions(mask, self.history_len)) + self.fb(bucket)
        x = x * mask[..., None].to(x.dtype)  # padding rows carry nothing
        x = torch.cat([self.ctx_token.to(x.dtype).expand(B, 1, -1), x], dim=1)  # [B, 1+H, D]
        mem_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # [B, 1+H]
        x = run_blocks(self.blocks, x, attn_mask=mem_mask[:, None, None, :],
                       checkpointing=checkpointing)
        return self.norm(x), mem_mask


def token_logprobs(logits: Tensor, codes: Tensor) -> Tensor:
    """log p(code): logits [..., K], codes [...] -> [...] float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, codes[..., None]).squeeze(-1)


# --------------------------------------------------------------------------------------------
# HSD
# --------------------------------------------------------------------------------------------


class HSDOutput(NamedTuple):
    logits: Tensor
    """[B, N, L, K] next-code logits under teacher forcing."""
    plan: Tensor
    """[B, N, D] planned preference embeddings P_j (eq. 7)."""


class HSDContext(NamedTuple):
    """A context encoded once for decoding."""

    mem_mask: Tensor
    """[B, M] bool memory mask."""
    planner_mem: list[Memory]
    """Per planner block: the raw memory [B, M, D] (absorbed cross-attention: the planner sends
    only N queries per context) or keys/values [B, h, M, dh] when projecting is cheaper."""
    gen_mem: list[Memory]
    """Per generator block: cross-attention keys/values [B, h, M, dh] (or the raw memory when
    the beam is narrow enough that the absorbed form is cheaper)."""
    start: Tensor
    """[B, 1, D] the planner's first input (BOS, plus the newest history item when
    ``start_from_last``)."""


class HSD(nn.Module):
    """Context encoder + slate planner + item generator (see the module docstring)."""

    def __init__(self, cfg: HSDConfig):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("HSDConfig: " + "; ".join(problems))
        self.cfg = cfg
        self.gradient_checkpointing = False
        d = cfg.d_model
        self.sid_emb = SidEmbedding(cfg.K, cfg.L, d, cfg.id_buckets)
        self.context = ContextEncoder(cfg)
        self.bos = nn.Parameter(torch.empty(1, 1, d))
        self.planner_pos = nn.Embedding(cfg.N, d)
        self.planner = make_blocks(cfg.block(cross=True), cfg.planner_layers)
        self.planner_norm = RMSNorm(d)
        self.plan_proj = nn.Linear(d, d, bias=False)  # W of eq. 7
        self.gen_pos = nn.Embedding(cfg.L, d)
        self.generator = make_blocks(cfg.block(cross=True), cfg.gen_layers)
        self.gen_norm = RMSNorm(d)
        self.heads = nn.Parameter(torch.empty(cfg.L, cfg.K, d))  # one output head per layer
        init_weights(self, cfg.ctx_layers + cfg.planner_layers + cfg.gen_layers)

    @property
    def _ckpt(self) -> bool:
        return self.gradient_checkpointing and self.training

    # ---------------------------------------------------------------- teacher forcing

    def _encode(self, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """-> memory [B, M, D], mask [B, M], start [B, 1, D] (the planner's first input).
        Codes on padding are ignored (zeroed first)."""
        codes = hist_codes * hist_mask[..., None]
        items = self.sid_emb.item(codes)  # [B, H, D]
        memory, mem_mask = self.context(items, hist_mask, hist_fb, self._ckpt)
        return memory, mem_mask, start_token(self.bos, self.sid_emb, codes, hist_mask,
                                             self.cfg.start_from_last, memory.dtype)

    def _teacher(self, memory: Tensor, mem_mask: Tensor, start: Tensor, slates: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """memory [B, M, D], start [B, 1, D], slates [B, S, N, L] -> (logits [B, S, N, L, K],
        plan [B, S, N, D])."""
        B, S, N, L = slates.shape
        if N > self.cfg.N or L != self.cfg.L:
            raise ValueError(f"slates have N={N}, L={L}; the model has N={self.cfg.N}, "
                             f"L={self.cfg.L}")
        pref = self.sid_emb.item(slates).reshape(B * S, N, -1)  # [B*S, N, D]
        bos = start.to(pref.dtype).repeat_interleave(S, dim=0)  # [B*S, 1, D], b-major
        x = torch.cat([bos, pref[:, : N - 1]], dim=1)  # [B*S, N, D]
        x = x + positions(self.planner_pos, 0, N, x.device)
        h = run_blocks(self.planner, x, memory, mem_mask, checkpointing=self._ckpt)
        plan = self.plan_proj(self.planner_norm(h))  # [B*S, N, D]
        codes_in = self.sid_emb.layers(slates[..., : L - 1]).reshape(B * S * N, L - 1, -1)
        g = torch.cat([plan.reshape(B * S * N, 1, -1), codes_in], dim=1)  # [B*S*N, L, D]
        g = g + positions(self.gen_pos, 0, L, g.device)
        g = self.gen_norm(run_blocks(self.generator, g, memory, mem_mask,
                                     checkpointing=self._ckpt))  # [B*S*N, L, D]
        logits = torch.einsum("rld,lkd->rlk", g, self.heads.to(g.dtype))  # [B*S*N, L, K]
        return logits.reshape(B, S, N, L, -1), plan.reshape(B, S, N, -1)

    def forward(self, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor,
                target_codes: Tensor) -> HSDOutput:
        """hist_codes [B, H, L] long, hist_mask [B, H] bool, hist_fb [B, H] float, target_codes
        [B, N, L] long -> logits [B, N, L, K], plan [B, N, D] (teacher forcing)."""
        memory, mem_mask, start = self._encode(hist_codes, hist_mask, hist_fb)
        logits, plan = self._teacher(memory, mem_mask, start, target_codes[:, None])
        return HSDOutput(logits[:, 0], plan[:, 0])

    def slate_logprobs(self, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor,
                       slates: Tensor) -> Tensor:
        """Per-token log-probs of S candidate slates per context: slates [B, S, N, L] ->
        [B, S, N, L] float32 (teacher forcing; the context is encoded once)."""
        memory, mem_mask, start = self._encode(hist_codes, hist_mask, hist_fb)
        logits, _ = self._teacher(memory, mem_mask, start, slates)  # [B, S, N, L, K]
        return token_logprobs(logits, slates)

    # ---------------------------------------------------------------- decoding

    def encode_context(self, hist_codes: Tensor, hist_mask: Tensor, hist_fb: Tensor,
                       beam: int | None = None) -> HSDContext:
        """Encode the history once and prepare every cross-attention block's memory. Each
        stack gets the cheaper form for the queries it will send per context over its steps
        (:func:`~higr_dist.models.layers.absorb_pays`): the greedy planner N queries in N
        steps; the generator ``N * (1 + (L-1) * beam)`` in N*L steps when ``beam`` is given
        (else projected keys/values)."""
        memory, mem_mask, start = self._encode(hist_codes, hist_mask, hist_fb)
        cfg = self.cfg
        gen_queries = None if beam is None else cfg.N * (1 + (cfg.L - 1) * beam)
        return HSDContext(mem_mask,
                          project_memory(self.planner, memory, queries=cfg.N, steps=cfg.N),
                          project_memory(self.generator, memory, queries=gen_queries,
                                         steps=cfg.N * cfg.L), start)

    def pref_embedding(self, codes: Tensor) -> Tensor:
        """p_j of placed items: codes [..., L] -> [..., D] (eq. 5-6)."""
        return self.sid_emb.item(codes)

    def planner_step(self, ctx: HSDContext, prev_codes: Tensor | None, cache: Cache | None
                     ) -> tuple[Tensor, Cache]:
        """One planner step for slate position j = len(cache): input BOS (``prev_codes`` None,
        j = 0) or p_{j-1} of the item placed last (prev_codes [B', L], B' = B*G b-major).
        Returns (P_j [B', D], the extended cache)."""
        j = cache_len(cache)
        if (prev_codes is None) != (j == 0):
            raise ValueError(f"planner step {j}: give prev_codes exactly when j > 0")
        if j >= self.cfg.N:
            raise ValueError(f"planner step {j}: the model plans N={self.cfg.N} positions")
        if prev_codes is None:
            x = ctx.start
        else:
            x = self.sid_emb.item(prev_codes)[:, None]  # [B', 1, D]
        x = x + positions(self.planner_pos, j, j + 1, x.device)
        h, cache = step_blocks(self.planner, x, ctx.planner_mem, ctx.mem_mask, cache)
        return self.plan_proj(self.planner_norm(h))[:, 0], cache

    def generator_step(self, ctx: HSDContext, cache: Cache | None, plan: Tensor | None = None,
                       prev_code: Tensor | None = None) -> tuple[Tensor, Cache]:
        """One generator step for SID layer l = len(cache): input P_j (``plan [B', D]``, l = 0)
        or the previous code (``prev_code [B']`` long, layer l-1). B' = B*G rows, b-major.
        Returns (logits [B', K] of layer l, the extended cache)."""
        layer = cache_len(cache)
        if layer >= self.cfg.L:
            raise ValueError(f"generator step {layer}: items have L={self.cfg.L} codes")
        if layer == 0:
            if plan is None:
                raise ValueError("generator step 0 needs plan")
            x = plan[:, None]
        else:
            if prev_code is None:
                raise ValueError(f"generator step {layer} needs prev_code")
            x = self.sid_emb(prev_code, layer - 1)[:, None]  # [B', 1, D]
        x = x + positions(self.gen_pos, layer, layer + 1, x.device)
        g, cache = step_blocks(self.generator, x, ctx.gen_mem, ctx.mem_mask, cache)
        logits = self.gen_norm(g)[:, 0] @ self.heads[layer].to(g.dtype).T  # [B', K]
        return logits, cache

    def planner_full(self, ctx: HSDContext, placed_codes: Tensor) -> Tensor:
        """Uncached reference of :meth:`planner_step`: placed_codes [B', j, L] (the items placed
        so far) -> P_j [B', D], recomputing the whole prefix."""
        Bp, j, _ = placed_codes.shape
        bos = ctx.start.repeat_interleave(Bp // ctx.start.shape[0], dim=0)  # [B', 1, D]
        x = torch.cat([bos, self.sid_emb.item(placed_codes).to(bos.dtype)], dim=1)
        h, _ = step_blocks(self.planner, x + positions(self.planner_pos, 0, j + 1, x.device),
                           ctx.planner_mem,
                           ctx.mem_mask, None)
        return self.plan_proj(self.planner_norm(h[:, -1]))

    def generator_full(self, ctx: HSDContext, plan: Tensor, prefix: Tensor) -> Tensor:
        """Uncached reference of :meth:`generator_step`: plan [B', D], prefix [B', l] codes ->
        logits [B', K] of layer l, recomputing the whole prefix."""
        layer = prefix.shape[1]
        x = torch.cat([plan[:, None], self.sid_emb.layers(prefix).to(plan.dtype)], dim=1)
        g, _ = step_blocks(self.generator, x + positions(self.gen_pos, 0, layer + 1, x.device),
                           ctx.gen_mem,
                           ctx.mem_mask, None)
        return self.gen_norm(g[:, -1]) @ self.heads[layer].to(g.dtype).T


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


@dataclass
class HSDLossConfig:
    """The HSD pretraining loss (the ``loss:`` section of stage hsd)."""

    lambda_ild: float = 0.1
    """Weight of the intra-slate diversity term L_ild (eq. 12; paper value lost, 0.1 here)."""
    label_smoothing: float = 0.0
    """Label smoothing of the SID-token cross-entropy (0 = plain CE, the paper's)."""

    def validate(self) -> list[str]:
        problems = []
        if self.lambda_ild < 0:
            problems.append(f"lambda_ild must be >= 0, got {self.lambda_ild}")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        return problems


class HSDLossTerms(NamedTuple):
    total: Tensor
    """ce + lambda_ild * ild (scalar)."""
    ce: Tensor
    """Mean cross-entropy over all B*N*L tokens."""
    ild: Tensor
    """Mean pairwise cosine of the planned preferences (eq. 12)."""
    acc: Tensor
    """Token accuracy (argmax == target), for logging."""


def token_ce(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean CE and accuracy: logits [..., K] (any dtype; CE in float32), targets [...] long."""
    K = logits.shape[-1]
    flat = logits.reshape(-1, K).float()
    ce = F.cross_entropy(flat, targets.reshape(-1), label_smoothing=label_smoothing)
    acc = (flat.argmax(-1) == targets.reshape(-1)).float().mean()
    return ce, acc


def ild_loss(plan: Tensor) -> Tensor:
    """``2/(N(N-1)) sum_{i<j} cos(P_i, P_j)`` averaged over the batch: plan [B, N, D] -> scalar
    (float32; 0 when N < 2)."""
    B, N, _ = plan.shape
    if N < 2:
        return plan.float().sum() * 0.0
    unit = F.normalize(plan.float(), dim=-1)  # [B, N, D]
    cos = unit @ unit.transpose(1, 2)  # [B, N, N]
    upper = torch.ones(N, N, dtype=torch.bool, device=plan.device).triu(1)
    return cos[:, upper].sum(-1).mean() * 2.0 / (N * (N - 1))


class HSDLoss(nn.Module):
    """CE over all N*L SID tokens + lambda_ild * L_ild (no trainable parameters)."""

    def __init__(self, cfg: HSDLossConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, out: HSDOutput, target_codes: Tensor) -> HSDLossTerms:
        """out.logits [B, N, L, K], out.plan [B, N, D], target_codes [B, N, L]."""
        ce, acc = token_ce(out.logits, target_codes, self.cfg.label_smoothing)
        ild = ild_loss(out.plan)
        return HSDLossTerms(ce + self.cfg.lambda_ild * ild, ce, ild, acc)
