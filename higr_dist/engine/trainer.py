"""The one training engine: any stage, any ZeRO stage, CPU (gloo) or GPU (NCCL), resumable.

Design
------
Stages differ only in model, batch and loss (``higr_dist/stages/base.py``); everything else
lives here: process group, DeepSpeed engine (``deepspeed.initialize`` is called only in
:func:`build_engine`), the streaming loader, the step loop, checkpoints, logging and the final
fp32 export + ``stage.finalize``.

Process group. Under ``deepspeed``/``torchrun`` the launcher sets ``RANK``/``WORLD_SIZE``/...;
without them (``higr run`` training in-process) we become a world of one ourselves, with
``MASTER_ADDR``/``MASTER_PORT`` on loopback. The backend comes from
``deepspeed.get_accelerator()`` (gloo on CPU, NCCL on CUDA), so the same code runs on both.
A world of one trains with ZeRO-0 and without DeepSpeed's gradient all-reduce (one rank has
nothing to partition or reduce; see ``ds_config.effective_zero_stage``): same math, and the
engine step then costs what a bare torch step costs (bench/engine.py).

The step loop, one optimizer step = one *window* of ``grad_accum`` micro-batches per rank:

1. every rank pulls up to ``grad_accum`` micro-batches from its loader (``None`` once its share
   of the epoch is exhausted; the time spent in ``next()`` is the data wait);
2. one ``all_reduce`` sums (real micro-batches, samples, tokens) over ranks; zero real
   micro-batches everywhere = the epoch is over for everybody (ranks may hold different numbers
   of batches, so this is the only safe end-of-epoch test);
3. each rank runs exactly ``grad_accum`` forward/backward/``engine.step`` calls, so DeepSpeed's
   gradient-accumulation boundary and every collective inside ZeRO stay in lockstep. A slot
   without a real batch runs a *filler* batch with loss weight 0 (no sample is seen twice,
   nobody hangs). Real micro-batches are weighted ``grad_accum * world / n_real``, so the
   update is the mean over the real micro-batches even in a short last window (weight 1 in
   full windows).

Trade-offs. A zero-weight step costs a full forward/backward on the ranks that ran out (at most
one window per epoch). It also runs the model's forward side effects (usage counters, k-means
surgery) on the filler; that is deliberate: models that synchronise such state with collectives
inside ``forward`` (the tokenizer does) need every rank to run the same number of training
forwards. The filler is the rank's first batch of the epoch re-read by a fresh in-process loader
(one extra small read per epoch), a function of (epoch, rank) only, so a resumed run replays
exactly the fillers of an uninterrupted one.

Buffers. DeepSpeed broadcasts parameters at start-up but never buffers, and a model may keep
per-rank buffer state (e.g. local code-usage counts summed over ranks only when needed). So the
engine (a) broadcasts buffers from rank 0 once after ``deepspeed.initialize``, (b) saves every
rank's own persistent buffers in the checkpoint's client state and restores them on resume
(DeepSpeed's module state holds rank 0's only), and (c) optionally (``broadcast_buffers``)
re-broadcasts rank 0's buffers before every step, torch-DDP style, for models that mutate
buffers without synchronising them.

Checkpoints, resume and export: see :mod:`higr_dist.engine.checkpoint`. A run restarts from the
latest complete checkpoint of its folder automatically: same step, LR schedule position, RNG
states and per-rank data position (a rank that had finished its share of the epoch stays
finished until the epoch ends). Whether to resume, and from which tag, is decided by rank 0 and
broadcast (``checkpoint.agreed_latest_tag``), and before anything is built a multi-rank run
checks that its run folder and training shards are the same on every rank
(``preflight.check_shared_paths``): both fail every rank with one line instead of splitting
the ranks or hanging. Collectives time out after ``train.dist_timeout_s`` (rank 0 alone
exports and finalizes while the others wait).

Host syncs: the step loop reads nothing from the device per step except the window's sample
counts (one small all-reduce whose result decides the epoch end); gradient norms stay device
tensors until the window is logged.

Scripts that call :func:`train` with loader workers must guard their launch code with
``if __name__ == "__main__":``: the workers are spawned and re-import the script
(``higr_dist.data.loader``, ``LoaderConfig.start_method``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from higr_dist.config import to_dict, write_run_metadata
from higr_dist.data.loader import LoaderConfig, StreamingLoader, reshard_states
from higr_dist.data.shardio import list_shards
from higr_dist.engine import checkpoint as ckpt
from higr_dist.engine import reshard
from higr_dist.engine.config import JobConfig, TrainConfig, ensure_resolved
from higr_dist.engine.ds_config import (
    WarmupCosine,
    build_ds_config,
    effective_zero_stage,
    ensure_extensions_dir,
    param_groups,
    peak_tflops,
    trainer_clips_gradients,
    use_deepspeed_optimizer,
)
from higr_dist.engine.errors import BadInput, ExportMismatch, NonFiniteLoss
from higr_dist.engine.logging import RunLogger, metric_tag
from higr_dist.engine.preflight import check_shared_paths
from higr_dist.engine.validate import METRIC, Validator, gathered
from higr_dist.layout import SHARD_LISTING, StageLayout
from higr_dist.models import card as model_card
from higr_dist.schema import FOLDERS, SampleSchema
from higr_dist.stages.base import Stage, get_stage

# --------------------------------------------------------------------------------------------
# process group and device
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """Device tensors and the model live on."""
    device_name: str
    """``cpu`` or the CUDA device name (for the peak-FLOP/s table)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> DistEnv:
    """Join (or create) the default process group; a world of one without a launcher.

    ``timeout_s``: timeout of every collective of the group (None = DeepSpeed's default, 10
    minutes or ``DEEPSPEED_TIMEOUT``); only the call that creates the group sets it. Also points
    ``TORCH_EXTENSIONS_DIR`` at a per-user, per-host folder outside the checkout unless it is
    set (``ds_config.default_extensions_dir``), before DeepSpeed can JIT-build anything."""
    ensure_extensions_dir()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), verbose=False,
                               **kwargs)
    if acc.device_name() == "cuda":
        device = torch.device("cuda", local_rank)
        name = torch.cuda.get_device_name(device)
    else:
        device, name = torch.device(acc.device_name()), acc.device_name()
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=device, device_name=name)


