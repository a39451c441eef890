"""The shared test toolkit: tiny inputs, job configs and the plumbing to launch real training
jobs and read what they leave behind.

Everything more than one test file needs lives here. Test files import from this module (``from
helpers import ...``, like :mod:`farm`), never from each other: a test module is its tests, not
a library.

- tiny shards and sample writers: the tiny tokenizer dataset (:func:`write_tiny_etl`), slate
  shards with a learnable pattern plus a SID export (:func:`write_slate_inputs`), preference
  shards plus a SID export and an init HSD (:func:`write_pref_inputs`);
- job dicts: overrides of the shipped tiny tokenizer config, HSD / flat / SASRec and ORPO / DPO
  job configs on those inputs, and the :mod:`farm` job specs built from them;
- launching jobs and reading their results: the environment of CPU ranks, ``torchrun``, the
  exit-status check, ``summary.json``, TensorBoard scalars, exported weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from higr_dist.configs import HERE as CONFIGS
from higr_dist.data.shardio import write_listing, write_shard
from higr_dist.models.hsd import HSD, HSDConfig
from higr_dist.schema import (
    ITEM,
    PAIR_BLOCK,
    PREF_GROUP_BLOCK,
    SLATE_BLOCK,
    SLATE_GROUP_BLOCK,
    blocks,
)
from higr_dist.schema.prefs import pref_group_of
from higr_dist.schema.slates import slate_group_of

#: the repository (the working folder of every launched job)
ROOT = Path(__file__).resolve().parents[1]
#: the shipped tiny tokenizer config
TINY = CONFIGS / "tiny" / "tokenizer.yaml"


# --------------------------------------------------------------------------------------------
# tiny shards and sample writers
# --------------------------------------------------------------------------------------------

#: tiny catalogue: items, feature size, clusters (= categories)
TINY_ITEMS, TINY_DIM, TINY_CLUSTERS = 96, 16, 8
#: training pairs :func:`write_tiny_etl` writes by default (two per item)
TINY_PAIRS = 192


def write_tiny_etl(out: Path, pair_shards: tuple[int, ...] = (56, 56, 56, 24),
                   dim: int = TINY_DIM) -> Path:
    """An ETL-shaped folder: ``items/`` (one shard) and ``pairs/`` (shards of the given sizes,
    deliberately uneven so ranks get different batch counts), with ``shards.json`` listings.

    Items are noisy copies of TINY_CLUSTERS centres in ``dim`` features; each item gets two
    positives from its cluster. Deterministic (fixed seed): the golden-loss test relies on it.
    Real shards written with ``shardio.write_shard``; no Spark.
    """
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(TINY_CLUSTERS, dim)).astype(np.float32)
    cat = np.arange(TINY_ITEMS) % TINY_CLUSTERS
    x = (centers[cat] + 0.2 * rng.normal(size=(TINY_ITEMS, dim))).astype(np.float32)
    items = out / "items"
    items.mkdir(parents=True, exist_ok=True)
    write_listing(items, [write_shard(items / "shard-000000.tar", ITEM, (
        (f"i{i:05d}", {"item_idx": i, "item_id": f"v{i}", "categories": [int(cat[i])], "x": x[i]})
        for i in range(TINY_ITEMS)))])
    pairs = [(i, int(rng.choice(np.flatnonzero(cat == cat[i]))))
             for i in range(TINY_ITEMS) for _ in range(2)]
    assert sum(pair_shards) <= len(pairs)
    folder = out / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    entries, k = [], 0
    for s, n in enumerate(pair_shards):
        chunk = pairs[k:k + n]
        entries.append(write_shard(folder / f"shard-{s:06d}.tar", PAIR_BLOCK, blocks((
            (f"p{k + t:06d}", {"anchor": a, "positive": b, "weight": 1.0, "x_anchor": x[a],
                               "x_positive": x[b]})
            for t, (a, b) in enumerate(chunk)), 4)))
        k += n
    write_listing(folder, entries)
    return out


#: slate data: catalogue size, codebook size, SID levels, slate length, history length
SLATE_NUM_ITEMS, SLATE_K, SLATE_L, SLATE_N, SLATE_H = 48, 8, 3, 4, 6


def write_slate_inputs(root: Path) -> tuple[Path, Path]:
    """Slate shards (4 x 64 samples, with listing) and a SID export; returns (etl, sid_dir).

    The pattern is learnable: the slate is the SLATE_N items after the newest history item."""
    rng = np.random.default_rng(0)
    sid = root / "sid"
    sid.mkdir(parents=True)
    keys = rng.choice(SLATE_K ** SLATE_L, SLATE_NUM_ITEMS, replace=False)
    table = np.stack([(keys // SLATE_K ** (SLATE_L - 1 - i)) % SLATE_K for i in range(SLATE_L)],
                     1).astype(np.int64)
    np.save(sid / "sid_table.npy", table)
    (sid / "sid_meta.json").write_text(json.dumps({"K": SLATE_K, "L": SLATE_L,
                                                   "num_items": SLATE_NUM_ITEMS}))
    folder = root / "etl" / "slates" / "train"
    folder.mkdir(parents=True)
    entries = []
    for s in range(4):
        samples = []
        for u in range(64):
            h = int(rng.integers(2, SLATE_H + 1))
            hist = rng.integers(0, SLATE_NUM_ITEMS, h)
            tgt = (hist[-1] + np.arange(1, SLATE_N + 1)) % SLATE_NUM_ITEMS
            samples.append((f"s{s}u{u}", {
                "user_id": f"u{s}_{u}", "split": "train", "ts": 1000 + u,
                "hist_items": hist.tolist(), "hist_fb": rng.random(h).round(2).tolist(),
                "target_items": tgt.tolist(), "target_fb": [1.0] * SLATE_N}))
        entries.append(write_shard(folder / f"shard-{s:06d}.tar", SLATE_GROUP_BLOCK,
                                   blocks([(k, slate_group_of(x)) for k, x in samples], 8)))
    write_listing(folder, entries)
    # a validation split (one held-out slate per user, all effective views) for model selection
    val = root / "etl" / "slates" / "val"
    val.mkdir(parents=True)
    records = []
    for u in range(48):
        hist = rng.integers(0, SLATE_NUM_ITEMS, SLATE_H)
        records.append((f"v{u}", {
            "user_id": f"v{u}", "split": "val", "ts": 5000 + u, "hist_items": hist.tolist(),
            "hist_fb": [1.0] * SLATE_H, "target_items": ((hist[-1] + np.arange(1, SLATE_N + 1))
                                                         % SLATE_NUM_ITEMS).tolist(),
            "target_fb": [3.0] * SLATE_N}))
    write_listing(val, [write_shard(val / "shard-000000.tar", SLATE_BLOCK, blocks(records, 8))])
    return root / "etl", sid


#: preference data: catalogue size, codebook size, SID levels, slate length, history length
PREF_NUM_ITEMS, PREF_K, PREF_L, PREF_N, PREF_H = 48, 8, 2, 3, 6
#: the HSD the preference stages train (and :func:`write_pref_inputs`' init state dict)
PREF_MODEL = {"K": PREF_K, "L": PREF_L, "N": PREF_N, "d_model": 32, "n_heads": 2,
              "ctx_layers": 1, "planner_layers": 2, "gen_layers": 1, "history_len": PREF_H,
              "dropout": 0.0}


def write_pref_inputs(root: Path) -> tuple[Path, Path, Path]:
    """PREF shards (4 x 32, with listing), a SID export and an init state dict; returns
    (etl, sid_dir, init)."""
    rng = np.random.default_rng(0)
    sid = root / "sid"
    sid.mkdir(parents=True)
    keys = rng.choice(PREF_K ** PREF_L, PREF_NUM_ITEMS, replace=False)
    table = np.stack([(keys // PREF_K ** (PREF_L - 1 - i)) % PREF_K for i in range(PREF_L)],
                     1).astype(np.int64)
    np.save(sid / "sid_table.npy", table)
    np.save(sid / "item_emb.npy", rng.normal(size=(PREF_NUM_ITEMS, 8)).astype(np.float32))
    (sid / "sid_meta.json").write_text(json.dumps({"K": PREF_K, "L": PREF_L,
                                                   "num_items": PREF_NUM_ITEMS}))
    folder = root / "etl" / "prefs"
    folder.mkdir(parents=True)
    entries = []
    for s in range(4):
        samples = []
        for u in range(32):
            h = int(rng.integers(2, PREF_H + 1))
            hist = rng.integers(0, PREF_NUM_ITEMS, h)
            # learnable: the items after the newest
            pos = (hist[-1] + np.arange(1, PREF_N + 1)) % PREF_NUM_ITEMS
            neg = (hist[-1] + np.arange(20, 20 + u % 3)) % PREF_NUM_ITEMS
            samples.append((f"s{s}u{u}", {
                "user_id": f"u{s}_{u}", "ts": 1000 + u, "hist_items": hist.tolist(),
                "hist_fb": rng.random(h).round(2).tolist(), "pos_items": pos.tolist(),
                "pos_fb": [3.0, 2.0, 1.5], "neg_items": neg.tolist(),
                "neg_fb": [0.1] * len(neg)}))
        entries.append(write_shard(folder / f"shard-{s:06d}.tar", PREF_GROUP_BLOCK,
                                   blocks([(k, pref_group_of(x)) for k, x in samples], 8)))
    write_listing(folder, entries)
    torch.manual_seed(0)
    init = root / "hsd_init.pt"
    torch.save(HSD(HSDConfig(**PREF_MODEL)).state_dict(), init)
    return root / "etl", sid, init


# --------------------------------------------------------------------------------------------
# job dicts
# --------------------------------------------------------------------------------------------

#: short, fast-learning schedule on top of configs/tiny/tokenizer.yaml
TINY_TRAIN = ["train.max_steps=24", "train.lr=0.01", "train.warmup_steps=2",
              "train.log_every=4", "train.checkpoint_every=8", "train.keep_last=2",
              "model.restart_every=6"]
#: the same for farm jobs (:func:`tok_job`), no loader workers, no progress bar: 24 steps of 3
#: per epoch (192 pairs, 64 per step), so checkpoints at 8 and 16 are mid-epoch
TINY_FARM_TRAIN = ["train.max_steps=24", "train.lr=0.01", "train.warmup_steps=2",
                   "train.log_every=4", "train.checkpoint_every=8", "train.keep_last=2",
                   "model.restart_every=6", "data.num_workers=0", "train.progress_bar=false"]


def tiny_overrides(etl: Path, out_dir: Path) -> list[str]:
    """Overrides that point configs/tiny/tokenizer.yaml at :func:`write_tiny_etl` data."""
    return [f"inputs.etl_dir={etl}", f"run.out_dir={out_dir}", f"model.input_dim={TINY_DIM}",
            "model.hidden_dims=[32,16]", "model.latent_dim=8", "model.K=16", "model.L=3"]


SLATE_STEPS = {"hsd": 24, "flat": 40, "sasrec": 40, "hsd_val": 32, "hsd_last": 32}
"""Optimizer steps per stage (ZeRO-3 + bf16 on CPU is the slowest: fewer steps)."""


def slate_job(stage: str, etl: Path, sid: Path, out: Path, zero: int, precision: str,
              extra_train: dict | None = None, steps: int | None = None,
              validation: dict | None = None) -> dict:
    """An hsd / flat / sasrec job config on :func:`write_slate_inputs` data."""
    model = ({"K": SLATE_K, "L": SLATE_L, "N": SLATE_N, "d_model": 32, "n_heads": 2,
              "ctx_layers": 1, "planner_layers": 2, "gen_layers": 1, "history_len": SLATE_H,
              "dropout": 0.0}
             if stage != "sasrec" else
             {"d_model": 32, "n_heads": 2, "n_layers": 1, "max_len": 16, "history_len": SLATE_H,
              "N": SLATE_N, "dropout": 0.0})
    return {
        "stage": stage,
        "run": {"name": f"test-{stage}", "out_dir": str(out), "seed": 0},
        "inputs": {"etl_dir": str(etl), "sid_dir": str(sid)},
        "data": {"num_workers": 0, "shuffle_buffer": 64},
        "train": {"zero_stage": zero, "precision": precision, "global_batch_size": 32,
                  "micro_batch_size": 16, "max_steps": steps or SLATE_STEPS[stage], "lr": 1e-2,
                  "warmup_steps": 2,
                  "weight_decay": 0.0, "checkpoint_every": 0, "log_every": 5,
                  "progress_bar": False, **(extra_train or {})},
        "validation": validation or {},
        "model": model,
        "loss": {},
    }


#: optimizer steps per preference stage
PREF_STEPS = {"orpo": 16, "dpo": 16}


def pref_job(stage: str, etl: Path, sid: Path, init: Path, out: Path, zero: int, precision: str,
             loss: dict, extra_train: dict | None = None) -> dict:
    """An orpo / dpo job config on :func:`write_pref_inputs` data, starting from ``init``."""
    return {
        "stage": stage,
        "run": {"name": f"test-{stage}", "out_dir": str(out), "seed": 0},
        "inputs": {"etl_dir": str(etl), "sid_dir": str(sid), "init_from": str(init)},
        "data": {"num_workers": 1, "shuffle_buffer": 32},
        "train": {"zero_stage": zero, "precision": precision, "global_batch_size": 32,
                  "micro_batch_size": 16, "max_steps": PREF_STEPS[stage], "lr": 1e-2,
                  "warmup_steps": 2, "weight_decay": 0.0, "checkpoint_every": 0,
                  "log_every": 4, "progress_bar": False, **(extra_train or {})},
        "model": PREF_MODEL,
        "loss": loss,
    }


def tok_job(name: str, etl: Path, out: Path, *extra: str, world: int = 2) -> dict:
    """A :mod:`farm` job of the tiny tokenizer on :func:`write_tiny_etl` data."""
    return {"name": name, "world": world, "config": str(TINY),
            "overrides": [*tiny_overrides(etl, out), *TINY_FARM_TRAIN, *extra]}


def stage_job(name: str, config: Path, **train) -> dict:
    """A job of a stage config written by :func:`write_stage_configs`, with train overrides."""
    return {"name": name, "world": 2, "config": str(config),
            "overrides": [f"train.{k}={json.dumps(v)}" for k, v in train.items()]}


def with_out(job: dict, out: Path) -> dict:
    """``job`` writing its run folder to ``out``."""
    return {**job, "overrides": [*job["overrides"], f"run.out_dir={out}"]}


def write_stage_configs(root: Path) -> dict[str, Path]:
    """HSD and ORPO job configs on the tiny inputs of :func:`write_slate_inputs` and
    :func:`write_pref_inputs` (ZeRO-1 fp32, 24 steps, checkpoints every 8)."""
    paths = {}
    etl, sid = write_slate_inputs(root / "hsd_in")
    job = slate_job("hsd", etl, sid, root / "runs" / "hsd", 1, "fp32", steps=24)
    job["train"].update(checkpoint_every=8, keep_last=2)
    paths["hsd"] = root / "hsd.yaml"
    paths["hsd"].write_text(yaml.safe_dump(job))
    etl, sid, init = write_pref_inputs(root / "orpo_in")
    job = pref_job("orpo", etl, sid, init, root / "runs" / "orpo", 1, "fp32",
                   {"lambda_or": 0.5})
    job["data"]["num_workers"] = 0
    job["train"].update(max_steps=24, checkpoint_every=8, keep_last=2)
    paths["orpo"] = root / "orpo.yaml"
    paths["orpo"].write_text(yaml.safe_dump(job))
    return paths


# --------------------------------------------------------------------------------------------
# launching jobs and reading their results
# --------------------------------------------------------------------------------------------

#: a driver script: ``driver.py CONFIG "OVERRIDES OF RUN 1" "OVERRIDES OF RUN 2" ...`` trains
#: CONFIG once per run in one process (also under the ``deepspeed`` launcher)
RUNS_DRIVER = """
import sys
from higr_dist.engine.config import load_job
from higr_dist.engine.trainer import shutdown, train

