"""The CUDA path's multi-rank fixes (issue 23) under real gloo ranks on the CPU.

1. Two spawned ranks (``torch.distributed`` through the trainer's own ``init_distributed``):
   - the shared-path check passes on one shared run folder and fails, on every rank with one
     line, on per-rank run folders or when a rank sees other shards;
   - the resume decision is rank 0's: a rank with a stale ``latest`` still resumes from rank
     0's tag, and a rank that cannot see that tag's folder fails every rank (no split, no hang);
   - bf16 engines built from our DeepSpeed config accumulate and reduce gradients in fp32
     (ZeRO-1 -> BF16_Optimizer, ZeRO-2), report their gradient norm, and the fp32 export is
     assembled on rank 0 only.
2. A world of one (plain ``python``), SASRec with ``HIGR_ZERO_AT_WORLD_ONE=1`` under ZeRO-3:
   the chunked cross-entropy trains exactly like the full softmax through the engine (the tied
   table is gathered inside the model's forward), and the logged MFU counts the catalogue
   softmax (FLOPs asked after ``build``).
3. The tiny tokenizer on 2 ranks in bf16 under ZeRO-1 (BF16_Optimizer): killed, relaunched,
   resumed from the agreed checkpoint, with a logged gradient norm.

~1.5 min in all on 2 cores, mostly process start-up (5 processes importing DeepSpeed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from helpers import (
    SLATE_NUM_ITEMS,
    TINY,
    TINY_TRAIN,
    assert_ok,
    dist_env,
    free_port,
    read_scalars,
    read_summary,
    slate_job,
    tiny_overrides,
    torchrun,
    write_slate_inputs,
    write_tiny_etl,
)

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# 1. two ranks, in-process collectives
# --------------------------------------------------------------------------------------------


def _outcome(fn) -> str:
    try:
        return f"ok {fn()}"
    except (RuntimeError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from higr_dist.engine import checkpoint as ckpt
    from higr_dist.engine.config import TrainConfig
    from higr_dist.engine.preflight import check_shared_paths
    from higr_dist.engine.trainer import (
        build_engine,
        global_grad_norm,
        init_distributed,
        reports_grad_norm,
        shutdown,
    )

    base = Path(root)
    init_distributed(120.0)
    out: dict = {}
    pairs = base / "etl" / "pairs"
    out["shared"] = _outcome(lambda: check_shared_paths(base / "out", pairs, wait_s=0.5))
    out["per_rank_out"] = _outcome(
        lambda: check_shared_paths(base / f"out{rank}", pairs, wait_s=0.5))
    mine = base / ("etl" if rank == 0 else "etl_other") / "pairs"
    out["other_shards"] = _outcome(lambda: check_shared_paths(base / "out", mine, wait_s=0.5))
    out["stale_latest"] = _outcome(lambda: ckpt.agreed_latest_tag(base / f"stale{rank}"))
    out["missing_tag"] = _outcome(lambda: ckpt.agreed_latest_tag(base / f"missing{rank}"))
    out["no_checkpoint"] = _outcome(lambda: ckpt.agreed_latest_tag(base / "none"))

    for zero in (1, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                    torch.nn.Linear(16, 2))
        train = TrainConfig(zero_stage=zero, precision="bf16", global_batch_size=16,
                            micro_batch_size=4, lr=1e-2)
        engine, _, ds_cfg = build_engine(model, train, 2, "cpu", 4)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank), dtype=torch.bfloat16)
        for _ in range(2 * train.grad_accum(2)):  # two optimizer steps
            engine.backward(engine(x).float().pow(2).mean())
            engine.step()
        state = ckpt.consolidated_fp32_state_dict(engine)
        out[f"zero{zero}"] = {
            "optimizer": type(engine.optimizer).__name__,
            "reports_norm": reports_grad_norm(engine.optimizer),
            "grad_norm": global_grad_norm(engine),
            "accum_dtype": str(engine.get_data_types()[1]),
            "comm_dtype": str(engine.communication_data_type),
            "ds_data_types": ds_cfg.get("data_types"),
            "export_keys": sorted(state),
            "export_dtypes": sorted({str(v.dtype) for v in state.values()}),
        }
        engine.destroy()
    (base / f"rank{rank}.json").write_text(json.dumps(out))
    shutdown()


def _checkpoint_dir(path: Path, tags: list[int], latest: int) -> None:
    for step in tags:
        (path / f"global_step{step}").mkdir(parents=True)
    (path / "latest").write_text(f"global_step{latest}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("gpu_path_dist")
    etl = write_tiny_etl(root / "etl")
    other = root / "etl_other"
    shutil.copytree(etl, other)
    shard = sorted((other / "pairs").glob("*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[:-512])  # a truncated copy on "another node"
    _checkpoint_dir(root / "stale0", [4, 8], latest=8)
    _checkpoint_dir(root / "stale1", [4, 8], latest=4)  # a stale view of the same folder
    _checkpoint_dir(root / "missing0", [4, 8], latest=8)
    _checkpoint_dir(root / "missing1", [4], latest=4)
    mp.start_processes(_worker, args=(free_port(), str(root)), nprocs=2, join=True,
                       start_method="spawn")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_shared_path_check(two_ranks):
    r0, r1 = two_ranks
    assert r0["shared"] == r1["shared"] == "ok None"
    # the same line on every rank (up to the path each rank was given, here per rank)
    assert r1["per_rank_out"] == r0["per_rank_out"].replace("out0", "out1")
    assert r1["other_shards"] == r0["other_shards"].replace("/etl/", "/etl_other/")
    for key in ("per_rank_out", "other_shards"):
        assert r0[key].startswith("RuntimeError: ") and "\n" not in r0[key]
        assert "rank(s) 1 on " in r0[key]
    assert "run.out_dir " in r0["per_rank_out"] and "out0 is not shared" in r0["per_rank_out"]
    assert "training shards " in r0["other_shards"] and "pairs differ" in r0["other_shards"]


def test_resume_decision_is_rank_zeros(two_ranks):
    r0, r1 = two_ranks
    assert r0["stale_latest"] == r1["stale_latest"] == "ok global_step8"
    assert r1["missing_tag"] == r0["missing_tag"].replace("missing0", "missing1")
    assert r0["missing_tag"].startswith("RuntimeError: rank 0 resumes from ")
    assert "rank(s) 1 cannot see that folder" in r0["missing_tag"]
    assert r0["no_checkpoint"] == r1["no_checkpoint"] == "ok None"


@pytest.mark.parametrize("zero, optimizer", [(1, "BF16_Optimizer"),
                                             (2, "DeepSpeedZeroOptimizer")])
def test_bf16_engines_accumulate_in_fp32_and_export_on_rank_zero(two_ranks, zero, optimizer):
    r0, r1 = (r[f"zero{zero}"] for r in two_ranks)
    for r in (r0, r1):
        assert r["optimizer"] == optimizer and r["reports_norm"]
        assert r["accum_dtype"] == r["comm_dtype"] == "torch.float32"
        assert r["ds_data_types"] == {"grad_accum_dtype": "fp32"}
        assert r["grad_norm"] is not None and 0 < r["grad_norm"] < float("inf")
    assert r0["grad_norm"] == pytest.approx(r1["grad_norm"])  # one global norm
    assert r0["export_keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert r0["export_dtypes"] == ["torch.float32"]
    assert r1["export_keys"] == []  # no host copy of the model on the other ranks


# --------------------------------------------------------------------------------------------
# 2. SASRec chunked vs full under ZeRO-3 at world one; MFU counts the softmax
# --------------------------------------------------------------------------------------------


DRIVER = """
import sys
from higr_dist.engine.config import load_job
from higr_dist.engine.trainer import shutdown, train

