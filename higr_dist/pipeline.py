"""``higr run``: the whole pipeline on one config, ETL -> tokenizer -> HSD -> ORPO -> eval -> slates.

Launch::

    higr run --config configs/tiny/run.yaml --name demo                 # embedded synthetic data
    higr run --config configs/tiny/run.yaml --name mine \\
        --interactions logs.parquet --items items.parquet               # your data, generic schema

Design
------
The pipeline is an orchestrator, not a second trainer: every training stage runs through the one
engine, launched as a real multi-process job (``torchrun`` by default, ``deepspeed`` or in-process
on request), exactly as a user would launch it on a cluster; the stage configs are the shipped
``configs/<scale>/<stage>.yaml`` files with the run's paths given as ``key=value`` overrides.

Steps are idempotent: each one records its output (ETL ``manifest.json``, a stage's
``summary.json``) and a re-run skips finished steps, so a killed pipeline continues where it
stopped (and a killed stage resumes from its last checkpoint inside the engine). A finished
stage whose recorded config differs from what the configs give now, or that was trained on an
ETL output built under another ETL config, stops the run before any process starts, with the
keys that differ (:func:`stale_stages`): reusing it would report an old model as the new one.

Fail before the work: :func:`check_run` loads every file the run will use (the ETL config,
the synthetic generator's settings, each stage's job config with the run's overrides) and
checks the input paths before Spark starts, so a typo costs seconds, not an ETL. Afterwards
:func:`check_samples` stops the run with one line when the ETL left a stage no sample (the
trainer would also stop, but after a launch). User errors print one line per problem and exit
2; a stage that fails exits 1 with the command to rerun it (its own output says why).

Baselines get the same data, the same budget and the same care as HiGR: ``flat`` and ``sasrec``
train on the same slate shards for the same epochs (sized from the manifest,
:mod:`higr_dist.sizing`) with the same schedule shape, and every model keeps the weights of its
best validation NDCG@5 (:mod:`higr_dist.engine.validate`). Defaults are compared across logs
on validation with ``bench/sweep.py`` (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from higr_dist import sizing
from higr_dist.config import ConfigError, load, to_dict, write_run_metadata

ROOT = Path(__file__).resolve().parents[1]

#: stages trained by the pipeline, in order, with the stage each one's weights initialise from
STAGE_ORDER = ("tokenizer", "hsd", "flat", "sasrec", "orpo", "dpo")


@dataclass
class SourceSpec:
    """Where the pipeline's input data comes from (the ``source:`` section)."""

    interactions: str = ""
    """Interaction log (CSV/Parquet, any Hadoop-FS URI); empty = the embedded synthetic data."""
    items: str = ""
    """Items table (``item_id, category[, caption]``); required with ``interactions``."""
    synthetic: dict = field(default_factory=dict)
    """Overrides of the synthetic generator's config (``higr_dist.etl.synthetic.SyntheticConfig``)."""