# loader workers are spawned and re-import this file: only the launch runs it
if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # deepspeed launcher
    config, runs = args[0], args[1:]
    for run in runs:
        train(load_job(config, run.split(" ")))
    shutdown()
"""

#: TensorBoard tags of a tokenizer run (``higr_dist.engine.logging.tb_tag``: health first,
#: then the objective)
TOKENIZER_TAGS = {"loss/total", "loss/rec", "loss/quant", "loss/con", "opt/lr", "opt/grad_norm",
                  "health/samples_per_s", "health/tokens_per_s", "health/step_time_s",
                  "health/data_wait_share", "health/mfu", "health/host_rss_gb",
                  "sid/perplexity_l1", "sid/dead_codes_l1"}


def dist_env() -> dict:
    """The environment of a launched job: CPU ranks (gloo), no inherited launcher variables."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"),
               CUDA_VISIBLE_DEVICES="")  # CPU ranks (gloo) even on a GPU machine
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc script args`` in the repository."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True,
                          timeout=300)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """A run's TensorBoard scalars: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def read_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def read_weights(run: Path) -> dict[str, torch.Tensor]:
    """A run's exported fp32 weights (``final/model_fp32.pt``)."""
    return torch.load(run / "final" / "model_fp32.pt")


def assert_trained(run: Path, steps: int = 24, drop: float = 0.8) -> dict:
    """A tiny tokenizer run on :func:`write_tiny_etl` data ran ``steps`` steps, saw every pair
    once per epoch and lowered its loss below ``drop`` x the first; returns its summary."""
    s = read_summary(run)
    assert s["final_step"] == steps
    # uneven shards, 2 ranks: still every sample exactly once per epoch
    assert s["epochs_completed"] >= 1 and set(s["samples_per_epoch"]) == {TINY_PAIRS}
    first, final = s["losses"]["first"]["loss/total"], s["losses"]["final"]["loss/total"]
    assert final < drop * first, (first, final)
    return s


def assert_same_weights(a: Path, b: Path, tol: float = 1e-6) -> None:
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        diff = (wa[k].double() - wb[k].double()).abs().max().item() if wa[k].numel() else 0.0
        assert diff <= tol, (k, diff)
