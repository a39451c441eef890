"""Job and training configuration: the ``run:`` and ``train:`` sections and the whole job file.

Design
------
One job file (``configs/<scale>/<stage>.yaml``) describes one training run of one stage:
``stage``, ``run``, ``inputs`` (:class:`~higr_dist.stages.base.StageInputs`), ``data``
(:class:`~higr_dist.data.loader.LoaderConfig`), ``train`` (:class:`TrainConfig`, here), and the
stage's own ``model`` and ``loss`` sections, whose dataclasses the stage names
(``stage.model_config_cls`` / ``stage.loss_config_cls``).

Loading is two-phase because the type of ``model``/``loss`` depends on the value of ``stage``:
first the generic sections are validated, then the stage is looked up and its two sections are
validated against its classes. Problems from both phases are collected into one
:class:`~higr_dist.config.ConfigError` (dotted paths, one line each), so the preflight can print
all of them at once.

Trade-off: ``model``/``loss`` are annotated ``Any`` on :class:`JobConfig` (plain dicts before
:func:`load_job`, the stage's dataclasses after it) instead of a generic type parameter; the
loader is the only place that builds a ``JobConfig`` from a file, and it always resolves them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from higr_dist.config import (
    PRESET,
    ConfigError,
    apply_overrides,
    deep_merge,
    from_dict,
    load_yaml,
    merge_layer,
    to_dict,
)
from higr_dist.data.loader import LoaderConfig
from higr_dist.engine.validate import ValidateConfig
from higr_dist.stages.base import (
    Stage,
    StageInputs,
    get_stage,
    import_builtin_stages,
    known_stages,
)

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class RunConfig:
    """The ``run:`` section: where a run writes and how it is seeded."""

    name: str = "run"
    """Run name (used for the default output folder ``runs/<name>``)."""
    out_dir: str = ""
    """Run folder (checkpoints, tb/, final/, export/, summary.json); empty = ``runs/<name>``."""
    seed: int = 0
    """Seed for model initialisation and data order (same on every rank)."""


@dataclass
class TrainConfig:
    """The ``train:`` section: parallelism, precision, batch, schedule, checkpoints, logging."""

    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded),
    2 (+ gradients), 3 (+ parameters). A world of one runs stage 0 whatever is set here (one
    rank has nothing to partition; see ``higr_dist.engine.ds_config.effective_zero_stage``)."""
    zero_options: dict[str, Any] = field(default_factory=dict)
    """Extra keys for DeepSpeed's ``zero_optimization`` section (``stage`` comes from
    ``zero_stage``), for tuning a cluster without code changes, e.g. ``{overlap_comm: true,
    reduce_bucket_size: 50000000, contiguous_gradients: false}``. Checked by the preflight
    against DeepSpeed's own schema. Empty = DeepSpeed's defaults."""
    precision: Precision = "fp32"
    """Training precision. bf16/fp16 keep fp32 master weights in the DeepSpeed optimizer; fp16 also
    uses dynamic loss scaling. fp16 needs a GPU (CPU kernels are bf16/fp32 only)."""
    fp32_grad_accum: bool = True
    """bf16 under ZeRO >= 1: accumulate gradients over micro-batches and reduce them over ranks
    in fp32 (DeepSpeed's ``data_types.grad_accum_dtype`` and ``communication_data_type``).
    False = DeepSpeed's default, both in bf16: half the gradient memory and traffic, but small
    per-micro-batch contributions are rounded away. Ignored at ZeRO-0, which DeepSpeed only
    runs with bf16 accumulation (see ``higr_dist.engine.ds_config``)."""
    global_batch_size: int = 64
    """Samples per optimizer step over all ranks."""
    micro_batch_size: int = 32
    """Samples per forward/backward on one rank; gradient accumulation steps =
    global_batch_size / (micro_batch_size * world_size), which must be a whole number."""
    max_steps: int = 100
    """Stop after this many optimizer steps (0 = no step limit; then ``epochs`` must be set)."""
    epochs: int = 0
    """Stop after this many passes over the shards (0 = no epoch limit). With both set, whichever
    comes first ends the run."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (biases, norms and 1-D tensors get none)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup from lr/warmup_steps to lr over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at the last step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    checkpoint_every: int = 500
    """Save a DeepSpeed checkpoint every K optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Keep the last M checkpoints in ``<out_dir>/checkpoints`` (older tags are deleted)."""
    activation_checkpointing: bool = False
    """Recompute Transformer blocks in backward (sets ``model.gradient_checkpointing = True`` on
    models that have that attribute): less activation memory for ~30% more compute."""
    log_every: int = 10
    """Log (TensorBoard + console) the mean over every this many optimizer steps."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device at this precision, for MFU; 0 = derived from the device
    (see ``higr_dist.engine.ds_config.PEAK_TFLOPS``)."""
    optimizer: Literal["auto", "torch", "deepspeed"] = "auto"
    """AdamW implementation. ``torch``: ``torch.optim.AdamW(fused=True)`` passed to DeepSpeed as
    client optimizer (one fused kernel per step on CPU and CUDA, nothing to compile).
    ``deepspeed``: DeepSpeed's FusedAdam from the ds config ``optimizer`` block (CUDA; DeepSpeed
    JIT-compiles the op on first use, which needs nvcc and ~1 min once, into
    ``TORCH_EXTENSIONS_DIR``, by default a per-user, per-host folder outside the checkout).
    ``auto`` = ``torch`` on every device, except under ZeRO-Offload
    (``zero_options.offload_optimizer``), where DeepSpeed accepts only its own CPU Adam:
    ``auto`` is then ``deepspeed`` and ``torch`` is rejected by the preflight."""
    broadcast_buffers: bool = False
    """Broadcast module buffers from rank 0 before every optimizer step (torch DDP's default),
    for models that mutate buffers (e.g. EMA statistics) without synchronising them. Off by
    default: it would overwrite deliberate per-rank buffer state (the tokenizer's local usage
    counts, summed over ranks when it checks for dead codes)."""
    dist_timeout_s: float = 3600.0
    """Timeout of every collective (``deepspeed.init_distributed``; DeepSpeed's default is 10
    minutes). Long because some phases have one rank working while the others wait in a
    collective: rank 0 alone writes the final export, rebuilds the model and runs the stage's
    finalize (the tokenizer's SID export and RQ-KMeans passes over the catalogue). A real hang is
    reported this much later. Only the first process group of a process gets it."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0 (console lines are printed either way)."""
    kill_at_step: int = 0
    """Debug: SIGKILL every rank (or ``kill_rank``) right after this optimizer step (0 = never),
    to test resume. Fires once per run folder (a marker file ``.debug-kill-step<N>`` remembers
    it), so relaunching the same command resumes and finishes, and a resumed run can be killed
    again at a later step."""
    kill_rank: int = -1
    """Debug: the rank ``kill_at_step`` kills (-1 = every rank), to test that the other ranks
    stop instead of waiting for it."""
    kill_in_save_at_step: int = 0
    """Debug: SIGKILL every rank in the middle of writing the checkpoint of this step (half of
    its first checkpoint file on disk), once per run folder, to test that a torn checkpoint is
    never resumed from (0 = never)."""
    bad_loss_at_step: int = 0
    """Debug: at this optimizer step, rank 0's first micro-batch returns a ``bad_loss`` loss (as
    if the stage's first loss term had diverged), to test the non-finite loss guard (0 =
    never)."""
    bad_loss: Literal["nan", "inf"] = "nan"
    """Debug: the value ``bad_loss_at_step`` injects."""

    def validate(self) -> list[str]:
        """Checks that do not depend on the world size (see :meth:`batch_problems`).

        Fields with a wrong type are skipped here: the loader has already reported them.
        """
        def num(*names: str) -> bool:
            return all(isinstance(getattr(self, n), int | float)
                       and not isinstance(getattr(self, n), bool) for n in names)

        out = []
        if num("zero_stage") and self.zero_stage not in (0, 1, 2, 3):
            out.append(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if isinstance(self.zero_options, dict) and "stage" in self.zero_options:
            out.append("zero_options.stage: set train.zero_stage instead")
        for name in ("global_batch_size", "micro_batch_size", "log_every", "keep_last"):
            if num(name) and getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if num("dist_timeout_s") and not self.dist_timeout_s > 0:
            out.append(f"dist_timeout_s: must be > 0, got {self.dist_timeout_s}")
        for name in ("max_steps", "epochs", "warmup_steps", "checkpoint_every", "kill_at_step",
                     "kill_in_save_at_step", "bad_loss_at_step", "weight_decay", "grad_clip",
                     "peak_tflops"):
            if num(name) and getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if num("max_steps", "epochs") and self.max_steps == 0 and self.epochs == 0:
            out.append("max_steps/epochs: set at least one of them (> 0) so training ends")
        if num("kill_rank") and self.kill_rank < -1:
            out.append(f"kill_rank: must be -1 (every rank) or a rank, got {self.kill_rank}")
        if num("lr") and not self.lr > 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        if num("min_lr_ratio") and not 0.0 <= self.min_lr_ratio <= 1.0:
            out.append(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if all(isinstance(b, int | float) for b in self.betas) \
                and not all(0.0 <= b < 1.0 for b in self.betas):
            out.append(f"betas: each must be in [0, 1), got {list(self.betas)}")
        if num("global_batch_size", "micro_batch_size") and self.micro_batch_size >= 1 \
                and self.global_batch_size % self.micro_batch_size:
            out.append(f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                       f"micro_batch_size ({self.micro_batch_size})")
        return out

    def batch_problems(self, world_size: int) -> list[str]:
        """Problems with the batch sizes for ``world_size`` ranks (empty = they divide)."""
        per_step = self.micro_batch_size * world_size
        if per_step <= 0 or self.global_batch_size % per_step:
            return [f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                    f"train.micro_batch_size x world size ({self.micro_batch_size} x {world_size}"
                    f" = {per_step}) so gradient accumulation is a whole number of micro-batches"]
        return []

    def grad_accum(self, world_size: int) -> int:
        """Gradient accumulation steps for ``world_size`` ranks; ValueError when not whole."""
        problems = self.batch_problems(world_size)
        if problems:
            raise ValueError(problems[0])
        return self.global_batch_size // (self.micro_batch_size * world_size)


@dataclass
class JobConfig:
    """One training job (one stage, one run folder): the whole YAML file."""

    stage: str
    """Registered stage name (``tokenizer``, ``hsd``, ``orpo``, ``dpo``)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run folder and seed."""
    inputs: StageInputs = field(default_factory=StageInputs)
    """Outputs of earlier steps this stage reads (ETL folder, SID export, init weights)."""
    data: LoaderConfig = field(default_factory=LoaderConfig)
    """Streaming loader settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Engine settings."""
    validation: ValidateConfig = field(default_factory=ValidateConfig)
    """Periodic validation and which weights the run keeps (slate models)."""
    model: Any = field(default_factory=dict)
    """The stage's model section (a ``stage.model_config_cls`` instance after :func:`load_job`)."""
    loss: Any = field(default_factory=dict)
    """The stage's loss section (a ``stage.loss_config_cls`` instance after :func:`load_job`)."""

    @property
    def out_path(self) -> Path:
        """The run folder (``run.out_dir`` or ``runs/<run.name>``)."""
        return Path(self.run.out_dir or f"runs/{self.run.name}")

    def shard_dir(self, sample_kind: str) -> Path:
        """Folder the loader streams: ``data.shards`` or ``<inputs.etl_dir>/<sample_kind>``."""
        return Path(self.data.shards) if self.data.shards else Path(self.inputs.etl_dir) / sample_kind


def _stage_section(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    """Validate one stage-owned section (``model``/``loss``) into ``cls``; collect problems."""
    if isinstance(value, cls):
        return value
    if value is None:  # an empty ``model:`` line in YAML
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a section (mapping), got {value!r}")
        return None
    try:
        return from_dict(cls, value, path)
    except ConfigError as e:
        problems.extend(e.problems)
        return None


def find_stage(name: str) -> Stage | None:
    """The registered stage ``name``, or None.

    Imports ``higr_dist.stages.<name>`` first when such a module exists (only the stage in use
    is imported), then every built-in stage module if the name is still unknown (``dpo`` lives
    in ``orpo.py``; a test may have registered its own stage before any built-in one).
    """
    if name.isidentifier():
        try:
            importlib.import_module(f"higr_dist.stages.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"higr_dist.stages.{name}":
                raise
    try:
        return get_stage(name)
    except KeyError:
        import_builtin_stages()
    try:
        return get_stage(name)
    except KeyError:
        return None


def resolve_job(data: dict) -> JobConfig:
    """Plain dict (already merged and overridden) -> validated :class:`JobConfig`.

    Every problem of both phases (generic sections, then the stage's ``model``/``loss``) is
    raised together in one :class:`ConfigError`.
    """
    problems: list[str] = []
    job = None
    generic = {k: v for k, v in data.items() if k not in ("model", "loss")}
    try:
        job = from_dict(JobConfig, generic)
    except ConfigError as e:
        problems.extend(e.problems)
    name = data.get("stage")
    stage = None
    if isinstance(name, str):
        stage = find_stage(name)
        if stage is None:
            problems.append(f"stage: unknown stage {name!r}; known: {', '.join(known_stages())}")
    model_cfg = loss_cfg = None
    if stage is not None:
        model = _with_preset(stage, data.get("model", {}), problems)
        model_cfg = _stage_section(stage.model_config_cls, model, "model", problems)
        loss_cfg = _stage_section(stage.loss_config_cls, data.get("loss", {}), "loss", problems)
    if problems:
        raise ConfigError(problems)
    assert job is not None
    job.model, job.loss = model_cfg, loss_cfg
    return job


def _with_preset(stage: Stage, model: object, problems: list[str]) -> object:
    """``model`` with its ``preset`` expanded: the named size's values (the stage's
    ``model_presets``, e.g. :data:`higr_dist.models.hsd.PRESETS`), then the section's own keys
    over them; anything else unchanged (its own checks report it). Which layer's keys reach
    the section is :func:`higr_dist.config.merge_layer`'s rule: a preset replaces the model
    keys of the layers below the one that names it."""
    if not isinstance(model, dict) or PRESET not in model:
        return model
    rest = {k: v for k, v in model.items() if k != PRESET}
    name, presets = model[PRESET], getattr(stage, "model_presets", {}) or {}
    if not presets:
        problems.append(f"model.{PRESET}: stage {stage.name} has no presets; give the model's "
                        "fields instead")
        return rest
    if not isinstance(name, str) or name not in presets:
        problems.append(f"model.{PRESET}: unknown preset {name!r}; known: "
                        f"{', '.join(presets)}")
        return rest
    return deep_merge(to_dict(presets[name]), rest)


def ensure_resolved(job: JobConfig) -> JobConfig:
    """``job`` with typed ``model``/``loss`` sections (re-validates when they are still dicts)."""
    if isinstance(job.model, dict) or isinstance(job.loss, dict):
        return resolve_job(to_dict(job))
    return job


def load_job(path: str | Path | None = None, overrides: list[str] | None = None,
             base: dict | None = None) -> JobConfig:
    """defaults < ``base`` < YAML at ``path`` < ``key=value`` overrides -> :class:`JobConfig`."""
    data = dict(base or {})
    if path is not None:
        data = merge_layer(data, load_yaml(path))
    data = apply_overrides(data, overrides)
    return resolve_job(data)
