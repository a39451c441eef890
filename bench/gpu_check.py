"""The GPU check: one script that measures and checks the CUDA path on one H100/H200.

    python bench/gpu_check.py                    # one GPU, <= 8 min -> bench/results/gpu_check.json
    python bench/gpu_check.py --dry-run --out /tmp/gpu_check.json   # the same plumbing on the
                                                 # CPU at a tiny size (< ~2 min; tests run it)

Before a GPU run, on a machine with the registry: ``bash bench/gpu_wheels.sh`` builds the
wheels the GPU machine may lack (DeepSpeed has none on PyPI; see that script for installing).

Phases, in this order (each timed; a failing phase is recorded with its error and the later
ones still run; the exit status is 1 when any failed, 2 when a module is missing):

1. ``environment``: versions, device name, the peak bf16/fp32 TFLOP/s the MFU uses
   (``ds_config.PEAK_TFLOPS`` by device name: nothing is pinned), loadable modules.
2. ``data``: a synthetic catalogue (random unique SIDs, ``K^L``) and slate shards with a
   learnable pattern (the slate is the N items after the newest history item), sized so the
   training phase reads about one epoch.
3. ``train``: HSD at the ``100m`` preset (``higr_dist.models.hsd.PRESETS``, the model of
   ``cluster/hsd``) in bf16 under ZeRO-2 (``HIGR_ZERO_AT_WORLD_ONE=1``: DeepSpeed's
   ZeRO-2 code paths with ``overlap_comm`` and the cluster configs' bucket sizes on one device)
   with activation checkpointing, ``--steps`` (200) optimizer steps through the real launcher and
   trainer. Reported from its TensorBoard scalars: MFU, samples/s, tokens/s, step time, the
   loader's data-wait share (median over the log windows after the first, which holds the
   start-up), peak device memory, host RSS; loss first/last.
4. ``parity``: the same model, data and seed in fp32 and in bf16 (both ZeRO-2) for
   ``--parity-steps`` steps, one log per step: the largest relative difference of the per-step
   losses must stay under ``--parity-tol``.
5. ``resume``: the bf16 parity job again with checkpoints every 4 steps, SIGKILLed after step
   6 (``train.kill_at_step``), then the same command relaunched: it must resume from
   ``global_step4``, replay steps 5-6 and end where the uninterrupted bf16 run ended
   (``--resume-tol``; GPU kernels are not bitwise deterministic, the CPU dry run is held to
   1e-4).
6. ``decode``: HiGR (the trained export of phase 3, loaded through the eval harness onto the
   device) and the flat baseline (same config, random weights: latency does not depend on
   them) decode the same random users on the device, batches 1 and 64, beam 10
   (``bench/decode.py``'s interleaved timing, device-synchronised): median/p99 latency,
   slates/s and the flat / HiGR speedup.
7. ``gpu_tests``: ``pytest -m gpu tests/test_engine_gpu.py`` (HSD/ORPO/DPO steps, ZeRO-1/2/3 at
   world one, activation checkpointing, resume, decoding on the GPU) with what is left of the
   time budget; the dry run only collects them.

Everything runs in subprocesses (``python launcher/train.py``, a world of one), so each phase
has its own process (peak memory per phase) and a crash cannot take the script down. Output:
one JSON file (``--out``) with the machine, the phases and their figures; a summary on stdout.

Trade-offs: one GPU cannot show NCCL between ranks or ZeRO's partitioning savings (one rank
holds everything); it does run every ZeRO code path, the bf16/fp32 numerics, the kernels'
speed and the memory of one rank. The synthetic data are random (no learning beyond the
pattern); MFU and latency do not depend on that.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: modules the check needs on the GPU machine (import name -> how to get it)
NEEDED = {"torch": "a CUDA build of torch", "deepspeed": "bench/gpu_wheels.sh (.whl/)",
          "higr_dist": "bench/gpu_wheels.sh (.whl/) or PYTHONPATH=<checkout>",
          "webdataset": "pip", "zstandard": "pip", "orjson": "pip", "yaml": "pip (pyyaml)",
          "numpy": "pip", "tensorboard": "pip", "psutil": "pip", "pytest": "pip",
          "tqdm": "pip", "pyarrow": "pip"}

#: ZeRO-2 settings of the cluster configs (cluster/_zero2)
CLUSTER_ZERO2 = {"overlap_comm": True, "reduce_bucket_size": 20_000_000,
                 "allgather_bucket_size": 50_000_000}


# --------------------------------------------------------------------------------------------
# plumbing
# --------------------------------------------------------------------------------------------


class Phase:
    """Runs one phase: records ok/seconds/result or the error, never raises."""

    def __init__(self, report: dict, name: str):
        self.report, self.name = report, name

    def __call__(self, fn, *args, **kwargs) -> Any:
        t0 = time.perf_counter()
        print(f"[gpu_check] {self.name} ...", flush=True)
        entry: dict = {}
        result = None
        try:
            result = fn(*args, **kwargs)
            entry.update(result if isinstance(result, dict) else {"result": result})
            entry["ok"] = bool(entry.get("ok", True))
        except Exception as e:  # recorded; the next phases still run
            entry["ok"] = False
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-4000:]
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        self.report["phases"][self.name] = entry
        state = "ok" if entry["ok"] else f"FAILED ({entry.get('error', 'check failed')})"
        print(f"[gpu_check] {self.name}: {state} in {entry['seconds']} s", flush=True)
        return result


def missing_modules() -> list[str]:
    out = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def run_env(dry: bool, zero_at_one: bool = True) -> dict:
    """Environment for a child process: a world of one, no launcher variables; the dry run
    hides GPUs so it is the CPU even on a GPU machine."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1" if dry else "8")
    env["PYTHONUNBUFFERED"] = "1"
    if zero_at_one:
        env["HIGR_ZERO_AT_WORLD_ONE"] = "1"
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def launch(config: Path, overrides: list[str], env: dict, timeout: float, log: Path
           ) -> subprocess.CompletedProcess:
    """``python launcher/train.py --config config overrides`` (a world of one)."""
    cmd = [sys.executable, str(ROOT / "launcher" / "train.py"), "--config", str(config),
           *overrides]
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout)


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text()[-n:] if log.is_file() else ""


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a run folder; the latest value per step (a resumed run logs some
    steps twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from higr_dist.layout import StageLayout

    acc = EventAccumulator(str(StageLayout(run).tensorboard), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        by_step: dict[int, tuple[float, float]] = {}
        for e in acc.Scalars(tag):
            if e.step not in by_step or e.wall_time >= by_step[e.step][0]:
                by_step[e.step] = (e.wall_time, e.value)
        out[tag] = [(s, v) for s, (_, v) in sorted(by_step.items())]
    return out


def steady(values: list[tuple[int, float]]) -> float | None:
    """Median over the log windows after the first (start-up), or the only one."""
    vals = [v for _, v in values]
    if not vals:
        return None
    return statistics.median(vals[1:] if len(vals) > 1 else vals)


# --------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------


def environment(dry: bool) -> dict:
    import torch

    from higr_dist.engine.ds_config import peak_tflops

    out: dict = {"python": platform.python_version(), "torch": torch.__version__,
                 "cuda": torch.version.cuda, "host": platform.node(),
                 "cpus": os.cpu_count(), "dry_run": dry}
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except ImportError:
        out["deepspeed"] = None
    if not dry and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        out.update(device=name, device_memory_gb=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    else:
        name = "cpu"
        out.update(device="cpu")
    out["peak_tflops"] = {p: peak_tflops(name, p) for p in ("bf16", "fp32")}
    out["ok"] = dry or name != "cpu"  # a real run needs a GPU
    if not out["ok"]:
        out["error"] = "no CUDA device (use --dry-run to check the plumbing on the CPU)"
    return out


def write_data(root: Path, preset: str, samples: int, shards: int, num_items: int,
               seed: int = 0) -> dict:
    """SID export + slate shards for ``preset``'s K, L, N, history_len."""
    import numpy as np

    from higr_dist.data.shardio import write_listing, write_shard
    from higr_dist.layout import RunLayout
    from higr_dist.models.hsd import preset as hsd_preset
    from higr_dist.schema import SLATE_GROUP_BLOCK, blocks
    from higr_dist.schema.slates import slate_group_of

    cfg = hsd_preset(preset)
    K, L, N, H = cfg.K, cfg.L, cfg.N, cfg.history_len
    rng = np.random.default_rng(seed)
    sid = root / "sid"
    sid.mkdir(parents=True, exist_ok=True)
    keys = rng.choice(K ** L, num_items, replace=False)
    table = np.stack([(keys // K ** (L - 1 - i)) % K for i in range(L)], 1).astype(np.int64)
    np.save(sid / "sid_table.npy", table)
    (sid / "sid_meta.json").write_text(json.dumps({"K": K, "L": L, "num_items": num_items}))
    etl = RunLayout(root).etl  # the ETL output where a run keeps it
    folder = etl.kind("slates/train")
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-samples // shards)
    entries, u = [], 0
    for s in range(shards):
        records = []
        for _ in range(per):
            h = int(rng.integers(max(1, H // 2), H + 1))
            hist = rng.integers(0, num_items, h)
            tgt = (hist[-1] + np.arange(1, N + 1)) % num_items
            records.append((f"s{s}u{u}", slate_group_of({
                "user_id": f"u{u}", "split": "train", "ts": 1000 + u,
                "hist_items": hist.tolist(), "hist_fb": (rng.random(h) * 3).round(2).tolist(),
                "target_items": tgt.tolist(), "target_fb": [1.0] * N})))
            u += 1
        entries.append(write_shard(folder / f"shard-{s:06d}.tar", SLATE_GROUP_BLOCK,
                                   blocks(records, 16)))
    write_listing(folder, entries)
    return {"etl": str(etl.root), "sid": str(sid), "samples": u, "shards": shards,
            "num_items": num_items, "K": K, "L": L, "N": N, "history_len": H}


def job_config(path: Path, data: dict, preset: str, out_dir: Path, micro: int, steps: int,
               workers: int, precision: str) -> Path:
    """A job file for stage hsd at ``preset`` on the synthetic data."""
    import yaml

    from higr_dist.config import to_dict
    from higr_dist.models.hsd import preset as hsd_preset

    job = {"stage": "hsd",
           "run": {"name": path.stem, "out_dir": str(out_dir), "seed": 0},
           "inputs": {"etl_dir": data["etl"], "sid_dir": data["sid"]},
           "data": {"num_workers": workers, "shuffle_buffer": 2048},
           "train": {"zero_stage": 2, "zero_options": CLUSTER_ZERO2, "precision": precision,
                     "global_batch_size": micro, "micro_batch_size": micro,
                     "max_steps": steps, "lr": 3e-4, "warmup_steps": min(20, steps // 4),
                     "weight_decay": 0.01, "grad_clip": 1.0, "activation_checkpointing": True,
                     "checkpoint_every": 0, "log_every": max(1, steps // 10),
                     "peak_tflops": 0, "progress_bar": False},
           "model": to_dict(hsd_preset(preset)),
           "loss": {"lambda_ild": 0.1}}
    path.write_text(yaml.safe_dump(job))
    return path


def train_phase(work: Path, data: dict, args: argparse.Namespace, env: dict) -> dict:
    from higr_dist.layout import StageLayout

    run = work / "train"
    config = job_config(work / "train.yaml", data, args.preset, run, args.micro_batch,
                        args.steps, args.workers, "bf16")
    log = work / "train.log"
    proc = launch(config, [], env, args.phase_timeout, log)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (rc {proc.returncode}): {_tail(log, 1500)}")
    s = json.loads(StageLayout(run).summary.read_text())
    sc = scalars(run)
    mem = sc.get("health/device_max_alloc_gb", [])
    out = {
        "preset": args.preset, "params": s["export"].get("params"),
        "steps": s["final_step"], "micro_batch": args.micro_batch,
        "precision": s["precision"], "zero_stage_effective": s["zero_stage_effective"],
        "activation_checkpointing": True, "device": s["device"],
        "mfu": steady(sc.get("health/mfu", [])),
        "samples_per_s": steady(sc.get("health/samples_per_s", [])),
        "tokens_per_s": steady(sc.get("health/tokens_per_s", [])),
        "step_time_s": steady(sc.get("health/step_time_s", [])),
        "data_wait_share": steady(sc.get("health/data_wait_share", [])),
        "device_max_alloc_gb": max((v for _, v in mem), default=None),
        "host_rss_gb": max((v for _, v in sc.get("health/host_rss_gb", [])), default=None),
        "loss_first": s["losses"]["first"].get("loss/total"),
        "loss_last": s["losses"]["final"].get("loss/total"),
        "wall_time_s": s["wall_time_s"], "run_dir": str(run),
    }
    out["ok"] = (out["steps"] == args.steps and out["zero_stage_effective"] == 2
                 and out["loss_last"] < out["loss_first"]
                 and (args.dry_run or out["device_max_alloc_gb"] is not None))
    return out


#: parity and resume runs: one log per step, no dropout (the same computation in both
#: precisions; dropout masks need not be drawn alike for fp32 and bf16 kernels)
PARITY = ["train.log_every=1", "model.dropout=0.0"]


def parity_phase(work: Path, data: dict, args: argparse.Namespace, env: dict) -> dict:
    losses = {}
    for precision in ("fp32", "bf16"):
        run = work / f"parity_{precision}"
        config = job_config(work / f"parity_{precision}.yaml", data, args.preset, run,
                            args.micro_batch, args.parity_steps, args.workers, precision)
        log = work / f"parity_{precision}.log"
        proc = launch(config, PARITY, env, args.phase_timeout, log)
        if proc.returncode != 0:
            raise RuntimeError(f"{precision} run failed (rc {proc.returncode}): "
                               f"{_tail(log, 1500)}")
        losses[precision] = [v for _, v in scalars(run)["loss/total"]]
    a, b = losses["fp32"], losses["bf16"]
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)]
    return {"steps": len(rel), "loss_fp32": a, "loss_bf16": b,
            "max_rel_diff": max(rel), "mean_rel_diff": statistics.fmean(rel),
            "tol": args.parity_tol,
            "ok": len(rel) == args.parity_steps and max(rel) < args.parity_tol}


def resume_phase(work: Path, data: dict, args: argparse.Namespace, env: dict) -> dict:
    from higr_dist.layout import LATEST, StageLayout

    run = work / "resume"
    config = job_config(work / "resume.yaml", data, args.preset, run, args.micro_batch,
                        args.parity_steps, args.workers, "bf16")
    overrides = [*PARITY, "train.checkpoint_every=4", "train.kill_at_step=6"]
    log = work / "resume.log"
    killed = launch(config, overrides, env, args.phase_timeout, log)
    latest = StageLayout(run).checkpoints / LATEST
    saved = latest.read_text().strip() if latest.is_file() else None
    resumed = launch(config, overrides, env, args.phase_timeout, log)  # the same command
    if resumed.returncode != 0:
        raise RuntimeError(f"resumed run failed (rc {resumed.returncode}): {_tail(log, 1500)}")
    s = json.loads(StageLayout(run).summary.read_text())
    ref = json.loads(StageLayout(work / "parity_bf16").summary.read_text())
    final, want = s["losses"]["final"]["loss/total"], ref["losses"]["final"]["loss/total"]
    rel = abs(final - want) / max(abs(want), 1e-12)
    tol = 1e-4 if args.dry_run else args.resume_tol
    return {"killed_rc": killed.returncode, "checkpoint_at_kill": saved,
            "resumed_from": s["resumed_from"], "final_step": s["final_step"],
            "final_loss": final, "uninterrupted_final_loss": want, "rel_diff": rel, "tol": tol,
            "ok": (killed.returncode == -9 and saved == "global_step4"
                   and s["resumed_from"] == "global_step4"
                   and s["final_step"] == args.parity_steps and rel < tol)}


DECODE_CHILD = """
import json, sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, sys.argv[1] + "/bench")
import decode as bench_decode
from higr_dist.eval.harness import load_stage_model, resolve_device
from higr_dist.models.flat import Flat

run, sid, out, batches, repeats, beam = sys.argv[2], sys.argv[3], sys.argv[4], \\
    [int(b) for b in sys.argv[5].split(",")], int(sys.argv[6]), int(sys.argv[7])
device = resolve_device("auto")
_, higr = load_stage_model(Path(run), device)
torch.manual_seed(0)
flat = Flat(higr.cfg).to(device).eval()
table = np.load(Path(sid) / "sid_table.npy")
lat = bench_decode.compare_latency({"higr": higr, "flat": flat}, table, batches,
                                   higr.cfg.history_len, beam, repeats, 2, device)
res = {"device": str(device), "beam": beam, "by_batch": lat}
if device.type == "cuda":
    res["device_max_alloc_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
Path(out).write_text(json.dumps(res))
"""


def decode_phase(work: Path, data: dict, train: dict | None, args: argparse.Namespace,
                 env: dict) -> dict:
    from higr_dist.layout import StageLayout

    final = StageLayout(Path(train.get("run_dir", ""))).final_weights.parent if train else None
    if final is None or not final.is_dir():
        raise RuntimeError("no trained HSD export (the train phase failed)")
    script, out = work / "decode_child.py", work / "decode.json"
    script.write_text(DECODE_CHILD)
    log = work / "decode.log"
    batches = "1,8" if args.dry_run else "1,64"
    repeats = 3 if args.dry_run else 20
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, str(script), str(ROOT), train["run_dir"],
                               data["sid"], str(out), batches, str(repeats), "10"],
                              cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=args.phase_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"decode failed (rc {proc.returncode}): {_tail(log, 1500)}")
    res = json.loads(out.read_text())
    rows = {b: {"higr_median_ms": r["higr"]["median_ms"], "higr_p99_ms": r["higr"]["p99_ms"],
                "flat_median_ms": r["flat"]["median_ms"], "flat_p99_ms": r["flat"]["p99_ms"],
                "higr_slates_per_s": r["higr"]["slates_per_s"],
                "flat_slates_per_s": r["flat"]["slates_per_s"], "speedup": r["speedup"]}
            for b, r in res["by_batch"].items()}
    return {"device": res["device"], "beam": res["beam"], "by_batch": rows,
            "device_max_alloc_gb": res.get("device_max_alloc_gb"),
            "ok": (res["device"].startswith("cuda") or args.dry_run) and bool(rows)}


def gpu_tests_phase(work: Path, args: argparse.Namespace, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/test_engine_gpu.py"]
    if args.dry_run:
        cmd.append("--collect-only")
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = work / "gpu_tests.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=max(timeout, 30))
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    collected = sum(1 for ln in lines if "::" in ln) if args.dry_run else None
    ok = proc.returncode == 0 and ("skipped" not in last or args.dry_run)
    return {"command": " ".join(cmd[1:]), "rc": proc.returncode, "summary": last,
            "collected": collected, "ok": ok and (not args.dry_run or (collected or 0) > 0),
            **({} if ok else {"log_tail": _tail(log)})}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="the whole plumbing on the CPU at the tiny preset (GPUs hidden)")
    p.add_argument("--out", default=None,
                   help="JSON report (default bench/results/gpu_check.json; the dry run "
                        "writes bench/results/gpu_check_dry.json)")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--preset", default=None, help="HSD preset (default 100m; dry run: tiny)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 200; dry 12)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="samples per step (default 256, the cluster config's; dry 16)")
    p.add_argument("--parity-steps", type=int, default=12,
                   help="steps of the fp32/bf16 parity and resume runs (>= 7)")
    p.add_argument("--parity-tol", type=float, default=0.03,
                   help="largest relative per-step loss difference fp32 vs bf16")
    p.add_argument("--resume-tol", type=float, default=0.02,
                   help="relative final-loss difference resumed vs uninterrupted (GPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers (default min(8, cpus / 2); dry run 0)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="time budget: the GPU tests get what the other phases left")
    p.add_argument("--phase-timeout", type=float, default=300.0,
                   help="timeout of one training/decoding subprocess")
    p.add_argument("--skip-tests", action="store_true", help="skip the pytest phase")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.preset = args.preset or ("tiny" if dry else "100m")
    args.steps = args.steps or (12 if dry else 200)
    args.micro_batch = args.micro_batch or (16 if dry else 256)
    if args.workers is None:
        args.workers = 0 if dry else max(1, min(8, (os.cpu_count() or 2) // 2))
    if args.parity_steps < 7:
        p.error("--parity-steps must be >= 7 (the resume check kills at step 6)")
    args.out = Path(args.out or ROOT / "bench" / "results" /
                    ("gpu_check_dry.json" if dry else "gpu_check.json"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    missing = missing_modules()
    if missing:
        print(f"gpu_check: missing module(s): {', '.join(missing)} ("
              f"{'; '.join(f'{m}: {NEEDED[m]}' for m in missing)}); after bench/gpu_wheels.sh "
              "on a machine with the registry: pip install --no-deps .whl/*.whl",
              file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"script": "bench/gpu_check.py", "dry_run": args.dry_run,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "work": str(work),
                    "settings": {k: (str(v) if isinstance(v, Path) else v)
                                 for k, v in vars(args).items()},
                    "phases": {}}
    env = run_env(args.dry_run)
    Phase(report, "environment")(environment, args.dry_run)
    epoch = args.steps * args.micro_batch
    num_items = 400 if args.dry_run else 20_000
    shards = max(4, 4 * max(1, args.workers))
    data = Phase(report, "data")(write_data, work / "data", args.preset,
                                 max(epoch + epoch // 10, 64 * shards // 4), shards, num_items)
    train = None
    if data:
        train = Phase(report, "train")(train_phase, work, data, args, env)
        Phase(report, "parity")(parity_phase, work, data, args, env)
        Phase(report, "resume")(resume_phase, work, data, args, env)
        Phase(report, "decode")(decode_phase, work, data, train, args, run_env(args.dry_run,
                                                                                False))
    if not args.skip_tests:
        left = args.budget_s - (time.perf_counter() - t_start)
        Phase(report, "gpu_tests")(gpu_tests_phase, work, args, left)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    report["ok"] = all(p["ok"] for p in report["phases"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({name: {k: v for k, v in p.items()
                             if k in ("ok", "seconds", "mfu", "samples_per_s",
                                      "device_max_alloc_gb", "max_rel_diff", "rel_diff",
                                      "summary", "error")}
                      for name, p in report["phases"].items()}, indent=1, default=str))
    print(f"gpu_check: {'OK' if report['ok'] else 'FAILED'} in {report['total_s']} s -> "
          f"{args.out}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
