"""HSD, flat and SASRec models, their losses, and the hsd/flat/sasrec stages (tiny, CPU)."""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from higr_dist.data.loader import iterate_samples
from higr_dist.data.shardio import list_shards, write_shard
from higr_dist.models.flat import Flat, FlatLoss, FlatLossConfig, flat_param_count
from higr_dist.models.hsd import (
    HSD,
    PRESETS,
    HSDConfig,
    HSDLoss,
    HSDLossConfig,
    HSDOutput,
    param_count,
    preset,
)
from higr_dist.models.sasrec import SASRec, SASRecConfig, SASRecLoss, SASRecLossConfig
from higr_dist.schema import SLATE
from higr_dist.stages.base import StageInputs, get_stage
from higr_dist.stages.hsd import SlateBatch, SlateCollate

TINY = HSDConfig(K=8, L=3, N=4, d_model=16, n_heads=2, ctx_layers=1, planner_layers=2,
                 gen_layers=1, history_len=6, dropout=0.0, id_buckets=64)


def _table(num_items: int, K: int, L: int, seed: int = 0) -> np.ndarray:
    """A random unique SID table [num_items, L]."""
    keys = np.random.default_rng(seed).choice(K ** L, num_items, replace=False)
    return np.stack([(keys // K ** (L - 1 - i)) % K for i in range(L)], 1).astype(np.int64)


def _inputs(cfg: HSDConfig, B: int = 3, H: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hc = torch.randint(0, cfg.K, (B, H, cfg.L), generator=g)
    hm = torch.ones(B, H, dtype=torch.bool)
    hm[0, 3:] = False
    hf = torch.rand(B, H, generator=g) * 3
    tg = torch.randint(0, cfg.K, (B, cfg.N, cfg.L), generator=g)
    return hc, hm, hf, tg


def _n(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# sizes and presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [TINY, preset("tiny"), replace(TINY, mlp="gelu", ffn_mult=3.0)])
def test_param_count_formulas_match_modules(cfg):
    assert param_count(cfg) == _n(HSD(cfg))
    assert flat_param_count(cfg) == _n(Flat(cfg))
    # same width and total depth: the two decoders are within 5% of each other
    assert abs(flat_param_count(cfg) - param_count(cfg)) / param_count(cfg) < 0.05


def test_presets_land_near_their_names():
    targets = {"25m": 25e6, "100m": 100e6, "0.05b": 50e6, "0.1b": 100e6, "0.2b": 200e6,
               "0.5b": 500e6, "1b": 1e9, "2b": 2e9}
    for name, target in targets.items():
        cfg = preset(name)
        assert cfg.validate() == []
        assert abs(param_count(cfg) - target) / target < 0.10, (name, param_count(cfg))
    for name in ("25m", "100m"):
        assert preset(name).planner_layers + preset(name).gen_layers == 16
        assert (preset(name).planner_layers, preset(name).gen_layers) == (14, 2)
    p = preset("tiny")
    p.fb_boundaries.append(99.0)  # a copy: the registry is untouched
    assert PRESETS["tiny"].fb_boundaries[-1] != 99.0
    with pytest.raises(KeyError):
        preset("nope")


def test_config_validation_lists_problems():
    bad = replace(TINY, d_model=15, fb_boundaries=[2.0, 1.0], planner_layers=0)
    problems = bad.validate()
    assert len(problems) == 3
    with pytest.raises(ValueError, match="HSDConfig"):
        HSD(bad)


# ---------------------------------------------------------------------------------------------
# masks and shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [HSD, Flat])
def test_history_padding_does_not_change_outputs(cls):
    torch.manual_seed(0)
    model = cls(TINY).eval()
    hc, hm, hf, tg = _inputs(TINY, B=3, H=5)
    base = model(hc, hm, hf, tg).logits  # [B, N, L, K]
    assert base.shape == (3, TINY.N, TINY.L, TINY.K)
    # garbage in the padded slots of row 0, plus 3 more padding columns for every row
    hc2 = torch.cat([hc, torch.randint(0, TINY.K, (3, 3, TINY.L))], 1)
    hc2[0, 3:5] = -1  # any value on padding (even an invalid code) is ignored
    hm2 = torch.cat([hm, torch.zeros(3, 3, dtype=torch.bool)], 1)
    hf2 = torch.cat([hf, torch.full((3, 3), 7.0)], 1)
    hf2[0, 3:5] = 5.0
    assert torch.allclose(model(hc2, hm2, hf2, tg).logits, base, atol=1e-5)
    # left padding instead of right padding: same result (recency positions)
    n = int(hm[0].sum())
    hc3, hm3, hf3 = hc.clone(), hm.clone(), hf.clone()
    hc3[0] = torch.roll(hc[0], 5 - n, 0)
    hm3[0] = torch.roll(hm[0], 5 - n, 0)
    hf3[0] = torch.roll(hf[0], 5 - n, 0)
    assert torch.allclose(model(hc3, hm3, hf3, tg).logits, base, atol=1e-5)
    # a row alone gives what it gives in the batch
    one = model(hc[1:2], hm[1:2], hf[1:2], tg[1:2]).logits
    assert torch.allclose(one, base[1:2], atol=1e-5)


def test_empty_history_is_finite():
    model = HSD(TINY).eval()
    hc, hm, hf, tg = _inputs(TINY, B=2, H=4)
    hm[:] = False
    out = model(hc, hm, hf, tg)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.plan).all()


def test_hsd_causal_structure():
    torch.manual_seed(1)
    model = HSD(TINY).eval()
    hc, hm, hf, tg = _inputs(TINY)
    base = model(hc, hm, hf, tg)
    j, layer = 1, 1
    tg2 = tg.clone()
    tg2[:, j, layer] = (tg[:, j, layer] + 1) % TINY.K
    out = model(hc, hm, hf, tg2)
    # earlier items, and item j up to the changed code, see nothing of the change
    assert torch.allclose(out.logits[:, :j], base.logits[:, :j], atol=1e-6)
    assert torch.allclose(out.logits[:, j, : layer + 1], base.logits[:, j, : layer + 1], atol=1e-6)
    assert torch.allclose(out.plan[:, : j + 1], base.plan[:, : j + 1], atol=1e-6)
    # ... while the later code of item j and the later plans do change
    assert not torch.allclose(out.logits[:, j, layer + 1], base.logits[:, j, layer + 1])
    assert not torch.allclose(out.plan[:, j + 1], base.plan[:, j + 1])


def test_flat_causal_structure():
    torch.manual_seed(2)
    model = Flat(TINY).eval()
    hc, hm, hf, tg = _inputs(TINY)
    base = model(hc, hm, hf, tg).logits.reshape(3, -1, TINY.K)  # [B, N*L, K]
    t = 5
    tg2 = tg.clone().reshape(3, -1)
    tg2[:, t] = (tg2[:, t] + 1) % TINY.K
    out = model(hc, hm, hf, tg2.reshape(tg.shape)).logits.reshape(3, -1, TINY.K)
    assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)
    assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize("cls", [HSD, Flat])
def test_slate_logprobs_match_forward(cls):
    torch.manual_seed(3)
    model = cls(TINY).eval()
    hc, hm, hf, _ = _inputs(TINY)
    slates = torch.randint(0, TINY.K, (3, 4, TINY.N, TINY.L))
    lp = model.slate_logprobs(hc, hm, hf, slates)  # [B, S, N, L]
    assert lp.shape == slates.shape and lp.dtype == torch.float32
    for s in range(slates.shape[1]):
        logits = model(hc, hm, hf, slates[:, s]).logits
        ref = torch.log_softmax(logits, -1).gather(-1, slates[:, s, ..., None]).squeeze(-1)
        assert torch.allclose(lp[:, s], ref, atol=1e-5)
    assert (lp <= 0).all()


def test_kv_cached_steps_equal_teacher_forcing():
    torch.manual_seed(4)
    model = HSD(TINY).eval()
    hc, hm, hf, tg = _inputs(TINY)
    with torch.no_grad():
        out = model(hc, hm, hf, tg)
        ctx = model.encode_context(hc, hm, hf)
        pcache = None
        for j in range(TINY.N):
            plan, pcache = model.planner_step(ctx, tg[:, j - 1] if j else None, pcache)
            assert torch.allclose(plan, out.plan[:, j], atol=1e-5)
            assert torch.allclose(model.planner_full(ctx, tg[:, :j]), plan, atol=1e-5)
            gcache = None
            for layer in range(TINY.L):
                logits, gcache = model.generator_step(
                    ctx, gcache, plan=out.plan[:, j] if layer == 0 else None,
                    prev_code=tg[:, j, layer - 1] if layer else None)
                assert torch.allclose(logits, out.logits[:, j, layer], atol=1e-5)
                full = model.generator_full(ctx, out.plan[:, j], tg[:, j, :layer])
                assert torch.allclose(full, logits, atol=1e-5)
        with pytest.raises(ValueError):
            model.generator_step(ctx, gcache, prev_code=tg[:, 0, 0])  # past the L-th code


def test_flat_kv_cached_steps_equal_teacher_forcing():
    torch.manual_seed(5)
    model = Flat(TINY).eval()
    hc, hm, hf, tg = _inputs(TINY)
    tokens = tg.reshape(3, -1)
    with torch.no_grad():
        ref = model(hc, hm, hf, tg).logits.reshape(3, -1, TINY.K)
        ctx = model.encode_context(hc, hm, hf)
        cache = None
        for t in range(tokens.shape[1]):
            logits, cache = model.step(ctx, cache, tokens[:, :t] if t else None)
            assert torch.allclose(logits, ref[:, t], atol=1e-5)
            assert torch.allclose(model.full_step(ctx, tokens[:, :t]), logits, atol=1e-5)


def test_grouped_cross_attention_matches_repeated_memory():
    """Folding G sequences onto one memory equals replicating the memory G times."""
    from higr_dist.models.layers import BlockConfig, CrossAttention

    torch.manual_seed(6)
    att = CrossAttention(BlockConfig(d_model=16, n_heads=2)).eval()
    mem = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(2 * 3, 4, 16)  # G = 3 sequences per memory row, b-major
    grouped = att(x, att.project(mem), mask)
    rep = att(x, att.project(mem.repeat_interleave(3, 0)), mask.repeat_interleave(3, 0))
    assert torch.allclose(grouped, rep, atol=1e-6)


def test_absorbed_cross_attention_equals_projected():
    """Attending to the raw memory with W_k / W_v folded into the query and output equals
    attention to projected keys/values (grouped queries, padded memory)."""
    from higr_dist.models.layers import BlockConfig, CrossAttention

    torch.manual_seed(7)
    att = CrossAttention(BlockConfig(d_model=24, n_heads=3)).eval()
    mem = torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(2 * 3, 2, 24)  # G = 3 sequences per memory row, b-major, T = 2
    assert torch.allclose(att(x, mem, mask), att(x, att.project(mem), mask), atol=1e-5)


def test_absorb_pays_picks_the_cheaper_form():
    from higr_dist.models.layers import absorb_pays

    d, h, M = 288, 4, 51  # the 25m preset with a 50-item history
    assert absorb_pays(5, 5, 64, M, d, h)  # HSD planner, batch 64: N queries per context
    assert not absorb_pays(5, 5, 1, M, d, h)  # batch 1: re-reading W_k/W_v per step dominates
    assert not absorb_pays(5 * (1 + 2 * 10), 15, 64, M, d, h)  # generator at beam 10
    assert not absorb_pays(1 + 14 * 10, 15, 64, M, d, h)  # flat decoder at beam 10


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def test_hsd_loss_terms_equal_hand_computation():
    logits = torch.tensor([[[[2.0, 0.0, -1.0]], [[0.0, 1.0, 0.0]]]])  # [B=1, N=2, L=1, K=3]
    target = torch.tensor([[[0], [2]]])
    plan = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # cos = 1/sqrt(2)
    terms = HSDLoss(HSDLossConfig(lambda_ild=0.5))(HSDOutput(logits, plan), target)

    def ce(row, t):
        return -(row[t] - math.log(sum(math.exp(v) for v in row)))

    want_ce = (ce([2.0, 0.0, -1.0], 0) + ce([0.0, 1.0, 0.0], 2)) / 2
    assert terms.ce.item() == pytest.approx(want_ce, rel=1e-6)
    assert terms.ild.item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert terms.total.item() == pytest.approx(want_ce + 0.5 / math.sqrt(2), rel=1e-6)
    assert terms.acc.item() == pytest.approx(0.5)


def test_ild_three_positions_and_single_position():
    from higr_dist.models.hsd import ild_loss

    plan = torch.randn(2, 3, 4)
    u = F.normalize(plan, dim=-1)
    want = torch.stack([(u[b, 0] @ u[b, 1] + u[b, 0] @ u[b, 2] + u[b, 1] @ u[b, 2]) / 3
                        for b in range(2)]).mean()
    assert ild_loss(plan).item() == pytest.approx(want.item(), rel=1e-5)
    assert ild_loss(plan[:, :1]).item() == 0.0


def test_flat_and_sasrec_losses_are_plain_ce():
    logits = torch.randn(2, 3, 2, 5)
    tgt = torch.randint(0, 5, (2, 3, 2))
    from higr_dist.models.flat import FlatOutput

    terms = FlatLoss(FlatLossConfig())(FlatOutput(logits), tgt)
    assert terms.total.item() == pytest.approx(
        F.cross_entropy(logits.reshape(-1, 5), tgt.reshape(-1)).item(), rel=1e-6)
    from higr_dist.models.sasrec import SASRecOutput

    lg, t = torch.randn(7, 11), torch.randint(0, 11, (7,))
    st = SASRecLoss(SASRecLossConfig())(SASRecOutput(lg, t))
    assert st.total.item() == pytest.approx(F.cross_entropy(lg, t).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# training, checkpointing, precision
# ---------------------------------------------------------------------------------------------


def _toy_batch(cfg: HSDConfig, table: np.ndarray, B: int, g: torch.Generator):
    """Learnable pattern: the slate is the N items after the newest history item."""
    n = table.shape[0]
    H = 4
    hist = torch.randint(0, n, (B, H), generator=g)
    tgt = (hist[:, -1:] + torch.arange(1, cfg.N + 1)) % n  # [B, N]
    t = torch.from_numpy(table)
    return (hist, t[hist], torch.ones(B, H, dtype=torch.bool), torch.rand(B, H, generator=g) * 2,
            tgt, t[tgt])


@pytest.mark.parametrize("kind", ["hsd", "flat", "sasrec"])
def test_short_training_lowers_the_loss(kind):
    torch.manual_seed(0)
    cfg = replace(TINY, d_model=32, K=8, N=3)
    table = _table(24, cfg.K, cfg.L, seed=1)
    if kind == "hsd":
        model, loss = HSD(cfg), HSDLoss(HSDLossConfig())
    elif kind == "flat":
        model, loss = Flat(cfg), FlatLoss(FlatLossConfig())
    else:
        model = SASRec(SASRecConfig(num_items=24, d_model=32, n_layers=1, max_len=8, dropout=0.0))
        loss = SASRecLoss(SASRecLossConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(120):
        items, hc, hm, hf, tgt, tc = _toy_batch(cfg, table, 32, g)
        if kind == "sasrec":
            total = loss(model(items, hm, tgt)).total
        else:
            total = loss(model(hc, hm, hf, tc), tc).total
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.6 * first, (kind, first, last)


@pytest.mark.parametrize("cls", [HSD, Flat])
def test_gradient_checkpointing_gives_the_same_gradients(cls):
    torch.manual_seed(7)
    model = cls(TINY).train()
    hc, hm, hf, tg = _inputs(TINY)
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(hc, hm, hf, tg).logits.float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_bf16_forward_is_close_to_fp32():
    torch.manual_seed(8)
    model = HSD(TINY).eval()
    hc, hm, hf, tg = _inputs(TINY)
    ref = model(hc, hm, hf, tg).logits
    out = model.to(torch.bfloat16)(hc, hm, hf.bfloat16(), tg).logits
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------
# SASRec
# ---------------------------------------------------------------------------------------------


def test_sasrec_padding_causality_and_recommend():
    torch.manual_seed(9)
    model = SASRec(SASRecConfig(num_items=30, d_model=16, n_layers=2, max_len=12,
                                dropout=0.0)).eval()
    hist = torch.tensor([[3, 4, 5, 0, 0], [7, 8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    tgt = torch.tensor([[1, 2], [12, 13]])
    out = model(hist, mask, tgt)
    assert out.logits.shape == (3 + 1 + 5 + 1, 30)  # positions with a next item
    assert out.targets.tolist() == [4, 5, 1, 2, 8, 9, 10, 11, 12, 13]
    left = model(torch.tensor([[0, 0, 3, 4, 5], [7, 8, 9, 10, 11]]),
                 torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool), tgt)
    assert torch.allclose(left.logits, out.logits, atol=1e-5)
    # changing the last target does not change any score (nothing is predicted from it)
    tgt2 = tgt.clone()
    tgt2[:, 0] = 20
    out2 = model(hist, mask, tgt2)
    first = [0, 1, 4, 5, 6, 7]  # positions before target 0 in each row
    assert torch.allclose(out2.logits[first], out.logits[first], atol=1e-6)
    rec = model.recommend(hist, mask, k=5)
    assert rec.shape == (2, 5) and all(len(set(r)) == 5 for r in rec.tolist())
    rec_ex = model.recommend(hist, mask, k=5, exclude_history=True)
    assert not set(rec_ex[1].tolist()) & {7, 8, 9, 10, 11}
    assert not set(rec_ex[0].tolist()) & {3, 4, 5}


# ---------------------------------------------------------------------------------------------
# stages on real shards
# ---------------------------------------------------------------------------------------------


def _export(tmp_path, cfg: HSDConfig, num_items: int):
    sid = tmp_path / "sid"
    sid.mkdir()
    table = _table(num_items, cfg.K, cfg.L, seed=3)
    np.save(sid / "sid_table.npy", table)
    (sid / "sid_meta.json").write_text(json.dumps({"K": cfg.K, "L": cfg.L,
                                                   "num_items": num_items}))
    return sid, table


def _write_slates(tmp_path, num_items: int, N: int, n: int = 10):
    d = tmp_path / "etl" / "slates" / "train"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    samples = []
    for u in range(n):
        h = int(rng.integers(0, 9))
        samples.append((f"u{u}", {
            "user_id": f"u{u}", "split": "train", "ts": 1000 + u,
            "hist_items": rng.integers(0, num_items, h).tolist(),
            "hist_fb": rng.random(h).round(3).tolist(),
            "target_items": rng.integers(0, num_items, N).tolist(),
            "target_fb": (rng.random(N) * 3).round(3).tolist()}))
    write_shard(d / "shard-000000.tar", SLATE, samples)
    return d, [s for _, s in samples]


def test_slate_collate_on_real_shards(tmp_path):
    cfg = TINY
    sid, table = _export(tmp_path, cfg, 40)
    shard_dir, written = _write_slates(tmp_path, 40, cfg.N)
    samples = list(iterate_samples(list_shards(shard_dir), SLATE))
    collate = pickle.loads(pickle.dumps(SlateCollate(sid, cfg.N, cfg.history_len)))
    batch = collate(samples)
    B = len(written)
    assert batch.num_samples == B and batch.num_tokens == B * cfg.N * cfg.L
    H = batch.hist_items.shape[1]
    assert H == min(cfg.history_len, max(len(s["hist_items"]) for s in written))
    for b, s in enumerate(written):
        hist = s["hist_items"][-cfg.history_len:]
        n = len(hist)
        assert batch.hist_mask[b].tolist() == [True] * n + [False] * (H - n)  # right-padded
        assert batch.hist_items[b, :n].tolist() == hist
        assert batch.hist_codes[b, :n].tolist() == table[hist].tolist()
        assert (batch.hist_codes[b, n:] == 0).all() and (batch.hist_fb[b, n:] == 0).all()
        assert batch.target_codes[b].tolist() == table[s["target_items"]].tolist()
    moved = batch.to(torch.device("cpu"), torch.bfloat16)
    assert moved.hist_fb.dtype == torch.float32  # bucketized feedback is never rounded
    with pytest.raises(ValueError, match="targets"):
        SlateCollate(sid, cfg.N + 1, 5)(samples)


@pytest.mark.parametrize("name", ["hsd", "flat", "sasrec"])
def test_stage_build_step_finalize(tmp_path, name):
    cfg = TINY
    sid, _ = _export(tmp_path, cfg, 40)
    shard_dir, _ = _write_slates(tmp_path, 40, cfg.N)
    inputs = StageInputs(etl_dir=str(tmp_path / "etl"), sid_dir=str(sid))
    stage = get_stage(name)
    assert stage.sample_kind == "slates/train"
    model_cfg = cfg if name != "sasrec" else SASRecConfig(d_model=16, n_layers=1, max_len=16,
                                                          history_len=cfg.history_len, N=cfg.N)
    loss_cfg = stage.loss_config_cls()
    assert stage.validate(model_cfg, loss_cfg, inputs) == []
    model, loss_module = stage.build(model_cfg, loss_cfg, inputs)
    assert hasattr(model, "gradient_checkpointing")
    assert not any(True for _ in loss_module.parameters())
    batch: SlateBatch = stage.make_collate(model_cfg, loss_cfg, inputs)(
        list(iterate_samples(list_shards(shard_dir), SLATE)))
    out = stage.step(model, loss_module, batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert "acc" in out.metrics and "ce" in out.metrics
    if name == "hsd":
        assert {"ild", "acc_l1", "acc_l3"} <= set(out.metrics)
        assert out.loss.item() == pytest.approx(
            (out.metrics["ce"] + loss_cfg.lambda_ild * out.metrics["ild"]).item(), rel=1e-6)
    assert stage.flops_per_sample(model_cfg, loss_cfg, inputs) > 0
    summary = stage.finalize(model, model_cfg, loss_cfg, inputs, tmp_path / "export")
    assert summary["params"] == _n(model)
    if name == "sasrec":
        assert summary["num_items"] == 40


def test_stage_validate_reports_mismatches(tmp_path):
    sid, _ = _export(tmp_path, TINY, 40)
    stage = get_stage("hsd")
    inputs = StageInputs(etl_dir="", sid_dir=str(sid))
    problems = stage.validate(replace(TINY, K=16), stage.loss_config_cls(lambda_ild=-1), inputs)
    text = " | ".join(problems)
    assert "K=16" in text and "lambda_ild" in text and "etl_dir" in text
    assert any("sid_dir" in p for p in stage.validate(TINY, stage.loss_config_cls(),
                                                      StageInputs(etl_dir="x", sid_dir="")))
    sas = get_stage("sasrec")
    problems = sas.validate(SASRecConfig(num_items=41), SASRecLossConfig(),
                            StageInputs(etl_dir="x", sid_dir=str(sid)))
    assert any("num_items=41" in p for p in problems)


def test_flops_per_sample_scale_with_depth():
    hsd, flat = get_stage("hsd"), get_stage("flat")
    cfg, inputs = preset("25m"), StageInputs()
    hsd_loss, flat_loss = hsd.loss_config_cls(), flat.loss_config_cls()
    # the flat decoder runs its full depth over all N*L tokens: more FLOPs than HSD
    assert flat.flops_per_sample(cfg, flat_loss, inputs) > hsd.flops_per_sample(cfg, hsd_loss,
                                                                                  inputs)
    deeper = replace(cfg, planner_layers=28)
    assert hsd.flops_per_sample(deeper, hsd_loss, inputs) > hsd.flops_per_sample(
        cfg, hsd_loss, inputs)


def test_newest_item_ignores_padding_wherever_it_sits():
    from higr_dist.models.hsd import newest_item

    codes = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    mask = torch.tensor([[True, True, False, False], [False, True, False, True]])
    got, present = newest_item(codes, mask)
    assert torch.equal(got, torch.stack([codes[0, 1], codes[1, 3]]))
    assert present.all()
    got, present = newest_item(codes, torch.zeros(2, 4, dtype=torch.bool))
    assert not present.any() and (got == 0).all()


def test_start_token_reads_the_newest_item_and_only_it():
    """With ``start_from_last`` the first planner input changes with the newest history
    item; changing an older item moves it only through the memory (cross-attention)."""
    from higr_dist.models.hsd import start_token

    model = HSD(TINY).eval()
    hc, hm, hf, _ = _inputs(TINY, B=2, H=4)
    hm[:] = True
    s0 = start_token(model.bos, model.sid_emb, hc, hm, True, torch.float32)
    older, newest = hc.clone(), hc.clone()
    older[:, 0] = (older[:, 0] + 1) % TINY.K
    newest[:, -1] = (newest[:, -1] + 1) % TINY.K
    assert torch.equal(start_token(model.bos, model.sid_emb, older, hm, True, torch.float32), s0)
    assert not torch.allclose(start_token(model.bos, model.sid_emb, newest, hm, True,
                                          torch.float32), s0)
    off = start_token(model.bos, model.sid_emb, hc, hm, False, torch.float32)
    assert torch.equal(off, model.bos.expand(2, 1, -1))


def test_hashed_identity_separates_items_that_share_codes():
    from higr_dist.models.hsd import HashedIdEmbedding

    torch.manual_seed(0)
    emb = HashedIdEmbedding(K=8, L=3, buckets=64, d=4)
    codes = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 2, 3]])
    h = emb.hashes(codes)
    assert h.shape == (3, 2) and (h >= 0).all() and (h < 64).all()
    assert torch.equal(h[0], h[2]) and not torch.equal(h[0], h[1])
    # every SID of an 8^3 code space: two items never share both buckets here
    allc = torch.cartesian_prod(*[torch.arange(8)] * 3)
    pairs = emb.hashes(allc)
    assert torch.unique(pairs[:, 0] * 64 + pairs[:, 1]).numel() > 0.9 * len(allc)
