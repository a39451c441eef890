"""PCRQ-VAE: the prefix-contrastive residual-quantised VAE item tokenizer (HiGR stage 1).

Design
------
``x [B, D] --encoder MLP--> z [B, d] --L residual codebooks--> codes [B, L], z_q [B, d]
--decoder MLP--> x_hat [B, D]``, with the straight-through estimator ``x_hat = D(z + sg(z_q - z))``
(METHOD.md, Stage 1). Three modes share the code:

- ``pcrq_vae``: global quantisation loss (eq. 2) + prefix InfoNCE (eq. 3) on the configured
  layers (default the first L-1; never the last, which stays free for item identity);
- ``rq_vae``: the plain RQ-VAE baseline, per-layer quantisation loss, no contrastive term;
- ``rq_kmeans``: identity encoder/decoder, codebooks fitted by residual k-means
  (``higr_dist.tokenizer.rq_kmeans``) and loaded with :meth:`PCRQVAE.load_codebooks`; no gradient
  training. It exists so that every tokenizer exports through the same ``encode`` path.

Codebooks: gradient-trained parameters (eq. 2's ``||sg(z) - z_q||^2`` term moves them), not EMA.
Trade-off: EMA codebooks would need every rank to all-reduce statistics inside forward and do
not implement the *global* codebook objective of eq. 2; gradient codebooks are synchronised by
the data-parallel engine like any other weight.

Data-dependent surgery (k-means initialisation, dead-code restarts) never writes a parameter.
The effective codebook is ``C = weight + offset`` where ``weight`` is the trainable parameter
(zero at construction) and ``offset`` a float32 *buffer*; surgery sets ``offset[l, k] =
target - weight[l, k]``. Under DeepSpeed, ZeRO-1/2 and bf16/fp16 keep fp32 master copies of the
parameters in the optimizer that would silently overwrite an in-place parameter edit at the
next step; buffers are neither partitioned (ZeRO-3) nor mastered, so the surgery survives every
ZeRO stage and precision, and it is saved in checkpoints with the module state. The cost is a
[L, K, d] fp32 buffer and one add per forward.

Surgery runs *inside* the quantiser's ``forward`` in training mode (under ZeRO-3 its parameters
are gathered exactly then), on the rows given as catalogue-representative (the anchors; positives
over-sample popular items, METHOD.md pitfalls). When ``torch.distributed`` is initialised with
more than one rank, every rank gathers the anchors of all ranks, computes the same result, and
rank 0's result is broadcast, so replicas never diverge; all ranks must therefore run the same
number of training forwards (the engine keeps ranks in step). ``initialized`` is a bool buffer:
saved in checkpoints, so a resumed run never re-initialises. Eval-mode forwards (export) do no
surgery and no collectives (they run on rank 0 only).

Dead codes: ``usage`` counts anchor assignments per code; every ``restart_every`` training
forwards the counts are summed over ranks and codes used fewer than ``dead_code_threshold``
times are moved onto random current residuals of their layer (seeded from ``seed`` and the
forward counter, so a resumed run restarts identically).

Nearest-code search runs in float32 whatever the compute dtype (bf16 distances mis-rank codes).
Forward outputs are NamedTuples (DeepSpeed ZeRO-3 walks tuples to hook backward; it skips
dataclasses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

Mode = Literal["pcrq_vae", "rq_vae", "rq_kmeans"]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class PCRQVAEConfig:
    """The tokenizer model (the ``model:`` section of a tokenizer job)."""

    input_dim: int = 64
    """D, the ETL's item feature size (``x`` of the item/pair samples)."""
    hidden_dims: list[int] = field(default_factory=lambda: [256, 128])
    """Encoder hidden widths (the decoder mirrors them); ignored in mode ``rq_kmeans``."""
    latent_dim: int = 32
    """d, the quantised latent size (``rq_kmeans`` quantises x itself: d = input_dim)."""
    K: int = 256
    """Codebook size per layer (METHOD.md: 256 for ~1e4-1e5 items)."""
    L: int = 3
    """Codes per item (paper: 3)."""
    beta: float = 0.25
    """Commitment weight in the quantisation loss (eq. 2)."""
    mode: Mode = "pcrq_vae"
    """``pcrq_vae`` (global quant. + prefix contrastive), ``rq_vae`` (per-layer quant., the
    baseline) or ``rq_kmeans`` (residual k-means on x, no gradient training)."""
    contrastive_layers: list[int] | None = None
    """1-based layers of the prefix InfoNCE; null = the first L-1 in ``pcrq_vae`` and none in
    the other modes. Including layer L is allowed for the ablation (the paper saw ~4x more
    collisions)."""
    contrastive_target: Literal["codeword", "prefix"] = "codeword"
    """q^l of eq. 3: ``codeword`` = layer l's selected codeword e^l (the paper's wording);
    ``prefix`` = the cumulative e^1+..+e^l. Both straight-through to the encoder."""
    tau: float = 0.1
    """InfoNCE temperature (eq. 3)."""
    dead_code_threshold: float = 1.0
    """A code assigned fewer times than this (anchors, summed over ranks) within one restart
    window is dead and moved onto a random current residual."""
    restart_every: int = 50
    """Training forwards (micro-batches) per dead-code window; 0 disables restarts."""
    kmeans_iters: int = 20
    """Lloyd iterations of the k-means codebook initialisation (and of RQ-KMeans)."""
    seed: int = 0
    """Seed of k-means++ seeding and dead-code restarts (independent of the global RNG)."""

    def validate(self) -> list[str]:
        problems = []
        if self.input_dim < 1 or self.latent_dim < 1:
            problems.append("input_dim and latent_dim must be >= 1")
        if any(h < 1 for h in self.hidden_dims):
            problems.append(f"hidden_dims must be >= 1, got {self.hidden_dims}")
        if self.K < 2:
            problems.append(f"K must be >= 2, got {self.K}")
        if self.L < 1:
            problems.append(f"L must be >= 1, got {self.L}")
        elif self.K >= 2 and self.L * math.log2(self.K) > 62:
            problems.append(f"K^L = {self.K}^{self.L} does not fit a packed int64 SID key")
        if self.contrastive_layers is not None:
            bad = [x for x in self.contrastive_layers if not 1 <= x <= self.L]
            if bad:
                problems.append(f"contrastive_layers {bad} outside 1..L={self.L} (1-based)")
        if self.tau <= 0:
            problems.append(f"tau must be > 0, got {self.tau}")
        if self.restart_every < 0 or self.kmeans_iters < 0:
            problems.append("restart_every and kmeans_iters must be >= 0")
        return problems

    def layers_for_contrastive(self) -> list[int]:
        """The resolved 1-based contrastive layers (see ``contrastive_layers``)."""
        if self.contrastive_layers is not None:
            return sorted(set(self.contrastive_layers))
        return list(range(1, self.L)) if self.mode == "pcrq_vae" else []

    @property
    def code_dim(self) -> int:
        """Dimension of the quantised space (d)."""
        return self.input_dim if self.mode == "rq_kmeans" else self.latent_dim


