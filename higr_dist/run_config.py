"""The whole run's config (``higr run --config tiny``): ``run.yaml``'s sections.

Its own module so that what reads a run folder (evaluation, ``higr-eval``) loads the run's
config without importing the orchestrator that writes it (:mod:`higr_dist.pipeline`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from higr_dist import sizing
from higr_dist.layout import RunLayout

#: the stages a run trains unless its config says otherwise (``dpo``, ORPO's comparison, is off)
DEFAULT_STAGES = ("tokenizer", "hsd", "flat", "sasrec", "orpo")


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
    """The whole pipeline (``<scale>/run.yaml``: ``higr run --config tiny``)."""

    name: str = "demo"
    """Run name: outputs go to ``<out_root>/<name>/``."""
    out_root: str = "runs"
    """Parent folder of run folders."""
    seed: int = 0
    """Seed for data generation and every stage."""
    source: SourceSpec = field(default_factory=SourceSpec)
    """Input data."""
    etl: str = "tiny/etl"
    """ETL config: a file, or a shipped one by name (:mod:`higr_dist.configs`)."""
    etl_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the ETL config."""
    spark_master: str = "local[*]"
    """Spark master for the ETL (the pipeline runs Spark in-process)."""
    stages: dict[str, str] = field(default_factory=lambda: {
        s: f"tiny/{s}" for s in DEFAULT_STAGES})
    """Stage name -> job config (a file, or a shipped one by name). A stage absent here is
    skipped (``dpo`` is off by default: it is the comparison for ORPO, evaluated as
    ``higr_dpo``). The stages run in the order of :mod:`higr_dist.stages.graph`."""
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
        from higr_dist.stages import graph
        from higr_dist.stages.base import known_stages

        known = known_stages()
        for s in self.stages:
            if s not in known:
                problems.append(f"stages: unknown stage {s!r}; known: {', '.join(known)}")
        if "tokenizer" not in self.stages or "hsd" not in self.stages:
            problems.append("stages: tokenizer and hsd are required")
        elif not problems:
            problems += graph.problems(self.stages)
        return problems

    @property
    def run_dir(self) -> Path:
        return Path(self.out_root) / self.name

    @property
    def layout(self) -> RunLayout:
        """Where everything of this run lives (:mod:`higr_dist.layout`)."""
        return RunLayout(self.run_dir)

    def stage_order(self) -> list[str]:
        """This run's stages in training order (:func:`higr_dist.stages.graph.order`)."""
        from higr_dist.stages import graph

        return graph.order(self.stages)
