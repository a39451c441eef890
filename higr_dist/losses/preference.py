"""Listwise preference losses for slates: ORPO (reference-free, the paper's) and DPO (comparison).

Design
------
The losses see only per-token log-probabilities under teacher forcing (``HSD.slate_logprobs``),
packed in :class:`SlateLogprobs` (chosen ``[B, N, L]``, rejected ``[B, R, N, L]`` with a
``[B, R]`` validity mask, R = enabled objectives O1/O2/O3). They are pure tensor code: the model
call, the reference model and the batch live in the stage (``higr_dist.stages.orpo``).

ORPO (METHOD.md eq. 13-14, Hong et al. 2024). Slate log-probability = mean log-prob of its N*L
codes; odds(y) = P/(1-P) with P = exp(mean log-prob), so
``log odds = logp - log(1 - exp(logp))``. Loss = nll_weight * NLL(y+) + lambda_or * mean over
valid (context, negative) pairs of ``-log sigmoid(log odds(y+) - log odds(y-))``.

Numerics (METHOD.md pitfall "ORPO under DeepSpeed giving NaN"): everything after the model is
float32; ``log1mexp`` switches between ``log(-expm1(x))`` and ``log1p(-exp(x))`` at -ln 2;
the slate log-prob is clamped to ``[min_logp, max_logp]`` (default max -1e-6) so a bf16
log-prob rounded to 0 gives a large finite log-odds, never inf/NaN; every masked mean divides by
``max(count, 1)``, so a micro-batch whose negatives are all masked (or an empty one) yields a
zero preference term instead of 0/0. Masked entries are selected away with ``where`` (never
multiplied by 0, which would keep a NaN).

DPO (Rafailov et al. 2023): ``-log sigmoid(beta * ((logp(y+) - ref(y+)) - (logp(y-) - ref(y-))))``
with sequence log-probs as **sums** over the N*L codes by default (the standard DPO
definition; ``logp_reduction: mean`` scales the implicit reward by 1/(N*L), so beta must grow
accordingly), plus an optional NLL term (``nll_weight``, default 0). The frozen reference model
is held by :class:`FrozenReference` inside the loss module: built lazily on first use (outside
any ZeRO-3 ``zero.Init`` context that may wrap ``build()``), moved to the policy's device,
its parameters (only) cast to the policy's dtype, ``requires_grad=False``, never seen by the
optimiser. Floating buffers stay fp32, as DeepSpeed (>= 0.19.2) keeps them in the policy: a
reference whose buffers were cast to bf16 would compute with other constants than the policy
(``fb_edges`` 0.2 becomes 0.2002) and bias every implicit reward.

Trade-off: per-pair averaging (over valid pairs of the micro-batch) instead of per-context
averaging weights a context by its number of valid negatives; it is simpler and matches "mean
over negatives" when all objectives are on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Stable ``log(1 - exp(x))`` for x < 0 (Maechler 2012), computed in float32."""
    x = x.float()
    return torch.where(x > -LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(logp: torch.Tensor, max_logp: float = -1e-6, min_logp: float = -1e4) -> torch.Tensor:
    """``log(P / (1 - P))`` from ``logp = log P`` (any shape), float32, clamped to stay finite."""
    lp = logp.float().clamp(min=min_logp, max=max_logp)
    return lp - log1mexp(lp)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (same shape); 0 when the mask is empty (no 0/0)."""
    x = x.float()
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / mask.sum().clamp(min=1).to(x.dtype)


def slate_logp(tok_logps: torch.Tensor, reduction: Literal["mean", "sum"] = "mean",
               token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token log-probs ``[..., N, L]`` -> slate log-prob ``[...]`` (float32).

    ``mean`` divides by the number of valid tokens, clamped to >= 1 (an all-padding slate gives
    0, not NaN); ``token_mask`` (same shape, bool) marks valid tokens (all when None).
    """
    lp = tok_logps.float()
    if token_mask is None:
        total = lp.sum(dim=(-2, -1))
        count = torch.full_like(total, lp.shape[-2] * lp.shape[-1])
    else:
        total = torch.where(token_mask, lp, torch.zeros_like(lp)).sum(dim=(-2, -1))
        count = token_mask.sum(dim=(-2, -1)).to(lp.dtype)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count.clamp(min=1.0)
    raise ValueError(f"unknown reduction {reduction!r}")


# ---------------------------------------------------------------------------------------------
# typed inputs / outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class SlateLogprobs:
    """Teacher-forced per-token log-probs of each context's chosen and rejected slates."""

    chosen: torch.Tensor
    """[B, N, L] log-probs of y+ tokens."""
    rejected: torch.Tensor
    """[B, R, N, L] log-probs of y- tokens."""
    rejected_mask: torch.Tensor
    """[B, R] bool: which rejected slates are real negatives."""

    @classmethod
    def from_stacked(cls, tok_logps: torch.Tensor, rejected_mask: torch.Tensor) -> SlateLogprobs:
        """``[B, 1+R, N, L]`` (chosen first, as ``PrefBatch.slates``) + mask ``[B, R]``."""
        if tok_logps.shape[1] != rejected_mask.shape[1] + 1:
            raise ValueError(f"log-probs for {tok_logps.shape[1]} slates but mask for "
                             f"{rejected_mask.shape[1]} negatives (+1 chosen)")
        return cls(chosen=tok_logps[:, 0], rejected=tok_logps[:, 1:], rejected_mask=rejected_mask)


@dataclass
class PreferenceOutput:
    """Loss and its terms (scalars unless noted); ``pair_margin`` feeds per-objective metrics."""

    loss: torch.Tensor
    nll: torch.Tensor
    """NLL of y+: mean token cross-entropy over the N*L codes, batch mean."""
    pref_loss: torch.Tensor
    """Preference term (ORPO odds-ratio loss or DPO loss), mean over valid pairs."""
    margin: torch.Tensor
    """Mean over valid pairs of the log-odds margin (ORPO) or implicit reward margin (DPO)."""
    pair_acc: torch.Tensor
    """Share of valid pairs with margin > 0."""
    chosen_logp: torch.Tensor
    """Mean token log-prob of y+ (batch mean)."""
    rejected_logp: torch.Tensor
    """Mean token log-prob of the valid y- (mean over valid pairs)."""
    pair_margin: torch.Tensor
    """[B, R] detached per-pair margins."""
    pair_mask: torch.Tensor
    """[B, R] bool: valid pairs."""

    def metrics(self, pref_name: str, objectives: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Detached scalars for logging; per-objective margin/accuracy when names are given."""
        out = {"nll": self.nll.detach(), pref_name: self.pref_loss.detach(),
               "margin": self.margin, "pair_acc": self.pair_acc,
               "chosen_logp": self.chosen_logp, "rejected_logp": self.rejected_logp}
        if objectives and len(objectives) == self.pair_margin.shape[1] and len(objectives) > 1:
            for r, name in enumerate(objectives):
                m = self.pair_mask[:, r]
                out[f"margin_{name}"] = masked_mean(self.pair_margin[:, r], m)
                out[f"pair_acc_{name}"] = masked_mean((self.pair_margin[:, r] > 0).float(), m)
        return out


def _summarise(loss: torch.Tensor, nll: torch.Tensor, pref: torch.Tensor, margin: torch.Tensor,
               lp: SlateLogprobs) -> PreferenceOutput:
    mask = lp.rejected_mask.bool()  # [B, R]
    m = margin.detach()  # [B, R]
    with torch.no_grad():
        chosen_mean = slate_logp(lp.chosen).mean()
        rejected_mean = masked_mean(slate_logp(lp.rejected), mask)
    return PreferenceOutput(
        loss=loss, nll=nll, pref_loss=pref, margin=masked_mean(m, mask),
        pair_acc=masked_mean((m > 0).float(), mask), chosen_logp=chosen_mean,
        rejected_logp=rejected_mean, pair_margin=m, pair_mask=mask)


# ---------------------------------------------------------------------------------------------
# ORPO
# ---------------------------------------------------------------------------------------------


@dataclass
class ORPOLossConfig:
    """Listwise ORPO (the ``loss:`` section of stage ``orpo``)."""

    lambda_or: float = 0.1
    """Weight of the odds-ratio term (ORPO's default 0.1; the paper's value was lost)."""
    nll_weight: float = 1.0
    """Weight of the NLL (SFT) term on y+."""
    max_logp: float = -1e-6
    """Upper clamp of the mean slate log-prob before log1mexp (keeps log-odds finite in bf16)."""
    min_logp: float = -1e4
    """Lower clamp of the mean slate log-prob (keeps log-odds finite for -inf log-probs)."""

    def validate(self) -> list[str]:
        problems = []
        if self.lambda_or < 0 or self.nll_weight < 0:
            problems.append("lambda_or and nll_weight must be >= 0")
        if not self.min_logp < self.max_logp < 0:
            problems.append(f"need min_logp < max_logp < 0, got {self.min_logp}, {self.max_logp}")
        return problems


class ORPOLoss(nn.Module):
    """Reference-free listwise ORPO; holds no parameters and no model."""

    pref_name = "or_loss"

    def __init__(self, cfg: ORPOLossConfig | None = None):
        super().__init__()
        self.cfg = cfg or ORPOLossConfig()

    def forward(self, lp: SlateLogprobs) -> PreferenceOutput:
        c = self.cfg
        mask = lp.rejected_mask.bool()  # [B, R]
        logp_c = slate_logp(lp.chosen)  # [B]
        logp_r = slate_logp(lp.rejected)  # [B, R]
        nll = -logp_c.mean()
        diff = (log_odds(logp_c, c.max_logp, c.min_logp)[:, None]
                - log_odds(logp_r, c.max_logp, c.min_logp))  # [B, R]
        pref = masked_mean(-F.logsigmoid(diff), mask)
        loss = c.nll_weight * nll + c.lambda_or * pref
        return _summarise(loss, nll, pref, diff, lp)


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


@dataclass
class DPOLossConfig:
    """DPO for comparison (the ``loss:`` section of stage ``dpo``)."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward (DPO's common default)."""
    logp_reduction: Literal["sum", "mean"] = "sum"
    """Sequence log-prob over the N*L codes: ``sum`` (standard DPO) or ``mean`` (as ORPO)."""
    nll_weight: float = 0.0
    """Optional NLL term on y+ (0 = pure DPO)."""

    def validate(self) -> list[str]:
        problems = []
        if self.beta <= 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        if self.nll_weight < 0:
            problems.append(f"nll_weight must be >= 0, got {self.nll_weight}")
        return problems


class FrozenReference(nn.Module):
    """A frozen reference model, built lazily by ``factory`` on first :meth:`get`.

    Lazy construction keeps it out of any parameter-partitioning context active while the
    trainable model is built, and out of the optimiser; it follows the policy's device and its
    parameters the policy's dtype (buffers keep theirs, see the module docstring).
    """

    def __init__(self, factory: Callable[[], nn.Module]):
        super().__init__()
        self._factory = factory
        self.model: nn.Module | None = None

    def train(self, mode: bool = True) -> FrozenReference:
        """Stays in eval mode whatever the trainer asks (no dropout in the reference)."""
        super().train(False)
        return self

    def get(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        if self.model is None:
            model = self._factory()
            model.requires_grad_(False)
            model.eval()
            self.model = model
        first = next(self.model.parameters(), None)
        if first is not None and (first.device != device or first.dtype != dtype):
            self.model.to(device=device)  # buffers move, keeping their dtype
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.is_floating_point():
                        p.data = p.data.to(dtype)
        return self.model


class DPOLoss(nn.Module):
    """Listwise DPO against a frozen reference; the reference's log-probs come in as input."""

    pref_name = "dpo_loss"

    def __init__(self, cfg: DPOLossConfig | None = None, reference: FrozenReference | None = None):
        super().__init__()
        self.cfg = cfg or DPOLossConfig()
        self.reference = reference

    def forward(self, lp: SlateLogprobs, ref: SlateLogprobs) -> PreferenceOutput:
        c = self.cfg
        mask = lp.rejected_mask.bool()  # [B, R]
        red = c.logp_reduction
        pc, pr = slate_logp(lp.chosen, red), slate_logp(lp.rejected, red)  # [B], [B, R]
        with torch.no_grad():
            rc, rr = slate_logp(ref.chosen, red), slate_logp(ref.rejected, red)
        z = c.beta * ((pc - rc)[:, None] - (pr - rr))  # [B, R] implicit reward margins
        pref = masked_mean(-F.logsigmoid(z), mask)
        nll = -slate_logp(lp.chosen).mean()
        loss = pref + c.nll_weight * nll if c.nll_weight > 0 else pref
        return _summarise(loss, nll, pref, z, lp)