# --------------------------------------------------------------------------------------------
# k-means primitives (shared with higr_dist.tokenizer.rq_kmeans)
# --------------------------------------------------------------------------------------------


def nearest_code(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Index and squared distance of the nearest codeword, computed in float32.

    x [N, d], codebook [K, d] -> (idx [N] long, dist2 [N] float32). Ties go to the lower index.
    """
    x32, c32 = x.detach().float(), codebook.detach().float()
    d2 = (x32 * x32).sum(-1, keepdim=True) - 2.0 * x32 @ c32.T + (c32 * c32).sum(-1)  # [N, K]
    dist2, idx = d2.min(dim=-1)
    return idx, dist2.clamp_min(0.0)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: ``k`` rows of x [N, d] (float32) -> centers [k, d], all data points.

    When x has fewer than k distinct rows, the remaining centers repeat data points (they stay
    unused and are revived by dead-code restarts).
    """
    x = x.detach().float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one data point")
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(-1)  # [N] squared distance to the nearest chosen center
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0.0:
            j = int(torch.multinomial((d2 / total).cpu(), 1, generator=generator))
        else:
            j = int(torch.randint(n, (1,), generator=generator))
        centers.append(x[j])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(-1))
    return torch.stack(centers)  # [k, d]


def lloyd_update(x: Tensor, centers: Tensor) -> Tensor:
    """One Lloyd iteration on x [N, d]: new centers [K, d]; empty clusters keep their place."""
    x = x.detach().float()
    idx, _ = nearest_code(x, centers)
    sums = torch.zeros_like(centers, dtype=torch.float32).index_add_(0, idx, x)  # [K, d]
    counts = code_counts(idx, centers.shape[0]).to(torch.float32)  # [K]
    out = centers.detach().float().clone()
    filled = counts > 0
    out[filled] = sums[filled] / counts[filled, None]
    return out


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """In-memory k-means (k-means++ seeding + ``iters`` Lloyd steps): x [N, d] -> [k, d]."""
    centers = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        centers = lloyd_update(x, centers)
    return centers


