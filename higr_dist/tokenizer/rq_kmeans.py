"""RQ-KMeans: residual k-means on the raw item features, the no-training tokenizer baseline.

Design
------
Layer by layer (OneRec-style): layer 1 clusters x, layer l clusters the residuals left by the
fitted layers 1..l-1. Each layer is seeded with k-means++ on a sample of its residuals, then
refined by *exact* Lloyd iterations computed in a streamed pass: every pass walks the data
chunk by chunk (``chunks()`` is a callable returning a fresh iterable, e.g. a shard reader or
slices of an in-memory array), accumulates per-cluster sums and counts in float64 and moves the
centers once per pass. Memory is O(K * D) plus one chunk, so the catalogue never has to be
materialised; the result is deterministic given the seed and the chunk order (float64
accumulation makes it insensitive to how the data is chunked, up to rounding). Empty clusters
are reseeded onto the sample points farthest from their centers. Cost: L * (iters + 1) passes.

Trade-off: exact streamed Lloyd costs one pass per iteration where mini-batch k-means needs
about one pass in all; catalogues are small (1e4-1e6 items) and exactness makes the baseline
reproducible and comparable.

:func:`fit_rq_kmeans` is how a pipeline runs the baseline (no DeepSpeed: there is nothing to
train): read ``<etl_dir>/items``, fit, export the same artefacts as the trained tokenizers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from higr_dist.models.pcrq_vae import (
    PCRQVAE,
    PCRQVAEConfig,
    kmeans_plus_plus,
    nearest_code,
)

ChunkSource = Callable[[], Iterable[Tensor]]


@dataclass
class RQKMeansConfig:
    """Residual k-means settings (derived from the tokenizer's model config by the stage)."""

    K: int = 256
    """Clusters per layer."""
    L: int = 3
    """Layers (codes per item)."""
    iters: int = 20
    """Streamed Lloyd passes per layer (early stop when no center moves more than ``tol``)."""
    init_points: int = 65536
    """Size of the per-layer k-means++ seeding sample (a seeded Bernoulli sample of the stream)."""
    tol: float = 1e-7
    """Stop a layer when the largest squared center move of a pass is below this."""
    seed: int = 0
    """Seed of the sampling and the k-means++ draws."""


class RQKMeans:
    """Residual k-means over a chunked stream of feature rows ([n, D] float tensors)."""

    def __init__(self, cfg: RQKMeansConfig):
        self.cfg = cfg
        self.centers: Tensor | None = None  # [L, K, D] float32 once fitted

    def fit(self, chunks: ChunkSource) -> RQKMeans:
        total = sum(int(c.shape[0]) for c in chunks())
        if total == 0:
            raise ValueError("RQ-KMeans: the data stream is empty")
        g = torch.Generator().manual_seed(self.cfg.seed)
        fitted: list[Tensor] = []
        for _ in range(self.cfg.L):
            sample = self._sample(chunks, fitted, total, g)  # [S, D]
            centers = kmeans_plus_plus(sample, self.cfg.K, g)  # [K, D]
            for _ in range(self.cfg.iters):
                centers, moved = self._lloyd_pass(chunks, fitted, centers, sample)
                if moved < self.cfg.tol:
                    break
            fitted.append(centers)
        self.centers = torch.stack(fitted)
        return self

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, D] -> (codes [B, L] long, z_q [B, D], last residual r^{L-1} [B, D])."""
        if self.centers is None:
            raise RuntimeError("RQKMeans.encode before fit")
        codes, r, last = _residualize(x.float(), list(self.centers))
        return codes, x.float() - r, last

    def to_model(self, input_dim: int, seed: int = 0) -> PCRQVAE:
        """A ``rq_kmeans``-mode :class:`PCRQVAE` holding these codebooks (for the export path)."""
        if self.centers is None:
            raise RuntimeError("RQKMeans.to_model before fit")
        cfg = PCRQVAEConfig(input_dim=input_dim, latent_dim=input_dim, K=self.cfg.K,
                            L=self.cfg.L, mode="rq_kmeans", seed=seed)
        model = PCRQVAE(cfg)
        model.load_codebooks(self.centers)
        return model.eval()

    # ---- internals ---------------------------------------------------------------------------

    def _sample(self, chunks: ChunkSource, fitted: list[Tensor], total: int,
                g: torch.Generator) -> Tensor:
        """Seeded Bernoulli sample (~init_points rows) of this layer's residuals."""
        keep_p = min(1.0, self.cfg.init_points / total)
        parts = []
        for c in chunks():
            _, r, _ = _residualize(c.float(), fitted)  # [n, D]
            if keep_p < 1.0:
                r = r[(torch.rand(r.shape[0], generator=g) < keep_p).to(r.device)]
            parts.append(r)
        sample = torch.cat(parts)
        if sample.shape[0] == 0:  # tiny keep_p on a tiny stream: fall back to the first chunk
            sample = _residualize(next(iter(chunks())).float(), fitted)[1]
        return sample

    def _lloyd_pass(self, chunks: ChunkSource, fitted: list[Tensor], centers: Tensor,
                    sample: Tensor) -> tuple[Tensor, float]:
        K, D = centers.shape
        sums = torch.zeros(K, D, dtype=torch.float64)
        counts = torch.zeros(K, dtype=torch.float64)
        for c in chunks():
            _, r, _ = _residualize(c.float(), fitted)  # [n, D]
            idx, _ = nearest_code(r, centers)
            sums.index_add_(0, idx, r.double())
            counts += torch.bincount(idx, minlength=K).double()
        new = centers.clone()
        filled = counts > 0
        new[filled] = (sums[filled] / counts[filled, None]).float()
        empty = (~filled).nonzero().squeeze(1)
        if empty.numel():
            _, d2 = nearest_code(sample, new)
            far = torch.argsort(d2, descending=True, stable=True)[: empty.numel()]
            new[empty[: far.numel()]] = sample[far]
        moved = float(((new - centers) ** 2).sum(-1).max())
        return new, moved


