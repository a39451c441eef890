"""PCRQ-VAE model and losses: hand-computed loss values, k-means init, dead-code restarts,
and a short single-process training (plain torch loop through the stage's step)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from higr_dist.models.pcrq_vae import (
    PCRQVAE,
    PCRQVAEConfig,
    PCRQVAELoss,
    PCRQVAELossConfig,
    PCRQVAEOutput,
    code_counts,
    contrastive_views,
    global_quant_loss,
    info_nce,
    kmeans,
    layer_quant_loss,
    negative_mask,
    reconstruction_loss,
)
from higr_dist.stages.base import StageInputs, get_stage
from higr_dist.stages.tokenizer import PairBatch, collate_pairs

# ---------------------------------------------------------------------------------------------
# losses on small tensors
# ---------------------------------------------------------------------------------------------


def test_reconstruction_loss_sums_dims_and_averages_rows():
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    x_hat = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert reconstruction_loss(x, x_hat).item() == pytest.approx((5.0 + 2.0) / 2)


def test_global_quant_loss_value_and_gradients():
    z = torch.tensor([[1.0, 0.0]], requires_grad=True)
    z_q = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = global_quant_loss(z, z_q, beta=0.25)
    assert loss.item() == pytest.approx(1.0 + 0.25 * 1.0)
    loss.backward()
    # codebook term moves z_q toward sg(z); the commitment term moves z toward sg(z_q)
    assert z_q.grad.tolist() == [[-2.0, 0.0]]
    assert z.grad.tolist() == [[0.5, 0.0]]


def test_layer_quant_loss_by_hand():
    residuals = (torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]))
    codewords = (torch.tensor([[0.5, 0.0]]), torch.tensor([[0.5, 0.0]]))
    # layer 1: 0.25 * (1 + beta); layer 2: exact
    assert layer_quant_loss(residuals, codewords, 0.25).item() == pytest.approx(0.25 * 1.25)


def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    valid = torch.tensor([True, True])
    # logits row i: [cos/tau] = [2, 0] -> -log(e^2 / (e^2 + 1)) for both rows
    expected = math.log(1 + math.exp(-2.0))
    assert info_nce(q, q, valid, tau=0.5).item() == pytest.approx(expected, rel=1e-6)
    # masking row 1 out of the mean leaves row 0's value
    only_first = info_nce(q, q, torch.tensor([True, False]), 0.5)
    assert only_first.item() == pytest.approx(expected, rel=1e-6)
    # dropping row 0's only negative makes its loss 0; row 1 unchanged
    drop = torch.tensor([[False, True], [False, False]])
    assert info_nce(q, q, valid, 0.5, drop).item() == pytest.approx(expected / 2, rel=1e-6)
    # no valid row: 0, and still differentiable
    qa = q.clone().requires_grad_(True)
    out = info_nce(qa, q, torch.tensor([False, False]), 0.5)
    out.backward()
    assert out.item() == 0.0 and qa.grad is not None


def test_negative_mask_drops_same_items():
    anchors, positives = torch.tensor([0, 1, 2]), torch.tensor([5, 5, 0])
    m = negative_mask(anchors, positives)
    # row 0: column 1 has the same positive (5); column 2's positive is row 0's anchor (0)
    assert m[0].tolist() == [True, True, True]
    assert m[2].tolist() == [False, False, True]


def _toy_output(z: torch.Tensor) -> PCRQVAEOutput:
    e1 = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    e2 = torch.tensor([[0.5, 0.5], [0.5, 0.0]])
    r1 = z - e1.detach()
    return PCRQVAEOutput(codes=torch.zeros(2, 2, dtype=torch.long), z=z, z_q=e1 + e2,
                         codewords=(e1, e2), residuals=(z, r1), x_hat=torch.zeros(1, 2))


def test_contrastive_views_values_and_straight_through():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    out = _toy_output(z)
    q1 = contrastive_views(out, 1, "codeword")
    q2 = contrastive_views(out, 2, "codeword")
    p2 = contrastive_views(out, 2, "prefix")
    assert torch.equal(q1, out.codewords[0]) and torch.equal(q2, out.codewords[1])
    assert torch.equal(p2, out.codewords[0] + out.codewords[1])
    (q1.sum() + q2.sum() + p2.sum()).backward()
    assert torch.equal(z.grad, torch.full_like(z, 3.0))  # identity gradient to the encoder


def test_loss_module_combines_terms_and_switches_quant_by_mode():
    torch.manual_seed(0)
    x = torch.randn(4, 2)  # anchors rows 0-1, positives rows 2-3
    z = torch.randn(4, 2, requires_grad=True)
    e1, e2 = torch.randn(4, 2), torch.randn(4, 2)
    out = PCRQVAEOutput(torch.zeros(4, 2, dtype=torch.long), z, e1 + e2, (e1, e2),
                        (z, z - e1), torch.randn(2, 2))
    weight = torch.tensor([1.0, 0.0])
    cfg = PCRQVAEConfig(input_dim=2, latent_dim=2, K=4, L=2, tau=0.2)
    lo = PCRQVAELoss(cfg, PCRQVAELossConfig(lambda_rec=1.0, lambda_q=0.5, lambda_c=0.3))(
        x, out, 2, weight)
    rec = reconstruction_loss(x[:2], out.x_hat)
    quant = global_quant_loss(z[:2], (e1 + e2)[:2], 0.25)
    con = info_nce(e1[:2], e1[2:], weight > 0, 0.2)  # layer 1 only (L-1 = 1)
    assert lo.rec.item() == pytest.approx(rec.item())
    assert lo.quant.item() == pytest.approx(quant.item())
    assert lo.con.item() == pytest.approx(con.item(), rel=1e-5)
    assert lo.total.item() == pytest.approx(rec.item() + 0.5 * quant.item() + 0.3 * con.item(),
                                            rel=1e-5)
    rq = PCRQVAELoss(PCRQVAEConfig(input_dim=2, latent_dim=2, K=4, L=2, mode="rq_vae"),
                     PCRQVAELossConfig())(x, out, 2, weight)
    per_layer = layer_quant_loss((z[:2], (z - e1)[:2]), (e1[:2], e2[:2]), 0.25)
    assert rq.quant.item() == pytest.approx(per_layer.item()) and rq.con.item() == 0.0


def test_config_validation_and_contrastive_defaults():
    assert PCRQVAEConfig(L=3).layers_for_contrastive() == [1, 2]
    assert PCRQVAEConfig(L=3, mode="rq_vae").layers_for_contrastive() == []
    assert PCRQVAEConfig(L=3, contrastive_layers=[3, 1]).layers_for_contrastive() == [1, 3]
    assert any("outside" in p for p in PCRQVAEConfig(L=2, contrastive_layers=[3]).validate())
    with pytest.raises(ValueError, match="K must be"):
        PCRQVAE(PCRQVAEConfig(K=1))


# ---------------------------------------------------------------------------------------------
# k-means init and dead-code restarts
# ---------------------------------------------------------------------------------------------


def _points() -> torch.Tensor:
    pts = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    return pts.repeat(10, 1)  # 40 rows, 4 distinct points


def test_kmeans_init_puts_codewords_on_data_points():
    model = PCRQVAE(PCRQVAEConfig(input_dim=2, K=4, L=1, mode="rq_kmeans", kmeans_iters=5))
    model.init_codebooks(_points())
    book = model.quantizer.codebooks()[0]  # [K, d]
    assert sorted(map(tuple, book.tolist())) == sorted(map(tuple, _points()[:4].tolist()))
    assert bool(model.quantizer.initialized)
    assert model.maybe_init(_points() + 1.0) is False  # never re-initialised
    # with an encoder: codewords are the encodings of the distinct anchors
    enc = PCRQVAE(PCRQVAEConfig(input_dim=2, hidden_dims=[8], latent_dim=3, K=4, L=2))
    enc.train()
    x = _points()
    out = enc(x)  # first training forward runs the init
    z = enc.encoder(x[:4]).detach()
    book = enc.quantizer.codebooks()[0]
    assert torch.cdist(book, z).min(dim=1).values.max() < 1e-5
    assert torch.allclose(enc.quantizer.codebooks()[1], torch.zeros(4, 3), atol=1e-5)
    assert out.codes.shape == (40, 2)


def test_init_is_in_state_dict_and_not_rerun_after_load():
    cfg = PCRQVAEConfig(input_dim=4, hidden_dims=[8], latent_dim=3, K=4, L=2)
    a = PCRQVAE(cfg).train()
    a(torch.randn(16, 4))
    b = PCRQVAE(cfg).train()
    b.load_state_dict(a.state_dict())
    before = b.quantizer.offset.clone()
    b(torch.randn(16, 4) * 10)
    assert torch.equal(b.quantizer.offset, before)


def test_uninitialised_eval_forward_raises():
    model = PCRQVAE(PCRQVAEConfig(input_dim=4, K=4, L=2)).eval()
    with pytest.raises(RuntimeError, match="not initialised"):
        model(torch.randn(3, 4))


def test_dead_code_restart_revives_unused_codes():
    cfg = PCRQVAEConfig(input_dim=2, K=4, L=1, mode="rq_kmeans", restart_every=2,
                        dead_code_threshold=1.0)
    model = PCRQVAE(cfg)
    far = torch.tensor([[[0.1, 0.1], [4.9, 5.1], [100.0, 100.0], [-100.0, 100.0]]])
    model.load_codebooks(far)
    model.train()
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.2, 0.0], [5.0, 4.8]])
    model(x)
    assert model.quantizer.dead_codes.tolist() == [0]  # not checked yet
    model(x)  # second forward closes the window: codes 2 and 3 were never used
    assert model.quantizer.dead_codes.tolist() == [2]
    assert model.quantizer.restarted.tolist() == [2]
    book = model.quantizer.codebooks()[0]
    rows = {tuple(r) for r in x.tolist()}
    assert tuple(book[2].tolist()) in rows and tuple(book[3].tolist()) in rows
    assert model.quantizer.usage.sum().item() == 0  # window reset
    codes = model(x).codes[:, 0]
    assert set(codes.tolist()) & {2, 3}  # revived codes are used again


def test_restart_schedule_follows_buffers_written_from_outside():
    """The restart schedule reads ``num_forwards`` from the host cache; a checkpoint's buffers
    copied in (as a resume does) must move it, or ranks would restart at different steps."""
    cfg = PCRQVAEConfig(input_dim=2, K=4, L=1, mode="rq_kmeans", restart_every=3,
                        dead_code_threshold=1.0)
    model = PCRQVAE(cfg)
    model.load_codebooks(torch.tensor([[[0.0, 0.0], [5.0, 5.0], [99.0, 99.0], [-99.0, 9.0]]]))
    model.train()
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    model(x)  # forward 1: caches num_forwards
    with torch.no_grad():
        model.quantizer.num_forwards.copy_(torch.tensor(5))  # as load_buffer_state does
    model(x)  # forward 6 closes a window of 3 (forward 2 would not)
    assert model.quantizer.num_forwards.item() == 6
    assert model.quantizer.dead_codes.tolist() == [2]


def test_code_counts_equal_bincount():
    codes = torch.tensor([[3, 0], [3, 7], [1, 3]])
    assert torch.equal(code_counts(codes, 9), torch.bincount(codes.reshape(-1), minlength=9))


def test_kmeans_is_deterministic_given_generator():
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    a = kmeans(x, 8, 10, torch.Generator().manual_seed(3))
    b = kmeans(x, 8, 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# stage plumbing
# ---------------------------------------------------------------------------------------------


def test_collate_and_batch_to():
    samples = [{"anchor": i, "positive": i + 1, "weight": float(i), "x_anchor": np.ones(3) * i,
                "x_positive": np.zeros(3)} for i in range(4)]
    batch = collate_pairs(samples)
    assert batch.x_anchor.shape == (4, 3) and batch.anchor.tolist() == [0, 1, 2, 3]
    moved = batch.to(torch.device("cpu"), torch.bfloat16)
    assert moved.x_anchor.dtype == torch.bfloat16 and moved.weight.dtype == torch.float32
    assert moved.positive.dtype == torch.long and moved.num_samples == moved.num_tokens == 4


def test_stage_registered_and_step_metrics():
    stage = get_stage("tokenizer")
    assert stage.sample_kind == "pairs"
    cfg = PCRQVAEConfig(input_dim=6, hidden_dims=[8], latent_dim=4, K=4, L=3)
    model, loss = stage.build(cfg, PCRQVAELossConfig(), StageInputs())
    assert sum(p.numel() for p in loss.parameters()) == 0
    g = torch.Generator().manual_seed(0)
    batch = PairBatch(torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g),
                      torch.tensor([1.0] * 6 + [0.0] * 2), torch.arange(8), torch.arange(8) + 8)
    out = stage.step(model.train(), loss, batch)
    out.loss.backward()
    for key in ("rec", "quant", "con", "con_l1", "con_l2", "perplexity_l1", "dead_codes_l3",
                "pair_same_l1"):
        assert key in out.metrics
    assert torch.isfinite(out.loss) and stage.flops_per_sample(cfg, PCRQVAELossConfig(), StageInputs()) > 0
    assert stage.needs_training(cfg) and not stage.needs_training(
        PCRQVAEConfig(mode="rq_kmeans"))


# ---------------------------------------------------------------------------------------------
# short training
# ---------------------------------------------------------------------------------------------


def _synthetic(seed: int = 0, n: int = 512, groups: int = 8, clusters: int = 4):
    """Items = [content (4 clusters, L2-normed, 12 dims) | collaborative group (8, 4 dims)*0.5].

    Pairs join items of the same group; the content clusters dominate the features, so a
    tokenizer without the contrastive term splits layer 1 mostly by content."""
    g = torch.Generator().manual_seed(seed)
    content = torch.randint(clusters, (n,), generator=g)
    group = torch.randint(groups, (n,), generator=g)
    cc, gc = torch.randn(clusters, 12, generator=g), torch.randn(groups, 4, generator=g)
    a = F.normalize(cc[content] + 0.3 * torch.randn(n, 12, generator=g), dim=1)
    b = F.normalize(gc[group] + 0.3 * torch.randn(n, 4, generator=g), dim=1) * 0.5
    return torch.cat([a, b], 1), group


def _pair_batches(x, group, batch_size, steps, seed):
    g = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(group == k).squeeze(1) for k in range(int(group.max()) + 1)]
    for _ in range(steps):
        a = torch.randint(x.shape[0], (batch_size,), generator=g)
        p = torch.stack([members[int(group[i])][
            torch.randint(len(members[int(group[i])]), (1,), generator=g)][0] for i in a])
        yield PairBatch(x[a], x[p], torch.ones(batch_size), a, p)


def _train(mode: str, lambda_c: float, steps: int = 200, seed: int = 0):
    torch.manual_seed(seed)
    x, group = _synthetic(seed)
    stage = get_stage("tokenizer")
    cfg = PCRQVAEConfig(input_dim=16, hidden_dims=[64], latent_dim=8, K=8, L=2, mode=mode,
                        restart_every=20, seed=seed)
    model, loss = stage.build(cfg, PCRQVAELossConfig(lambda_c=lambda_c), StageInputs())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for batch in _pair_batches(x, group, 64, steps, seed):
        out = stage.step(model.train(), loss, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append((out.loss.item(), float(out.metrics["rec"])))
    codes = model.encode(x).codes[:, 0]  # [N] layer-1 codes
    off = ~torch.eye(len(x), dtype=torch.bool)
    same_group = (group[:, None] == group[None, :]) & off
    same_code = codes[:, None] == codes[None, :]
    p_pair = ((same_code & same_group).sum() / same_group.sum()).item()
    p_rand = ((same_code & off).sum() / off.sum()).item()
    return np.array(losses), p_pair, p_rand


def test_short_training_lowers_loss_and_contrastive_aligns_layer1():
    rq_losses, rq_pair, rq_rand = _train("rq_vae", 0.0)
    # lambda_c = 1.0 here (paper default 0.1): 200 steps is a short budget for the prefix term
    pc_losses, pc_pair, pc_rand = _train("pcrq_vae", 1.0)
    for losses in (rq_losses, pc_losses):
        assert losses[-20:, 0].mean() < losses[:20, 0].mean()
        assert losses[-20:, 1].mean() < 0.5 * losses[:20, 1].mean()  # reconstruction learns
    # positives share their layer-1 code far more often, beyond the random-pair base rate
    assert pc_pair > rq_pair + 0.1
    assert pc_pair / pc_rand > rq_pair / rq_rand