def code_counts(codes: Tensor, k: int) -> Tensor:
    """How often each of the ``k`` codes occurs in ``codes`` (any shape): [k] long.

    ``torch.bincount`` on CUDA reads the input's maximum back to the host to size its output,
    a device sync per call; a scatter-add into ``k`` known bins stays on the device."""
    flat = codes.reshape(-1)
    return torch.zeros(k, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def codebook_perplexity(codes: Tensor, k: int) -> Tensor:
    """exp(entropy) of the code distribution: codes [N] -> scalar in [1, k] (float32)."""
    p = code_counts(codes, k).float()
    p = p / p.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


# --------------------------------------------------------------------------------------------
# Distributed helpers (pure torch.distributed; no-ops in a single process)
# --------------------------------------------------------------------------------------------


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _gather_rows(x: Tensor) -> Tensor:
    """Concatenate the rows of x [n_r, d] of every rank (ranks may hold different n_r)."""
    if _world_size() == 1:
        return x
    x = x.detach().float().contiguous()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(_world_size())]
    dist.all_gather(sizes, n)
    cap = int(max(s.item() for s in sizes))
    padded = torch.zeros(cap, x.shape[1], device=x.device, dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def _broadcast_(t: Tensor) -> None:
    """Overwrite t in place with rank 0's value (float32 on the wire: gloo lacks bf16)."""
    if _world_size() == 1:
        return
    buf = t.detach().float().contiguous() if t.is_floating_point() else t.detach().contiguous()
    dist.broadcast(buf, src=0)
    t.copy_(buf)


def _all_reduce_sum(t: Tensor) -> Tensor:
    if _world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


# --------------------------------------------------------------------------------------------
# Residual quantiser
# --------------------------------------------------------------------------------------------


class QuantOutput(NamedTuple):
    codes: Tensor
    """[B, L] long, the SID codes."""
    z_q: Tensor
    """[B, d] sum of the selected codewords (gradient flows to the codebooks)."""
    codewords: tuple[Tensor, ...]
    """L x [B, d] selected codeword e^l per layer (gradient to the codebooks)."""
    residuals: tuple[Tensor, ...]
    """L x [B, d] layer inputs r^{l-1} (r^0 = z); gradient flows to the encoder only."""


class ResidualQuantizer(nn.Module):
    """L residual codebooks of K codewords of size d, with k-means init and dead-code restarts."""

    def __init__(self, cfg: PCRQVAEConfig):
        super().__init__()
        self.cfg = cfg
        L, K, d = cfg.L, cfg.K, cfg.code_dim
        self.weight = nn.Parameter(torch.zeros(L, K, d))  # trainable part of the codebooks
        self.register_buffer("offset", torch.zeros(L, K, d))  # surgery part (fp32)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("usage", torch.zeros(L, K, dtype=torch.long))  # current window
        self.register_buffer("num_forwards", torch.zeros((), dtype=torch.long))
        self.register_buffer("dead_codes", torch.zeros(L, dtype=torch.long))  # at last check
        self.register_buffer("restarted", torch.zeros(L, dtype=torch.long))  # total revived
        self._host_cache: dict[str, tuple[Tensor, int, int]] = {}

    def _host_value(self, name: str) -> int:
        """The 0-d buffer ``name`` as a Python int, read from the device only when the tensor
        changed since the last read (another object after ``.to()``, or a write elsewhere,
        e.g. a checkpoint's buffers copied in: its ``_version`` moved). The training forward
        thus makes no host sync for the init flag or the restart schedule."""
        t = getattr(self, name)
        cached = self._host_cache.get(name)
        try:
            version = t._version
        except RuntimeError:  # an inference-mode tensor keeps no version: read it every time
            return int(t)
        if cached is None or cached[0] is not t or cached[1] != version:
            cached = (t, version, int(t))
            self._host_cache[name] = cached
        return cached[2]

    def codebooks(self) -> Tensor:
        """The effective codebooks ``weight + offset``: [L, K, d] float32."""
        return self.weight.float() + self.offset

    def forward(self, z: Tensor, n_anchor: int | None = None) -> QuantOutput:
        """z [B, d] -> QuantOutput. Training mode: k-means init on first use, usage, restarts.

        Rows ``z[:n_anchor]`` (all when None) are the catalogue-representative ones used for
        initialisation and usage statistics.
        """
        n_anchor = z.shape[0] if n_anchor is None else n_anchor
        if self.training and not self._host_value("initialized"):
            self._init_from(z[:n_anchor])
        if not self._host_value("initialized"):
            raise RuntimeError("codebooks are not initialised: train (the first training forward "
                               "runs k-means) or call init_codebooks / load_codebooks first")
        out = self._quantize(z)
        if self.training:
            self._after_training_forward(out, n_anchor)
        return out

    def _quantize(self, z: Tensor) -> QuantOutput:
        books = self.codebooks()  # [L, K, d] f32
        r = z  # [B, d]
        codes, codewords, residuals = [], [], []
        for layer in range(self.cfg.L):
            idx, _ = nearest_code(r, books[layer])  # [B]
            e = F.embedding(idx, books[layer]).to(z.dtype)  # [B, d]
            codes.append(idx)
            codewords.append(e)
            residuals.append(r)
            r = r - e.detach()
        z_q = torch.stack(codewords).sum(0)  # [B, d]
        return QuantOutput(torch.stack(codes, dim=1), z_q, tuple(codewords), tuple(residuals))

    # ---- surgery -------------------------------------------------------------------------

    @torch.no_grad()
    def _init_from(self, z: Tensor) -> None:
        """Residual k-means over the anchors of all ranks; rank 0's result wins."""
        r = _gather_rows(z.detach().float())  # [N, d]
        g = torch.Generator().manual_seed(self.cfg.seed)
        w = self.weight.detach().float()
        for layer in range(self.cfg.L):
            centers = kmeans(r, self.cfg.K, self.cfg.kmeans_iters, g).to(w.device)  # [K, d]
            self.offset[layer] = centers - w[layer]
            idx, _ = nearest_code(r, centers)
            r = r - centers[idx]
        _broadcast_(self.offset)
        self.initialized.fill_(True)

    @torch.no_grad()
    def load_codebooks(self, centers: Tensor) -> None:
        """Set the effective codebooks to ``centers`` [L, K, d] (e.g. fitted by RQ-KMeans)."""
        L, K, d = self.offset.shape
        if tuple(centers.shape) != (L, K, d):
            raise ValueError(f"codebooks of shape {tuple(centers.shape)}, expected {(L, K, d)}")
        self.offset.copy_(centers.float().to(self.offset.device) - self.weight.detach().float())
        self.initialized.fill_(True)

    @torch.no_grad()
    def _after_training_forward(self, out: QuantOutput, n_anchor: int) -> None:
        codes = out.codes[:n_anchor]  # [n, L]
        for layer in range(self.cfg.L):
            self.usage[layer] += code_counts(codes[:, layer], self.cfg.K)
        forwards = self._host_value("num_forwards") + 1
        self.num_forwards += 1
        self._host_cache["num_forwards"] = (self.num_forwards, self.num_forwards._version,
                                            forwards)
        every = self.cfg.restart_every
        if every > 0 and forwards % every == 0:
            self._restart_dead([r[:n_anchor] for r in out.residuals])

    @torch.no_grad()
    def _restart_dead(self, residuals: list[Tensor]) -> None:
        """Move codes used < threshold times in the window onto random current residuals."""
        usage = _all_reduce_sum(self.usage)  # [L, K]
        dead = usage.float() < self.cfg.dead_code_threshold  # [L, K]
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + int(self.num_forwards))
        w = self.weight.detach().float()
        for layer in range(self.cfg.L):
            n_dead = int(dead[layer].sum())
            pool = _gather_rows(residuals[layer].detach().float())  # [N, d]
            if n_dead == 0 or pool.shape[0] == 0:
                continue
            pick = torch.randint(pool.shape[0], (n_dead,), generator=g).to(pool.device)
            rows = dead[layer].nonzero().squeeze(1)
            self.offset[layer, rows] = pool[pick].to(w.device) - w[layer, rows]
        _broadcast_(self.offset)
        self.dead_codes.copy_(dead.sum(1))
        self.restarted += dead.sum(1)
        self.usage.zero_()


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class PCRQVAEOutput(NamedTuple):
    codes: Tensor
    """[B, L] long SID codes."""
    z: Tensor
    """[B, d] encoder output."""
    z_q: Tensor
    """[B, d] quantised latent (sum of codewords)."""
    codewords: tuple[Tensor, ...]
    """L x [B, d] selected codeword per layer."""
    residuals: tuple[Tensor, ...]
    """L x [B, d] residual entering each layer (r^0 = z)."""
    x_hat: Tensor
    """[n_anchor, D] reconstruction of the first n_anchor rows (straight-through)."""


