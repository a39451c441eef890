"""Stages ``orpo`` (listwise ORPO, the paper's stage 3) and ``dpo`` (the comparison).

Design
------
Both stages stream PREF samples (``prefs/``), derive the rejected slates O1/O2/O3 in the
collate (:mod:`higr_dist.data.pairs`), score the chosen and all rejected slates of a context in
one model call, and hand the per-token log-probs to a pure-tensor loss
(:mod:`higr_dist.losses.preference`).

The model is :class:`PreferenceHSD`: an ``HSD`` whose ``forward`` is ``slate_logprobs``. The
engine must run the model through ``engine(...)`` (DeepSpeed registers its backward prologue
and ZeRO-3 parameter fetching on the forward call); a side method called on the engine would
bypass both. Subclassing (instead of wrapping) keeps the state-dict keys of a plain HSD, so
``init_from`` loads strictly and the exported ``final/model_fp32.pt`` feeds decoding and
evaluation unchanged.

ORPO holds no reference model: the loss module has no parameters and no submodule. DPO's frozen
reference (``inputs.reference_from``, defaulting to ``inputs.init_from``) lives in the loss
module (:class:`~higr_dist.losses.preference.FrozenReference`), is built lazily on the first
step, follows the policy's device and dtype, is never trainable and never reaches the
optimiser; its log-probs are computed under ``torch.no_grad``.

Trade-off: the initial weights are loaded in ``build()`` with a plain ``load_state_dict``; an
engine that builds models inside ZeRO-3 ``zero.Init`` must load them after partitioning
instead (the tiny and 25M models do not need ``zero.Init``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from higr_dist import layout
from higr_dist.data.pairs import PairConfig, PrefBatch, PrefCollate
from higr_dist.data.sids import load_sid_meta
from higr_dist.losses.preference import (
    DPOLoss,
    DPOLossConfig,
    FrozenReference,
    ORPOLoss,
    ORPOLossConfig,
    SlateLogprobs,
)
from higr_dist.models.hsd import HSD, PRESETS, HSDConfig
from higr_dist.models.layers import block_param_count
from higr_dist.models.params import load_state
from higr_dist.stages.base import StageInputs, StepOutput, register


class PreferenceHSD(HSD):
    """HSD whose forward scores candidate slates: the call the engine wraps."""

    def forward(self, hist_codes: torch.Tensor, hist_mask: torch.Tensor, hist_fb: torch.Tensor,
                slates: torch.Tensor) -> torch.Tensor:
        """[B,H,L], [B,H], [B,H], slates [B,S,N,L] -> per-token log-probs [B,S,N,L]."""
        return self.slate_logprobs(hist_codes, hist_mask, hist_fb, slates)


@dataclass
class ORPOStageLossConfig(ORPOLossConfig):
    """``loss:`` section of stage ``orpo``: the ORPO weights plus pair construction."""

    pairs: PairConfig = field(default_factory=PairConfig)
    """Which negatives (O1/O2/O3) are built and how (``higr_dist.data.pairs.PairConfig``)."""


@dataclass
class DPOStageLossConfig(DPOLossConfig):
    """``loss:`` section of stage ``dpo``: the DPO settings plus pair construction."""

    pairs: PairConfig = field(default_factory=PairConfig)
    """Which negatives (O1/O2/O3) are built and how (``higr_dist.data.pairs.PairConfig``)."""


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an fp32 state-dict file (``*.pt``, a mapping name -> tensor) on CPU."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"state dict not found: {p}")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{p}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def load_hsd(model_cfg: HSDConfig, path: str | Path, cls: type[HSD] = HSD) -> HSD:
    """A ``cls(model_cfg)`` with the weights of ``path`` loaded strictly (fp32, CPU; under
    ``zero.Init`` into the partitioned parameters, one at a time)."""
    model = cls(model_cfg)
    load_state(model, load_state_file(path))
    return model


def preference_flops_per_sample(cfg: HSDConfig, num_slates: int, reference: bool) -> float:
    """Matmul FLOPs of one context scored on ``num_slates`` slates (1 + R).

    Same accounting as ``hsd_flops_per_sample``: the history (1+history_len tokens) is encoded
    and projected to cross-attention keys/values once; planner (N tokens) and generator (N*L
    tokens) run per slate. Training costs 6 x (params x tokens); DPO's no-grad reference
    forward adds 2 x the same.
    """
    d, S = cfg.d_model, num_slates
    mem, n_plan, n_gen = 1 + cfg.history_len, cfg.N * S, cfg.N * cfg.L * S
    enc = block_param_count(cfg.block(cross=False, causal=False)) * mem
    xblk, kv = block_param_count(cfg.block(cross=True)), 2 * d * d
    planner = (xblk - kv) * n_plan + kv * mem
    gen = (xblk - kv) * n_gen + kv * mem
    heads = d * d * n_plan + cfg.K * d * n_gen
    matmul = cfg.ctx_layers * enc + cfg.planner_layers * planner + cfg.gen_layers * gen + heads
    return (6.0 + (2.0 if reference else 0.0)) * matmul


def _reference_path(inputs: StageInputs) -> str:
    return inputs.reference_from or inputs.init_from


class PreferenceStage:
    """Shared spec of the ``orpo`` and ``dpo`` stages (they differ in the loss only)."""

    sample_kind = "prefs"
    model_config_cls = HSDConfig
    model_presets = PRESETS
    """Named sizes for ``model: {preset: 100m}`` (the HSD it aligns)."""
    validates = True

    def __init__(self, name: str, loss_config_cls: type):
        self.name = name
        self.loss_config_cls = loss_config_cls
        self.consumes = {"etl_dir": layout.ETL, "sid_dir": layout.SIDS,
                         "init_from": layout.weights_artifact("hsd")}
        if name == "dpo":  # the frozen reference: the same pretrained HSD
            self.consumes["reference_from"] = layout.weights_artifact("hsd")
        self.produces = ()

    @property
    def uses_reference(self) -> bool:
        return self.name == "dpo"

    def validate(self, model_cfg: HSDConfig, loss_cfg: Any, inputs: StageInputs) -> list[str]:
        problems: list[str] = []
        sid_dir = Path(inputs.sid_dir) if inputs.sid_dir else None
        if sid_dir is None or not (sid_dir / "sid_table.npy").is_file():
            problems.append(f"inputs.sid_dir: no sid_table.npy in {inputs.sid_dir!r} "
                            "(run the tokenizer stage first)")
        else:
            meta = load_sid_meta(sid_dir)
            if (meta.K, meta.L) != (model_cfg.K, model_cfg.L):
                problems.append(f"model K={model_cfg.K}, L={model_cfg.L} but the SID table has "
                                f"K={meta.K}, L={meta.L}")
            pc = loss_cfg.pairs
            needs_emb = pc.o3_similarity == "embedding" or pc.o3_tie_break == "embedding"
            if ("o3" in pc.objectives and needs_emb
                    and not (sid_dir / pc.o3_embedding).is_file()):
                problems.append(f"loss.pairs: o3 needs {sid_dir / pc.o3_embedding} "
                                f"(o3_similarity={pc.o3_similarity}, "
                                f"o3_tie_break={pc.o3_tie_break})")
        if not inputs.init_from:
            problems.append(f"inputs.init_from: required for {self.name} (the pretrained HSD)")
        elif not Path(inputs.init_from).is_file():
            problems.append(f"inputs.init_from: file not found: {inputs.init_from}")
        if self.uses_reference and inputs.reference_from and not Path(inputs.reference_from).is_file():
            problems.append(f"inputs.reference_from: file not found: {inputs.reference_from}")
        return problems

    def build(self, model_cfg: HSDConfig, loss_cfg: Any, inputs: StageInputs
              ) -> tuple[nn.Module, nn.Module]:
        model = load_hsd(model_cfg, inputs.init_from, PreferenceHSD)
        if not self.uses_reference:
            return model, ORPOLoss(loss_cfg)
        factory: Callable[[], nn.Module] = functools.partial(
            load_hsd, model_cfg, _reference_path(inputs))
        return model, DPOLoss(loss_cfg, FrozenReference(factory))

    def make_collate(self, model_cfg: HSDConfig, loss_cfg: Any, inputs: StageInputs) -> PrefCollate:
        return PrefCollate(inputs.sid_dir, loss_cfg.pairs, slate_size=model_cfg.N,
                           history_len=model_cfg.history_len)

    def step(self, model: nn.Module, loss_module: nn.Module, batch: PrefBatch) -> StepOutput:
        tok = model(batch.hist_codes, batch.hist_mask, batch.hist_fb, batch.slates)  # [B,1+R,N,L]
        lp = SlateLogprobs.from_stacked(tok, batch.rejected_mask)
        if isinstance(loss_module, DPOLoss):
            out = loss_module(lp, self._reference_logprobs(model, loss_module, batch))
        else:
            out = loss_module(lp)
        return StepOutput(out.loss, out.metrics(loss_module.pref_name, batch.objectives))

    @staticmethod
    def _reference_logprobs(model: nn.Module, loss_module: DPOLoss, batch: PrefBatch
                            ) -> SlateLogprobs:
        if loss_module.reference is None:
            raise ValueError("DPO loss module has no reference model")
        p = next(model.parameters())
        ref = loss_module.reference.get(p.device, p.dtype)
        with torch.no_grad():
            tok = ref.slate_logprobs(batch.hist_codes, batch.hist_mask, batch.hist_fb,
                                     batch.slates)  # [B,1+R,N,L]
        return SlateLogprobs.from_stacked(tok, batch.rejected_mask)

    def flops_per_sample(self, model_cfg: HSDConfig, loss_cfg: Any, inputs: StageInputs
                         ) -> float:
        """Each context scored on 1 + R slates (R = the loss's objectives)."""
        return preference_flops_per_sample(model_cfg, 1 + len(loss_cfg.pairs.objectives),
                                           self.uses_reference)

    def finalize(self, model: nn.Module, model_cfg: HSDConfig, loss_cfg: Any,
                 inputs: StageInputs, out_dir: Path) -> dict:
        return {"stage": self.name, "params": sum(p.numel() for p in model.parameters()),
                "objectives": list(loss_cfg.pairs.objectives), "init_from": inputs.init_from,
                "reference_from": _reference_path(inputs) if self.uses_reference else ""}


@register("orpo")
def orpo_stage() -> PreferenceStage:
    return PreferenceStage("orpo", ORPOStageLossConfig)


@register("dpo")
def dpo_stage() -> PreferenceStage:
    return PreferenceStage("dpo", DPOStageLossConfig)
