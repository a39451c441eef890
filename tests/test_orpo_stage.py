"""Stages ``orpo`` and ``dpo`` end to end on a tiny HSD: build, collate, step, train, no reference."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from higr_dist.config import ConfigError, from_dict
from higr_dist.data.pairs import PairConfig
from higr_dist.losses import DPOLoss, ORPOLoss
from higr_dist.models.hsd import HSD, param_count, preset
from higr_dist.schema import PREF
from higr_dist.stages.base import StageInputs, get_stage
from higr_dist.stages.hsd import hsd_flops_per_sample
from higr_dist.stages.orpo import (
    DPOStageLossConfig,
    ORPOStageLossConfig,
    PreferenceHSD,
    preference_flops_per_sample,
)

NUM_ITEMS, K, L, N = 40, 8, 2, 3


def _cfg():
    return replace(preset("tiny"), K=K, L=L, N=N, history_len=6, d_model=32, dropout=0.0)


@pytest.fixture
def inputs(tmp_path):
    """A SID export (unique SIDs, embeddings) and an 'HSD pretraining' fp32 state dict."""
    rng = np.random.default_rng(1)
    codes = np.array([(a, b) for a in range(K) for b in range(K)])
    table = codes[rng.choice(len(codes), NUM_ITEMS, replace=False)].astype(np.int64)
    sid = tmp_path / "sid"
    sid.mkdir()
    np.save(sid / "sid_table.npy", table)
    np.save(sid / "item_emb.npy", rng.normal(size=(NUM_ITEMS, 4)).astype(np.float32))
    (sid / "sid_meta.json").write_text(json.dumps({"K": K, "L": L, "num_items": NUM_ITEMS}))
    torch.manual_seed(0)
    init = tmp_path / "hsd_fp32.pt"
    torch.save(HSD(_cfg()).state_dict(), init)
    return StageInputs(etl_dir=str(tmp_path), sid_dir=str(sid), init_from=str(init))


def _samples(n: int = 8) -> list[dict]:
    rng = np.random.default_rng(2)
    out = []
    for u in range(n):
        items = rng.choice(NUM_ITEMS, size=12, replace=False)
        hist, pos, neg = items[:6], items[6 : 6 + N], items[6 + N : 6 + N + (u % 3)]
        s = {"user_id": f"u{u}", "ts": 1000 + u, "hist_items": hist.tolist(),
             "hist_fb": rng.uniform(0, 3, 6).tolist(), "pos_items": pos.tolist(),
             "pos_fb": [3.0, 2.0, 1.5][:N], "neg_items": neg.tolist(),
             "neg_fb": [0.1] * len(neg)}
        out.append(PREF.decode(PREF.encode(s)))
    return out


def _train(stage, model, loss, batch, steps: int, lr: float) -> list[dict]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        out = stage.step(model, loss, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in out.metrics.items()} | {"loss": float(out.loss.detach())})
    return history


def test_config_sections_load_and_validate(inputs):
    cfg = from_dict(ORPOStageLossConfig, {"lambda_or": 0.2, "pairs": {"objectives": ["o1", "o3"]}})
    assert cfg.lambda_or == 0.2 and cfg.pairs.objectives == ["o1", "o3"]
    with pytest.raises(ConfigError) as e:
        from_dict(DPOStageLossConfig, {"beta": -1, "pairs": {"objectives": ["o4"]}})
    assert any("beta" in p for p in e.value.problems) and any("o4" in p for p in e.value.problems)
    stage = get_stage("orpo")
    assert stage.sample_kind == "prefs" and stage.validate(_cfg(), cfg, inputs) == []
    bad = replace(inputs, init_from="", sid_dir=str(inputs.etl_dir) + "/nope")
    problems = stage.validate(replace(_cfg(), K=16), cfg, bad)
    assert any("init_from" in p for p in problems) and any("sid_table" in p for p in problems)
    assert any("K=16" in p for p in stage.validate(replace(_cfg(), K=16), cfg, inputs))
    dpo = get_stage("dpo")
    assert any("reference_from" in p for p in dpo.validate(
        _cfg(), DPOStageLossConfig(), replace(inputs, reference_from="/missing.pt")))


def test_build_loads_init_weights_and_flops(inputs):
    stage = get_stage("orpo")
    model, loss = stage.build(_cfg(), ORPOStageLossConfig(), inputs)
    ref = torch.load(inputs.init_from, weights_only=True)
    assert isinstance(model, PreferenceHSD) and set(model.state_dict()) == set(ref)
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    cfg = preset("25m")
    assert preference_flops_per_sample(cfg, 1, False) == pytest.approx(hsd_flops_per_sample(cfg))
    loss = ORPOStageLossConfig()  # O1, O2, O3: each context scored on 1 + 3 slates
    assert stage.flops_per_sample(cfg, loss, inputs) == pytest.approx(
        preference_flops_per_sample(cfg, 4, False))
    dpo = get_stage("dpo")
    assert dpo.flops_per_sample(cfg, loss, inputs) > stage.flops_per_sample(cfg, loss, inputs)
    with pytest.raises(RuntimeError):  # strict load: a state dict of another shape fails
        stage.build(replace(_cfg(), d_model=64, n_heads=2), ORPOStageLossConfig(), inputs)


def test_orpo_holds_no_reference_model(inputs):
    stage = get_stage("orpo")
    cfg = _cfg()
    model, loss = stage.build(cfg, ORPOStageLossConfig(), inputs)
    batch = stage.make_collate(cfg, ORPOStageLossConfig(), inputs)(_samples(4))
    _train(stage, model, loss, batch, steps=2, lr=1e-3)
    assert isinstance(loss, ORPOLoss)
    hsds = [m for m in [*model.modules(), *loss.modules()] if isinstance(m, HSD)]
    assert len(hsds) == 1 and hsds[0] is model
    assert list(loss.parameters()) == [] and list(loss.buffers()) == []
    assert len(list(loss.modules())) == 1  # the loss module has no submodule at all
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
    assert not any(isinstance(v, torch.nn.Module) for v in vars(stage).values())


def test_orpo_tiny_training_raises_margin_and_pair_accuracy(inputs):
    stage = get_stage("orpo")
    cfg, lcfg = _cfg(), ORPOStageLossConfig(lambda_or=0.5)
    model, loss = stage.build(cfg, lcfg, inputs)
    batch = stage.make_collate(cfg, lcfg, inputs)(_samples(8)).to("cpu", torch.float32)
    assert batch.rejected_mask[:, 1].tolist() == [u % 3 > 0 for u in range(8)]  # O2 needs negs
    hist = _train(stage, model, loss, batch, steps=50, lr=3e-3)
    first, last = hist[0], hist[-1]
    assert set(first) >= {"nll", "or_loss", "margin", "pair_acc", "margin_o1", "pair_acc_o3"}
    assert all(np.isfinite(v) for h in hist for v in h.values())
    assert last["margin"] > first["margin"] + 1.0
    assert last["pair_acc"] > first["pair_acc"] and last["pair_acc"] >= 0.9
    assert last["nll"] < first["nll"] and last["or_loss"] < first["or_loss"]


def test_dpo_reference_is_frozen_lazy_and_outside_the_model(inputs):
    stage = get_stage("dpo")
    cfg, lcfg = _cfg(), DPOStageLossConfig(beta=0.1)
    model, loss = stage.build(cfg, lcfg, inputs)
    assert isinstance(loss, DPOLoss) and loss.reference.model is None  # built on first step
    batch = stage.make_collate(cfg, lcfg, inputs)(_samples(8))
    first = stage.step(model, loss, batch)
    assert first.metrics["dpo_loss"].item() == pytest.approx(np.log(2), abs=1e-5)  # policy == ref
    hist = _train(stage, model, loss, batch, steps=30, lr=3e-3)
    ref = loss.reference.model
    assert isinstance(ref, HSD) and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert not {id(p) for p in ref.parameters()} & {id(p) for p in model.parameters()}
    init = torch.load(inputs.init_from, weights_only=True)
    assert all(torch.equal(ref.state_dict()[k], init[k]) for k in init)  # never updated
    assert hist[-1]["margin"] > hist[0]["margin"] + 0.5 and hist[-1]["pair_acc"] >= 0.9


def test_step_in_bf16_is_finite(inputs):
    stage = get_stage("orpo")
    cfg = _cfg()
    model, loss = stage.build(cfg, ORPOStageLossConfig(), inputs)
    model = model.to(torch.bfloat16)
    batch = stage.make_collate(cfg, ORPOStageLossConfig(pairs=PairConfig(objectives=["o2"])),
                               inputs)(_samples(3)).to("cpu", torch.bfloat16)
    assert not batch.rejected_mask[0].any()  # user u0 has no negatives: one all-masked row
    out = stage.step(model, loss, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(torch.as_tensor(v))
                                            for v in out.metrics.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
