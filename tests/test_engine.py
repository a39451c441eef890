"""Engine pieces that need no process group: job loading, DeepSpeed config, LR schedule,
checkpoint folder bookkeeping, log formatting. (Multi-process training: test_engine_dist.py.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_tiny_etl

from higr_dist.config import ConfigError, to_dict
from higr_dist.configs import HERE as CONFIGS
from higr_dist.engine import checkpoint as ckpt
from higr_dist.engine.config import JobConfig, TrainConfig, ensure_resolved, load_job
from higr_dist.engine.ds_config import (
    CPU_ZERO_OPTIONS,
    WarmupCosine,
    build_ds_config,
    param_groups,
    peak_tflops,
    trainer_clips_gradients,
    use_deepspeed_optimizer,
)
from higr_dist.engine.logging import format_line, metric_tag, tb_tag
from higr_dist.engine.trainer import clip_gradients, schema_for, total_steps_for
from higr_dist.schema import PAIR_BLOCK

ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIGS / "tiny" / "tokenizer.yaml"


# --------------------------------------------------------------------------------------------
# job config
# --------------------------------------------------------------------------------------------


def test_shipped_configs_load_and_divide():
    for scale, world in (("tiny", 2), ("kuairec", 8), ("cluster", 32)):
        job = load_job(CONFIGS / scale / "tokenizer.yaml")
        assert job.stage == "tokenizer"
        assert type(job.model).__name__ == "PCRQVAEConfig"
        assert job.train.batch_problems(world) == []
        assert job.train.grad_accum(world) >= 1


def test_job_problems_collected_across_sections_and_stage():
    with pytest.raises(ConfigError) as e:
        load_job(TINY, ["train.zero_stagee=2", "train.lr=fast", "train.zero_stage=7",
                        "model.K=0", "model.bogus=1", "data.num_workers=-1"])
    text = "\n".join(e.value.problems)
    assert "train.zero_stagee: unknown key (did you mean 'zero_stage'?)" in text
    assert "train.lr: expected a number, got 'fast'" in text
    assert "zero_stage: must be 0, 1, 2 or 3, got 7" in text
    assert "model.bogus: unknown key" in text  # the stage's own section, validated too
    assert "K must be >= 2" in text
    assert "num_workers must be >= 0" in text
    with pytest.raises(ConfigError) as e:
        load_job(None, base={"stage": "nope"})
    assert "stage: unknown stage 'nope'; known:" in e.value.problems[0]
    assert "tokenizer" in e.value.problems[0]


def test_ensure_resolved_types_model_and_loss_sections():
    job = load_job(TINY, ["model.K=16"])
    raw = JobConfig(**{**job.__dict__, "model": to_dict(job.model), "loss": to_dict(job.loss)})
    typed = ensure_resolved(raw)
    assert typed.model == job.model and typed.loss == job.loss
    assert typed.out_path == Path("runs/tiny/tokenizer")


def test_train_config_batch_checks():
    t = TrainConfig(global_batch_size=64, micro_batch_size=16)
    assert t.grad_accum(1) == 4 and t.grad_accum(2) == 2 and t.grad_accum(4) == 1
    (msg,) = t.batch_problems(3)
    assert "global_batch_size (64) must be a multiple of" in msg and "16 x 3 = 48" in msg
    with pytest.raises(ValueError):
        t.grad_accum(3)
    assert "max_steps/epochs: set at least one" in " ".join(TrainConfig(max_steps=0).validate())


def test_total_steps_from_epochs_uses_the_listing(tmp_path):
    etl = write_tiny_etl(tmp_path / "etl")
    t = TrainConfig(global_batch_size=64, micro_batch_size=16, max_steps=0, epochs=3)
    assert total_steps_for(t, etl / "pairs") == 3 * math.ceil(192 / 64)
    t.max_steps = 5
    assert total_steps_for(t, etl / "pairs") == 5
    assert schema_for("pairs") is PAIR_BLOCK
    assert schema_for("slates/train").kind == "slate_group_block"


# --------------------------------------------------------------------------------------------
# DeepSpeed config, optimizer groups, schedule, peak FLOP/s
# --------------------------------------------------------------------------------------------


def test_ds_config_from_train_config():
    t = TrainConfig(zero_stage=3, precision="bf16", global_batch_size=64, micro_batch_size=8,
                    grad_clip=0.5)
    cfg = build_ds_config(t, world_size=2, device_type="cpu")
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"] == {"stage": 3, **CPU_ZERO_OPTIONS}
    t.zero_options = {"overlap_comm": True, "reduce_bucket_size": 5}  # the config wins
    assert build_ds_config(t, world_size=2, device_type="cpu")["zero_optimization"] == {
        "stage": 3, "contiguous_gradients": False, "reduce_bucket_size": 5,
        "allgather_bucket_size": 2_000_000, "overlap_comm": True}
    assert build_ds_config(t, world_size=2, device_type="cuda")["zero_optimization"] == {
        "stage": 3, "overlap_comm": True, "reduce_bucket_size": 5}  # DeepSpeed's defaults
    t.zero_options = {}
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_allow_untested_optimizer"]
    # ZeRO-0 fp32 (also any stage in a world of one): the trainer clips, DeepSpeed does not
    fp32 = TrainConfig(zero_stage=2, global_batch_size=64, micro_batch_size=8, grad_clip=0.5)
    assert trainer_clips_gradients(fp32, 1) and not trainer_clips_gradients(fp32, 2)
    assert build_ds_config(fp32, 1, "cpu")["gradient_clipping"] == 0.0
    assert build_ds_config(fp32, 2, "cpu")["gradient_clipping"] == 0.5
    assert not trainer_clips_gradients(t, 1)  # bf16: DeepSpeed's bf16 optimizer clips
    # one rank has nothing to partition: DeepSpeed gets stage 0 (same math, no ZeRO copies)
    assert build_ds_config(t, world_size=1, device_type="cuda")["zero_optimization"] == {
        "stage": 0}
    assert "optimizer" not in cfg and "scheduler" not in cfg  # client AdamW + LambdaLR
    # auto = torch's fused AdamW as client optimizer everywhere (no JIT-compiled op on GPUs)
    assert "optimizer" not in build_ds_config(t, world_size=2, device_type="cuda")
    assert use_deepspeed_optimizer(TrainConfig(optimizer="auto")) is False
    t.optimizer = "deepspeed"  # DeepSpeed's FusedAdam from the ds config's optimizer block
    gpu = build_ds_config(t, world_size=2, device_type="cuda")
    assert gpu["optimizer"]["type"] == "AdamW" and gpu["optimizer"]["params"]["lr"] == t.lr
    assert gpu["optimizer"]["params"]["betas"] == list(t.betas)


def test_clip_gradients_returns_the_pre_clip_norm():
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 2.0)  # norm sqrt(24)
    model.bias.grad = torch.zeros(2)
    assert clip_gradients(model, 1.0) == pytest.approx(24 ** 0.5)
    assert torch.linalg.vector_norm(model.weight.grad).item() == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients(model, 0.0) == pytest.approx(1.0, rel=1e-5)  # 0: measure only


def test_param_groups_skip_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[1].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 2  # linear bias, norm bias (frozen norm weight left out)


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # never 0 at the first step
    assert f(4) == pytest.approx(1.0)
    assert f(19) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    mids = [f(s) for s in range(4, 20)]
    assert all(a >= b for a, b in zip(mids, mids[1:]))  # monotone decay
    assert WarmupCosine(0, 10, 0.0)(0) == pytest.approx(1.0)


def test_peak_tflops_table():
    threads = torch.get_num_threads()  # a CPU rank's peak scales with its threads
    assert peak_tflops("cpu", "fp32") == pytest.approx(0.085 * threads)
    assert peak_tflops("cpu", "bf16") == pytest.approx(0.4 * threads)
    assert peak_tflops("NVIDIA H20", "bf16") == 148.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.0  # not mistaken for H20
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 67.0
    assert peak_tflops("Some Future GPU", "bf16") == 0.0


# --------------------------------------------------------------------------------------------
# checkpoint folder bookkeeping, RNG, buffers
# --------------------------------------------------------------------------------------------


def test_latest_pointer_and_prune(tmp_path):
    assert ckpt.latest_tag(tmp_path) is None
    for step in (2, 10, 4, 8):
        (tmp_path / ckpt.tag_for(step)).mkdir()
    (tmp_path / "not_a_tag").mkdir()
    assert [s for s, _ in ckpt.list_tags(tmp_path)] == [2, 4, 8, 10]  # numeric, not lexical
    assert ckpt.prune(tmp_path, keep_last=2) == ["global_step2", "global_step4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "global_step8",
                                                          "not_a_tag"]
    (tmp_path / "latest").write_text("global_step10")
    assert ckpt.latest_tag(tmp_path) == "global_step10"
    (tmp_path / "latest").write_text("global_step99")
    with pytest.raises(FileNotFoundError, match="global_step99"):
        ckpt.latest_tag(tmp_path)


def test_rng_and_buffer_state_round_trip():
    state = ckpt.rng_state()
    a = (np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(state)
    b = (np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    m = torch.nn.BatchNorm1d(3)
    m.running_mean.fill_(2.0)
    saved = ckpt.buffer_state(m)
    assert set(saved) == {"running_mean", "running_var", "num_batches_tracked"}
    m.running_mean.zero_()
    ckpt.load_buffer_state(m, saved)
    assert torch.all(m.running_mean == 2.0)


# --------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------


def test_metric_tags_and_console_line():
    assert metric_tag("rec") == "loss/rec" and metric_tag("codebook/usage") == "codebook/usage"
    line = format_line(20, 100, {"loss/total": 1.5, "loss/rec": 1.25, "opt/lr": 1e-3,
                                 "perf/data_wait_share": 0.05, "perf/mfu": float("nan")})
    assert line.startswith("step 20/100 | loss 1.5000 | lr 1.00e-03 | wait 5.0%")
    assert "rec 1.2500" in line and "mfu" not in line
    assert format_line(7, 5, {}).startswith("step 7")  # past an epoch-based estimate
    # diagnostics are not printed among the objective's terms
    line = format_line(3, 10, {"loss/total": 1.0, "loss/ce": 0.9, "loss/acc_l1": 0.5,
                               "loss/perplexity_l1": 20.0, "loss/margin": 0.1})
    assert "ce 0.9000" in line and "acc" not in line and "perplexity" not in line
    assert "margin" not in line


def test_tensorboard_groups_put_health_first():
    """The scalars dashboard sorts groups by name: health/ must come before every other group,
    and loss/ must hold only the objective's terms."""
    want = {"perf/samples_per_s": "health/samples_per_s", "perf/mfu": "health/mfu",
            "perf/data_wait_share": "health/data_wait_share",
            "mem/rss_gb": "health/host_rss_gb",
            "mem/device_max_alloc_gb": "health/device_max_alloc_gb",
            "perf/validation_s": "val/seconds", "opt/lr": "opt/lr", "val/ndcg5": "val/ndcg5",
            "loss/total": "loss/total", "loss/ce": "loss/ce", "loss/ild": "loss/ild",
            "loss/or_loss": "loss/or_loss", "loss/con_l1": "loss/con_l1",
            "loss/acc": "train/acc", "loss/acc_l3": "train/acc_l3",
            "loss/perplexity_l2": "sid/perplexity_l2", "loss/dead_codes_l1": "sid/dead_codes_l1",
            "loss/pair_same_l1": "sid/pair_same_l1", "loss/margin": "pref/margin",
            "loss/margin_o3": "pref/margin_o3", "loss/pair_acc_o1": "pref/pair_acc_o1",
            "loss/chosen_logp": "pref/chosen_logp", "codebook/usage": "codebook/usage"}
    assert {k: tb_tag(k) for k in want} == want
    groups = sorted({tb_tag(k).split("/")[0] for k in want if k != "codebook/usage"})
    assert groups[0] == "health"