def shutdown(wait: bool = True) -> None:
    """Destroy the default process group (launcher processes call this before exiting).

    Also unlinks this rank's DeepSpeed CPU shared-memory all-reduce buffer
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, ~66 MB, created when
    the ``deepspeed`` launcher starts CPU ranks and never removed by DeepSpeed), after a barrier
    so no peer still opens it; peers that mapped it keep their mapping. ``wait=False`` (a run
    that stopped with an error, maybe on this rank only): no barrier, which could wait for a
    peer that is gone.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    rank = dist.get_rank()
    dist.destroy_process_group()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}").unlink(
            missing_ok=True)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------------


def float_dtype(precision: str) -> torch.dtype | None:
    """dtype floating batch inputs are cast to (None = keep fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def build_engine(model: nn.Module, train: TrainConfig, world_size: int, device_type: str,
                 total_steps: int) -> tuple[Any, Any, dict]:
    """Wrap ``model`` in a DeepSpeed engine: (engine, lr_scheduler, ds_config).

    The only call of ``deepspeed.initialize`` in the project.
    """
    import deepspeed

    ds_cfg = build_ds_config(train, world_size, device_type)
    groups = param_groups(model, train.weight_decay)
    optimizer = None
    if not use_deepspeed_optimizer(train):
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas),
                                      eps=train.eps, weight_decay=train.weight_decay, fused=True)
    schedule = WarmupCosine(warmup=train.warmup_steps, total=total_steps,
                            min_ratio=train.min_lr_ratio)

    def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
        lr_scheduler=make_scheduler, config=ds_cfg)
    if world_size == 1 and effective_zero_stage(train.zero_stage, world_size) == 0:
        # ZeRO-0 "all-reduces" a single rank's gradients by flattening them into one buffer and
        # copying them back (a measurable share of a CPU step: docs/BENCHMARKS.md, "Figures
        # behind design choices"); with one rank that is the identity, so skip it. DeepSpeed's
        # own switch (it is off without a backend). Not under ZeRO >= 1
        # (HIGR_ZERO_AT_WORLD_ONE): ZeRO moves gradients into its partitions in that epilogue.
        engine.enable_backward_allreduce = False
    return engine, scheduler, ds_cfg


def sync_buffers(module: nn.Module, src: int = 0) -> None:
    """Broadcast every buffer of ``module`` from rank ``src`` (one flat tensor per dtype;
    16-bit floats travel as float32, which gloo supports everywhere)."""
    if dist.get_world_size() == 1:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault((b.dtype, b.device), []).append(b)
    for (dtype, _), bufs in by_dtype.items():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        if dtype in (torch.bfloat16, torch.float16):
            flat = flat.float()
        dist.broadcast(flat, src=src)
        offset = 0
        for b in bufs:
            b.data.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def _clip(module: nn.Module, max_norm: float) -> torch.Tensor | float:
    """:func:`clip_gradients` without the host sync: the norm stays on the device."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    return torch.nn.utils.get_total_norm([p.grad for p in params]).detach()


def clip_gradients(module: nn.Module, max_norm: float) -> float:
    """Clip ``module``'s gradients to global norm ``max_norm`` (0 = only measure); returns the
    pre-clip norm. Where the trainer clips instead of DeepSpeed: see
    ``ds_config.trainer_clips_gradients``. Call after the boundary backward (gradients reduced),
    before ``engine.step()``. (The step loop keeps the norm on the device until it logs.)"""
    return _as_float(_clip(module, max_norm))


def _as_float(value: torch.Tensor | float) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


def _device_grad_norm(engine: Any) -> torch.Tensor | float | None:
    """Pre-clip global gradient norm of the last optimizer step as DeepSpeed holds it (a device
    tensor under ZeRO: reading it is left to log time), None if unknown."""
    norm = engine.get_global_grad_norm()
    return norm.detach() if torch.is_tensor(norm) else norm


def global_grad_norm(engine: Any) -> float | None:
    """Pre-clip global gradient norm of the last optimizer step (None if unknown)."""
    norm = _device_grad_norm(engine)
    return None if norm is None else _as_float(norm)


def reports_grad_norm(optimizer: Any) -> bool:
    """True when DeepSpeed's optimizer wrapper computes the global gradient norm itself (ZeRO
    1/2/3 and the bf16 optimizer that ZeRO-1 runs with fp32 accumulation, which only sets its
    ``_global_grad_norm`` at its first step); False for the ZeRO-0 wrappers, whose norm the
    trainer measures from the module's (already reduced, fully accumulated) gradients."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return hasattr(optimizer, "_global_grad_norm") or isinstance(optimizer, BF16_Optimizer)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def schema_for(sample_kind: str) -> SampleSchema:
    """ETL folder (``pairs``, ``slates/train``, ``prefs``) -> the schema of its records."""
    if sample_kind not in FOLDERS:
        raise KeyError(f"no sample schema for folder {sample_kind!r} (known folders: "
                       f"{', '.join(sorted(FOLDERS))})")
    return FOLDERS[sample_kind]


def listed_samples(shard_dir: Path) -> int | None:
    """Training samples listed in ``<shard_dir>/shards.json`` (what a grouped kind's records
    unpack to); None when there is no listing."""
    listing = shard_dir / SHARD_LISTING
    if not listing.is_file():
        return None
    data = json.loads(listing.read_text())
    return int(data.get("unpacked", data["samples"]))


def total_steps_for(train: TrainConfig, shard_dir: Path) -> int:
    """Optimizer steps the run will take (sizes the LR schedule and the progress bar).

    With ``epochs`` the per-epoch count is estimated as ceil(samples / global batch) from the
    shard listing; the real count can differ by a step or two (partial batches per worker).
    """
    if train.epochs == 0:
        return train.max_steps
    samples = listed_samples(shard_dir)
    if samples is None:
        raise FileNotFoundError(f"train.epochs needs {shard_dir / SHARD_LISTING} to size the LR "
                                "schedule; set train.max_steps or write the listing")
    per_epoch = max(1, math.ceil(samples / train.global_batch_size))
    steps = per_epoch * train.epochs
    return min(steps, train.max_steps) if train.max_steps else steps


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------


