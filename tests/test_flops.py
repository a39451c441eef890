"""Every stage's FLOPs per sample (what MFU divides by) against an independent count: the
matrix-multiply FLOPs that torch's own counter sees when the real model runs forward and
backward on a batch, divided by the batch.

The stages count 6 x (matmul parameters x the tokens they see), biases included, and leave out
attention scores (short sequences) and the input gradient that the first layer does not need;
so the formula sits at or somewhat above the counted matrix multiplies (at most 20% in these
tiny models, where the first layer is a large share; the slate models 1-3%), never below, and
the attention-score matmuls (``bmm``) are small beside them. One step runs before the count:
the tokenizer's first training forward initialises its codebooks by k-means, once.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from higr_dist.models.hsd import HSDConfig
from higr_dist.models.pcrq_vae import PCRQVAEConfig
from higr_dist.models.sasrec import SASRecConfig
from higr_dist.stages.base import StageInputs, get_stage
from higr_dist.stages.tokenizer import PairBatch

B = 4
HSD_CFG = HSDConfig(K=8, L=3, N=4, d_model=16, n_heads=2, ctx_layers=1, planner_layers=2,
                    gen_layers=2, history_len=6, dropout=0.0, id_buckets=64)


def _measure(run) -> tuple[float, float]:
    """(parameter-matmul FLOPs, attention-score FLOPs) per sample of ``run()`` (fwd + bwd)."""
    with FlopCounterMode(display=False) as counter:
        run()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    matmul = sum(v for k, v in counts.items() if k in ("aten.mm", "aten.addmm"))
    return matmul / B, counts.get("aten.bmm", 0) / B


def _slate_inputs(cfg: HSDConfig, slates: int = 0):
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(0, cfg.K, (B, cfg.history_len, cfg.L), generator=g)
    mask = torch.ones(B, cfg.history_len, dtype=torch.bool)
    fb = torch.rand(B, cfg.history_len, generator=g)
    shape = (B, slates, cfg.N, cfg.L) if slates else (B, cfg.N, cfg.L)
    return hist, mask, fb, torch.randint(0, cfg.K, shape, generator=g)


def _case(name: str, tmp_path):
    """(formula FLOPs per sample, a function running one training forward + backward)."""
    stage = get_stage(name)
    loss_cfg = stage.loss_config_cls()
    if name in ("hsd", "flat"):
        model, loss = stage.build(HSD_CFG, loss_cfg, StageInputs())
        args = _slate_inputs(HSD_CFG)
        flops = stage.flops_per_sample(HSD_CFG, loss_cfg, StageInputs())
        return flops, lambda: loss(model(*args), args[-1]).total.backward()
    if name in ("orpo", "dpo"):
        from higr_dist.models.hsd import HSD

        init = tmp_path / "hsd.pt"
        torch.save(HSD(HSD_CFG).state_dict(), init)
        inputs = StageInputs(init_from=str(init))
        model, _ = stage.build(HSD_CFG, loss_cfg, inputs)
        slates = 1 + len(loss_cfg.pairs.objectives)
        args = _slate_inputs(HSD_CFG, slates)
        flops = stage.flops_per_sample(HSD_CFG, loss_cfg, inputs)
        if name == "dpo":  # the frozen reference's forward is counted on top: 8 x, not 6 x
            flops = flops * 6.0 / 8.0
        return flops, lambda: model(*args).sum().backward()
    if name == "sasrec":
        cfg = SASRecConfig(num_items=50, d_model=16, n_heads=2, n_layers=2, max_len=16,
                           history_len=6, dropout=0.0)
        model, loss = stage.build(cfg, loss_cfg, StageInputs())
        g = torch.Generator().manual_seed(0)
        hist = torch.randint(1, 50, (B, cfg.history_len), generator=g)
        mask = torch.ones(B, cfg.history_len, dtype=torch.bool)
        targets = torch.randint(1, 50, (B, cfg.N), generator=g)
        flops = stage.flops_per_sample(cfg, loss_cfg, StageInputs())
        return flops, lambda: loss(model(hist, mask, targets)).total.backward()
    assert name == "tokenizer"
    cfg = PCRQVAEConfig(input_dim=24, hidden_dims=[32, 16], latent_dim=8, K=8, L=3)
    model, loss = stage.build(cfg, loss_cfg, StageInputs())
    g = torch.Generator().manual_seed(0)
    batch = PairBatch(torch.randn(B, 24, generator=g), torch.randn(B, 24, generator=g),
                      torch.ones(B), torch.arange(B), torch.arange(B) + B)
    flops = stage.flops_per_sample(cfg, loss_cfg, StageInputs())
    return flops, lambda: stage.step(model.train(), loss, batch).loss.backward()


@pytest.mark.parametrize("name", ["tokenizer", "hsd", "flat", "sasrec", "orpo", "dpo"])
def test_flops_per_sample_match_the_counted_matmuls(name, tmp_path):
    torch.manual_seed(0)
    formula, run = _case(name, tmp_path)
    run()  # the first step's one-off work (codebook initialisation) is not per sample
    matmul, scores = _measure(run)
    assert matmul > 0
    print(f"{name}: formula {formula:,.0f}, counted matmuls {matmul:,.0f} "
          f"({formula / matmul:.3f}x), attention scores {scores:,.0f}")
    assert matmul * 0.999 <= formula <= matmul * 1.2, (formula, matmul)
    assert scores <= 0.05 * matmul


def test_a_deeper_model_counts_more():
    hsd = get_stage("hsd")
    deeper = replace(HSD_CFG, planner_layers=4)
    loss, inputs = hsd.loss_config_cls(), StageInputs()
    assert hsd.flops_per_sample(deeper, loss, inputs) > hsd.flops_per_sample(HSD_CFG, loss, inputs)


def test_tokenizer_flops_by_hand():
    """PCRQ-VAE 24 -> 32 -> 16 -> 8, K=8, L=3, per pair: both items encoded, the anchor
    decoded (6 x params each, biases included), and the nearest-code search of both items at
    each layer (2 x 2 x L x K x d, forward only)."""
    stage = get_stage("tokenizer")
    cfg = PCRQVAEConfig(input_dim=24, hidden_dims=[32, 16], latent_dim=8, K=8, L=3)
    encoder = (24 * 32 + 32) + (32 * 16 + 16) + (16 * 8 + 8)  # 1,464
    decoder = (8 * 16 + 16) + (16 * 32 + 32) + (32 * 24 + 24)  # 1,480
    search = 2 * 2 * 3 * 8 * 8  # 768
    assert stage.flops_per_sample(cfg, stage.loss_config_cls(), StageInputs()) == \
        6 * (2 * encoder + decoder) + search == 27_216
