"""ORPO and DPO losses against hand computation, and their numerics (bf16, logp near 0, masks)."""

from __future__ import annotations

import math

import pytest
import torch

from higr_dist.losses import (
    DPOLoss,
    DPOLossConfig,
    FrozenReference,
    ORPOLoss,
    ORPOLossConfig,
    SlateLogprobs,
    log1mexp,
    log_odds,
    slate_logp,
)


def _lsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _odds(lp: float) -> float:
    return lp - math.log(1.0 - math.exp(lp))


def _toy() -> tuple[SlateLogprobs, list[float], list[list[float]]]:
    """B=2, R=2, N=2, L=1 with known per-token log-probs; one negative masked."""
    chosen = torch.tensor([[[-0.2], [-0.4]], [[-1.0], [-0.6]]])  # means -0.3, -0.8
    rejected = torch.tensor([[[[-1.0], [-2.0]], [[-0.1], [-0.3]]],  # means -1.5, -0.2
                             [[[-3.0], [-1.0]], [[-9.0], [-9.0]]]])  # means -2.0, (masked)
    mask = torch.tensor([[True, True], [True, False]])
    return SlateLogprobs(chosen, rejected, mask), [-0.3, -0.8], [[-1.5, -0.2], [-2.0, None]]


def test_log1mexp_and_log_odds_stable():
    x = torch.tensor([-1e-7, -1e-3, -0.5, -0.7, -5.0, -50.0])
    ref = torch.log(1 - torch.exp(x.double())).float()
    assert torch.allclose(log1mexp(x), ref, rtol=1e-4)
    # bf16 rounds log-probs near 0 to exactly 0: the log-odds stay finite (clamped)
    for lp in (torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16), torch.tensor([-1e-30, 0.0, 1e-3])):
        lo = log_odds(lp)
        assert lo.dtype == torch.float32 and torch.isfinite(lo).all() and (lo > 10).all()
    assert torch.isfinite(log_odds(torch.tensor([-float("inf"), -1e6]))).all()
    assert log_odds(torch.tensor([math.log(0.5)])).abs().item() < 1e-6  # odds(1/2) = 1


def test_slate_logp_reductions_and_empty_mask():
    tok = torch.tensor([[[-1.0, -2.0], [-3.0, -4.0]]])  # [1, N=2, L=2]
    assert slate_logp(tok, "mean").item() == pytest.approx(-2.5)
    assert slate_logp(tok, "sum").item() == pytest.approx(-10.0)
    m = torch.tensor([[[True, False], [False, False]]])
    assert slate_logp(tok, "mean", m).item() == pytest.approx(-1.0)
    assert slate_logp(tok, "mean", torch.zeros_like(m)).item() == 0.0  # all padding: no 0/0


def test_orpo_matches_hand_computation():
    lp, pc, pr = _toy()
    out = ORPOLoss(ORPOLossConfig(lambda_or=0.1))(lp)
    pairs = [(0, 0), (0, 1), (1, 0)]
    diffs = [_odds(pc[b]) - _odds(pr[b][r]) for b, r in pairs]
    nll = -(pc[0] + pc[1]) / 2
    or_loss = sum(-_lsig(d) for d in diffs) / 3
    assert out.nll.item() == pytest.approx(nll, rel=1e-5)
    assert out.pref_loss.item() == pytest.approx(or_loss, rel=1e-5)
    assert out.loss.item() == pytest.approx(nll + 0.1 * or_loss, rel=1e-5)
    assert out.margin.item() == pytest.approx(sum(diffs) / 3, rel=1e-5)
    assert out.pair_acc.item() == pytest.approx(2 / 3)  # (0, 1) has the rejected slate likelier
    m = out.metrics("or_loss", ("o1", "o2"))
    assert set(m) >= {"nll", "or_loss", "margin", "pair_acc", "margin_o1", "pair_acc_o2"}
    assert m["pair_acc_o2"].item() == 0.0 and m["pair_acc_o1"].item() == 1.0


def test_dpo_matches_hand_computation_sum_and_mean():
    lp, _, _ = _toy()
    ref = SlateLogprobs(lp.chosen - 0.5, lp.rejected + 0.25, lp.rejected_mask)
    for red, beta, nll_w in (("sum", 0.1, 0.0), ("mean", 2.0, 0.5)):
        out = DPOLoss(DPOLossConfig(beta=beta, logp_reduction=red, nll_weight=nll_w))(lp, ref)
        scale = 1.0 if red == "mean" else 2.0  # N*L = 2 tokens
        # policy - ref: chosen +0.5 per token, rejected -0.25 per token
        z = beta * (0.5 * scale + 0.25 * scale)
        dpo = -_lsig(z)
        nll = -(-0.3 - 0.8) / 2
        assert out.pref_loss.item() == pytest.approx(dpo, rel=1e-5)
        assert out.margin.item() == pytest.approx(z, rel=1e-5) and out.pair_acc.item() == 1.0
        assert out.loss.item() == pytest.approx(dpo + nll_w * nll, rel=1e-5)


def test_all_negatives_masked_gives_finite_zero_term_and_grads():
    tok = torch.randn(3, 4, 5, 3).clamp(max=-0.01).requires_grad_(True)
    lp = SlateLogprobs.from_stacked(tok, torch.zeros(3, 3, dtype=torch.bool))
    out = ORPOLoss()(lp)
    assert out.pref_loss.item() == 0.0 and out.pair_acc.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(tok.grad).all()
    assert tok.grad[:, 1:].abs().sum() == 0  # masked negatives get no gradient
    out = DPOLoss()(lp, lp)
    assert torch.isfinite(out.loss) and out.loss.item() == 0.0


def test_bf16_and_near_zero_logprobs_are_finite():
    # bf16 log-probs with exact zeros (a near-certain model) on chosen and rejected
    tok = torch.zeros(2, 3, 5, 3, dtype=torch.bfloat16)
    tok[1] = -torch.rand(3, 5, 3).to(torch.bfloat16) * 1e-3
    tok.requires_grad_(True)
    lp = SlateLogprobs.from_stacked(tok, torch.ones(2, 2, dtype=torch.bool))
    out = ORPOLoss()(lp)
    assert all(torch.isfinite(v).all() for v in (out.loss, out.nll, out.pref_loss, out.margin))
    out.loss.backward()
    assert torch.isfinite(tok.grad.float()).all()
    out = DPOLoss()(lp, SlateLogprobs.from_stacked(tok.detach(), lp.rejected_mask))
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(math.log(2), rel=1e-3)


def test_from_stacked_checks_shapes_and_reference_is_frozen_and_lazy():
    with pytest.raises(ValueError, match="negatives"):
        SlateLogprobs.from_stacked(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, dtype=torch.bool))
    built = []

    def factory():
        built.append(1)
        return torch.nn.Linear(2, 2)

    ref = FrozenReference(factory)
    loss = DPOLoss(reference=ref)
    assert not built and sum(1 for _ in loss.parameters()) == 0  # nothing until first use
    model = ref.get(torch.device("cpu"), torch.bfloat16)
    assert built == [1] and model.weight.dtype == torch.bfloat16 and not model.training
    assert all(not p.requires_grad for p in loss.parameters())
    assert ref.get(torch.device("cpu"), torch.bfloat16) is model and built == [1]
    loss.train()  # what the trainer does: the reference must stay in eval mode
    assert not model.training and not ref.training
    assert ORPOLoss().state_dict() == {} and sum(1 for _ in ORPOLoss().modules()) == 1
