"""``higr run``: the whole pipeline on one config, ETL -> tokenizer -> HSD -> ORPO -> eval -> slates.

Launch::

    higr run --config tiny --name demo                 # embedded synthetic data
    higr run --config tiny --name mine \\
        --interactions logs.parquet --items items.parquet               # your data, generic schema

Design
------
The pipeline is an orchestrator, not a second trainer: every training stage runs through the one
engine, launched as a real multi-process job (``torchrun`` by default, ``deepspeed`` or in-process
on request), exactly as a user would launch it on a cluster; the stage configs are the shipped
``<scale>/<stage>`` files (:mod:`higr_dist.configs`; or the user's own) with the run's paths
given as ``key=value`` overrides.

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
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from higr_dist import sizing
from higr_dist.config import ConfigError, load, to_dict, write_run_metadata
from higr_dist.layout import RunLayout
from higr_dist.run_config import (  # noqa: F401 - the run config is part of this API
    DEFAULT_STAGES,
    EvalSpec,
    LaunchSpec,
    PipelineConfig,
    SourceSpec,
)


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

    out = cfg.layout.data
    syn = load(SyntheticConfig, None, [f"{k}={json.dumps(v)}" for k, v in cfg.source.synthetic.items()],
               base={"seed": cfg.seed})
    done = cfg.layout.data_done
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

    return load(EtlConfig, _config_path(cfg.etl), [*cfg.etl_overrides])


def step_etl(cfg: PipelineConfig, spark, interactions: str, items: str) -> dict:
    from higr_dist.config import config_hash
    from higr_dist.etl.build import run_etl

    etl_cfg = _etl_config(cfg)
    out = cfg.layout.etl.root
    manifest_path = cfg.layout.etl.manifest
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
    from higr_dist.stages import graph
    from higr_dist.stages.base import get_stage

    run = RunLayout(cfg.run_dir.resolve())
    ov = [f"run.name={cfg.name}-{stage}", f"run.out_dir={run.stage(stage).root}",
          f"run.seed={cfg.seed}", *graph.input_overrides(stage, run)]
    if get_stage(stage).validates:  # models are selected with the evaluation's own decoding
        ov += [f"validation.beam={cfg.eval.beam}", f"validation.rank={cfg.eval.rank}"]
    return ov + list((sized or {}).get(stage, [])) + list(cfg.stage_overrides.get(stage, []))


def sized_overrides(cfg: PipelineConfig, manifest: dict | None) -> dict[str, list[str]]:
    """Stage -> overrides that :mod:`higr_dist.sizing` derives from the ETL manifest (none
    before the ETL has run). Each stage's batch size and step count come from its config."""
    if manifest is None or not cfg.sizing.enabled:
        return {}
    from higr_dist.engine.config import load_job

    jobs = {s: load_job(stage_config_path(cfg, s), list(cfg.stage_overrides.get(s, [])))
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

    path = cfg.layout.etl.manifest
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
    path = cfg.layout.etl.manifest
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
    from higr_dist.stages import graph

    broken = graph.problems(cfg.stages)
    if broken:
        return problems + broken
    if cfg.launch.mode == "deepspeed" and cfg.launch.hostfile \
            and not Path(cfg.launch.hostfile).is_file():
        problems.append(f"launch.hostfile: no file {cfg.launch.hostfile} (a relative path is "
                        f"from the working folder, {Path.cwd()})")
    for stage in cfg.stage_order():
        try:
            load_job(stage_config_path(cfg, stage), stage_overrides(cfg, stage))
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
            f"{cfg.layout.etl.quarantine} and the ETL config (holdout, min_history, "
            f"timestamp bounds)"])