@dataclass
class LaunchSpec:
    """How training stages are launched (the ``launch:`` section)."""

    mode: Literal["torchrun", "deepspeed", "inprocess"] = "torchrun"
    """``torchrun --standalone`` / ``deepspeed --num_gpus`` with ``nproc`` ranks, or in this
    process as a world of one (fastest start-up; for debugging)."""
    nproc: int = 2
    """Ranks per stage on this machine (CPU: gloo processes; GPU: one per device)."""
    hostfile: str = ""
    """With ``mode: deepspeed``: a DeepSpeed hostfile (``hostfile.example``) to launch across
    nodes instead of ``--num_gpus nproc`` on this one."""
    node_rank: int = -1
    """With a ``hostfile``: this node's rank (its line in the hostfile, 0 = the first) when every
    node runs its own ``higr run`` and launcher, without ssh (``deepspeed --no_ssh``; Kubernetes,
    Slurm). -1: one launcher on this node starts every node over ssh. Node 0 runs the data, ETL
    and evaluation steps; the others wait for the ETL output (``wait_etl_s``) and train."""
    master_addr: str = ""
    """With ``node_rank``: node 0's address, where rank 0 hosts the rendezvous (required)."""
    master_port: int = 0
    """The rendezvous port of ``deepspeed`` launches (0 = DeepSpeed's default, 29500)."""
    wait_etl_s: float = 3600.0
    """Nodes other than 0: how long to wait for node 0's ETL output (its ``manifest.json``, written
    last, in the shared run folder, for this run's ETL config) before giving up."""

    def validate(self) -> list[str]:
        problems = []
        if self.node_rank >= 0:
            if self.mode != "deepspeed" or not self.hostfile:
                problems.append("node_rank: needs mode: deepspeed and a hostfile (one launcher "
                                "per node, without ssh)")
            if not self.master_addr:
                problems.append("node_rank: needs master_addr (node 0's address)")
        elif self.node_rank != -1:
            problems.append(f"node_rank: must be -1 (one launcher) or >= 0, got "
                            f"{self.node_rank}")
        if not 0 <= self.master_port <= 65535:
            problems.append(f"master_port: must be 0..65535, got {self.master_port}")
        if not self.wait_etl_s > 0:
            problems.append(f"wait_etl_s: must be > 0, got {self.wait_etl_s}")
        return problems


@dataclass
class EvalSpec:
    """Evaluation and generation settings (the ``eval:`` section)."""

    beam: int = 10
    """Beam width for trie-constrained decoding (HiGR generator and flat baseline)."""
    rank: str = "mass"
    """How the SID decoders fill and order a slate (``higr_dist.decode.hier.RANKS``):
    ``placed`` (the planner's placement order) or ``mass`` (the decoded candidates with the
    largest expected presence). Also what validation selects models with."""
    batch_size: int = 64
    """Users per decoding batch."""
    max_users: int = 0
    """Evaluate on at most this many test users (0 = all)."""
    effective_threshold: float = 2.0
    """watch_ratio at or above which a held-out item counts as an effective view."""
    latency_batches: list[int] = field(default_factory=lambda: [1, 64])
    """Batch sizes for the decode-latency measurement in the report."""
    latency_repeats: int = 20
    """Timed decode calls per batch size (median and p99 over these)."""
    latency_budget_s: float = 20.0
    """Stop timing one decoder at one batch size after this many seconds (at least 3 calls;
    0 = always ``latency_repeats``). bench/decode.py is the place for careful latency figures."""
    generate_users: int = 100
    """Users to write slates for (``slates.jsonl``)."""
    device: str = "auto"
    """Where evaluation, decode timing and generation run: ``auto`` (the first CUDA device when
    there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``
    (``higr_dist.eval.harness.resolve_device``; whether the device exists is checked when
    evaluation starts, so a config can be written on a machine without it)."""

    def validate(self) -> list[str]:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            return [f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}"]
        return []