@dataclass
class _Window:
    """What this rank saw since the last log point."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """metric name -> sum over real micro-batches (on the device, no host sync per step)"""
    counts: dict[str, float] = field(default_factory=dict)
    """metric name -> real micro-batches summed"""
    steps: int = 0
    """optimizer steps in the window"""
    samples: float = 0.0
    """samples over all ranks"""
    tokens: float = 0.0
    """tokens over all ranks"""
    wait_s: float = 0.0
    """time this rank spent waiting for the loader"""
    step_s: float = 0.0
    """wall time of the window's steps"""
    grad_norms: list[torch.Tensor | float] = field(default_factory=list)
    """pre-clip global gradient norm per step (when the optimizer reports it); device tensors
    until the window is logged, so no step waits for the device to report it"""
    lr: float = 0.0
    """learning rate of the window's last step"""

    def add(self, name: str, value: torch.Tensor | float, weight: float, device: torch.device):
        v = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
        prev = self.sums.get(name)
        v = v.to(device) * weight
        self.sums[name] = v if prev is None else prev + v
        self.counts[name] = self.counts.get(name, 0.0) + weight


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (for the resume note)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _inject_bad_loss(out: Any, value: str) -> Any:
    """Debug (``train.bad_loss_at_step``): ``out`` with its loss and first loss term made
    ``value`` (nan or inf), as if that term had diverged."""
    bad = float(value)
    metrics = dict(out.metrics)
    first = next(iter(metrics), None)
    if first is not None:
        metrics[first] = torch.as_tensor(metrics[first]) + bad
    return dataclasses.replace(out, loss=out.loss + bad, metrics=metrics)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a model output (a tensor, a dataclass, a tuple/list or a dict), in a
    fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    return []