class PCRQVAE(nn.Module):
    """Encoder MLP -> residual quantiser -> decoder MLP (identity encoder/decoder in rq_kmeans)."""

    def __init__(self, cfg: PCRQVAEConfig):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid PCRQVAEConfig: " + "; ".join(problems))
        self.cfg = cfg
        if cfg.mode == "rq_kmeans":
            self.encoder: nn.Module = nn.Identity()
            self.decoder: nn.Module = nn.Identity()
        else:
            dims = [cfg.input_dim, *cfg.hidden_dims, cfg.latent_dim]
            self.encoder = _mlp(dims)
            self.decoder = _mlp(dims[::-1])
        self.quantizer = ResidualQuantizer(cfg)

    def forward(self, x: Tensor, n_anchor: int | None = None) -> PCRQVAEOutput:
        """x [B, D] -> PCRQVAEOutput; rows ``x[:n_anchor]`` are anchors (init, usage, x_hat)."""
        n_anchor = x.shape[0] if n_anchor is None else n_anchor
        z = self.encoder(x)  # [B, d]
        q = self.quantizer(z, n_anchor)
        z_st = z[:n_anchor] + (q.z_q[:n_anchor] - z[:n_anchor]).detach()  # [n, d]
        x_hat = self.decoder(z_st)  # [n, D]
        return PCRQVAEOutput(q.codes, z, q.z_q, q.codewords, q.residuals, x_hat)

    @torch.no_grad()
    def encode(self, x: Tensor) -> QuantOutput:
        """Export path (no surgery, no collectives): x [B, D] -> QuantOutput (float32)."""
        was = self.training
        self.eval()
        try:
            z = self.encoder(x.to(next(self.parameters()).dtype))
            q = self.quantizer(z)
        finally:
            self.train(was)
        return QuantOutput(q.codes, q.z_q.float(), tuple(e.float() for e in q.codewords),
                           tuple(r.float() for r in q.residuals))

    @torch.no_grad()
    def init_codebooks(self, x: Tensor) -> None:
        """k-means-initialise the codebooks from the encodings of x [N, D] (anchor items).

        Collective when torch.distributed runs with > 1 rank (every rank must call it). Do not
        call it on a ZeRO-3-partitioned model: there the first training forward does it.
        """
        self.quantizer._init_from(self.encoder(x.to(next(self.parameters()).dtype)))

    def maybe_init(self, x: Tensor) -> bool:
        """:meth:`init_codebooks` unless already initialised (e.g. resumed); True if it ran."""
        if bool(self.quantizer.initialized):
            return False
        self.init_codebooks(x)
        return True

    def load_codebooks(self, centers: Tensor) -> None:
        """Install fitted codebooks [L, K, d] (RQ-KMeans) and mark the model initialised."""
        self.quantizer.load_codebooks(centers)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