def _residualize(x: Tensor, layers: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise x [n, D] through ``layers`` (each [K, D]).

    Returns (codes [n, len(layers)], residual after all layers, residual entering the last).
    """
    r, last = x, x
    codes = []
    for centers in layers:
        idx, _ = nearest_code(r, centers)
        codes.append(idx)
        last = r
        r = r - centers[idx]
    codes_t = torch.stack(codes, dim=1) if codes else x.new_zeros(x.shape[0], 0, dtype=torch.long)
    return codes_t, r, last


def rq_kmeans_config(model_cfg: PCRQVAEConfig) -> RQKMeansConfig:
    """The RQ-KMeans settings a tokenizer job's ``model:`` section implies."""
    return RQKMeansConfig(K=model_cfg.K, L=model_cfg.L, iters=model_cfg.kmeans_iters,
                          seed=model_cfg.seed)


def tensor_chunks(x: Tensor, chunk_size: int) -> ChunkSource:
    """A chunk source over an in-memory [N, D] tensor."""
    return lambda: (x[i:i + chunk_size] for i in range(0, x.shape[0], chunk_size))


def fit_rq_kmeans(items_dir: str | Path, cfg: PCRQVAEConfig, out_dir: str | Path,
                  chunk_size: int = 8192) -> dict:
    """Fit RQ-KMeans on ``items_dir`` (ITEM shards) and write the tokenizer export to out_dir.

    The item table is read once (the export writes item_features.npy anyway), then fitted by
    streamed passes over its chunks. Returns the export summary (see ``export_tokenizer``).
    """
    from higr_dist.tokenizer.export import export_tokenizer, load_items

    items = load_items(items_dir)
    if items.x.shape[1] != cfg.input_dim:
        raise ValueError(f"items have D={items.x.shape[1]} features, model.input_dim="
                         f"{cfg.input_dim}")
    x = torch.from_numpy(items.x)
    rq = RQKMeans(rq_kmeans_config(cfg)).fit(tensor_chunks(x, chunk_size))
    model = rq.to_model(cfg.input_dim, seed=cfg.seed)
    return export_tokenizer(model, items, out_dir, batch_size=chunk_size,
                            extra_meta={"mode": "rq_kmeans",
                                        "model": _cfg_dict(replace(cfg, mode="rq_kmeans"))})


def _cfg_dict(cfg: PCRQVAEConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