@dataclass
class PipelineConfig:
    """The whole pipeline (``configs/<scale>/run.yaml``)."""

    name: str = "demo"
    """Run name: outputs go to ``<out_root>/<name>/``."""
    out_root: str = "runs"
    """Parent folder of run folders."""
    seed: int = 0
    """Seed for data generation and every stage."""
    source: SourceSpec = field(default_factory=SourceSpec)
    """Input data."""
    etl: str = "configs/tiny/etl.yaml"
    """ETL config file."""
    etl_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the ETL config."""
    spark_master: str = "local[*]"
    """Spark master for the ETL (the pipeline runs Spark in-process)."""
    stages: dict[str, str] = field(default_factory=lambda: {
        s: f"configs/tiny/{s}.yaml" for s in STAGE_ORDER if s != "dpo"})
    """Stage name -> job config file. A stage absent here is skipped (``dpo`` is off by
    default: it is the comparison for ORPO, evaluated as ``higr_dpo``)."""
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Stage name -> ``key=value`` overrides (e.g. ``{hsd: [train.max_steps=50]}``)."""
    sizing: sizing.SizingConfig = field(default_factory=sizing.SizingConfig)
    """What is derived from the ETL manifest (codebook size, identity buckets, training
    length, the catalogue bound): ``higr_dist.sizing``."""
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    """How stages are launched."""
    eval: EvalSpec = field(default_factory=EvalSpec)
    """Evaluation."""

    def validate(self) -> list[str]:
        problems = []
        if bool(self.source.interactions) != bool(self.source.items):
            problems.append("source: give both interactions and items, or neither (synthetic)")
        from higr_dist.decode.hier import RANKS

        if self.eval.rank not in RANKS:
            problems.append(f"eval.rank: must be one of {', '.join(RANKS)}, got "
                            f"{self.eval.rank!r}")
        for s in self.stages:
            if s not in STAGE_ORDER:
                problems.append(f"stages: unknown stage {s!r}; known: {', '.join(STAGE_ORDER)}")
        if "tokenizer" not in self.stages or "hsd" not in self.stages:
            problems.append("stages: tokenizer and hsd are required")
        return problems

    @property
    def run_dir(self) -> Path:
        return Path(self.out_root) / self.name