@dataclass
class PCRQVAELossConfig:
    """Weights of eq. 4 (the ``loss:`` section of a tokenizer job)."""

    lambda_rec: float = 1.0
    """Weight of the reconstruction loss."""
    lambda_q: float = 1.0
    """Weight of the quantisation loss (global in pcrq_vae, per-layer in rq_vae)."""
    lambda_c: float = 0.1
    """Weight of the prefix contrastive loss (paper default 0.1)."""

    def validate(self) -> list[str]:
        bad = [n for n in ("lambda_rec", "lambda_q", "lambda_c") if getattr(self, n) < 0]
        return [f"{n} must be >= 0" for n in bad]


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 summed over dims, averaged over rows (a dim-mean aids collapse)."""
    return ((x.float() - x_hat.float()) ** 2).sum(-1).mean()


def global_quant_loss(z: Tensor, z_q: Tensor, beta: float) -> Tensor:
    """Eq. 2: ||sg(z) - z_q||^2 + beta ||z - sg(z_q)||^2 on the aggregate, row-mean."""
    z, z_q = z.float(), z_q.float()
    codebook = ((z.detach() - z_q) ** 2).sum(-1)
    commit = ((z - z_q.detach()) ** 2).sum(-1)
    return (codebook + beta * commit).mean()


def layer_quant_loss(residuals: tuple[Tensor, ...], codewords: tuple[Tensor, ...],
                     beta: float) -> Tensor:
    """Plain RQ-VAE: sum over layers of ||sg(r^{l-1}) - e^l||^2 + beta ||r^{l-1} - sg(e^l)||^2."""
    total = residuals[0].new_zeros((), dtype=torch.float32)
    for r, e in zip(residuals, codewords):
        r, e = r.float(), e.float()  # [B, d]
        codebook = ((r.detach() - e) ** 2).sum(-1)  # [B]
        commit = ((r - e.detach()) ** 2).sum(-1)  # [B]
        total = total + (codebook + beta * commit).mean()
    return total


def info_nce(q_a: Tensor, q_p: Tensor, valid: Tensor, tau: float,
             drop: Tensor | None = None) -> Tensor:
    """Eq. 3 for one layer with in-batch negatives (the other rows' positives).

    q_a, q_p [B, d]; valid [B] bool (rows without a real pair contribute nothing); drop
    [B, B] bool marks off-diagonal negatives to ignore (the same item as the positive/anchor).
    Mean over valid rows; 0 (with a graph) when none is valid.
    """
    a = F.normalize(q_a.float(), dim=-1)
    p = F.normalize(q_p.float(), dim=-1)
    logits = a @ p.T / tau  # [B, B]
    if drop is not None:
        eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(drop & ~eye, float("-inf"))
    nll = -torch.diagonal(F.log_softmax(logits, dim=-1))  # [B]
    w = valid.float()
    return (nll * w).sum() / w.sum().clamp_min(1.0)


def contrastive_views(out: PCRQVAEOutput, layer: int, target: str) -> Tensor:
    """Straight-through q^l [B, d] (value: codeword or prefix; gradient: to the encoder)."""
    if target == "codeword":
        base, value = out.residuals[layer - 1], out.codewords[layer - 1]
    elif target == "prefix":
        base, value = out.z, torch.stack(out.codewords[:layer]).sum(0)
    else:
        raise ValueError(f"unknown contrastive_target {target!r}")
    return base + (value - base).detach()


def negative_mask(anchor_ids: Tensor, positive_ids: Tensor) -> Tensor:
    """[B, B] True where column j's positive is row i's positive or row i's anchor item."""
    p = positive_ids
    return (p[None, :] == p[:, None]) | (p[None, :] == anchor_ids[:, None])


class PCRQVAELossOutput(NamedTuple):
    total: Tensor
    """Eq. 4, the scalar to backpropagate."""
    rec: Tensor
    """Reconstruction loss (anchors)."""
    quant: Tensor
    """Quantisation loss: global (eq. 2) or per-layer (rq_vae)."""
    con: Tensor
    """Prefix InfoNCE summed over the contrastive layers (0 when there are none)."""
    con_per_layer: tuple[Tensor, ...]
    """One InfoNCE value per contrastive layer (in ``layers_for_contrastive`` order)."""


class PCRQVAELoss(nn.Module):
    """Eq. 4: lambda_rec * L_rec + lambda_q * L_quant + lambda_c * L_con. No parameters.

    Reconstruction and quantisation use the anchor rows only (catalogue-uniform; positives
    over-sample popular items); the contrastive term pairs anchor row i with positive row
    n_anchor + i.
    """

    def __init__(self, model_cfg: PCRQVAEConfig, cfg: PCRQVAELossConfig):
        super().__init__()
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.layers = model_cfg.layers_for_contrastive()

    def forward(self, x: Tensor, out: PCRQVAEOutput, n_anchor: int, weight: Tensor,
                anchor_ids: Tensor | None = None,
                positive_ids: Tensor | None = None) -> PCRQVAELossOutput:
        """x [2B or B, D] model input; weight [B] pair weights (0 = no contrastive term)."""
        m, n = self.model_cfg, n_anchor
        rec = reconstruction_loss(x[:n], out.x_hat)
        if m.mode == "rq_vae":
            quant = layer_quant_loss(tuple(r[:n] for r in out.residuals),
                                     tuple(e[:n] for e in out.codewords), m.beta)
        else:
            quant = global_quant_loss(out.z[:n], out.z_q[:n], m.beta)
        per_layer: list[Tensor] = []
        if self.layers and out.z.shape[0] >= 2 * n:
            valid = weight > 0
            drop = None
            if anchor_ids is not None and positive_ids is not None:
                drop = negative_mask(anchor_ids, positive_ids)
            for layer in self.layers:
                q = contrastive_views(out, layer, m.contrastive_target)  # [2B, d]
                per_layer.append(info_nce(q[:n], q[n:2 * n], valid, m.tau, drop))
        con = torch.stack(per_layer).sum() if per_layer else rec.new_zeros(())
        total = self.cfg.lambda_rec * rec + self.cfg.lambda_q * quant + self.cfg.lambda_c * con
        return PCRQVAELossOutput(total, rec, quant, con, tuple(per_layer))