def _forward_outputs(stage: Stage, model: nn.Module, core: nn.Module, loss_module: nn.Module,
                     batch: Any) -> list[torch.Tensor]:
    """CPU copies of everything ``core``'s forward returns during one ``stage.step`` of
    ``model`` (``core`` is the module inside a DeepSpeed engine, or ``model`` itself)."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        seen.extend(t.detach().cpu().clone() for t in _tensors(output))

    handle = core.register_forward_hook(hook)
    try:
        stage.step(model, loss_module, batch)
    finally:
        handle.remove()
    return seen


def _compare_outputs(want: list[torch.Tensor], got: list[torch.Tensor], rel_tol: float,
                     what: str) -> dict:
    """Figures of how ``got`` differs from ``want`` (floating tensors: max abs difference
    against ``rel_tol`` x the largest magnitude; integer tensors: equal), with ``error`` (one
    line) when they differ."""
    max_abs = scale = 0.0
    ints_equal = True
    if len(want) != len(got) or any(w.shape != g.shape for w, g in zip(want, got)):
        error = (f"{what}: the reloaded model's forward returns {[tuple(g.shape) for g in got]}"
                 f", the live model's {[tuple(w.shape) for w in want]}")
    else:
        for w, g in zip(want, got):
            if not w.is_floating_point():
                ints_equal = ints_equal and torch.equal(w, g)
            elif w.numel():
                max_abs = max(max_abs, float((w.double() - g.double()).abs().max()))
                scale = max(scale, float(w.double().abs().max()))
        error = None
        if max_abs > rel_tol * max(scale, 1.0) or not ints_equal:
            error = (f"{what} does not reproduce the live model: max abs output difference "
                     f"{max_abs:.3e} (outputs up to {scale:.3e}, tolerance {rel_tol:g} relative)"
                     f"{'' if ints_equal else ', integer outputs differ'}; the export is wrong: "
                     "report it with the run folder")
    out = {"checked": True, "tensors": len(want), "elements": sum(w.numel() for w in want),
           "max_abs_diff": max_abs, "max_abs_output": scale, "integers_equal": ints_equal}
    if error is not None:
        out["error"] = error
    return out


def _manual_grad_norm(module: nn.Module) -> torch.Tensor | float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return torch.nn.utils.get_total_norm(grads).detach()  # read at log time (no host sync)


class Trainer:
    """One training run of one stage: construct, then :meth:`run`."""

    def __init__(self, job: JobConfig):
        self.job = ensure_resolved(job)
        self.cfg = self.job.train
        self.env = init_distributed(self.cfg.dist_timeout_s)
        self.stage: Stage = get_stage(self.job.stage)
        self.out_dir = self.job.out_path
        self.folder = StageLayout(self.out_dir)
        self.ckpt_dir = self.folder.checkpoints
        self.shard_dir = self.job.shard_dir(self.stage.sample_kind)
        self.gas = self.cfg.grad_accum(self.env.world_size)
        self.total_steps = total_steps_for(self.cfg, self.shard_dir)
        self.dtype = float_dtype(self.cfg.precision)
        self.is_main = self.env.rank == 0
        peak = self.cfg.peak_tflops or peak_tflops(self.env.device_name, self.cfg.precision)
        self.peak_flops = peak * 1e12
        self.flops_per_sample = float(self.stage.flops_per_sample(
            self.job.model, self.job.loss, self.job.inputs))
        # progress; restored from the checkpoint when resuming
        self.step = 0
        self.epoch = 0
        self.epoch_samples = 0.0
        self.samples_per_epoch: list[float] = []
        self.exhausted = False
        self.first_log: dict[str, float] | None = None
        # this process only
        self.resumed_from: str | None = None
        self.saved_step = -1
        self.last_log: dict[str, float] = {}
        self.step_times: list[float] = []
        self.step_samples: list[float] = []
        self.step_waits: list[float] = []  # this rank's loader wait per step
        self.iterator: Any = iter(())
        self.filler: Any = None
        self.filler_epoch = -1
        self.carry_s = self.carry_wait_s = 0.0  # time of an epoch-end probe, for the next step
        # non-finite loss guard: micro-batches of the last window whose loss was not finite
        # (a device tensor, read with the next window's counts; see _run_window)
        self.bad_losses: torch.Tensor | None = None
        self.bad_step = 0  # the step those micro-batches belong to
        # model selection on the validation split (restored from the checkpoint)
        self.val_every = self._validation_interval()
        self.val_history: list[dict] = []
        self.best: dict | None = None  # {"step", METRIC, ...} of the best validation so far
        self.stale = 0  # validations since the last new best
        self.stopped_early = False
        self.validator: Validator | None = None

    # ---------------------------------------------------------------- setup

    def _build_loader(self, cfg: LoaderConfig | None = None) -> StreamingLoader:
        job, stage = self.job, self.stage
        collate = stage.make_collate(job.model, job.loss, job.inputs)
        return StreamingLoader(list_shards(self.shard_dir), schema_for(stage.sample_kind),
                               collate, batch_size=self.cfg.micro_batch_size,
                               cfg=cfg or job.data,
                               rank=self.env.rank, world_size=self.env.world_size,
                               seed=self.job.run.seed)

    def _build_model(self) -> tuple[nn.Module, nn.Module]:
        """The stage's model and loss; under ZeRO-3 built inside ``deepspeed.zero.Init``, so
        each submodule's parameters are partitioned over the ranks as soon as it exists (no
        rank ever holds the whole fp32 model; whole-tensor edits during construction go
        through ``higr_dist.models.params``, with the values of an unpartitioned build)."""
        seed_all(self.job.run.seed)  # identical initial weights on every rank
        build = contextlib.nullcontext()
        if effective_zero_stage(self.cfg.zero_stage, self.env.world_size) == 3:
            import deepspeed

            # fp32 while building, as without ZeRO-3 (zero.Init would otherwise create every
            # floating tensor of the construction in bf16, buffers and constants included);
            # the partitions are cast to the training dtype below, as the engine casts an
            # unpartitioned model's parameters
            # (told through the config: zero.Init's own ``dtype=torch.float32`` becomes bf16
            # on a device without fp16, DeepSpeed 0.19)
            ds_cfg = build_ds_config(self.cfg, self.env.world_size, self.env.device.type)
            ds_cfg = {**ds_cfg, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
            build = deepspeed.zero.Init(config_dict_or_path=ds_cfg, mem_efficient_linear=False)
        with build:
            model, loss_module = self.stage.build(self.job.model, self.job.loss,
                                                  self.job.inputs)
        if self.dtype != torch.float32:
            for p in model.parameters():
                if hasattr(p, "ds_tensor") and p.dtype != self.dtype:
                    p.ds_tensor.data = p.ds_tensor.data.to(self.dtype)
                    p.data = p.data.to(self.dtype)
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                    for p in model.parameters())
        full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.build_values = {"local": local, "full": full}
        if self.cfg.activation_checkpointing and hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True
        return model, loss_module

    # ---------------------------------------------------------------- data

    def _start_epoch(self) -> None:
        self.loader.set_epoch(self.epoch)
        self.iterator = iter(self.loader)
        self.exhausted = False
        self.epoch_samples = 0.0

    def _next_batch(self) -> Any | None:
        """Next micro-batch of this rank's share of the epoch, None once it is exhausted."""
        if self.exhausted:
            return None
        try:
            return next(self.iterator)
        except StopIteration:
            self.exhausted = True
            return None

    def _filler(self) -> Any:
        """Batch for a zero-weight step: this rank's first batch of the epoch, read by a fresh
        in-process loader (cached per epoch). A function of (epoch, rank) only, so a resumed run
        replays exactly the fillers (and their forward side effects) of an uninterrupted one."""
        if self.filler_epoch != self.epoch:
            cfg = dataclasses.replace(self.job.data, num_workers=0)
            fresh = self._build_loader(cfg)
            fresh.set_epoch(self.epoch)
            batch = next(iter(fresh), None)
            self.filler = None if batch is None else batch.to(self.env.device, self.dtype)
            self.filler_epoch = self.epoch
        return self.filler

    def _check_fillers(self, exhausted_ranks: float) -> None:
        """Collective, in a window where some ranks ran out while others still have batches:
        every rank that ran out must have a filler batch, i.e. at least one sample of its own
        this epoch; otherwise every rank raises the same :class:`BadInput` (a lone rank's error
        would leave the others waiting in the next collective)."""
        missing = torch.tensor([float(self.exhausted and self._filler() is None)],
                               dtype=torch.float64, device=self.env.device)
        dist.all_reduce(missing)
        if missing.item() > 0:
            raise BadInput(
                f"epoch {self.epoch}: {int(missing.item())} of {int(exhausted_ranks)} rank(s) "
                f"that ran out of {self.shard_dir} had no sample of their own this epoch while "
                f"other ranks still train (a rank reads whole shards: its shards are empty); "
                f"write more or evener shards (ETL min_shards, samples_per_shard) or use fewer "
                f"ranks x data.num_workers")

    # ---------------------------------------------------------------- validation

    def _validation_interval(self) -> int:
        """Optimizer steps between validations (0 = no validation): ``every_epochs`` epochs of
        the listed training samples, at least one step."""
        vcfg = self.job.validation
        if not vcfg.enabled or not getattr(self.stage, "validates", False):
            return 0
        samples = listed_samples(self.shard_dir)
        if samples is None:
            raise FileNotFoundError(f"validation.every_epochs needs "
                                    f"{self.shard_dir / SHARD_LISTING} to count an epoch")
        per_epoch = max(1, math.ceil(samples / self.cfg.global_batch_size))
        return max(1, round(vcfg.every_epochs * per_epoch))

    @property
    def best_path(self) -> Path:
        return self.folder.best_weights

    def _validate(self) -> None:
        """Collective: score the model on the validation split; keep the best weights."""
        if self.validator is None:
            self.validator = Validator(
                self.job.inputs.etl_dir, self.job.inputs.sid_dir, self.job.model.N,
                self.job.model.history_len, self.job.validation, self.env.rank,
                self.env.world_size)
        t0 = time.perf_counter()
        zero = effective_zero_stage(self.cfg.zero_stage, self.env.world_size)
        with gathered(self.engine.module, zero):
            scores = self.validator.score(self.engine.module)
        vcfg = self.job.validation
        record = {"step": self.step, "epoch": self.epoch, **scores}
        self.val_history.append(record)
        improved = self.best is None or scores[METRIC] > self.best[METRIC] + vcfg.min_delta
        if improved:
            self.best, self.stale = record, 0
            state = ckpt.consolidated_fp32_state_dict(self.engine)
            if self.is_main:
                ckpt.save_state_file(state, self.best_path)
        else:
            self.stale += 1
        self.log.write(self.step, {f"val/{METRIC}": scores[METRIC], "val/recall5": scores["recall5"],
                                 f"val/best_{METRIC}": self.best[METRIC],
                                 "perf/validation_s": time.perf_counter() - t0})
        self.log.message(f"validation at step {self.step}: {METRIC} {scores[METRIC]:.4f} "
                         f"(best {self.best[METRIC]:.4f} at step {self.best['step']})")
        if vcfg.patience and self.stale >= vcfg.patience:
            self.stopped_early = True
            self.log.message(f"no better validation in {self.stale} tries: stopping at step "
                             f"{self.step} (best at step {self.best['step']})")

    # ---------------------------------------------------------------- checkpoints

    def _save(self) -> None:
        shared = {"step": self.step, "epoch": self.epoch, "epoch_samples": self.epoch_samples,
                  "samples_per_epoch": self.samples_per_epoch, "first_log": self.first_log,
                  "val_history": self.val_history, "best": self.best, "stale": self.stale,
                  "stopped_early": self.stopped_early, "config": to_dict(self.job)}
        mine = {"loader": self.loader.state_dict(), "exhausted": self.exhausted,
                "rng": ckpt.rng_state(), "buffers": ckpt.buffer_state(self.engine.module)}
        torn = self.cfg.kill_in_save_at_step == self.step and "kill_in_save" not in self.debug_done
        if torn:  # debug: the marker first, so the relaunched command saves normally
            self._debug_marker("kill_in_save", self.step).touch()
            self.log.message(f"kill_in_save_at_step={self.step}: SIGKILL inside the write")
        tag = ckpt.save(self.engine, self.ckpt_dir, self.step, mine, shared, self.cfg.keep_last,
                        kill_in_write=torn)
        self.saved_step = self.step
        self.log.message(f"saved checkpoint {self.ckpt_dir / tag}")

    def _written_by(self, tag: str) -> dict:
        """Collective: the world size and ZeRO stage that wrote ``tag`` (rank 0 reads)."""
        box: list[Any] = [None]
        if self.is_main:
            try:
                box = [reshard.written_by(self.ckpt_dir / tag)]
            except (OSError, RuntimeError, KeyError) as e:
                box = [{"error": f"{self.ckpt_dir / tag}: {e}"}]
        dist.broadcast_object_list(box, src=0)
        if "error" in box[0]:
            raise BadInput(f"cannot read checkpoint {box[0]['error']}")
        return box[0]

    def _resume_resharded(self, tag: str, written: dict) -> None:
        """Resume ``tag``, written by another world size (:mod:`higr_dist.engine.reshard`):
        model, optimizer, LR schedule and step exactly; the rest of the interrupted epoch dealt
        over this world's ranks (``loader.reshard_states``), every remaining sample once."""
        tag_dir = self.ckpt_dir / tag
        box: list[Any] = [None]
        if self.is_main:
            def build() -> nn.Module:
                return self.stage.build(self.job.model, self.job.loss, self.job.inputs)[0]

            try:
                box = [str(reshard.convert(tag_dir, build, self.cfg.weight_decay))]
            except (OSError, RuntimeError) as e:
                box = [RuntimeError(str(e))]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise BadInput(f"cannot resume {tag_dir} (written by {written['world_size']} "
                           f"rank(s)) on {self.env.world_size}: {box[0]}")
        client = reshard.model_states(tag_dir)
        figures = reshard.apply(self.engine, self.scheduler, Path(box[0]), client)
        ranks = client["ranks"]
        old = len(ranks)
        self._restore_shared(client)
        try:
            self.loader.load_state_dict(reshard_states(
                [r["loader"] for r in ranks], [bool(r["exhausted"]) for r in ranks],
                self.env.rank, self.env.world_size, self.loader.workers))
        except ValueError as e:  # the same on every rank: every rank stops here
            raise BadInput(f"cannot resume {tag_dir} on {self.env.world_size} rank(s): {e}") \
                from e
        self.exhausted = False
        self.iterator = iter(self.loader)
        mine = ranks[self.env.rank if self.env.rank < old else 0]
        if self.env.rank < old:
            ckpt.set_rng_state(mine["rng"])
        ckpt.load_buffer_state(self.engine.module, mine["buffers"])
        self.resumed_from = tag
        self.saved_step = self.step
        self.log.message(
            f"resumed from {tag_dir}, written by {old} rank(s) (ZeRO-{written['zero_stage']}), "
            f"on {self.env.world_size}: step {self.step}, epoch {self.epoch}, lr "
            f"{figures['lr']:.3e}; weights, fp32 masters and Adam moments of "
            f"{figures['params']} tensors ({figures['elements']} values) checked equal to the "
            f"checkpoint; the rest of epoch {self.epoch} is dealt over the {self.env.world_size} "
            "rank(s), each remaining sample once")
        self.log.advance(self.step)

    def _restore_shared(self, client: dict) -> None:
        """The progress every rank shares (step, epoch, validation history ...)."""
        self.step, self.epoch = int(client["step"]), int(client["epoch"])
        self.epoch_samples = float(client["epoch_samples"])
        self.samples_per_epoch = list(client["samples_per_epoch"])
        self.first_log = client["first_log"]
        self.val_history = list(client.get("val_history", []))
        self.best, self.stale = client.get("best"), int(client.get("stale", 0))
        self.stopped_early = bool(client.get("stopped_early", False))

    def _resume(self, tag: str) -> None:
        written = self._written_by(tag)
        if written["world_size"] != self.env.world_size:
            self._resume_resharded(tag, written)
            return
        loaded = ckpt.load(self.engine, self.ckpt_dir, tag)
        if loaded is None:
            raise RuntimeError(f"{self.ckpt_dir}: 'latest' vanished while starting")
        tag, client = loaded
        mine = client["ranks"][self.env.rank]
        self._restore_shared(client)
        self.loader.load_state_dict(mine["loader"])
        self.exhausted = bool(mine["exhausted"])
        self.iterator = iter(()) if self.exhausted else iter(self.loader)
        ckpt.set_rng_state(mine["rng"])
        ckpt.load_buffer_state(self.engine.module, mine["buffers"])
        self.resumed_from = tag
        self.saved_step = self.step
        for line in _config_changes(client["config"], to_dict(self.job)):
            self.log.message(f"note: config changed since {tag}: {line}")
        self.log.message(f"resumed from {self.ckpt_dir / tag}: step {self.step}, epoch "
                         f"{self.epoch}, lr {self.scheduler.get_last_lr()[0]:.3e}")
        self.log.advance(self.step)

    # ---------------------------------------------------------------- one optimizer step

    def _run_window(self, window: _Window) -> bool:
        """One optimizer step over ``grad_accum`` micro-batches per rank; False at epoch end.

        The one all-reduce that decides the epoch end also carries the previous window's count
        of non-finite losses (a device tensor until then, so the step loop adds no host sync)
        and how many ranks ran out of batches."""
        t0 = time.perf_counter()
        batches, wait = [], 0.0
        for _ in range(self.gas):
            tw = time.perf_counter()
            batches.append(self._next_batch())
            wait += time.perf_counter() - tw
        real = [b for b in batches if b is not None]
        counts = torch.tensor([len(real), sum(b.num_samples for b in real),
                               sum(b.num_tokens for b in real), float(len(real) < self.gas), 0.0],
                              dtype=torch.float64, device=self.env.device)
        if self.bad_losses is not None:
            counts[4] = self.bad_losses
        dist.all_reduce(counts)
        n_real, samples, tokens, exhausted_ranks, bad = counts.tolist()
        if bad > 0:
            self._stop_non_finite(window)
        if n_real == 0:  # the time spent finding out is charged to the next step
            self.carry_s += time.perf_counter() - t0
            self.carry_wait_s += wait
            return False
        if exhausted_ranks > 0:
            self._check_fillers(exhausted_ranks)
        wait += self.carry_wait_s
        window.wait_s += wait
        if self.cfg.broadcast_buffers:
            sync_buffers(self.engine.module)
        window.lr = self.scheduler.get_last_lr()[0]
        scale = self.gas * self.env.world_size / n_real
        bad_losses = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for i, b in enumerate(batches):
            if b is None:
                weight, batch = 0.0, self._filler()
            else:
                weight, batch = scale, b.to(self.env.device, self.dtype)
            out = self.stage.step(self.engine, self.loss_module, batch)
            if i == 0 and self.cfg.bad_loss_at_step == self.step + 1 and self.is_main:
                out = _inject_bad_loss(out, self.cfg.bad_loss)
            # a filler's loss counts too: weight 0 times NaN is still a NaN gradient
            bad_losses += (~torch.isfinite(out.loss.detach())).to(bad_losses.dtype)
            self.engine.backward(out.loss * weight)
            if i == self.gas - 1 and self.own_clip:
                window.grad_norms.append(_clip(self.engine.module, self.cfg.grad_clip))
            elif i == self.gas - 1 and self.manual_norm:
                window.grad_norms.append(_manual_grad_norm(self.engine.module))
            self.engine.step()
            seen = 1.0 if b is not None else 0.0
            window.add("total", out.loss, seen, self.env.device)
            for name, value in out.metrics.items():
                window.add(name, value, seen, self.env.device)
        if not (self.own_clip or self.manual_norm):
            norm = _device_grad_norm(self.engine)
            if norm is not None:
                window.grad_norms.append(norm)
        self.step += 1
        self.bad_losses, self.bad_step = bad_losses, self.step
        self.epoch_samples += samples
        step_s = time.perf_counter() - t0 + self.carry_s
        self.carry_s = self.carry_wait_s = 0.0
        self.step_times.append(step_s)
        self.step_samples.append(samples)
        self.step_waits.append(wait)
        window.steps += 1
        window.samples += samples
        window.tokens += tokens
        window.step_s += step_s
        return True

    def _check_finite(self, window: _Window) -> None:
        """Collective: stop (every rank) when the last window had a non-finite loss. Called
        before anything reads or keeps the weights of that step (log, validation, checkpoint,
        export); otherwise the next window's counts carry the flag."""
        if self.bad_losses is None:
            return
        flag = self.bad_losses.reshape(1).clone()
        dist.all_reduce(flag)
        if flag.item() > 0:
            self._stop_non_finite(window)
        self.bad_losses = None  # checked: the next window's counts carry a fresh flag

    def _stop_non_finite(self, window: _Window) -> None:
        """Raise :class:`NonFiniteLoss` on every rank, naming the step and the loss terms
        whose sums over the window are not finite (collective: the names of every rank)."""
        mine = sorted(metric_tag(n) for n, v in window.sums.items()
                      if not math.isfinite(float(v)))
        terms = sorted(set().union(*ckpt.gather_objects(mine))) or ["loss/total"]
        latest = ckpt.latest_tag(self.ckpt_dir) if self.is_main else None
        box = [latest]
        dist.broadcast_object_list(box, src=0)
        kept = (f"the last good checkpoint {self.ckpt_dir / box[0]} is intact"
                if box[0] else "no checkpoint was written before it")
        raise NonFiniteLoss(
            f"non-finite loss at step {self.bad_step} (epoch {self.epoch}): "
            f"{', '.join(terms)} not finite; stopped before saving anything of that step, "
            f"{kept}; lower train.lr, keep train.grad_clip > 0, or check the data")

    # ---------------------------------------------------------------- logging

    def _log_window(self, window: _Window) -> None:
        """Collective: reduce the window's metrics over ranks and log them on rank 0."""
        names = sorted(set().union(*ckpt.gather_objects(sorted(window.sums))))
        zero = torch.zeros((), device=self.env.device)
        vec = torch.stack([window.sums.get(n, zero) for n in names]
                          + [torch.tensor(window.counts.get(n, 0.0), device=self.env.device)
                             for n in names]
                          + [torch.tensor(window.wait_s / max(window.step_s, 1e-12),
                                          device=self.env.device)]).double()
        dist.all_reduce(vec)
        values = vec.tolist()
        k = len(names)
        scalars = {metric_tag(n): values[i] / values[k + i]
                   for i, n in enumerate(names) if values[k + i] > 0}
        per_s = window.samples / max(window.step_s, 1e-12)
        scalars.update({
            "opt/lr": window.lr,
            "perf/samples_per_s": per_s,
            "perf/tokens_per_s": window.tokens / max(window.step_s, 1e-12),
            "perf/step_time_s": window.step_s / max(window.steps, 1),
            "perf/data_wait_share": values[2 * k] / self.env.world_size,
            "mem/rss_gb": _rss_gb(),
        })
        if window.grad_norms:
            scalars["opt/grad_norm"] = statistics.fmean(_as_float(n) for n in window.grad_norms)
        if self.peak_flops > 0:
            scalars["perf/mfu"] = (self.flops_per_sample * per_s
                                   / (self.peak_flops * self.env.world_size))
        if self.env.device.type == "cuda":
            scalars["mem/device_max_alloc_gb"] = (torch.cuda.max_memory_allocated(self.env.device)
                                                  / 2**30)
        if self.first_log is None:
            self.first_log = scalars
        self.last_log = scalars
        self.log.log(self.step, scalars)

    # ---------------------------------------------------------------- the run

    def _finished(self) -> bool:
        return bool(self.stopped_early
                    or (self.cfg.max_steps and self.step >= self.cfg.max_steps)
                    or (self.cfg.epochs and self.epoch >= self.cfg.epochs))

    def _loop(self) -> None:
        window = _Window()
        while not self._finished():
            if not self._run_window(window):
                if self.epoch_samples == 0:  # counted over all ranks: every rank stops here
                    listed = listed_samples(self.shard_dir)
                    raise BadInput(
                        f"epoch {self.epoch} gave no training sample on any of the "
                        f"{self.env.world_size} rank(s): {self.shard_dir} holds none "
                        f"({listed if listed is not None else 'no'} listed in shards.json); "
                        "nothing to train: check the ETL output (manifest.json: "
                        "rows_quarantined, quarantine_by_reason)")
                self.samples_per_epoch.append(self.epoch_samples)
                self.epoch += 1
                if not self._finished():
                    self._start_epoch()
                continue
            self.log.advance()
            log = self.step % self.cfg.log_every == 0
            validate = bool(self.val_every) and self.step % self.val_every == 0
            save = bool(self.cfg.checkpoint_every) and self.step % self.cfg.checkpoint_every == 0
            if log or validate or save:
                self._check_finite(window)  # nothing of a non-finite step is logged or kept
            if log:
                self._log_window(window)
                window = _Window()
            if validate:
                self._validate()
            if save:
                self._save()
            if self.cfg.kill_at_step == self.step:
                self._debug_kill("kill", self.cfg.kill_rank)
        self._check_finite(window)
        if window.steps:
            self._log_window(window)
        if self.val_every and (not self.val_history or self.val_history[-1]["step"] != self.step):
            self._validate()  # the last weights are always a candidate

    def _debug_marker(self, what: str, step: int) -> Path:
        return self.out_dir / f".debug-{what}-step{step}"

    def _debug_kill(self, what: str, rank: int = -1) -> None:
        """Debug knobs (``train.kill_at_step``, ``kill_in_save_at_step``): SIGKILL this rank
        (when it is ``rank``, or any rank for -1), once per run folder: a marker file in the
        run folder remembers it, so the relaunched command resumes past this step."""
        if what in self.debug_done or rank not in (-1, self.env.rank):
            return
        self._debug_marker(what, self.step).touch()
        self.log.message(f"{what}_at_step={self.step}: SIGKILL (rank {self.env.rank})")
        self.log.close()
        os.kill(os.getpid(), signal.SIGKILL)

    def _export(self) -> dict:
        """Collective: the weights the run keeps (the best validation weights with
        ``validation.keep_best``, else the last ones, consolidated to fp32) ->
        final/model_fp32.pt, checked against the live model (:meth:`_check_export`);
        rank 0 finalizes."""
        path = self.folder.final_weights
        kept_best = bool(self.val_every and self.job.validation.keep_best and self.best is not None)
        if kept_best:
            state = ckpt.load_state_file(self.best_path) if self.is_main else {}
        else:
            state = ckpt.consolidated_fp32_state_dict(self.engine)
        live = None if kept_best else self._live_outputs()
        result: dict = {}
        check: dict = {"checked": False, "why": "the kept weights are the best validation "
                       "ones (validation.keep_best), not the live ones"} if kept_best else {}
        if self.is_main:
            ckpt.save_state_file(state, path)
            del state
            fresh, _ = self.stage.build(self.job.model, self.job.loss, self.job.inputs)
            fresh.load_state_dict(ckpt.load_state_file(path), strict=True)  # the file, reread
            fresh.eval()
            self.folder.model_card.write_text(json.dumps(model_card.card(fresh), indent=2))
            if live is not None:
                check = self._check_export(fresh, live, path)
            result = self.stage.finalize(fresh, self.job.model, self.job.loss, self.job.inputs,
                                         self.folder.export) or {}
        box = [check]
        dist.broadcast_object_list(box, src=0)
        check = box[0]
        if check.get("error"):
            raise ExportMismatch(check["error"])
        return {**result, "roundtrip": check}

    def _check_batch(self) -> Any | None:
        """Collective: the batch the export check runs (this rank's first of the epoch), or
        None on every rank when some rank has none."""
        batch = self._filler()
        missing = torch.tensor([float(batch is None)], device=self.env.device)
        dist.all_reduce(missing)
        return None if missing.item() > 0 else batch

    @torch.no_grad()
    def _live_outputs(self) -> tuple[Any, list[torch.Tensor]] | None:
        """Collective: (batch, the live model's forward outputs on it) on rank 0 (every rank
        runs the forward: under ZeRO-3 it gathers the partitioned weights). None when a rank
        has no batch."""
        batch = self._check_batch()
        if batch is None:
            return None
        self.engine.eval()
        self.loss_module.eval()
        outputs = _forward_outputs(self.stage, self.engine, self.engine.module,
                                   self.loss_module, batch)
        return (batch, outputs) if self.is_main else None

    @torch.no_grad()
    def _check_export(self, fresh: nn.Module, live: tuple[Any, list[torch.Tensor]],
                      path: Path) -> dict:
        """Rank 0: a model loaded from ``final/model_fp32.pt`` must give the live model's
        outputs (logits, codes) on the check batch, to 1e-5 relative. Under bf16 each reloaded
        tensor is cast to the dtype of its live counterpart (DeepSpeed casts the parameters,
        not the buffers), so the outputs are the same numbers. Returns the figures, with
        ``error`` when they differ."""
        import copy

        batch, want = live
        probe = copy.deepcopy(fresh).to(self.env.device)
        live_dtypes = {n: t.dtype for n, t in self.engine.module.named_parameters()}
        live_dtypes.update((n, t.dtype) for n, t in self.engine.module.named_buffers())
        for name, t in [*probe.named_parameters(), *probe.named_buffers()]:
            if name in live_dtypes and t.dtype != live_dtypes[name]:
                t.data = t.data.to(live_dtypes[name])
        got = _forward_outputs(self.stage, probe, probe, self.loss_module, batch)
        return _compare_outputs(want, got, rel_tol=1e-5, what=str(path))

    def _summary(self, export: dict, wall_s: float) -> dict:
        rates = [s / t for s, t in zip(self.step_samples, self.step_times) if t > 0]
        last, first = self.last_log, self.first_log or {}
        return {
            "stage": self.job.stage,
            "final_step": self.step,
            "epochs_completed": len(self.samples_per_epoch),
            "samples_per_epoch": self.samples_per_epoch,
            "world_size": self.env.world_size,
            "zero_stage": self.cfg.zero_stage,
            "zero_stage_effective": effective_zero_stage(self.cfg.zero_stage,
                                                         self.env.world_size),
            # parameter values this rank held right after building the model, of the whole
            # model's (under ZeRO-3 a share: built inside zero.Init)
            "built_param_values": getattr(self, "build_values", None),
            "precision": self.cfg.precision,
            "device": self.env.device_name,
            "resumed_from": self.resumed_from,
            "losses": {"first": {k: v for k, v in first.items() if k.startswith("loss/")},
                       "final": {k: v for k, v in last.items() if k.startswith("loss/")}},
            "throughput": {
                "median_step_time_s": statistics.median(self.step_times) if self.step_times
                else None,
                "median_samples_per_s": statistics.median(rates) if rates else None,
                "tokens_per_s": last.get("perf/tokens_per_s"),
                "data_wait_share": (sum(self.step_waits) / sum(self.step_times)
                                    if self.step_times else None),
                # the total above includes each epoch's pipeline fill (spawned workers
                # importing torch: docs/BENCHMARKS.md, "Engine overhead"); the median step
                # shows the steady state
                "median_step_data_wait_share": statistics.median(
                    w / t for w, t in zip(self.step_waits, self.step_times) if t > 0)
                if self.step_times else None,
                "data_wait_share_last_log": last.get("perf/data_wait_share"),
                "mfu": last.get("perf/mfu"),
            },
            "wall_time_s": wall_s,
            "validation": {"history": self.val_history, "best": self.best,
                           "kept": ("best" if self.val_every and self.job.validation.keep_best
                                    and self.best is not None else "last"),
                           "stopped_early": self.stopped_early} if self.val_every else None,
            "export": export,
        }

    def run(self) -> dict:
        """Train to the end (resuming if a checkpoint exists), export, finalize; the summary."""
        t_start = time.perf_counter()
        self.log = RunLogger(self.out_dir, enabled=self.is_main, total_steps=self.total_steps,
                             start_step=0, progress_bar=self.cfg.progress_bar)
        try:
            return self._run(t_start)
        finally:
            self.log.close()

    def _run_untrained(self, t_start: float) -> dict:
        """A stage with nothing to train (``stage.needs_training(model_cfg)`` is False, e.g.
        RQ-KMeans): rank 0 builds the model and calls ``finalize``; no DeepSpeed."""
        export: dict = {}
        if self.is_main:
            write_run_metadata(self.out_dir, self.job, extra={
                "world_size": self.env.world_size, "device": self.env.device_name,
                "trained": False})
            model, _ = self._build_model()
            model.eval()
            self.log.message(f"{self.job.stage}: nothing to train for this model config; "
                             "finalizing directly")
            export = self.stage.finalize(model, self.job.model, self.job.loss, self.job.inputs,
                                         self.folder.export) or {}
        return self._finish(export, t_start)

    def _finish(self, export: dict, t_start: float) -> dict:
        """Write summary.json on rank 0 and hand the summary to every rank."""
        summary = self._summary(export, time.perf_counter() - t_start)
        if self.is_main:
            self.folder.summary.write_text(json.dumps(summary, indent=2))
            self.log.message(f"done: step {self.step}, summary {self.folder.summary}")
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _run(self, t_start: float) -> dict:
        needs_training = getattr(self.stage, "needs_training", None)
        if needs_training is not None and not needs_training(self.job.model):
            return self._run_untrained(t_start)
        if self.env.world_size > 1:  # collective; one line naming the path on every rank
            try:
                check_shared_paths(self.out_dir, self.shard_dir)
            except RuntimeError as e:
                raise BadInput(str(e)) from e
        self.loader = self._build_loader()
        model, self.loss_module = self._build_model()
        # decided by rank 0 and broadcast: ranks never disagree on resuming (ckpt module doc)
        try:
            resume_tag = ckpt.agreed_latest_tag(self.ckpt_dir)
        except (RuntimeError, FileNotFoundError) as e:
            raise BadInput(str(e)) from e
        if self.is_main:  # the remains of a save that never completed
            for tag in ckpt.remove_incomplete(self.ckpt_dir, resume_tag):
                self.log.message(f"removed incomplete checkpoint {self.ckpt_dir / tag} (newer "
                                 f"than the last complete one, {resume_tag or 'none'})")
        resuming = resume_tag is not None
        if not resuming:
            self._start_epoch()
        self.engine, self.scheduler, ds_cfg = build_engine(
            model, self.cfg, self.env.world_size, self.env.device.type, self.total_steps)
        # debug kills that already fired in this run folder (read by every rank before any of
        # them can fire again: deepspeed.initialize above was a collective)
        self.debug_done = {what for what, step in (("kill", self.cfg.kill_at_step),
                                                   ("kill_in_save", self.cfg.kill_in_save_at_step))
                           if step and self._debug_marker(what, step).exists()}
        self.own_clip = trainer_clips_gradients(self.cfg, self.env.world_size)
        self.manual_norm = not reports_grad_norm(self.engine.optimizer)
        self.loss_module.to(self.env.device)
        sync_buffers(self.engine.module)  # DeepSpeed broadcasts parameters, not buffers
        if self.is_main:
            write_run_metadata(self.out_dir, self.job, extra={
                "world_size": self.env.world_size, "device": self.env.device_name,
                "grad_accum": self.gas, "total_steps": self.total_steps, "ds_config": ds_cfg})
        seed_all(self.job.run.seed + 1 + self.env.rank)  # per-rank randomness (dropout ...)
        if resume_tag is not None:
            self._resume(resume_tag)
        zero = effective_zero_stage(self.cfg.zero_stage, self.env.world_size)
        zero_note = "" if zero == self.cfg.zero_stage else \
            f" (train.zero_stage={self.cfg.zero_stage}: nothing to partition on one rank)"
        self.log.message(
            f"{self.job.stage}: {self.env.world_size} rank(s) on {self.env.device_name}, ZeRO-"
            f"{zero}{zero_note}, {self.cfg.precision}, global batch "
            f"{self.cfg.global_batch_size} = {self.cfg.micro_batch_size} x {self.gas} accum x "
            f"{self.env.world_size} ranks, {self.total_steps} steps -> {self.out_dir}")
        self.engine.train()
        self.loss_module.train()
        if self.val_every and self.job.validation.at_start and not self.val_history:
            self._validate()  # the starting weights are a candidate too
        self._loop()
        if self.saved_step != self.step:
            self._save()
        export = self._export()
        self.engine.destroy()
        return self._finish(export, t_start)


def train(job: JobConfig) -> dict:
    """Train ``job`` on this process's share of the world (a world of one without a launcher);
    returns the run summary (also written to ``<out_dir>/summary.json``)."""
    return Trainer(job).run()