if __name__ == "__main__":
    for config in sys.argv[1:]:
        train(load_job(config))
    shutdown()
"""


def test_sasrec_chunked_loss_under_zero3_and_its_flops(tmp_path):
    from higr_dist.models.sasrec import SASRecConfig, SASRecLossConfig
    from higr_dist.stages.base import StageInputs
    from higr_dist.stages.hsd import SASRecStage

    etl, sid = write_slate_inputs(tmp_path)
    configs = []
    for name, chunk in (("full", 0), ("chunked", 7)):
        job = slate_job("sasrec", etl, sid, tmp_path / name, 3, "fp32",
                        {"peak_tflops": 1.0, "log_every": 1}, steps=6)
        job["loss"] = {"chunk_items": chunk}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job))
        configs.append(str(tmp_path / f"{name}.yaml"))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(dist_env(), HIGR_ZERO_AT_WORLD_ONE="1")
    assert_ok(subprocess.run([sys.executable, str(tmp_path / "driver.py"), *configs],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300))
    full, chunked = (read_scalars(tmp_path / n) for n in ("full", "chunked"))
    assert read_summary(tmp_path / "chunked")["zero_stage_effective"] == 3
    losses = [v for _, v in full["loss/total"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # same objective, same gradients -> the same trajectory, step by step
    assert [v for _, v in chunked["loss/total"]] == pytest.approx(losses, rel=1e-4)
    # MFU x peak / samples per second = FLOPs per sample, with the catalogue softmax
    cfg = SASRecConfig(**slate_job("sasrec", etl, sid, tmp_path, 3, "fp32")["model"])
    loss, inputs = SASRecLossConfig(), StageInputs(sid_dir=str(sid))
    want = SASRecStage().flops_per_sample(replace(cfg, num_items=SLATE_NUM_ITEMS), loss, inputs)
    assert want == SASRecStage().flops_per_sample(cfg, loss, inputs)  # num_items 0: the table's
    assert want > SASRecStage().flops_per_sample(replace(cfg, num_items=1), loss, inputs)
    for (_, mfu), (_, per_s) in zip(full["health/mfu"], full["health/samples_per_s"]):
        assert mfu * 1e12 / per_s == pytest.approx(want, rel=1e-3)


# --------------------------------------------------------------------------------------------
# 3. 2 ranks, bf16 ZeRO-1 (BF16_Optimizer): kill, relaunch, resume
# --------------------------------------------------------------------------------------------


def test_bf16_zero1_kill_and_resume_on_two_ranks(tmp_path):
    etl = write_tiny_etl(tmp_path / "etl")
    run = tmp_path / "run"
    args = ["--config", str(TINY), *tiny_overrides(etl, run), *TINY_TRAIN,
            "train.precision=bf16", "train.zero_stage=1", "train.progress_bar=false",
            "data.num_workers=0", "train.max_steps=12", "train.checkpoint_every=4",
            "train.kill_at_step=6"]
    killed = torchrun("launcher/train.py", args)
    assert killed.returncode != 0
    assert (run / "checkpoints" / "latest").read_text() == "global_step4"
    assert_ok(torchrun("launcher/train.py", args))  # the same command resumes
    s = read_summary(run)
    assert (s["world_size"], s["precision"], s["zero_stage_effective"]) == (2, "bf16", 1)
    assert s["resumed_from"] == "global_step4" and s["final_step"] == 12
    first, final = s["losses"]["first"]["loss/total"], s["losses"]["final"]["loss/total"]
    assert final < first
    norms = [v for _, v in read_scalars(run)["opt/grad_norm"]]
    assert norms and all(0 < v < float("inf") for v in norms)  # BF16_Optimizer's own norm