def _log(msg: str) -> None:
    print(f"[higr run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------


def step_data(cfg: PipelineConfig, spark) -> tuple[str, str]:
    """The input paths: the user's, or the embedded synthetic data (generated once)."""
    if cfg.source.interactions:
        return cfg.source.interactions, cfg.source.items
    from higr_dist.etl.synthetic import SyntheticConfig, generate

    out = cfg.run_dir / "data"
    syn = load(SyntheticConfig, None, [f"{k}={json.dumps(v)}" for k, v in cfg.source.synthetic.items()],
               base={"seed": cfg.seed})
    done = out / "_SUCCESS.json"
    if done.is_file():
        paths = json.loads(done.read_text())
        if paths.get("config") == to_dict(syn):
            _log(f"data: reusing synthetic data in {out}")
            return paths["interactions"], paths["items"]
    _log(f"data: generating synthetic interactions ({syn}) into {out}")
    inter, items = generate(spark, syn, str(out.resolve()))
    done.write_text(json.dumps({"interactions": str(inter), "items": str(items),
                                "config": to_dict(syn)}))
    return str(inter), str(items)


def _etl_config(cfg: PipelineConfig):
    from higr_dist.etl.config import EtlConfig

    return load(EtlConfig, ROOT / cfg.etl if not Path(cfg.etl).is_absolute() else cfg.etl,
                [*cfg.etl_overrides])


def step_etl(cfg: PipelineConfig, spark, interactions: str, items: str) -> dict:
    from higr_dist.config import config_hash
    from higr_dist.etl.build import run_etl

    etl_cfg = _etl_config(cfg)
    out = cfg.run_dir / "etl"
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("config_hash") == config_hash(etl_cfg):
            _log(f"etl: reusing {out}")
            return manifest
    _log(f"etl: {interactions} + {items} -> {out}")
    return run_etl(spark, etl_cfg, interactions, items, out, overwrite=True)


def stage_overrides(cfg: PipelineConfig, stage: str, sized: dict[str, list[str]] | None = None
                    ) -> list[str]:
    """The run-specific paths of one stage, then what sizing derived for it from the data
    (``sized``, :func:`sized_overrides`), then the user's overrides for it (which win)."""
    rd = cfg.run_dir.resolve()
    ov = [f"run.name={cfg.name}-{stage}", f"run.out_dir={rd / stage}", f"run.seed={cfg.seed}",
          f"inputs.etl_dir={rd / 'etl'}"]
    if stage != "tokenizer":
        ov.append(f"inputs.sid_dir={rd / 'tokenizer' / 'export'}")
    if stage in ("orpo", "dpo"):
        ov.append(f"inputs.init_from={rd / 'hsd' / 'final' / 'model_fp32.pt'}")
    if stage == "dpo":
        ov.append(f"inputs.reference_from={rd / 'hsd' / 'final' / 'model_fp32.pt'}")
    if stage != "tokenizer":  # models are selected with the evaluation's own decoding
        ov += [f"validation.beam={cfg.eval.beam}", f"validation.rank={cfg.eval.rank}"]
    return ov + list((sized or {}).get(stage, [])) + list(cfg.stage_overrides.get(stage, []))


def sized_overrides(cfg: PipelineConfig, manifest: dict | None) -> dict[str, list[str]]:
    """Stage -> overrides that :mod:`higr_dist.sizing` derives from the ETL manifest (none
    before the ETL has run). Each stage's batch size and step count come from its config."""
    if manifest is None or not cfg.sizing.enabled:
        return {}
    from higr_dist.engine.config import load_job

    jobs = {s: load_job(_stage_config_path(cfg, s), list(cfg.stage_overrides.get(s, [])))
            for s in cfg.stages}
    return sizing.derive(manifest, cfg.sizing,
                         batch={s: j.train.global_batch_size for s, j in jobs.items()},
                         steps={s: j.train.max_steps for s, j in jobs.items()})


def wait_for_etl(cfg: PipelineConfig, poll_s: float = 2.0) -> dict:
    """A node other than 0: node 0's ETL manifest, once it is in the shared run folder.

    The protocol: node 0 runs data + ETL as on one machine; ``manifest.json`` is written last
    (an atomic rename), so its presence marks a complete output. Every other node polls for it
    and takes it only when it was built under this run's ETL config (an older output is one
    node 0 is about to rebuild), then derives the same stage overrides from it as node 0 does.
    Gives up with one line after ``launch.wait_etl_s``.
    """
    from higr_dist.config import config_hash

    path = cfg.run_dir / "etl" / "manifest.json"
    want = config_hash(_etl_config(cfg))
    deadline = time.monotonic() + cfg.launch.wait_etl_s
    _log(f"node {cfg.launch.node_rank}: waiting for node 0's ETL output {path}")
    while True:
        if path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("config_hash") == want:
                return manifest
        if time.monotonic() >= deadline:
            raise ConfigError([
                f"launch.node_rank={cfg.launch.node_rank}: no ETL output for this run's ETL "
                f"config at {path} after {cfg.launch.wait_etl_s:g} s; node 0 runs the ETL (is "
                f"it running, with the same --name and configs, on the same shared folder?)"])
        time.sleep(poll_s)


def _manifest(cfg: PipelineConfig) -> dict | None:
    path = cfg.run_dir / "etl" / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_run(cfg: PipelineConfig) -> list[str]:
    """Every problem the run's files and inputs have, before any work (one line each): the
    ETL config, the synthetic generator's settings, each stage's job config with the
    run-specific overrides, and (local) input paths."""
    from higr_dist.engine.config import load_job
    from higr_dist.etl.build import check_input_path
    from higr_dist.etl.synthetic import SyntheticConfig

    problems: list[str] = []
    try:
        _etl_config(cfg)
    except ConfigError as e:
        problems += [f"etl ({cfg.etl}): {p}" for p in e.problems]
    if cfg.source.interactions:
        for what, path in (("source.interactions", cfg.source.interactions),
                           ("source.items", cfg.source.items)):
            try:
                check_input_path(path, what)
            except FileNotFoundError as e:
                problems.append(str(e))
    else:
        try:
            load(SyntheticConfig, None, [f"{k}={json.dumps(v)}"
                                         for k, v in cfg.source.synthetic.items()])
        except ConfigError as e:
            problems += [f"source.synthetic: {p}" for p in e.problems]
    for stage in (s for s in STAGE_ORDER if s in cfg.stages):
        try:
            load_job(_stage_config_path(cfg, stage), stage_overrides(cfg, stage))
        except ConfigError as e:
            problems += [f"stages.{stage} ({cfg.stages[stage]}): {p}" for p in e.problems]
    return problems


class RunFailed(RuntimeError):
    """A step of the run failed for the reason its one-line message gives."""

    exit_code = 2


class StageFailed(RunFailed):
    """A stage's training process failed; its own output says why (one line here)."""

    exit_code = 1


def check_samples(cfg: PipelineConfig, manifest: dict) -> None:
    """Stop with one line when the ETL left a stage nothing to train or select on."""
    kinds = manifest.get("kinds", {})
    need = {"slates/train": "every slate model", "slates/val": "model selection",
            "slates/test": "evaluation", "pairs": "the tokenizer"}
    if any(s in cfg.stages for s in ("orpo", "dpo")):
        need["prefs"] = "alignment (orpo/dpo)"
    empty = [f"{kind} ({what})" for kind, what in need.items()
             if int(kinds.get(kind, {}).get("samples", 0)) == 0]
    if empty:
        q = manifest.get("quarantine_by_reason", {})
        top = ", ".join(f"{r} {n:,}" for r, n in sorted(q.items(), key=lambda kv: -kv[1]) if n)
        raise ConfigError([
            f"etl: no samples for {', '.join(empty)}: {manifest.get('rows_in', 0):,} rows in, "
            f"{manifest.get('rows_quarantined', 0):,} quarantined ({top or 'none'}); see "
            f"{cfg.run_dir / 'etl' / 'quarantine'} and the ETL config (holdout, min_history, "
            f"timestamp bounds)"])


def launch_command(cfg: PipelineConfig, config_path: str, overrides: list[str]) -> list[str]:
    """The exact command a user would type to run this stage."""
    script = str(ROOT / "launcher" / "train.py")
    args = ["--config", config_path, *overrides]
    launch = cfg.launch
    if launch.mode == "deepspeed":
        where = (["--hostfile", launch.hostfile] if launch.hostfile
                 else ["--num_gpus", str(launch.nproc)])
        if launch.hostfile and launch.node_rank >= 0:  # one launcher per node, no ssh
            where += ["--no_ssh", "--node_rank", str(launch.node_rank),
                      "--master_addr", launch.master_addr]
        if launch.master_port:
            where += ["--master_port", str(launch.master_port)]
        return ["deepspeed", *where, script, *args]
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [exe, "--standalone", "--nproc_per_node", str(cfg.launch.nproc), script, *args]


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _in_process_world():
    """Let in-process stages share one world of one, and leave the process as it was found.

    The engine creates the default process group (and sets the launcher variables) when none
    exists. DeepSpeed caches its groups process-wide, so the group must live for all stages of
    the run rather than be rebuilt per stage; afterwards it is destroyed (when this run created
    it), because a caller that did not own it (a notebook, a test session that later forks
    gloo workers) must not inherit it.
    """
    import torch.distributed as dist

    from higr_dist.engine.trainer import shutdown

    owned = not (dist.is_available() and dist.is_initialized())
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        yield
    finally:
        if owned:
            shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _finished(stage_dir: Path) -> bool:
    """A stage folder whose training ended (summary written, fp32 weights exported)."""
    return (stage_dir / "summary.json").is_file() and \
        (stage_dir / "final" / "model_fp32.pt").is_file()


def _stage_config_path(cfg: PipelineConfig, stage: str) -> str:
    path = Path(cfg.stages[stage])
    return str(path if path.is_absolute() else ROOT / path)


def _flat(data: object, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def stale_stages(cfg: PipelineConfig) -> list[str]:
    """One line per finished stage folder that the current configs would train differently.

    A re-run reuses finished steps (that is how a killed pipeline continues). Reusing a stage
    trained under another config (say, after editing ``configs/tiny/hsd.yaml``) would report
    the old model under the new config, and every later stage builds on it; so this check runs
    before any process starts and the run stops with the keys that differ. Nothing is deleted:
    the user picks a new ``--name`` or removes the folders.
    """
    import yaml

    from higr_dist.config import config_hash
    from higr_dist.engine.config import load_job
    from higr_dist.schema import SCHEMA_VERSION

    problems = []
    rd = cfg.run_dir.resolve()
    manifest = cfg.run_dir / "etl" / "manifest.json"
    etl = _manifest(cfg)
    sized = sized_overrides(cfg, etl)
    if etl is not None and etl.get("schema_version") != SCHEMA_VERSION:
        # shards written by older code: this code cannot read them
        problems.append(f"etl: {manifest.parent} holds shards of schema "
                        f"{etl.get('schema_version')}, this version reads {SCHEMA_VERSION}; "
                        f"use a new --name, or delete the run folder")
    etl_changed = etl is not None and etl.get("config_hash") != config_hash(_etl_config(cfg))
    for stage in (s for s in STAGE_ORDER if s in cfg.stages):
        out = cfg.run_dir / stage
        resolved = out / "resolved_config.yaml"
        if not _finished(out):
            continue
        if etl_changed:
            problems.append(f"{stage}: {out} was trained on an ETL output built with another "
                            f"ETL config; use a new --name, or delete the run folder")
            continue
        if not resolved.is_file():
            problems.append(f"{stage}: {out} is finished but has no resolved_config.yaml")
            continue
        want = _flat(to_dict(load_job(_stage_config_path(cfg, stage),
                                      stage_overrides(cfg, stage, sized))))
        had = _flat(yaml.safe_load(resolved.read_text()))
        # a run folder that was moved or renamed is still the same run: compare its own paths
        # relative to it, and ignore the run's display name
        old_root, new_root = str(Path(str(had.get("run.out_dir", ""))).parent), str(rd)
        had = {k: v.replace(old_root, new_root, 1) if isinstance(v, str) and v.startswith(old_root)
               else v for k, v in had.items() if k != "run.name"}
        want.pop("run.name", None)
        diff = [f"{k}: {had.get(k)!r} -> {want.get(k)!r}"
                for k in sorted(set(want) | set(had)) if want.get(k) != had.get(k)]
        if diff:
            problems.append(
                f"{stage}: {out} was trained with another config ({'; '.join(diff[:6])}"
                f"{'; ...' if len(diff) > 6 else ''}); use a new --name, or delete that folder "
                f"and the stages after it")
    return problems


def step_stage(cfg: PipelineConfig, stage: str, sized: dict[str, list[str]] | None = None
               ) -> dict:
    """Train one stage (skipped when its summary exists); returns its summary."""
    out = cfg.run_dir / stage
    summary = out / "summary.json"
    if _finished(out):
        _log(f"{stage}: reusing {out}")
        return json.loads(summary.read_text())
    config_path = _stage_config_path(cfg, stage)
    overrides = stage_overrides(cfg, stage, sized)
    t0 = time.perf_counter()
    if cfg.launch.mode == "inprocess":
        from higr_dist.engine.config import load_job
        from higr_dist.engine.trainer import train

        _log(f"{stage}: training in-process ({config_path})")
        result = train(load_job(config_path, overrides))
    else:
        cmd = launch_command(cfg, config_path, overrides)
        _log(f"{stage}: {' '.join(cmd)}")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT))
        if proc.returncode != 0:
            raise StageFailed(f"stage {stage} failed (exit {proc.returncode}; its output above "
                              f"says why); rerun: {' '.join(cmd)}")
        result = json.loads(summary.read_text())
    _log(f"{stage}: done in {time.perf_counter() - t0:.1f}s")
    return result


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every step; write ``report.json``/``report.md`` into the run folder; return the report."""
    problems = cfg.validate() or check_run(cfg) or stale_stages(cfg)
    if problems:
        raise ConfigError(problems)
    run_dir = cfg.run_dir
    node = cfg.launch.node_rank
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if node > 0:  # node 0 runs data + ETL (and evaluation) for all nodes
        manifest = wait_for_etl(cfg)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_metadata(run_dir, cfg)

        from pyspark.sql import SparkSession

        from higr_dist.etl.spark import get_spark

        owned = SparkSession.getActiveSession() is None  # never stop a caller's session
        spark = get_spark(app_name=f"higr-{cfg.name}", master=cfg.spark_master)
        from pyspark.errors import AnalysisException

        try:
            interactions, items = step_data(cfg, spark)
            manifest = step_etl(cfg, spark, interactions, items)
        except (AnalysisException, ValueError, FileNotFoundError, FileExistsError) as e:
            # the ETL's user errors (unreadable or wrongly formatted inputs, no valid item ...)
            lines = str(e).strip().splitlines()
            raise RunFailed(f"etl: {lines[0] if lines else type(e).__name__}") from e
        except Exception as e:  # a write that failed (full disk ...): one line, exit 1
            from higr_dist.etl.build import write_failure

            line = write_failure(e)
            if line is None:
                raise
            raise StageFailed(f"etl: {line}; nothing of the output was kept") from e
        finally:
            if owned:
                spark.stop()  # free the JVM's memory before training starts
    timings["data+etl"] = time.perf_counter() - t
    check_samples(cfg, manifest)
    if cfg.sizing.enabled:
        sizing.check_scale(manifest, cfg.sizing)
    sized = sized_overrides(cfg, manifest)
    for stage, ov in sized.items():
        _log(f"sizing {stage} from the data ({manifest['num_items']:,} items, "
             f"{manifest['rows_out']:,} rows): {' '.join(ov)}")

    summaries = {}
    world = _in_process_world() if cfg.launch.mode == "inprocess" else contextlib.nullcontext()
    with world:
        for stage in STAGE_ORDER:
            if stage in cfg.stages:
                t = time.perf_counter()
                summaries[stage] = step_stage(cfg, stage, sized)
                timings[stage] = time.perf_counter() - t

    if node > 0:  # node 0 evaluates and writes the report
        return {"node_rank": node, "stages": summaries,
                "timings_s": {k: round(v, 1) for k, v in timings.items()}}

    from higr_dist.eval.harness import evaluate_run

    t = time.perf_counter()
    report = evaluate_run(cfg, manifest, summaries)
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    from higr_dist.eval.report import write_report

    tb = {s: run_dir / s / "tb" for s in summaries}
    write_report(run_dir, report, tb)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="higr run", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny" / "run.yaml"))
    p.add_argument("--name", default=None, help="run name (outputs in runs/<name>/)")
    p.add_argument("--interactions", default=None, help="interaction log (generic schema)")
    p.add_argument("--items", default=None, help="items table (generic schema)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"name={args.name}")
    if args.interactions:
        overrides.append(f"source.interactions={args.interactions}")
    if args.items:
        overrides.append(f"source.items={args.items}")
    from higr_dist.engine.errors import RunStopped, one_line

    try:
        cfg = load(PipelineConfig, args.config, overrides)
        report = run_pipeline(cfg)
    except ConfigError as e:
        print(f"higr run: {e}", file=sys.stderr)
        return 2
    except (RunFailed, RunStopped) as e:  # (in-process stages raise the engine's own)
        print(f"higr run: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    if cfg.launch.node_rank > 0:
        print(f"\nnode {cfg.launch.node_rank}: trained {', '.join(report['stages'])}; node 0 "
              f"writes the report ({cfg.run_dir / 'report.json'})")
        return 0
    from higr_dist.eval.report import eval_table

    print("\n" + eval_table(report.get("eval", {})))
    print(f"\nreport: {cfg.run_dir / 'report.json'}  {cfg.run_dir / 'report.md'}")
    return 0