def _launcher(name: str, module: str) -> list[str]:
    """A launcher's console script: the one installed beside this Python, else the one on
    PATH, else the module it runs (``python -m``), which works wherever the package imports."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def launch_command(cfg: PipelineConfig, config_path: str, overrides: list[str]) -> list[str]:
    """The exact command a user would type to run this stage: the launcher starts
    :mod:`higr_dist.launch` as a module on every rank, so it runs from any folder, installed
    or from a checkout."""
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
        return [*_launcher("deepspeed", "deepspeed.launcher.runner"), *where,
                "--module", "higr_dist.launch", *args]
    return [*_launcher("torchrun", "torch.distributed.run"), "--standalone", "--nproc_per_node",
            str(cfg.launch.nproc), "-m", "higr_dist.launch", *args]


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


def _config_path(ref: str) -> str:
    """A config reference as an absolute file path (what launched processes are handed, so
    they read the file this process checked wherever they start)."""
    from higr_dist import configs

    path = configs.resolve(ref)
    return str(path.resolve()) if path.is_file() else str(ref)


def stage_config_path(cfg: PipelineConfig, stage: str) -> str:
    """The absolute path of ``stage``'s job config in this run (what its launch is given)."""
    return _config_path(cfg.stages[stage])


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
    trained under another config (say, after editing its ``hsd.yaml``) would report
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
    manifest = cfg.layout.etl.manifest
    etl = _manifest(cfg)
    sized = sized_overrides(cfg, etl)
    if etl is not None and etl.get("schema_version") != SCHEMA_VERSION:
        # shards written by older code: this code cannot read them
        problems.append(f"etl: {manifest.parent} holds shards of schema "
                        f"{etl.get('schema_version')}, this version reads {SCHEMA_VERSION}; "
                        f"use a new --name, or delete the run folder")
    etl_changed = etl is not None and etl.get("config_hash") != config_hash(_etl_config(cfg))
    for stage in cfg.stage_order():
        out = cfg.layout.stage(stage).root
        resolved = cfg.layout.stage(stage).resolved_config
        if not cfg.layout.stage(stage).finished():
            continue
        if etl_changed:
            problems.append(f"{stage}: {out} was trained on an ETL output built with another "
                            f"ETL config; use a new --name, or delete the run folder")
            continue
        if not resolved.is_file():
            problems.append(f"{stage}: {out} is finished but has no resolved_config.yaml")
            continue
        want = _flat(to_dict(load_job(stage_config_path(cfg, stage),
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
    out = cfg.layout.stage(stage).root
    summary = cfg.layout.stage(stage).summary
    if cfg.layout.stage(stage).finished():
        _log(f"{stage}: reusing {out}")
        return json.loads(summary.read_text())
    config_path = stage_config_path(cfg, stage)
    overrides = stage_overrides(cfg, stage, sized)
    t0 = time.perf_counter()
    if cfg.launch.mode == "inprocess":
        from higr_dist.engine.config import load_job
        from higr_dist.engine.trainer import train

        _log(f"{stage}: training in-process ({config_path})")
        result = train(load_job(config_path, overrides))
    else:
        cmd = launch_command(cfg, config_path, overrides)
        _log(f"{stage}: {shlex.join(cmd)}")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise StageFailed(f"stage {stage} failed (exit {proc.returncode}; its output above "
                              f"says why); rerun: {shlex.join(cmd)}")
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

        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise RunFailed("node 0 runs the ETL, which needs PySpark and Java 17+: pip install "
                            "'higr-dist[etl,train]' (nodes with launch.node_rank > 0 need only "
                            "the train extra)") from None
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
        for stage in cfg.stage_order():
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

    write_report(run_dir, report, {s: cfg.layout.stage(s).tensorboard for s in summaries})
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="higr run", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny",
                   help="run config: a file, or a shipped one by name (tiny, kuairec, cluster)")
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
              f"writes the report ({cfg.layout.report_json})")
        return 0
    from higr_dist.eval.report import eval_table

    print("\n" + eval_table(report.get("eval", {})))
    print(f"\nreport: {cfg.layout.report_json}  {cfg.layout.report_md}")
    return 0
