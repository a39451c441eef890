"""Engine overhead: DeepSpeed engine step vs a bare torch loop, and the trainer's data wait.

What is measured, per world size (each world in its own ``torchrun`` launch; gloo on CPU, NCCL
on GPU) and per model case (:data:`CASES`: the KuaiRec-scale PCRQ-VAE tokenizer, the tiny HSD
and the 25.8M-parameter HSD; model sections read from the shipped configs):

- ``bare``: the stage's model and loss in a plain loop: forward, backward, grad-norm clip,
  ``torch.optim.AdamW(fused=True)`` step (the engine's optimizer), LambdaLR step; torch DDP
  around the model when world > 1;
- ``zero<k>``: the same model wrapped by ``higr_dist.engine.trainer.build_engine`` (the
  project's one ``deepspeed.initialize``) at each requested ZeRO stage: ``stage.step`` +
  ``engine.backward`` + ``engine.step`` (a world of one runs ZeRO-0 whatever is asked, so only
  ``zero0`` is timed there); with ``--zero-options`` also ``zero<k>+opts``, the same engine
  with those ``train.zero_options``;
- ``trainer``: the full ``higr_dist.engine.train`` loop on real shards written to a temp folder
  (streaming loader with workers, per-step bookkeeping, logging, no intermediate checkpoints):
  median step time and the share of step time rank 0 spent waiting for data over the run.

All three see the same micro-batch: the first batch of this rank's shards, collated by the
stage's own collate. Times are medians over ``steps`` steps after ``warmup``; the bare loop and
the engines take turns step by step (round robin), so load from other processes on the machine
hits them alike. Output: a Markdown table on stdout and JSON at ``--out``. Target:
zero<k> / bare <= 1.10.

    python bench/engine.py                                  # world 1 and 2, fp32, ZeRO 0/1/2
    python bench/engine.py --cases hsd_25m --worlds 2 --zero 1 2 3 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Case:
    """One model under test."""

    stage: str
    """Registered stage name."""
    config: str
    """Shipped job config whose ``model``/``loss`` sections are used (repo-relative)."""
    micro: int
    """Micro-batch size per rank."""
    steps: int
    """Timed steps (engine vs bare)."""
    trainer_steps: int
    """Steps of the full trainer run."""
    model_overrides: dict = field(default_factory=dict)
    """Changes to the config's model section (e.g. no dead-code restarts while timing)."""


CASES: dict[str, Case] = {
    "tokenizer": Case("tokenizer", "kuairec/tokenizer", micro=256, steps=30,
                      trainer_steps=40, model_overrides={"restart_every": 0}),
    "hsd_tiny": Case("hsd", "tiny/hsd", micro=64, steps=30, trainer_steps=40),
    "hsd_25m": Case("hsd", "kuairec/hsd", micro=16, steps=12, trainer_steps=16),
}
#: synthetic catalogue size and HSD shard layout
N_ITEMS = 2048
#: items in the tokenizer case's items/ folder (exported at the end of its trainer run)
EXPORT_ITEMS = 128
SHARDS_PER_RANK = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2], help="ZeRO stages to time")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=0, help="timed steps (0 = each case's default)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--workers", type=int, default=1, help="loader workers per rank (trainer)")
    p.add_argument("--trainer-zero", type=int, default=1, help="ZeRO stage of the trainer run")
    p.add_argument("--zero-options", default="", help="JSON for train.zero_options: also time "
                   "each ZeRO stage >= 1 with these options (engine 'zero<k>+opts')")
    p.add_argument("--torch-sharded", action="store_true",
                   help="also time torch's own ZeRO-1 (DDP + ZeroRedundancyOptimizer) and "
                        "ZeRO-2 (FSDP2, reshard_after_forward=False) at world > 1 (fp32)")
    p.add_argument("--out", default="bench/results/engine.json", help="JSON results file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # result file (internal)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# synthetic ETL folders (rank 0 writes, everyone reads)
# --------------------------------------------------------------------------------------------


def _write_pairs_etl(out: Path, n_shards: int, per_shard: int, dim: int) -> None:
    """``items/`` (the stage exports them at the end) and ``pairs/`` shards."""
    import numpy as np

    from higr_dist.data.shardio import write_listing, write_shard
    from higr_dist.layout import EtlLayout
    from higr_dist.schema import ITEM, PAIR_BLOCK, blocks

    layout = EtlLayout(out)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(64, dim)).astype(np.float32)
    cat = rng.integers(0, 64, size=N_ITEMS)
    x = (centers[cat] + 0.2 * rng.normal(size=(N_ITEMS, dim))).astype(np.float32)
    # the export at the end of the trainer run covers these few items only: a barely trained
    # tokenizer puts most items under one SID prefix, and K items per prefix is the most that
    # collision resolution can place
    items = layout.kind("items")
    items.mkdir(parents=True, exist_ok=True)
    write_listing(items, [write_shard(items / "shard-000000.tar", ITEM, (
        (f"i{i}", {"item_idx": i, "item_id": str(i), "categories": [int(cat[i])], "x": x[i]})
        for i in range(EXPORT_ITEMS)))])
    pairs = layout.kind("pairs")
    pairs.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(n_shards):
        a = rng.integers(0, N_ITEMS, size=per_shard)
        b = np.where(rng.random(per_shard) < 0.5, a, rng.integers(0, N_ITEMS, size=per_shard))
        entries.append(write_shard(pairs / f"shard-{s:06d}.tar", PAIR_BLOCK, blocks((
            (f"s{s}_{i}", {"anchor": int(a[i]), "positive": int(b[i]), "weight": 1.0,
                           "x_anchor": x[a[i]], "x_positive": x[b[i]]})
            for i in range(per_shard)), 32)))
    write_listing(pairs, entries)


