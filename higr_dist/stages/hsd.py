"""Stages ``hsd`` (HiGR stage 2 pretraining) and its baselines ``flat`` and ``sasrec``.

Design
------
All three stream slate samples (``slates/train``) through one picklable collate,
:class:`~higr_dist.data.slates.SlateCollate` (history, first N targets, their SIDs) into a
:class:`~higr_dist.data.slates.SlateBatch`.

- ``hsd``: :class:`~higr_dist.models.hsd.HSD` + :class:`~higr_dist.models.hsd.HSDLoss`
  (CE over N*L SID tokens + lambda_ild * ILD); logs ce, ild, token accuracy (all and per SID
  layer).
- ``flat``: :class:`~higr_dist.models.flat.Flat` built from the same ``HSDConfig`` (same width,
  decoder depth planner_layers + gen_layers), CE over N*L tokens.
- ``sasrec``: :class:`~higr_dist.models.sasrec.SASRec` on item_idx (history + targets),
  next-item CE over the catalogue; ``model.num_items: 0`` is read from ``sid_meta.json``;
  ``loss.chunk_items`` has the model compute that CE in catalogue chunks inside its forward.
  Its FLOPs include the catalogue softmax (the catalogue size read from the SID table).

FLOPs per sample (for MFU) are 6 x (matmul parameters x the tokens they see): context blocks
see 1+history_len tokens, planner blocks N, generator blocks N*L, cross-attention key/value
projections 1+history_len per block; attention-score FLOPs are ignored (short sequences).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import Tensor, nn

from higr_dist import layout
from higr_dist.data.sids import load_sid_meta
from higr_dist.data.slates import SlateBatch, SlateCollate
from higr_dist.models.flat import Flat, FlatLoss, FlatLossConfig, flat_param_count
from higr_dist.models.hsd import HSD, PRESETS, HSDConfig, HSDLoss, HSDLossConfig, param_count
from higr_dist.models.layers import block_param_count
from higr_dist.models.sasrec import (
    SASRec,
    SASRecConfig,
    SASRecLoss,
    SASRecLossConfig,
    sasrec_param_count,
)
from higr_dist.stages.base import StageInputs, StepOutput, register

__all__ = ["SlateBatch", "SlateCollate", "SlateStage", "HSDStage", "FlatStage", "SASRecStage",
           "hsd_flops_per_sample", "flat_flops_per_sample"]


# --------------------------------------------------------------------------------------------
# Shared checks and FLOPs
# --------------------------------------------------------------------------------------------


def _check_sid_dir(inputs: StageInputs, K: int | None = None, L: int | None = None) -> list[str]:
    sid_dir = Path(inputs.sid_dir) if inputs.sid_dir else None
    if sid_dir is None or not (sid_dir / "sid_table.npy").is_file() \
            or not (sid_dir / "sid_meta.json").is_file():
        return [f"inputs.sid_dir: no sid_table.npy/sid_meta.json in {inputs.sid_dir!r} "
                "(run the tokenizer stage first)"]
    meta = load_sid_meta(sid_dir)
    if K is not None and (meta.K, meta.L) != (K, L):
        return [f"model K={K}, L={L} but the SID table has K={meta.K}, L={meta.L}"]
    return []


def _check_etl_dir(inputs: StageInputs) -> list[str]:
    if not inputs.etl_dir:
        return ["inputs.etl_dir: required (slate shards under <etl_dir>/slates/train)"]
    return []


def _tokens_seen(cfg: HSDConfig) -> tuple[int, int, int]:
    """(memory tokens 1+H, planner tokens N, generator tokens N*L) per sample."""
    return 1 + cfg.history_len, cfg.N, cfg.N * cfg.L


def hsd_flops_per_sample(cfg: HSDConfig) -> float:
    """Training matmul FLOPs of one HSD sample (see the module docstring)."""
    d = cfg.d_model
    mem, n_plan, n_gen = _tokens_seen(cfg)
    enc = block_param_count(cfg.block(cross=False, causal=False)) * mem
    xblk = block_param_count(cfg.block(cross=True))
    kv = 2 * d * d
    planner = (xblk - kv) * n_plan + kv * mem
    gen = (xblk - kv) * n_gen + kv * mem
    heads = d * d * n_plan + cfg.K * d * n_gen
    return 6.0 * (cfg.ctx_layers * enc + cfg.planner_layers * planner + cfg.gen_layers * gen
                  + heads)


def flat_flops_per_sample(cfg: HSDConfig) -> float:
    """Training matmul FLOPs of one flat-decoder sample."""
    d = cfg.d_model
    mem, _, n_tok = _tokens_seen(cfg)
    enc = block_param_count(cfg.block(cross=False, causal=False)) * mem
    xblk = block_param_count(cfg.block(cross=True))
    kv = 2 * d * d
    dec = (xblk - kv) * n_tok + kv * mem
    depth = cfg.planner_layers + cfg.gen_layers
    return 6.0 * (cfg.ctx_layers * enc + depth * dec + cfg.K * d * n_tok)


def _layer_acc(logits: Tensor, target_codes: Tensor) -> dict[str, Tensor]:
    """Token accuracy per SID layer: logits [B, N, L, K], targets [B, N, L]."""
    hit = (logits.detach().argmax(-1) == target_codes).float()  # [B, N, L]
    return {f"acc_l{i + 1}": hit[..., i].mean() for i in range(hit.shape[-1])}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


class SlateStage:
    """What ``hsd`` and ``flat`` share: the same ``HSDConfig``, data, checks and step; they
    differ in the model, its loss, the logged terms, the FLOPs and the parameter formula."""

    sample_kind = "slates/train"
    consumes = {"etl_dir": layout.ETL, "sid_dir": layout.SIDS}
    produces = ()
    validates = True
    model_config_cls = HSDConfig
    model_presets = PRESETS
    """Named sizes for ``model: {preset: 100m}``."""
    name: str
    loss_config_cls: type
    model_cls: type[nn.Module]
    loss_cls: type[nn.Module]

    def validate(self, model_cfg: HSDConfig, loss_cfg, inputs: StageInputs) -> list[str]:
        return ([f"model: {p}" for p in model_cfg.validate()]
                + [f"loss: {p}" for p in loss_cfg.validate()]
                + _check_etl_dir(inputs) + _check_sid_dir(inputs, model_cfg.K, model_cfg.L))

    def build(self, model_cfg: HSDConfig, loss_cfg, inputs: StageInputs
              ) -> tuple[nn.Module, nn.Module]:
        return self.model_cls(model_cfg), self.loss_cls(loss_cfg)

    def make_collate(self, model_cfg: HSDConfig, loss_cfg, inputs: StageInputs
                     ) -> Callable[[list[dict]], SlateBatch]:
        return SlateCollate(inputs.sid_dir, model_cfg.N, model_cfg.history_len)

    def step(self, model: nn.Module, loss_module: nn.Module, batch: SlateBatch) -> StepOutput:
        out = model(batch.hist_codes, batch.hist_mask, batch.hist_fb, batch.target_codes)
        terms = loss_module(out, batch.target_codes)
        metrics = self.terms(terms)
        metrics.update(_layer_acc(out.logits, batch.target_codes))
        return StepOutput(terms.total, metrics)

    def terms(self, terms) -> dict[str, Tensor | float]:
        """The loss terms to log (detached)."""
        raise NotImplementedError

    def param_formula(self, model_cfg: HSDConfig) -> int:
        raise NotImplementedError

    def finalize(self, model: nn.Module, model_cfg: HSDConfig, loss_cfg,
                 inputs: StageInputs, out_dir: Path) -> dict:
        return {"stage": self.name, "params": _n_params(model),
                "params_formula": self.param_formula(model_cfg)}


class HSDStage(SlateStage):
    name = "hsd"
    loss_config_cls = HSDLossConfig
    model_cls, loss_cls = HSD, HSDLoss

    def terms(self, terms) -> dict[str, Tensor | float]:
        return {"ce": terms.ce.detach(), "ild": terms.ild.detach(), "acc": terms.acc.detach()}

    def flops_per_sample(self, model_cfg: HSDConfig, loss_cfg: HSDLossConfig,
                         inputs: StageInputs) -> float:
        return hsd_flops_per_sample(model_cfg)

    def param_formula(self, model_cfg: HSDConfig) -> int:
        return param_count(model_cfg)


class FlatStage(SlateStage):
    name = "flat"
    loss_config_cls = FlatLossConfig
    model_cls, loss_cls = Flat, FlatLoss

    def terms(self, terms) -> dict[str, Tensor | float]:
        return {"ce": terms.total.detach(), "acc": terms.acc.detach()}

    def flops_per_sample(self, model_cfg: HSDConfig, loss_cfg: FlatLossConfig,
                         inputs: StageInputs) -> float:
        return flat_flops_per_sample(model_cfg)

    def param_formula(self, model_cfg: HSDConfig) -> int:
        return flat_param_count(model_cfg)


def resolve_num_items(cfg: SASRecConfig, inputs: StageInputs) -> int:
    """``cfg.num_items``, or the catalogue size from ``sid_meta.json`` when it is 0."""
    if cfg.num_items:
        return cfg.num_items
    return load_sid_meta(inputs.sid_dir).num_items


class SASRecStage:
    name = "sasrec"
    sample_kind = "slates/train"
    consumes = {"etl_dir": layout.ETL, "sid_dir": layout.SIDS}
    produces = ()
    validates = True
    model_config_cls = SASRecConfig
    loss_config_cls = SASRecLossConfig

    def validate(self, model_cfg: SASRecConfig, loss_cfg: SASRecLossConfig,
                 inputs: StageInputs) -> list[str]:
        problems = ([f"model: {p}" for p in model_cfg.validate()]
                    + [f"loss: {p}" for p in loss_cfg.validate()]
                    + _check_etl_dir(inputs) + _check_sid_dir(inputs))
        if not problems:
            meta = load_sid_meta(inputs.sid_dir)
            if model_cfg.num_items and model_cfg.num_items != meta.num_items:
                problems.append(f"model.num_items={model_cfg.num_items} but the catalogue has "
                                f"{meta.num_items} items (0 = take it from sid_meta.json)")
        return problems

    def build(self, model_cfg: SASRecConfig, loss_cfg: SASRecLossConfig,
              inputs: StageInputs) -> tuple[nn.Module, nn.Module]:
        num_items = resolve_num_items(model_cfg, inputs)
        return SASRec(replace(model_cfg, num_items=num_items)), SASRecLoss(loss_cfg)

    def make_collate(self, model_cfg: SASRecConfig, loss_cfg: SASRecLossConfig,
                     inputs: StageInputs) -> Callable[[list[dict]], SlateBatch]:
        return SlateCollate(inputs.sid_dir, model_cfg.N, model_cfg.history_len)

    def step(self, model: nn.Module, loss_module: nn.Module, batch: SlateBatch) -> StepOutput:
        cfg: SASRecLossConfig = loss_module.cfg
        if cfg.chunk_items:  # the loss is computed inside the model's forward (ZeRO-3)
            out = model(batch.hist_items, batch.hist_mask, batch.target_items,
                        loss_chunk=cfg.chunk_items, label_smoothing=cfg.label_smoothing)
        else:
            out = model(batch.hist_items, batch.hist_mask, batch.target_items)
        terms = loss_module(out)
        return StepOutput(terms.total, {"ce": terms.total.detach(), "acc": terms.acc.detach()})

    def flops_per_sample(self, model_cfg: SASRecConfig, loss_cfg: SASRecLossConfig,
                         inputs: StageInputs) -> float:
        """6 x (block params x T + catalogue x D x T), T = history_len + N - 1 positions; the
        catalogue is the config's ``num_items`` or, at 0, the SID table's."""
        T = model_cfg.history_len + model_cfg.N - 1
        blocks = sasrec_param_count(replace(model_cfg, num_items=0, max_len=0))
        items = resolve_num_items(model_cfg, inputs)
        return 6.0 * T * (blocks + items * model_cfg.d_model)

    def finalize(self, model: nn.Module, model_cfg: SASRecConfig,
                 loss_cfg: SASRecLossConfig, inputs: StageInputs, out_dir: Path) -> dict:
        return {"stage": self.name, "params": _n_params(model),
                "num_items": resolve_num_items(model_cfg, inputs)}


@register("hsd")
def hsd_stage() -> HSDStage:
    return HSDStage()


@register("flat")
def flat_stage() -> FlatStage:
    return FlatStage()


@register("sasrec")
def sasrec_stage() -> SASRecStage:
    return SASRecStage()
