"""TrainConfig -> DeepSpeed config dict, optimizer parameter groups, LR schedule, peak FLOP/s.

Design
------
Everything DeepSpeed is told comes from :class:`~higr_dist.engine.config.TrainConfig` through
:func:`build_ds_config`, a pure function (no DeepSpeed import), so it is unit-testable and the
preflight can show it. ``deepspeed.initialize`` itself is called in exactly one place,
``higr_dist/engine/trainer.py``.

Choices
-------
- Optimizer: by default (``auto``) a client ``torch.optim.AdamW(fused=True)`` on CPU and CUDA:
  torch's fused kernel is a multi-tensor AdamW like DeepSpeed's FusedAdam but needs no JIT
  compile (DeepSpeed's ops need nvcc on the node and a compile on first use), and on CPU it is
  several times faster than torch's default per-tensor loop (figures: docs/BENCHMARKS.md,
  "Figures behind design choices"). ``optimizer: deepspeed`` selects DeepSpeed's FusedAdam
  through the ``optimizer`` block instead. Either way ZeRO wraps it
  (``zero_allow_untested_optimizer`` for the torch one) and its state is sharded and
  checkpointed by DeepSpeed. ZeRO-Offload (``zero_options.offload_optimizer`` on cpu/nvme)
  needs DeepSpeed's CPU Adam (DeepSpeed refuses a client optimizer there): ``auto`` then
  resolves to ``deepspeed`` and the preflight rejects an explicit ``torch``. DeepSpeed
  JIT-builds its ops into ``TORCH_EXTENSIONS_DIR``; unless that is set,
  :func:`default_extensions_dir` (per user and host, outside the checkout) is used, so ranks
  never compile into the shared filesystem the repository lives on.
- bf16 gradients: under ZeRO >= 1 (``fp32_grad_accum``, the default) gradients are accumulated
  over micro-batches and reduced over ranks in fp32 (``data_types.grad_accum_dtype`` and
  ``communication_data_type``); DeepSpeed 0.19 would otherwise do both in bf16, whose 8-bit
  mantissa loses the small per-micro-batch contributions (e.g. 4 accumulation steps of a 1/4
  weighted loss). Cost: twice the gradient traffic and an fp32 gradient buffer. ZeRO-1 then runs
  DeepSpeed's ``BF16_Optimizer``, ZeRO-2/3 their own optimizers with fp32 accumulation. ZeRO-0
  cannot (DeepSpeed refuses bf16 parameters with fp32 accumulation there), so a world of one in
  bf16 still accumulates in bf16 (one rank: no reduction, only the accumulation).
- LR schedule: a torch ``LambdaLR`` over :class:`WarmupCosine`, handed to DeepSpeed as a callable
  so it wraps the optimizer DeepSpeed builds. DeepSpeed steps it at every gradient-accumulation
  boundary and saves/restores it in checkpoints (verified: a resumed run continues with the same
  LR). We do not use DeepSpeed's ``WarmupCosineLR``: it spends its first two steps at lr = 0
  (``last_batch_iteration`` starts at -1, then 0 -> ratio 0).
- No weight decay on 1-D tensors (biases, norm gains, codebook scalars), the usual AdamW recipe.
- ``steps_per_print`` is effectively off: the trainer logs through TensorBoard and one console
  line per ``log_every`` steps.
- A world of one runs ZeRO stage 0 whatever ``zero_stage`` says (:func:`effective_zero_stage`):
  with one rank there is nothing to partition, and DeepSpeed's ZeRO-1/2/3 bookkeeping (flat fp32
  partition copies, gradient bucket copies, gathers) then only costs memory and step time
  (bench/engine.py; figures: docs/BENCHMARKS.md, "Figures behind design choices"). The math is
  the same (fp32 or the bf16 optimizer's fp32 master weights; same AdamW, same clipping); only the
  checkpoint layout differs, and a checkpoint is only ever resumed at its own world size.
  Setting ``HIGR_ZERO_AT_WORLD_ONE=1`` in the environment keeps ``zero_stage`` in a world of one
  (the GPU tests and ``bench/gpu_check.py`` use it to run DeepSpeed's ZeRO-2/3 code paths on one
  device); it is read by :func:`effective_zero_stage`, so every caller agrees.
- Peak FLOP/s for MFU come from :data:`PEAK_TFLOPS` by device name (``train.peak_tflops: 0``,
  the default); the shipped configs do not pin a device's figure.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from higr_dist.engine.config import TrainConfig

#: Peak dense TFLOP/s per device and precision, for MFU. GPU figures are vendor datasheet dense
#: (no sparsity) tensor-core numbers of the SXM/OAM part unless the key names another form
#: factor; fp32 is the non-tensor-core figure since torch leaves TF32 off by default. CPU
#: figures are per core, from torch matmuls on the 2-core development box. Keys are matched as
#: substrings of ``torch.cuda.get_device_name()``, longest first ("H100 PCIe" before "H100",
#: "H200" before "H20").
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # CPU: per core (0.17 / 0.8 TFLOP/s measured on the 2-core development machine with
    # torch matmuls); a rank's peak is this times the threads it runs (torch.get_num_threads)
    "cpu": {"fp32": 0.085, "bf16": 0.4, "fp16": 0.4},
    "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H100 PCIe": {"fp32": 51.0, "bf16": 756.0, "fp16": 756.0},
    "H100 NVL": {"fp32": 60.0, "bf16": 835.0, "fp16": 835.0},
    "H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H800": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H20": {"fp32": 44.0, "bf16": 148.0, "fp16": 148.0},
    "B200": {"fp32": 80.0, "bf16": 2250.0, "fp16": 2250.0},
    "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
    "A800": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
    "L20": {"fp32": 59.8, "bf16": 119.5, "fp16": 119.5},
    "L40S": {"fp32": 91.6, "bf16": 362.0, "fp16": 362.0},
}


def peak_tflops(device_name: str, precision: str) -> float:
    """Peak TFLOP/s for a device name (``cpu`` or a CUDA device name such as
    ``NVIDIA H20``); 0.0 when the device is not in :data:`PEAK_TFLOPS` (MFU is then not logged)."""
    if device_name == "cpu":  # a rank uses torch's intra-op threads (OMP_NUM_THREADS) only
        return PEAK_TFLOPS["cpu"][precision] * torch.get_num_threads()
    # longest key first so "H200" is not matched as "H20"
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key != "cpu" and key.lower() in device_name.lower():
            return PEAK_TFLOPS[key][precision]
    return 0.0


def offloads_optimizer(train: TrainConfig) -> bool:
    """True when ``zero_options.offload_optimizer`` puts the optimizer on cpu or nvme
    (ZeRO-Offload), where DeepSpeed accepts only its own CPU Adam."""
    offload = train.zero_options.get("offload_optimizer") if isinstance(
        train.zero_options, dict) else None
    return isinstance(offload, dict) and offload.get("device", "none") in ("cpu", "nvme")


def use_deepspeed_optimizer(train: TrainConfig) -> bool:
    """True when the AdamW comes from the ds config (DeepSpeed's FusedAdam, or its CPU Adam
    under ZeRO-Offload), False for the client ``torch.optim.AdamW(fused=True)``: ``torch``
    always, ``auto`` unless the optimizer is offloaded (DeepSpeed refuses a client optimizer
    there; the preflight rejects ``torch`` + offload)."""
    return train.optimizer == "deepspeed" or (train.optimizer == "auto"
                                              and offloads_optimizer(train))


def default_extensions_dir() -> Path:
    """Where DeepSpeed JIT-builds its ops when ``TORCH_EXTENSIONS_DIR`` is unset: per user and
    per host (``~/.cache/higr-dist/torch_extensions/<host>``), outside the checkout, so ranks
    never compile into a shared filesystem and nodes never race on one build folder (the local
    ranks of one node share it under torch's file lock). Without a home folder: the system
    temp folder, per user."""
    try:
        base = Path.home() / ".cache" / "higr-dist"
    except RuntimeError:  # no HOME and no passwd entry
        base = Path(tempfile.gettempdir()) / f"higr-dist-{os.getuid()}"
    return base / "torch_extensions" / socket.gethostname()


def ensure_extensions_dir() -> str:
    """Set ``TORCH_EXTENSIONS_DIR`` to :func:`default_extensions_dir` unless it is set; returns
    the folder in use."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions_dir()))


#: ``zero_optimization`` defaults on CPU (``train.zero_options`` wins): 8 MB buckets instead of
#: DeepSpeed's 2 GB and no contiguous gradient buffer. On CPU every step otherwise allocates
#: and fills fresh 100 MB-scale flat buffers (page faults + copies, no caching allocator),
#: which slows a ZeRO-2 step on CPU ranks against a bare DDP step (``bench/engine.py
#: --zero-options``; figures: docs/BENCHMARKS.md, "Figures behind design choices"). GPUs keep
#: DeepSpeed's defaults.
CPU_ZERO_OPTIONS: dict = {"contiguous_gradients": False, "reduce_bucket_size": 2_000_000,
                          "allgather_bucket_size": 2_000_000}


#: Environment switch: ``1`` keeps ``train.zero_stage`` in a world of one (see the docstring).
ZERO_AT_WORLD_ONE = "HIGR_ZERO_AT_WORLD_ONE"


def effective_zero_stage(zero_stage: int, world_size: int) -> int:
    """The ZeRO stage DeepSpeed is given: ``zero_stage``, or 0 in a world of one (nothing to
    partition; see the module docstring) unless ``HIGR_ZERO_AT_WORLD_ONE=1``."""
    if world_size == 1 and os.environ.get(ZERO_AT_WORLD_ONE, "0") != "1":
        return 0
    return zero_stage


def fp32_grad_dtypes(train: TrainConfig, world_size: int) -> bool:
    """True when the ds config asks DeepSpeed for fp32 gradient accumulation and reduction:
    bf16 with ``fp32_grad_accum`` under an effective ZeRO stage >= 1 (see the docstring)."""
    return (train.precision == "bf16" and train.fp32_grad_accum
            and effective_zero_stage(train.zero_stage, world_size) >= 1)


def trainer_clips_gradients(train: TrainConfig, world_size: int) -> bool:
    """True when the trainer, not DeepSpeed, clips the gradients: ZeRO-0 in fp32, where
    DeepSpeed's optimizer is the bare client AdamW and DeepSpeed would clip parameter by
    parameter and then all-reduce a norm every rank already has (the gradients were all-reduced
    in backward), a collective per step and the norm thrown away. The trainer instead calls
    ``torch.nn.utils.clip_grad_norm_`` (foreach, no collective; same coefficient
    ``max_norm / (norm + 1e-6)``) and logs the norm it returns. Every other configuration
    clips inside DeepSpeed's optimizer wrapper, which reports the norm."""
    return (effective_zero_stage(train.zero_stage, world_size) == 0
            and train.precision == "fp32")


def build_ds_config(train: TrainConfig, world_size: int, device_type: str) -> dict:
    """The DeepSpeed config dict for ``train`` on ``world_size`` ranks of ``device_type``."""
    gas = train.grad_accum(world_size)
    cfg: dict = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0 if trainer_clips_gradients(train, world_size) else train.grad_clip,
        "zero_optimization": {**(CPU_ZERO_OPTIONS if device_type == "cpu" else {}),
                              **train.zero_options,
                              "stage": effective_zero_stage(train.zero_stage, world_size)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16},
    }
    if fp32_grad_dtypes(train, world_size):
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
    if use_deepspeed_optimizer(train):
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": train.lr, "betas": list(train.betas), "eps": train.eps,
            "weight_decay": train.weight_decay}}
    return cfg


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for tensors with >= 2 dims, none for biases/norms/1-D tensors.

    Only trainable parameters are included; empty groups are dropped.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        dims = len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3: partitioned
        (decay if dims >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class WarmupCosine:
    """LR multiplier for ``LambdaLR``: linear warmup, then cosine to ``min_ratio`` at ``total``.

    ``step`` is the number of optimizer steps already taken, so the first step runs at
    ``1 / warmup`` of the peak (never at 0) and step ``total`` (the last) at ``min_ratio``.
    A callable object (not a lambda) so LambdaLR's state_dict records its fields.
    """

    warmup: int
    """Warmup steps."""
    total: int
    """Total optimizer steps of the run (the schedule's end)."""
    min_ratio: float
    """Final LR as a fraction of the peak."""

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - 1 - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