def _write_slates_etl(out: Path, n_shards: int, per_shard: int, K: int, L: int, N: int,
                      H: int) -> None:
    """``slates/train`` shards (histories of H/2..H items) and a SID export in ``out/sids``."""
    import numpy as np

    from higr_dist.data.shardio import write_listing, write_shard
    from higr_dist.layout import EtlLayout
    from higr_dist.schema import SLATE_GROUP_BLOCK, blocks
    from higr_dist.schema.slates import slate_group_of

    rng = np.random.default_rng(0)
    sids = out / "sids"
    sids.mkdir(parents=True, exist_ok=True)
    np.save(sids / "sid_table.npy", rng.integers(0, K, size=(N_ITEMS, L), dtype=np.int64))
    (sids / "sid_meta.json").write_text(json.dumps({"K": K, "L": L, "num_items": N_ITEMS}))
    folder = EtlLayout(out).kind("slates/train")
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(n_shards):
        def samples(s=s):
            for i in range(per_shard):
                h = int(rng.integers(H // 2, H + 1))
                yield f"s{s}_{i}", slate_group_of({
                    "user_id": f"u{s}_{i}", "split": "train", "ts": 1_700_000_000 + i,
                    "hist_items": rng.integers(0, N_ITEMS, size=h).tolist(),
                    "hist_fb": rng.gamma(2.0, 0.5, size=h).round(3).tolist(),
                    "target_items": rng.integers(0, N_ITEMS, size=N).tolist(),
                    "target_fb": rng.gamma(2.0, 0.5, size=N).round(3).tolist()})
        entries.append(write_shard(folder / f"shard-{s:06d}.tar", SLATE_GROUP_BLOCK,
                                   blocks(samples(), 32)))
    write_listing(folder, entries)


def _prepare(case: Case, job, etl: Path, world: int) -> list[str]:
    """Write the case's shards (rank 0 only) -> the job overrides that point at them."""
    n_shards = SHARDS_PER_RANK * world
    if case.stage == "tokenizer":
        _write_pairs_etl(etl, n_shards, case.micro * 4, job.model.input_dim)
        return [f"inputs.etl_dir={etl}"]
    m = job.model
    _write_slates_etl(etl, n_shards, case.micro * 4, m.K, m.L, m.N, m.history_len)
    return [f"inputs.etl_dir={etl}", f"inputs.sid_dir={etl / 'sids'}"]


# --------------------------------------------------------------------------------------------
# worker (one torchrun launch per world size, every case)
# --------------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_runner(stage, job, batch, env, args, sharding: str = "ddp"):
    """One plain torch training step per call: forward, backward, clip, fused AdamW, LR step.

    ``sharding`` picks how the step is distributed at world > 1:

    - ``ddp`` (the ``bare`` column): DDP around the model (nothing at world 1); bf16 autocast
      when ``--precision bf16``;
    - ``torch_zero1``: DDP + ``ZeroRedundancyOptimizer`` (optimizer states sharded; after its
      step every rank broadcasts its updated slice), the bare-torch ZeRO-1;
    - ``torch_zero2``: FSDP2 ``fully_shard(reshard_after_forward=False)`` on the whole model
      (gradients reduce-scattered, optimizer states and the fp32 master sharded, parameters
      all-gathered once per step), the bare-torch ZeRO-2 (FSDP's SHARD_GRAD_OP).

    The two torch ZeRO runs separate the engine's overhead from the cost of the sharding
    itself. They are fp32 only (the engine's bf16 keeps fp32 masters; matching that in FSDP
    needs a mixed-precision policy this comparison does not try to mirror).
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from higr_dist.engine.ds_config import WarmupCosine, param_groups
    from higr_dist.engine.trainer import seed_all

    seed_all(0)
    model, loss_module = stage.build(job.model, job.loss, job.inputs)
    model.to(env.device)
    loss_module.to(env.device)
    if sharding not in ("ddp", "torch_zero1", "torch_zero2"):
        raise ValueError(f"unknown sharding {sharding!r}")
    if sharding == "torch_zero2":
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(model, reshard_after_forward=False)  # parameters become DTensors
    elif env.world_size > 1:
        wrapped = DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    else:
        wrapped = model
    groups = param_groups(model, job.train.weight_decay)  # after fully_shard: DTensor params
    if sharding == "torch_zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=torch.optim.AdamW,
                                      lr=1e-4, weight_decay=groups[0]["weight_decay"],
                                      fused=True)
        for g in groups[1:]:
            opt.add_param_group(g)
    else:
        opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    autocast = sharding == "ddp" and args.precision == "bf16"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, 10**6, 0.1))
    b = batch.to(env.device)

    def step() -> None:
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = stage.step(wrapped, loss_module, b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def _deepspeed_runner(stage, job, batch, env, args, zero: int, options: dict):
    """One DeepSpeed engine step per call (the trainer's build_engine at this ZeRO stage)."""
    import dataclasses

    from higr_dist.engine.ds_config import trainer_clips_gradients
    from higr_dist.engine.trainer import build_engine, clip_gradients, float_dtype, seed_all

    seed_all(0)
    model, loss_module = stage.build(job.model, job.loss, job.inputs)
    micro = batch.num_samples
    train = dataclasses.replace(job.train, zero_stage=zero, precision=args.precision, lr=1e-4,
                                micro_batch_size=micro, global_batch_size=micro * env.world_size,
                                zero_options=options)
    engine, _, _ = build_engine(model, train, env.world_size, env.device.type, 10**6)
    loss_module.to(env.device)
    b = batch.to(env.device, float_dtype(args.precision))

    own_clip = trainer_clips_gradients(train, env.world_size)

    def step() -> None:  # what the trainer does per optimizer step (grad_accum = 1)
        out = stage.step(engine, loss_module, b)
        engine.backward(out.loss)
        if own_clip:
            clip_gradients(engine.module, train.grad_clip)
        engine.step()

    return step, engine


def _time_interleaved(runners: dict, env, steps: int, warmup: int) -> dict[str, float]:
    """Median ms per runner; runners take turns every step so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(warmup + steps):
        for name, step in runners.items():
            _sync(env.device)
            t0 = time.perf_counter()
            step()
            _sync(env.device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _first_batch(job, stage, env):
    """This rank's first collated micro-batch of epoch 0 (in-process reader)."""
    import dataclasses

    from higr_dist.data.loader import StreamingLoader
    from higr_dist.data.shardio import list_shards
    from higr_dist.engine.trainer import schema_for

    cfg = dataclasses.replace(job.data, num_workers=0)
    loader = StreamingLoader(list_shards(job.shard_dir(stage.sample_kind)),
                             schema_for(stage.sample_kind),
                             stage.make_collate(job.model, job.loss, job.inputs),
                             batch_size=job.train.micro_batch_size, cfg=cfg, rank=env.rank,
                             world_size=env.world_size, seed=0)
    loader.set_epoch(0)
    return next(iter(loader))


def _run_case(name: str, case: Case, env, args, tmp: Path) -> dict:
    import torch.distributed as dist

    from higr_dist.config import load_yaml
    from higr_dist.engine.config import load_job
    from higr_dist.engine.trainer import train
    from higr_dist.layout import RunLayout
    from higr_dist.stages.base import get_stage

    raw = load_yaml(case.config)
    base = {"stage": case.stage, "model": {**raw["model"], **case.model_overrides},
            "loss": raw.get("loss", {})}
    job = load_job(None, base=base)
    etl = RunLayout(tmp / name).etl.root
    inputs = _prepare(case, job, etl, env.world_size) if env.rank == 0 else None
    box = [inputs]
    dist.broadcast_object_list(box, src=0)
    steps = args.steps or case.steps
    overrides = [*box[0], f"run.out_dir={tmp / name / 'run'}", f"data.num_workers={args.workers}",
                 "data.shuffle_buffer=1000", f"train.zero_stage={args.trainer_zero}",
                 f"train.precision={args.precision}", f"train.micro_batch_size={case.micro}",
                 f"train.global_batch_size={case.micro * env.world_size}",
                 f"train.max_steps={case.trainer_steps}", "train.checkpoint_every=0",
                 "train.keep_last=1", f"train.log_every={max(1, case.trainer_steps // 4)}",
                 "train.progress_bar=false", "train.warmup_steps=0"]
    job = load_job(None, overrides, base=base)
    stage = get_stage(case.stage)
    batch = _first_batch(job, stage, env)
    runners, engines = {"bare": _bare_runner(stage, job, batch, env, args)}, []
    # a world of one runs ZeRO-0 whatever is asked (ds_config.effective_zero_stage)
    stages = [0] if env.world_size == 1 else args.zero
    options = json.loads(args.zero_options) if args.zero_options else {}
    variants = [(f"zero{z}", z, {}) for z in stages]
    if options:
        variants += [(f"zero{z}+opts", z, options) for z in stages if z > 0]
    for label, zero, opts in variants:
        runners[label], engine = _deepspeed_runner(stage, job, batch, env, args, zero, opts)
        engines.append(engine)
    if args.torch_sharded and env.world_size > 1:
        for z in (z for z in stages if z in (1, 2)):
            runners[f"torch_zero{z}"] = _bare_runner(stage, job, batch, env, args,
                                                     f"torch_zero{z}")
    medians = _time_interleaved(runners, env, steps, args.warmup)
    for engine in engines:
        engine.destroy()
    summary = train(job)
    tp = summary["throughput"]
    model, _ = stage.build(job.model, job.loss, job.inputs)
    return {"case": name, "stage": case.stage, "config": case.config,
            "params": sum(p.numel() for p in model.parameters()),
            "flops_per_sample": stage.flops_per_sample(job.model, job.loss, job.inputs), "micro_batch": case.micro,
            "steps": steps, "bare_ms": medians.pop("bare"),
            "torch_sharded_ms": {k: medians.pop(k) for k in list(medians)
                                 if k.startswith("torch_")},
            "deepspeed_ms": medians,
            "trainer": {"zero_stage": args.trainer_zero, "steps": case.trainer_steps,
                        "workers": args.workers,
                        "median_step_ms": 1e3 * tp["median_step_time_s"],
                        "data_wait_share": tp["data_wait_share"],
                        "median_step_data_wait_share": tp["median_step_data_wait_share"],
                        "samples_per_s": tp["median_samples_per_s"]}}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from higr_dist.engine.trainer import init_distributed, shutdown

    env = init_distributed()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        box = [tmp]
        dist.broadcast_object_list(box, src=0)  # one folder on every rank (one machine)
        for name in args.cases:
            results.append(_run_case(name, CASES[name], env, args, Path(box[0])))
            dist.barrier()
    if env.rank == 0:
        Path(args.worker).write_text(json.dumps({"world_size": env.world_size,
                                                 "device": env.device_name, "cases": results}))
    shutdown()


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def _launch(world: int, args: argparse.Namespace, result_file: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world}", __file__, "--worker", str(result_file),
           "--cases", *args.cases, "--zero", *map(str, args.zero),
           "--precision", args.precision, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--workers", str(args.workers),
           "--trainer-zero", str(args.trainer_zero), "--zero-options", args.zero_options,
           *(["--torch-sharded"] if args.torch_sharded else [])]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"world {world} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(result_file.read_text())
    out["wall_s"] = time.perf_counter() - t0
    out["loadavg_before"], out["loadavg_after"] = load_before, os.getloadavg()
    return out


def table(results: list[dict]) -> str:
    lines = ["| case | params | world | bare ms | engine | engine ms | engine / bare "
             "| torch same stage ms | engine / torch same stage "
             "| trainer ms | trainer / bare | data wait (all steps / median step) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["cases"]:
            tr = c["trainer"]
            same = c.get("torch_sharded_ms", {})
            for name, ms in c["deepspeed_ms"].items():
                ref = same.get(f"torch_{name}")
                ref_cols = f"{ref:.1f} | {ms / ref:.3f}" if ref else "- | -"
                lines.append(
                    f"| {c['case']} | {c['params'] / 1e6:.2f}M | {r['world_size']} "
                    f"| {c['bare_ms']:.1f} | {name} | {ms:.1f} | {ms / c['bare_ms']:.3f} "
                    f"| {ref_cols} "
                    f"| {tr['median_step_ms']:.1f} (zero{tr['zero_stage']}) "
                    f"| {tr['median_step_ms'] / c['bare_ms']:.3f} | {tr['data_wait_share']:.1%} / "
                    f"{tr.get('median_step_data_wait_share', float('nan')):.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            results.append(_launch(world, args, Path(tmp) / f"world{world}.json"))
    import deepspeed
    import torch

    report = {"bench": "engine", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "deepspeed": deepspeed.__version__,
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")},
              "precision": args.precision, "warmup": args.warmup,
              "zero_options": json.loads(args.zero_options) if args.zero_options else {},
              "results": results,
              "command": "python bench/engine.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
