"""Resume on a different world size (docs/RELIABILITY.md): a checkpoint written by 2 ranks
resumes on 1 and one written by 1 resumes on 2, model, optimizer, LR schedule and step exact,
every training sample of the interrupted epoch seen once.

Real two-rank ``launcher/train.py`` jobs on the farm (``tests/farm.py``), HSD (ZeRO-1 fp32,
8 steps an epoch, checkpoints every 6 steps so they fall mid-epoch) and, in ``make
test-faults``, the tokenizer under ZeRO-2 bf16 (its world of one runs DeepSpeed's bf16
optimizer at ZeRO-0, the other way round from ZeRO-2's flat partitions) and ZeRO-3 fp32.

What is checked, and by whom:
- the trainer itself, when it resumes on another world size, reads every parameter's weight,
  fp32 master and Adam moments back through DeepSpeed's getters and raises unless each equals
  the converted checkpoint; its log line says so (asserted here);
- independently, a run resumed and stopped at once (``max_steps`` = the checkpoint's step)
  exports the weights it loaded: they equal DeepSpeed's own consolidation of the source
  checkpoint (``zero_to_fp32``; for a ZeRO-0 source, its model state), to the bit;
- the LR and step the resumed run logs are the checkpoint's; the samples of each epoch,
  counted over the ranks, equal the uninterrupted run's (none lost, none twice: the loader's
  exactly-once dealing is proven sample by sample in ``tests/test_loader.py``).
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
import yaml
from farm import job_log, run_farm
from helpers import (
    read_summary,
    read_weights,
    stage_job,
    tok_job,
    with_out,
    write_stage_configs,
    write_tiny_etl,
)

from higr_dist.engine.ds_config import WarmupCosine
from higr_dist.engine.trainer import listed_samples

pytestmark = pytest.mark.dist

HSD = {"checkpoint_every": 6, "keep_last": 3}


def hsd_job(name: str, config, out, world: int, **train) -> dict:
    job = with_out(stage_job(name, config, **HSD, **train), out)
    job["overrides"].append("validation.every_epochs=0")
    job["world"] = world
    return job


def _farm(root, jobs) -> dict:
    t0 = time.time()
    results = run_farm(root, jobs, timeout=1800)
    print(f"reshard farm: {len(jobs)} jobs in {time.time() - t0:.0f}s")
    return results


@pytest.fixture(scope="module")
def hsd_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard_hsd")
    cfg = write_stage_configs(root)["hsd"]
    runs = root / "runs"
    jobs = [
        hsd_job("ref2", cfg, runs / "ref2", 2),
        hsd_job("ref1", cfg, runs / "ref1", 1),
        # 2 -> 1: killed at 14 (last checkpoint 12, mid-epoch 1), resumed on one rank
        hsd_job("d21_a", cfg, runs / "d21", 2, kill_at_step=14),
        hsd_job("d21_b", cfg, runs / "d21", 1),
        # 1 -> 2
        hsd_job("d12_a", cfg, runs / "d12", 1, kill_at_step=14),
        hsd_job("d12_b", cfg, runs / "d12", 2),
        # resumed and stopped at once: the export is what was loaded
        hsd_job("x21_a", cfg, runs / "x21", 2, kill_at_step=12),
        hsd_job("x21_b", cfg, runs / "x21", 1, max_steps=12),
        hsd_job("x12_a", cfg, runs / "x12", 1, kill_at_step=12),
        hsd_job("x12_b", cfg, runs / "x12", 2, max_steps=12),
    ]
    return {"root": root, "runs": runs, "results": _farm(root, jobs)}


def rcs(farm: dict, name: str) -> list[int]:
    return [r["rc"] for r in farm["results"][name]]


def killed_then_resumed(farm: dict, name: str, old: int, new: int) -> str:
    """Job ``<name>_a`` (``old`` ranks) was killed, ``<name>_b`` (``new`` ranks) finished
    resuming it: its one resume line."""
    assert rcs(farm, f"{name}_a") == [-9] * old
    assert rcs(farm, f"{name}_b") == [0] * new, job_log(farm["root"], f"{name}_b")[-3000:]
    return resume_line(farm, f"{name}_b")


def resume_line(farm: dict, name: str) -> str:
    lines = [ln for ln in job_log(farm["root"], name).splitlines() if "resumed from" in ln]
    assert len(lines) == 1, job_log(farm["root"], name)[-3000:]
    return lines[0]


def source_weights(tag_dir) -> dict[str, torch.Tensor]:
    """DeepSpeed's own fp32 consolidation of a checkpoint tag (ZeRO-0: its module state)."""
    if list(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


@pytest.mark.faults(ci=True)
@pytest.mark.parametrize("d", ["d21", "d12"])
def test_resume_on_another_world_size_finishes_with_every_sample_once(hsd_runs, d):
    old, new = (2, 1) if d == "d21" else (1, 2)
    line = killed_then_resumed(hsd_runs, d, old, new)
    assert f"written by {old} rank(s)" in line and f"on {new}: step 12, epoch 1" in line, line
    assert "checked equal to the checkpoint" in line, line
    run, ref = hsd_runs["runs"] / d, hsd_runs["runs"] / f"ref{new}"
    s, r = read_summary(run), read_summary(ref)
    assert s["resumed_from"] == "global_step12" and s["world_size"] == new
    assert s["final_step"] == r["final_step"] == 24
    # every epoch, the interrupted one included, saw exactly the uninterrupted run's samples
    assert s["samples_per_epoch"] == r["samples_per_epoch"], (s, r)
    # the LR the resumed run goes on from is the schedule's after 12 steps
    cfg = yaml.safe_load((run / "resolved_config.yaml").read_text())["train"]
    want = cfg["lr"] * WarmupCosine(cfg["warmup_steps"], 24, cfg["min_lr_ratio"])(12)
    got = float(re.search(r"lr ([0-9.e+-]+);", line).group(1))
    assert abs(got - want) <= 1e-3 * want, (got, want)
    assert s["export"]["roundtrip"]["checked"] and "error" not in s["export"]["roundtrip"]
    assert all(torch.isfinite(t).all() for t in read_weights(run).values())


@pytest.mark.faults(ci=True)
@pytest.mark.parametrize("x", ["x21", "x12"])
def test_resumed_weights_equal_deepspeeds_consolidation_of_the_source(hsd_runs, x):
    old, new = (2, 1) if x == "x21" else (1, 2)
    killed_then_resumed(hsd_runs, x, old, new)
    run = hsd_runs["runs"] / x
    want = source_weights(run / "checkpoints" / "global_step12")
    got = read_weights(run)
    params = [k for k in want if k in got]
    assert params and len(params) == len(want)
    for k in params:
        assert torch.equal(got[k], want[k].float()), k


@pytest.fixture(scope="module")
def tok_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard_tok")
    etl = write_tiny_etl(root / "etl")
    runs = root / "runs"
    bf = ("train.zero_stage=2", "train.precision=bf16")
    z3 = ("train.zero_stage=3",)
    jobs = [tok_job("t_a", etl, runs / "t", *bf, "train.kill_at_step=13"),
            tok_job("t_b", etl, runs / "t", *bf, world=1),
            tok_job("u_a", etl, runs / "u", *bf, "train.kill_at_step=13", world=1),
            tok_job("u_b", etl, runs / "u", *bf),
            tok_job("z_a", etl, runs / "z", *z3, "train.kill_at_step=13"),
            tok_job("z_b", etl, runs / "z", *z3, world=1),
            tok_job("y_a", etl, runs / "y", *z3, "train.kill_at_step=13", world=1),
            tok_job("y_b", etl, runs / "y", *z3)]
    return {"root": root, "runs": runs, "etl": etl, "results": _farm(root, jobs)}


@pytest.mark.faults
@pytest.mark.parametrize("name,old,new", [("t", 2, 1), ("u", 1, 2), ("z", 2, 1), ("y", 1, 2)])
def test_tokenizer_bf16_zero2_and_zero3_resume_across_world_sizes(tok_runs, name, old, new):
    line = killed_then_resumed(tok_runs, name, old, new)
    assert f"written by {old} rank(s)" in line and "checked equal" in line, line
    s = read_summary(tok_runs["runs"] / name)
    assert s["resumed_from"] == "global_step8"
    assert s["precision"] == ("bf16" if name in "tu" else "fp32")
    # every finished epoch, the resharded one included, saw each of the listed pairs once
    # (how many epochs 24 steps finish depends on the world size: ranks read whole shards)
    listed = listed_samples(tok_runs["etl"] / "pairs")
    assert listed and s["final_step"] == 24 and len(s["samples_per_epoch"]) >= 5
    assert set(s["samples_per_epoch"]) == {float(listed)}, s["samples_per_epoch"]
    assert json.dumps(s["export"]["roundtrip"]).count("error") == 0
