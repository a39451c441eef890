"""The tokenizer stage (``stage: tokenizer``): PCRQ-VAE / RQ-VAE trained on pair samples,
RQ-KMeans fitted without training; all three export the same SID artefacts.

Design
------
- Stream: ``pairs`` (anchor + positive with both feature vectors, see ``schema/pairs.py``).
  :func:`collate_pairs` stacks them into a :class:`PairBatch`.
- Step: one model forward over ``[x_anchor; x_positive]`` (``[2B, D]``) with ``n_anchor = B``,
  so both sides share one encoder pass and one ZeRO-3 parameter gather; the loss pairs row i
  with row B + i. Reconstruction/quantisation use the anchors only (catalogue-uniform).
- Codebook initialisation needs no engine hook: the first *training* forward k-means-initialises
  the codebooks from that batch's anchors, inside the quantiser's forward (parameters are
  gathered there under ZeRO-3), gathered over ranks and broadcast from rank 0. The
  ``initialized`` buffer is checkpointed, so a resumed run never re-initialises. Requirement
  on the engine: every rank runs the same number of training forwards (it already keeps ranks
  in step), and no activation recomputation re-runs the quantiser (the model has no
  ``gradient_checkpointing`` attribute).
- Finalize (rank 0, fp32 weights loaded): read ``<etl_dir>/items``, encode, resolve collisions,
  write the export (``higr_dist.tokenizer.export``).
- RQ-KMeans (``model.mode: rq_kmeans``) has nothing to train: ``needs_training(cfg)`` is False
  and the engine (or pipeline) should skip DeepSpeed and call ``finalize`` with the freshly built
  model, which fits RQ-KMeans on the items stream and exports; :func:`fit_rq_kmeans` is the
  same thing as a plain function (``fit_rq_kmeans(items_dir, cfg, out_dir)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from higr_dist import layout
from higr_dist.models.pcrq_vae import (
    PCRQVAE,
    PCRQVAEConfig,
    PCRQVAELoss,
    PCRQVAELossConfig,
    codebook_perplexity,
)
from higr_dist.stages.base import StageInputs, StepOutput, register
from higr_dist.tokenizer.rq_kmeans import fit_rq_kmeans

__all__ = ["PairBatch", "collate_pairs", "TokenizerStage", "tokenizer_stage", "fit_rq_kmeans"]


@dataclass
class PairBatch:
    """B (anchor, positive) pairs."""

    x_anchor: Tensor
    """[B, D] float anchor features."""
    x_positive: Tensor
    """[B, D] float positive features."""
    weight: Tensor
    """[B] float32 pair weight; 0 = no contrastive term for this row."""
    anchor: Tensor
    """[B] long anchor item_idx."""
    positive: Tensor
    """[B] long positive item_idx."""

    def to(self, device: torch.device, float_dtype: torch.dtype | None = None) -> PairBatch:
        fd = float_dtype or self.x_anchor.dtype
        return PairBatch(self.x_anchor.to(device, fd), self.x_positive.to(device, fd),
                         self.weight.to(device), self.anchor.to(device), self.positive.to(device))

    @property
    def num_samples(self) -> int:
        return int(self.anchor.shape[0])

    @property
    def num_tokens(self) -> int:
        return self.num_samples


def collate_pairs(samples: list[dict]) -> PairBatch:
    """Decoded PAIR samples -> :class:`PairBatch` (module-level: picklable for workers)."""
    if not samples:
        raise ValueError("collate_pairs: empty sample list")
    xa = np.stack([np.asarray(s["x_anchor"], dtype=np.float32) for s in samples])  # [B, D]
    xp = np.stack([np.asarray(s["x_positive"], dtype=np.float32) for s in samples])  # [B, D]
    return PairBatch(
        x_anchor=torch.from_numpy(xa),
        x_positive=torch.from_numpy(xp),
        weight=torch.tensor([float(s["weight"]) for s in samples], dtype=torch.float32),
        anchor=torch.tensor([int(s["anchor"]) for s in samples], dtype=torch.long),
        positive=torch.tensor([int(s["positive"]) for s in samples], dtype=torch.long),
    )


def _linear_params(dims: list[int]) -> int:
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


class TokenizerStage:
    name = "tokenizer"
    sample_kind = "pairs"
    consumes = {"etl_dir": layout.ETL}
    produces = (layout.SIDS,)
    validates = False
    model_config_cls = PCRQVAEConfig
    loss_config_cls = PCRQVAELossConfig

    def needs_training(self, model_cfg: PCRQVAEConfig) -> bool:
        """False for ``rq_kmeans``: skip the optimizer loop and call :meth:`finalize` directly."""
        return model_cfg.mode != "rq_kmeans"

    def validate(self, model_cfg: PCRQVAEConfig, loss_cfg: PCRQVAELossConfig,
                 inputs: StageInputs) -> list[str]:
        problems = [f"model: {p}" for p in model_cfg.validate()]
        problems += [f"loss: {p}" for p in loss_cfg.validate()]
        if not inputs.etl_dir:
            return problems + ["inputs.etl_dir: required (the tokenizer exports <etl_dir>/items)"]
        items = Path(inputs.etl_dir) / "items"
        if not items.is_dir():
            return problems + [f"inputs.etl_dir: no items folder at {items}"]
        dim = _first_item_dim(items)
        if dim is None:
            problems.append(f"inputs.etl_dir: no item shards in {items}")
        elif dim != model_cfg.input_dim:
            problems.append(f"model.input_dim: {model_cfg.input_dim} but the items in {items} "
                            f"have {dim} features")
        return problems

    def build(self, model_cfg: PCRQVAEConfig, loss_cfg: PCRQVAELossConfig,
              inputs: StageInputs) -> tuple[nn.Module, nn.Module]:
        return PCRQVAE(model_cfg), PCRQVAELoss(model_cfg, loss_cfg)

    def make_collate(self, model_cfg: PCRQVAEConfig, loss_cfg: PCRQVAELossConfig,
                     inputs: StageInputs) -> Callable[[list[dict]], PairBatch]:
        return collate_pairs

    def step(self, model: nn.Module, loss_module: nn.Module, batch: PairBatch) -> StepOutput:
        B = batch.num_samples
        x = torch.cat([batch.x_anchor, batch.x_positive])  # [2B, D]
        out = model(x, n_anchor=B)
        lo = loss_module(x, out, B, batch.weight, batch.anchor, batch.positive)
        core = getattr(model, "module", model)  # the PCRQVAE under a DeepSpeed engine
        metrics: dict[str, Tensor | float] = {
            "rec": lo.rec.detach(), "quant": lo.quant.detach(), "con": lo.con.detach()}
        for layer, value in zip(loss_module.layers, lo.con_per_layer):
            metrics[f"con_l{layer}"] = value.detach()
        codes = out.codes[:B]  # [B, L]
        for layer in range(codes.shape[1]):
            metrics[f"perplexity_l{layer + 1}"] = codebook_perplexity(codes[:, layer], core.cfg.K)
            metrics[f"dead_codes_l{layer + 1}"] = core.quantizer.dead_codes[layer].float()
        # share of contrastive pairs whose first codes agree (0 when the batch has none);
        # computed on the device: no host sync in the step
        valid = batch.weight > 0
        same = (out.codes[:B, 0] == out.codes[B:, 0]) & valid  # [B]
        metrics["pair_same_l1"] = same.float().sum() / valid.float().sum().clamp_min(1.0)
        return StepOutput(loss=lo.total, metrics=metrics)

    def flops_per_sample(self, model_cfg: PCRQVAEConfig, loss_cfg: PCRQVAELossConfig,
                         inputs: StageInputs) -> float:
        """6 x (2 encoder passes + 1 decoder pass) params + nearest-code search (fwd only)."""
        if model_cfg.mode == "rq_kmeans":
            enc = dec = 0
        else:
            dims = [model_cfg.input_dim, *model_cfg.hidden_dims, model_cfg.latent_dim]
            enc, dec = _linear_params(dims), _linear_params(dims[::-1])
        search = 2 * 2 * model_cfg.L * model_cfg.K * model_cfg.code_dim
        return float(6 * (2 * enc + dec) + search)

    def finalize(self, model: nn.Module, model_cfg: PCRQVAEConfig, loss_cfg: PCRQVAELossConfig,
                 inputs: StageInputs, out_dir: Path) -> dict:
        from higr_dist.tokenizer.export import export_tokenizer, load_items

        items_dir = Path(inputs.etl_dir) / "items"
        if model_cfg.mode == "rq_kmeans":
            return fit_rq_kmeans(items_dir, model_cfg, out_dir)
        core = getattr(model, "module", model)
        items = load_items(items_dir)
        if items.x.shape[1] != model_cfg.input_dim:
            raise ValueError(f"items have D={items.x.shape[1]}, model.input_dim="
                             f"{model_cfg.input_dim}")
        return export_tokenizer(core, items, out_dir,
                                extra_meta={"mode": model_cfg.mode, "model": asdict(model_cfg)})


def _first_item_dim(items_dir: Path) -> int | None:
    """Feature size of the first item sample (None when there are no shards)."""
    from higr_dist.data.loader import iterate_samples
    from higr_dist.data.shardio import list_shards
    from higr_dist.schema.items import ITEM

    try:
        shards = list_shards(items_dir)
    except FileNotFoundError:
        return None
    for sample in iterate_samples(shards[:1], ITEM):
        return int(np.asarray(sample["x"]).shape[0])
    return None


@register("tokenizer")
def tokenizer_stage() -> TokenizerStage:
    return TokenizerStage()
