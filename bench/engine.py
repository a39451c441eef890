"""Engine overhead: DeepSpeed engine step vs a bare torch loop, and the trainer's data wait.

What is measured (per world size, each world in its own ``torchrun`` launch, gloo on CPU /
NCCL on GPU):

- ``bare``: the same model/loss/batch in a plain loop: forward, backward, grad-norm clip,
  ``torch.optim.AdamW`` step, LambdaLR step (torch DDP around the model when world > 1);
- ``deepspeed``: the model wrapped by ``higr_dist.engine.trainer.build_engine`` (the project's
  one ``deepspeed.initialize``) for each requested ZeRO stage: ``stage.step`` + ``backward`` +
  ``step``;
- ``trainer``: the full ``higr_dist.engine.train`` loop on real shards written to a temp folder
  (streaming loader with workers, logging, no checkpoints): its median step time and the share
  of step time spent waiting for data.

The model is the real tokenizer stage (PCRQ-VAE, KuaiRec-sized by default) on one fixed
synthetic pair batch. Timings are the median over ``--steps`` steps after ``--warmup`` steps.
The bare loop and the engines take turns step by step (one step each, round robin), so load
from other processes on the machine hits them alike. Results: a table on stdout and JSON at
``--out``. Target: deepspeed / bare <= 1.10.

    python bench/engine.py                       # world 1 and 2, fp32, ZeRO 1 and 2
    python bench/engine.py --worlds 1 --zero 0 1 2 3 --precision bf16
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: the tokenizer model under test (KuaiRec scale, configs/kuairec/tokenizer.yaml)
MODEL = {"input_dim": 128, "hidden_dims": [512, 256], "latent_dim": 64, "K": 256, "L": 3,
         "restart_every": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    p.add_argument("--zero", type=int, nargs="+", default=[1, 2], help="ZeRO stages to time")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--micro", type=int, default=256, help="micro-batch size per rank")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--trainer-steps", type=int, default=40, help="steps of the full trainer run")
    p.add_argument("--out", default="runs/bench/engine.json", help="JSON results file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # result file (internal)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# worker (one torchrun launch per world size)
# --------------------------------------------------------------------------------------------


def _batch(micro: int, dim: int, rank: int):
    import torch

    from higr_dist.stages.tokenizer import PairBatch

    g = torch.Generator().manual_seed(1234 + rank)
    centers = torch.randn(32, dim, generator=g)
    ids = torch.randint(0, 32, (micro,), generator=g)
    xa = centers[ids] + 0.2 * torch.randn(micro, dim, generator=g)  # [B, D]
    xp = centers[ids] + 0.2 * torch.randn(micro, dim, generator=g)  # [B, D]
    return PairBatch(xa, xp, torch.ones(micro), torch.arange(micro), torch.arange(micro))


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_runner(stage, model_cfg, loss_cfg, batch, env, args):
    """One plain torch training step per call (DDP around the model when world > 1)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from higr_dist.engine.ds_config import WarmupCosine, param_groups
    from higr_dist.engine.trainer import seed_all
    from higr_dist.stages.base import StageInputs

    seed_all(0)
    model, loss_module = stage.build(model_cfg, loss_cfg, StageInputs())
    model.to(env.device)
    loss_module.to(env.device)
    wrapped = model
    if env.world_size > 1:
        wrapped = DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, 10**6, 0.1))
    autocast = args.precision == "bf16"

    def step() -> None:
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = stage.step(wrapped, loss_module, batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step, None


def _deepspeed_runner(stage, model_cfg, loss_cfg, batch, env, args, zero: int):
    """One DeepSpeed engine step per call (the trainer's build_engine, this ZeRO stage)."""
    from higr_dist.engine.config import TrainConfig
    from higr_dist.engine.trainer import build_engine, float_dtype, seed_all
    from higr_dist.stages.base import StageInputs

    seed_all(0)
    model, loss_module = stage.build(model_cfg, loss_cfg, StageInputs())
    train = TrainConfig(zero_stage=zero, precision=args.precision, micro_batch_size=args.micro,
                        global_batch_size=args.micro * env.world_size, weight_decay=0.0)
    engine, _, _ = build_engine(model, train, env.world_size, env.device.type, 10**6)
    loss_module.to(env.device)
    b = batch.to(env.device, float_dtype(args.precision))

    def step() -> None:
        out = stage.step(engine, loss_module, b)
        engine.backward(out.loss)
        engine.step()

    return step, engine


def _time_interleaved(runners: dict, env, args) -> dict[str, float]:
    """Median ms per runner; runners take turns every step so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.warmup + args.steps):
        for name, step in runners.items():
            _sync(env.device)
            t0 = time.perf_counter()
            step()
            _sync(env.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: _median_ms(t) for name, t in times.items()}


def _write_etl(out: Path, n_shards: int, per_shard: int, dim: int) -> None:
    """``items/`` (one per item, the stage exports them at the end) and ``pairs/`` shards."""
    import numpy as np

    from higr_dist.data.shardio import write_listing, write_shard
    from higr_dist.schema import ITEM, PAIR

    rng = np.random.default_rng(0)
    n_items = 2048
    centers = rng.normal(size=(64, dim)).astype(np.float32)
    cat = rng.integers(0, 64, size=n_items)
    x = (centers[cat] + 0.2 * rng.normal(size=(n_items, dim))).astype(np.float32)
    (out / "items").mkdir(parents=True, exist_ok=True)
    write_listing(out / "items", [write_shard(out / "items" / "shard-000000.tar", ITEM, (
        (f"i{i}", {"item_idx": i, "item_id": str(i), "categories": [int(cat[i])], "x": x[i]})
        for i in range(n_items)))])
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(n_shards):
        a = rng.integers(0, n_items, size=per_shard)
        entries.append(write_shard(out / "pairs" / f"shard-{s:06d}.tar", PAIR, (
            (f"s{s}_{i}", {"anchor": int(a[i]), "positive": int(a[i]), "weight": 1.0,
                           "x_anchor": x[a[i]], "x_positive": x[a[i]]})
            for i in range(per_shard))))
    write_listing(out / "pairs", entries)


def _time_trainer(env, args, tmp: Path) -> dict:
    import torch.distributed as dist

    from higr_dist.engine.config import load_job
    from higr_dist.engine.trainer import train

    etl = tmp / "etl"
    if env.rank == 0:
        _write_etl(etl, n_shards=4 * env.world_size, per_shard=args.micro * 4,
                   dim=MODEL["input_dim"])
    dist.barrier()
    job = load_job(None, base={
        "stage": "tokenizer", "run": {"out_dir": str(tmp / "run")},
        "inputs": {"etl_dir": str(etl)},
        "data": {"num_workers": 2, "shuffle_buffer": 1000},
        "train": {"zero_stage": args.zero[0], "precision": args.precision,
                  "micro_batch_size": args.micro,
                  "global_batch_size": args.micro * env.world_size,
                  "max_steps": args.trainer_steps, "checkpoint_every": 0, "keep_last": 1,
                  "log_every": max(1, args.trainer_steps // 4), "progress_bar": False,
                  "weight_decay": 0.0},
        "model": MODEL})
    summary = train(job)
    warm = summary["throughput"]
    return {"median_step_ms": 1e3 * warm["median_step_time_s"],
            "data_wait_share": warm["data_wait_share"],
            "samples_per_s": warm["median_samples_per_s"], "zero_stage": args.zero[0]}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from higr_dist.engine.config import load_job
    from higr_dist.engine.trainer import init_distributed, shutdown
    from higr_dist.stages.base import get_stage

    env = init_distributed()
    job = load_job(None, base={"stage": "tokenizer", "model": MODEL})
    stage = get_stage("tokenizer")
    batch = _batch(args.micro, MODEL["input_dim"], env.rank).to(env.device)
    runners, engines = {}, []
    runners["bare"], _ = _bare_runner(stage, job.model, job.loss, batch, env, args)
    for zero in args.zero:
        runners[f"zero{zero}"], engine = _deepspeed_runner(stage, job.model, job.loss, batch,
                                                           env, args, zero)
        engines.append(engine)
    medians = _time_interleaved(runners, env, args)
    for engine in engines:
        engine.destroy()
    result = {"world_size": env.world_size, "device": env.device_name,
              "bare_ms": medians.pop("bare"), "deepspeed_ms": medians}
    with tempfile.TemporaryDirectory() as tmp:
        box = [tmp]
        dist.broadcast_object_list(box, src=0)  # one folder on every rank (one machine)
        result["trainer"] = _time_trainer(env, args, Path(box[0]))
        dist.barrier()
    if env.rank == 0:
        Path(args.worker).write_text(json.dumps(result))
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
           "--zero", *map(str, args.zero), "--precision", args.precision,
           "--micro", str(args.micro), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--trainer-steps", str(args.trainer_steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"world {world} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def table(results: list[dict]) -> str:
    lines = ["| world | bare torch ms | engine | engine ms | engine / bare | trainer ms "
             "| data wait |", "|---|---|---|---|---|---|---|"]
    for r in results:
        tr = r["trainer"]
        for name, ms in r["deepspeed_ms"].items():
            lines.append(f"| {r['world_size']} | {r['bare_ms']:.2f} | {name} | {ms:.2f} | "
                         f"{ms / r['bare_ms']:.3f} | {tr['median_step_ms']:.2f} "
                         f"(zero{tr['zero_stage']}) | {tr['data_wait_share']:.1%} |")
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
    report = {"bench": "engine", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "model": MODEL, "precision": args.precision, "micro_batch": args.micro,
              "steps": args.steps, "warmup": args.warmup, "results": results,
              "command": "python bench/engine.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
