"""The CUDA path's fixes that a CPU can check (issue 23), in-process and fast.

- MFU: the peak FLOP/s table per device name, the shipped configs leaving it to the device, and
  SASRec's FLOPs counting the catalogue softmax once ``build`` has read the catalogue;
- bf16 numerics: the DeepSpeed config asks for fp32 gradient accumulation and reduction in
  DeepSpeed 0.19's own keys; DPO's frozen reference keeps its buffers fp32;
- configuration mistakes: ZeRO-Offload with the torch optimizer is rejected by the preflight;
  DeepSpeed's JIT builds go to a per-user folder outside the checkout; the collective timeout
  reaches ``deepspeed.init_distributed``;
- memory: SASRec's chunked cross-entropy equals the full softmax's (value, gradient, accuracy);
- evaluation on a ``device`` option (``eval.device``, ``--device``).

The multi-rank parts (shared-path check, resume decided on rank 0, rank-0-only export,
BF16_Optimizer) are in ``tests/test_gpu_path_dist.py``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_overrides, write_tiny_etl

from higr_dist import configs
from higr_dist.config import ConfigError
from higr_dist.configs import HERE as CONFIGS
from higr_dist.engine.config import TrainConfig, load_job
from higr_dist.engine.ds_config import (
    ZERO_AT_WORLD_ONE,
    build_ds_config,
    default_extensions_dir,
    ensure_extensions_dir,
    peak_tflops,
    use_deepspeed_optimizer,
)
from higr_dist.engine.preflight import preflight
from higr_dist.losses.preference import FrozenReference
from higr_dist.models.hsd import HSD, HSDConfig
from higr_dist.models.sasrec import (
    SASRec,
    SASRecConfig,
    SASRecLoss,
    SASRecLossConfig,
    chunked_cross_entropy,
)
from higr_dist.stages.base import StageInputs, get_stage

ROOT = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = CONFIGS / "tiny" / "tokenizer.yaml"
SHIPPED = [p for p in configs.all_files() if p.parent.name in ("cluster", "kuairec", "ladder")
           and p.name not in ("etl.yaml", "run.yaml")]


# --------------------------------------------------------------------------------------------
# MFU
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H20", 148.0, 44.0),
    ("NVIDIA H100 80GB HBM3", 989.0, 67.0),
    ("NVIDIA H100 PCIe", 756.0, 51.0),
    ("NVIDIA H100 NVL", 835.0, 60.0),
    ("NVIDIA H200", 989.0, 67.0),
    ("NVIDIA GH200 480GB", 989.0, 67.0),
    ("NVIDIA H800", 989.0, 67.0),
    ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 19.5),
    ("NVIDIA L20", 119.5, 59.8),
    ("NVIDIA L40S", 362.0, 91.6),
    ("NVIDIA B200", 2250.0, 80.0),
])
def test_peak_tflops_per_device_name(name, bf16, fp32):
    assert peak_tflops(name, "bf16") == bf16 and peak_tflops(name, "fp16") == bf16
    assert peak_tflops(name, "fp32") == fp32
    assert peak_tflops("Some Future GPU", "bf16") == 0.0  # unknown: MFU not logged


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_take_the_peak_from_the_device(path):
    job = load_job(path)
    assert job.train.peak_tflops == 0, f"{path} pins a device's peak FLOP/s"
    if job.train.zero_stage == 2 and "cluster" in path.parts:  # NCCL: overlap, small buckets
        opts = job.train.zero_options
        assert opts.get("overlap_comm") is True and opts["reduce_bucket_size"] < 5e8


def test_sasrec_flops_count_the_catalogue_softmax_from_the_sid_table(tmp_path):
    sid = tmp_path / "sid"
    sid.mkdir()
    np.save(sid / "sid_table.npy", np.zeros((1000, 3), dtype=np.int64))
    (sid / "sid_meta.json").write_text(json.dumps({"K": 8, "L": 3, "num_items": 1000}))
    cfg, loss = SASRecConfig(d_model=16, n_layers=1, max_len=8), SASRecLossConfig()
    stage = get_stage("sasrec")  # stateless: the same count before and after build
    inputs = StageInputs(sid_dir=str(sid))
    before = stage.flops_per_sample(cfg, loss, inputs)
    stage.build(cfg, loss, inputs)
    assert stage.flops_per_sample(cfg, loss, inputs) == before
    T = cfg.history_len + cfg.N - 1
    blocks = stage.flops_per_sample(replace(cfg, num_items=1), loss, inputs)
    assert before - blocks == pytest.approx(6.0 * T * 999 * cfg.d_model)


# --------------------------------------------------------------------------------------------
# bf16 numerics
# --------------------------------------------------------------------------------------------


def test_bf16_ds_config_accumulates_and_reduces_gradients_in_fp32(monkeypatch):
    from deepspeed.runtime.config import (
        DtypeEnum,
        get_communication_data_type,
        get_data_types_params,
    )
    from deepspeed.runtime.constants import GRAD_ACCUM_DTYPE

    monkeypatch.delenv(ZERO_AT_WORLD_ONE, raising=False)
    for stage in (1, 2, 3):
        t = TrainConfig(zero_stage=stage, precision="bf16", global_batch_size=64,
                        micro_batch_size=8)
        cfg = build_ds_config(t, world_size=2, device_type="cuda")
        # read back with DeepSpeed 0.19's own config parsers: the keys are the ones it reads
        assert DtypeEnum(get_data_types_params(cfg)[GRAD_ACCUM_DTYPE]).value == torch.float32
        assert get_communication_data_type(cfg) == torch.float32
    bf16 = TrainConfig(zero_stage=2, precision="bf16", global_batch_size=64, micro_batch_size=8)
    # ZeRO-0 (a world of one): DeepSpeed refuses bf16 parameters with fp32 accumulation
    assert "data_types" not in build_ds_config(bf16, 1, "cuda")
    assert "data_types" not in build_ds_config(replace(bf16, precision="fp32"), 2, "cuda")
    assert "data_types" not in build_ds_config(replace(bf16, fp32_grad_accum=False), 2, "cuda")
    assert get_communication_data_type(build_ds_config(bf16, 1, "cuda")) is None
    monkeypatch.setenv(ZERO_AT_WORLD_ONE, "1")  # the GPU check's ZeRO-2 on one device
    one = build_ds_config(bf16, 1, "cuda")
    assert one["zero_optimization"]["stage"] == 2 and one["data_types"]["grad_accum_dtype"] == "fp32"


def test_frozen_reference_casts_parameters_and_keeps_buffers_fp32():
    cfg = HSDConfig(K=8, L=3, N=4, d_model=16, n_heads=2, ctx_layers=1, planner_layers=1,
                    gen_layers=1, history_len=6, dropout=0.0, fb_boundaries=[0.2, 1.0, 2.0])
    torch.manual_seed(0)
    policy = HSD(cfg)
    ref = FrozenReference(lambda: HSD(cfg))
    model = ref.get(torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    edges = dict(model.named_buffers())
    assert edges and all(b.dtype == torch.float32 for b in edges.values() if b.is_floating_point())
    fb = next(v for k, v in edges.items() if k.endswith("fb_edges"))
    assert torch.equal(fb, next(v for k, v in policy.named_buffers() if k.endswith("fb_edges")))
    assert fb[0].item() == pytest.approx(0.2, abs=1e-7)  # 0.2 stays 0.2 (bf16: 0.2002)
    assert ref.get(torch.device("cpu"), torch.bfloat16) is model  # cast once


# --------------------------------------------------------------------------------------------
# configuration mistakes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_etl(tmp_path_factory) -> Path:
    return write_tiny_etl(tmp_path_factory.mktemp("gpu_path") / "etl")


def test_preflight_rejects_zero_offload_with_the_torch_optimizer(tiny_etl, tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ok = tiny_overrides(tiny_etl, tmp_path / "run")
    offload = "train.zero_options={offload_optimizer: {device: cpu}}"
    assert preflight(TINY_TOKENIZER, [*ok, offload, "train.optimizer=torch"]) == [
        "train.optimizer: torch cannot run with ZeRO-Offload (train.zero_options.offload_optimizer)"
        "; DeepSpeed needs its own CPU Adam: set train.optimizer to auto or deepspeed"]
    assert preflight(TINY_TOKENIZER, [*ok, offload]) == []  # auto resolves to DeepSpeed's
    job = load_job(TINY_TOKENIZER, [*ok, offload])
    assert use_deepspeed_optimizer(job.train)
    assert build_ds_config(job.train, 2, "cuda")["optimizer"]["type"] == "AdamW"
    assert not use_deepspeed_optimizer(load_job(TINY_TOKENIZER, ok).train)  # no offload: torch


def test_deepspeed_builds_outside_the_checkout_unless_told(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    where = Path(ensure_extensions_dir())
    assert where == default_extensions_dir() and os.environ["TORCH_EXTENSIONS_DIR"] == str(where)
    assert ROOT not in where.parents and Path.home() in where.parents
    assert where.name == socket.gethostname()  # per host: nodes never share one build folder
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert ensure_extensions_dir() == "/somewhere/else"


def test_collective_timeout_reaches_deepspeed(monkeypatch):
    import deepspeed

    from higr_dist.engine import trainer

    seen: dict = {}

    class Stop(Exception):
        pass

    def fake(**kwargs):
        seen.update(kwargs)
        raise Stop

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29999").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(deepspeed, "init_distributed", fake)
    with pytest.raises(Stop):
        trainer.init_distributed(TrainConfig(dist_timeout_s=77.0).dist_timeout_s)
    assert seen["timeout"] == datetime.timedelta(seconds=77)
    assert TrainConfig().dist_timeout_s > 600  # longer than DeepSpeed's 10 minutes
    with pytest.raises(ConfigError, match="dist_timeout_s: must be > 0"):
        load_job(TINY_TOKENIZER, ["train.dist_timeout_s=0"])


# --------------------------------------------------------------------------------------------
# SASRec at large catalogues: chunked cross-entropy == full softmax
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 50, 64, 1000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_cross_entropy_equals_the_full_softmax(chunk, smoothing):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(23, 12, generator=g, requires_grad=True)
    w = torch.randn(64, 12, generator=g, requires_grad=True)
    t = torch.randint(0, 64, (23,), generator=g)
    full = F.cross_entropy(h @ w.T, t, label_smoothing=smoothing)
    gh, gw = torch.autograd.grad(full, (h, w))
    ce, acc = chunked_cross_entropy(h, w, t, chunk, smoothing)
    ch, cw = torch.autograd.grad(ce, (h, w))
    assert ce.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(ch, gh, atol=1e-6) and torch.allclose(cw, gw, atol=1e-6)
    assert acc.item() == ((h @ w.T).argmax(-1) == t).float().mean().item()


def test_sasrec_chunked_loss_through_the_model_and_stage():
    torch.manual_seed(3)
    model = SASRec(SASRecConfig(num_items=41, d_model=16, n_layers=1, max_len=8, dropout=0.0))
    hist = torch.randint(0, 41, (5, 6))
    mask = torch.rand(5, 6) > 0.3
    tgt = torch.randint(0, 41, (5, 4))
    full = SASRecLoss(SASRecLossConfig(label_smoothing=0.05))(model(hist, mask, tgt))
    grads = torch.autograd.grad(full.total, list(model.parameters()))
    out = model(hist, mask, tgt, loss_chunk=8, label_smoothing=0.05)
    assert out.logits is None  # no [positions x catalogue] tensor
    chunked = SASRecLoss(SASRecLossConfig(label_smoothing=0.05, chunk_items=8))(out)
    cgrads = torch.autograd.grad(chunked.total, list(model.parameters()))
    assert chunked.total.item() == pytest.approx(full.total.item(), rel=1e-6)
    assert chunked.acc.item() == full.acc.item()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(cgrads, grads))
    assert SASRecLossConfig(chunk_items=-1).validate() == [
        "chunk_items must be >= 0 (0 = full softmax), got -1"]

    from higr_dist.data.slates import SlateBatch  # the stage routes chunk_items to the model

    batch = SlateBatch(hist_codes=torch.zeros(5, 6, 3, dtype=torch.long), hist_mask=mask,
                       hist_fb=torch.zeros(5, 6), hist_items=hist, target_items=tgt,
                       target_codes=torch.zeros(5, 4, 3, dtype=torch.long),
                       target_fb=torch.zeros(5, 4))
    stage = get_stage("sasrec")
    step = stage.step(model, SASRecLoss(SASRecLossConfig(label_smoothing=0.05, chunk_items=8)),
                      batch)
    assert step.loss.item() == pytest.approx(full.total.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# evaluation on a device
# --------------------------------------------------------------------------------------------


def test_eval_device_option(tmp_path, capsys):
    from higr_dist.eval.harness import generate_main, load_stage_model, resolve_device
    from higr_dist.pipeline import EvalSpec, PipelineConfig

    cuda = torch.cuda.is_available()
    assert EvalSpec().device == "auto"
    assert resolve_device("auto") == (torch.device("cuda", 0) if cuda else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="only .* CUDA device" if cuda else "CUDA is not available"):
        resolve_device("cuda:99")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    from higr_dist.config import load

    (tmp_path / "run.yaml").write_text("eval:\n  device: cpu\n")
    assert load(PipelineConfig, tmp_path / "run.yaml").eval.device == "cpu"
    assert load(PipelineConfig, None, ["eval.device=cuda:3"]).eval.device == "cuda:3"
    with pytest.raises(ConfigError, match=r"eval: device: must be auto, cpu, cuda or cuda:N, "
                                          r"got 'gpu0'"):
        load(PipelineConfig, None, ["eval.device=gpu0"])
    if not cuda:
        assert generate_main(["--run-dir", str(tmp_path), "--device", "cuda"]) == 2
        assert capsys.readouterr().err.strip() == ("higr-generate: device 'cuda': CUDA is not "
                                                   "available on this machine (use cpu or auto)")
    # a stage folder loads onto the requested device
    job = load_job(CONFIGS / "tiny" / "hsd.yaml", [
        "inputs.sid_dir=x", "inputs.etl_dir=y", "model.history_len=6"])
    from higr_dist.layout import StageLayout
    from higr_dist.models import card

    folder = StageLayout(tmp_path / "hsd")
    folder.final_weights.parent.mkdir(parents=True)
    model = HSD(job.model)
    torch.save(model.state_dict(), folder.final_weights)
    folder.model_card.write_text(json.dumps(card.card(model)))
    _, model = load_stage_model(folder.root, resolve_device("auto"))
    assert next(model.parameters()).device == resolve_device("auto") and not model.training
