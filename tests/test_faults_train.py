"""Training faults on 2 CPU ranks (gloo): kills, torn checkpoints, a dead rank, non-finite
losses, empty data and a full disk (docs/RELIABILITY.md, "Training faults").

Every job is a real rank process of ``launcher/train.py`` (preflight, DeepSpeed engine, the
one-line errors and exit codes); :mod:`farm` runs many of them per import of torch. The debug
knobs of ``train`` (``kill_at_step``, ``kill_rank``, ``kill_in_save_at_step``,
``bad_loss_at_step``) inject the faults from inside the real run: a SIGKILL of every rank (or
one), a SIGKILL in the middle of writing a checkpoint file, a NaN / inf loss.

``make test`` runs the ``ci_farm`` cases (one of each promise, tokenizer and HSD); ``make
test-faults`` adds the ``full_farm``: kill and resume for tokenizer, HSD and ORPO, under ZeRO-2
and bf16 too (each stage), killed twice, a torn checkpoint for HSD, an inf loss, a rank without data, and a
full disk (a real tmpfs) while saving a checkpoint.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from farm import job_log, run_farm
from helpers import (
    assert_same_weights,
    read_summary,
    stage_job,
    tok_job,
    with_out,
    write_stage_configs,
    write_tiny_etl,
)

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]


def out_of(job: dict) -> Path:
    """The run folder a job writes (its ``run.out_dir``)."""
    for o in job["overrides"]:
        if o.startswith("run.out_dir="):
            return Path(o.split("=", 1)[1])
    return Path(yaml.safe_load(Path(job["config"]).read_text())["run"]["out_dir"])


def rcs(results: dict, name: str) -> list[int]:
    return [r["rc"] for r in results[name]]


def error_line(root: Path, name: str, rank: int = 0) -> str:
    """The job's one ``train.py: error:`` line of that rank (asserting there is exactly one,
    and no traceback)."""
    log = job_log(root, name, rank)
    lines = [ln for ln in log.splitlines() if "train.py: error:" in ln]
    assert len(lines) == 1 and "Traceback" not in log, log[-3000:]
    return lines[0]


def ckpt_tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("global_step*"))


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text()


def assert_loads(run: Path, tag: str) -> None:
    """Every file of checkpoint ``tag`` loads (what a resume reads)."""
    files = list((run / "checkpoints" / tag).glob("*.pt"))
    assert files
    for f in files:
        torch.load(f, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------
# make test: one case of each promise
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ci_farm(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_ci")
    etl = write_tiny_etl(root / "etl")
    empty = write_tiny_etl(root / "etl_empty", pair_shards=(0, 0))
    stages = write_stage_configs(root)
    runs = root / "runs"
    jobs = [
        tok_job("ref", etl, runs / "ref"),
        # kill -9 inside the write of the step-16 checkpoint, then the same command again
        tok_job("torn_a", etl, runs / "torn", "train.kill_in_save_at_step=16"),
        tok_job("torn_b", etl, runs / "torn", "train.kill_in_save_at_step=16"),
        # rank 1 dies at step 5; rank 0 must not wait for it
        tok_job("rank_dies", etl, runs / "rank_dies", "train.kill_at_step=5",
                "train.kill_rank=1", "train.dist_timeout_s=600"),
        # HSD: a NaN loss at step 6, after the step-4 checkpoint
        with_out(stage_job("hsd_nan", stages["hsd"], bad_loss_at_step=6, checkpoint_every=4),
                 runs / "hsd_nan"),
        # no training sample at all, world 2 and world 1
        tok_job("empty_w2", empty, runs / "empty_w2"),
        tok_job("empty_w1", empty, runs / "empty_w1", world=1),
    ]
    t0 = time.time()
    results = run_farm(root, jobs, timeout=900)
    print(f"ci farm: {len(jobs)} jobs in {time.time() - t0:.0f}s")
    return {"root": root, "runs": runs, "results": results, "etl": etl, "stages": stages}


@pytest.mark.faults(ci=True)
def test_kill_inside_checkpoint_write_resumes_from_the_previous_one(ci_farm):
    root, runs, res = ci_farm["root"], ci_farm["runs"], ci_farm["results"]
    assert rcs(res, "ref") == [0, 0]
    assert rcs(res, "torn_a") == [-9, -9]
    assert rcs(res, "torn_b") == [0, 0], job_log(root, "torn_b")[-3000:]
    log = job_log(root, "torn_b")
    assert "removed incomplete checkpoint" in log and "global_step16" in log
    s = read_summary(runs / "torn")
    assert s["resumed_from"] == "global_step8"
    assert s["samples_per_epoch"] == read_summary(runs / "ref")["samples_per_epoch"]
    assert_same_weights(runs / "ref", runs / "torn")


@pytest.mark.faults(ci=True)
def test_one_rank_killed_the_other_exits_within_60s(ci_farm):
    res = ci_farm["results"]["rank_dies"]
    assert res[1]["rc"] == -9  # rank 1: SIGKILLed at step 5
    assert res[0]["rc"] == 1  # rank 0: failed, not finished, not hung
    assert res[0]["end"] - res[1]["end"] < 60, res
    assert "a peer rank is gone" in error_line(ci_farm["root"], "rank_dies", 0)
    assert not (ci_farm["runs"] / "rank_dies" / "summary.json").exists()


@pytest.mark.faults(ci=True)
def test_nan_loss_stops_naming_step_and_term_last_checkpoint_intact(ci_farm):
    root, runs = ci_farm["root"], ci_farm["runs"]
    assert rcs(ci_farm["results"], "hsd_nan") == [1, 1]
    for rank in (0, 1):
        line = error_line(root, "hsd_nan", rank)
        assert "non-finite loss at step 6" in line and "loss/" in line, line
        assert "global_step4 is intact" in line, line
    run = runs / "hsd_nan"
    assert latest(run) == "global_step4" and ckpt_tags(run) == ["global_step4"]
    assert_loads(run, "global_step4")
    assert not (run / "final").exists()


@pytest.mark.faults(ci=True)
@pytest.mark.parametrize("name", ["empty_w2", "empty_w1"])
def test_no_training_sample_stops_with_one_line(ci_farm, name):
    root, res = ci_farm["root"], ci_farm["results"][name]
    assert [r["rc"] for r in res] == [2] * len(res)
    for rank in range(len(res)):
        line = error_line(root, name, rank)
        assert "gave no training sample" in line, line
    assert all(r["end"] - r["start"] < 120 for r in res), res  # no endless wait


# --------------------------------------------------------------------------------------------
# make test-faults: the rest
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_farm(ci_farm):
    root = ci_farm["root"] / "full"
    root.mkdir()
    etl, stages = ci_farm["etl"], ci_farm["stages"]
    uneven = write_tiny_etl(root / "etl_uneven", pair_shards=(100, 0))
    runs = root / "runs"
    jobs = [
        # killed twice: at step 13 (last checkpoint 8), then at 19 (last checkpoint 16)
        tok_job("twice_a", etl, runs / "twice", "train.kill_at_step=13"),
        tok_job("twice_b", etl, runs / "twice", "train.kill_at_step=19"),
        tok_job("twice_c", etl, runs / "twice", "train.kill_at_step=19"),
        # ZeRO-2 and bf16: kill at 13, resume; each against its own uninterrupted run
        tok_job("z2_ref", etl, runs / "z2_ref", "train.zero_stage=2"),
        tok_job("z2_a", etl, runs / "z2", "train.zero_stage=2", "train.kill_at_step=13"),
        tok_job("z2_b", etl, runs / "z2", "train.zero_stage=2", "train.kill_at_step=13"),
        tok_job("bf_ref", etl, runs / "bf_ref", "train.precision=bf16"),
        tok_job("bf_a", etl, runs / "bf", "train.precision=bf16", "train.kill_at_step=13"),
        tok_job("bf_b", etl, runs / "bf", "train.precision=bf16", "train.kill_at_step=13"),
        # an inf loss in the tokenizer
        tok_job("tok_inf", etl, runs / "tok_inf", "train.bad_loss_at_step=10",
                "train.bad_loss=inf"),
        # one rank whose shards hold no sample
        tok_job("rank_empty", uneven, runs / "rank_empty"),
    ]
    for stage in ("hsd", "orpo"):
        jobs += [
            with_out(stage_job(f"{stage}_ref", stages[stage]), runs / f"{stage}_ref"),
            with_out(stage_job(f"{stage}_a", stages[stage], kill_at_step=13), runs / stage),
            with_out(stage_job(f"{stage}_b", stages[stage], kill_at_step=13), runs / stage),
        ]
        z2bf = {"zero_stage": 2, "precision": "bf16"}
        jobs += [
            with_out(stage_job(f"{stage}_zb_ref", stages[stage], **z2bf),
                     runs / f"{stage}_zb_ref"),
            with_out(stage_job(f"{stage}_zb_a", stages[stage], kill_at_step=13, **z2bf),
                     runs / f"{stage}_zb"),
            with_out(stage_job(f"{stage}_zb_b", stages[stage], kill_at_step=13, **z2bf),
                     runs / f"{stage}_zb"),
        ]
    jobs += [
        with_out(stage_job("hsd_torn_a", stages["hsd"], kill_in_save_at_step=16),
                 runs / "hsd_torn"),
        with_out(stage_job("hsd_torn_b", stages["hsd"], kill_in_save_at_step=16),
                 runs / "hsd_torn"),
    ]
    t0 = time.time()
    results = run_farm(root, jobs, timeout=1800)
    print(f"full farm: {len(jobs)} jobs in {time.time() - t0:.0f}s")
    return {"root": root, "runs": runs, "results": results, "ref": ci_farm["runs"] / "ref"}


@pytest.mark.faults
def test_killed_twice_gives_the_uninterrupted_weights(full_farm):
    res, runs = full_farm["results"], full_farm["runs"]
    assert rcs(res, "twice_a") == [-9, -9] and rcs(res, "twice_b") == [-9, -9]
    assert rcs(res, "twice_c") == [0, 0]
    assert read_summary(runs / "twice")["resumed_from"] == "global_step16"
    assert_same_weights(full_farm["ref"], runs / "twice")


@pytest.mark.faults
@pytest.mark.parametrize("name", ["z2", "bf"])
def test_kill_and_resume_under_zero2_and_bf16(full_farm, name):
    res, runs = full_farm["results"], full_farm["runs"]
    assert rcs(res, f"{name}_ref") == [0, 0] and rcs(res, f"{name}_a") == [-9, -9]
    assert rcs(res, f"{name}_b") == [0, 0]
    s = read_summary(runs / name)
    assert s["resumed_from"] == "global_step8"
    assert s["precision"] == ("bf16" if name == "bf" else "fp32")
    # bf16: equal to the bf16 uninterrupted run (the same fp32 masters, the same steps)
    assert_same_weights(runs / f"{name}_ref", runs / name, tol=1e-6 if name == "z2" else 0.0)


@pytest.mark.faults
@pytest.mark.parametrize("stage", ["hsd", "orpo"])
def test_kill_and_resume_hsd_and_orpo(full_farm, stage):
    res, runs = full_farm["results"], full_farm["runs"]
    assert rcs(res, f"{stage}_ref") == [0, 0] and rcs(res, f"{stage}_a") == [-9, -9]
    assert rcs(res, f"{stage}_b") == [0, 0], job_log(full_farm["root"], f"{stage}_b")[-3000:]
    assert read_summary(runs / stage)["resumed_from"] == "global_step8"
    assert_same_weights(runs / f"{stage}_ref", runs / stage)


@pytest.mark.faults
@pytest.mark.parametrize("stage", ["hsd", "orpo"])
def test_kill_and_resume_hsd_and_orpo_under_zero2_bf16(full_farm, stage):
    res, runs = full_farm["results"], full_farm["runs"]
    name = f"{stage}_zb"
    assert rcs(res, f"{name}_ref") == [0, 0] and rcs(res, f"{name}_a") == [-9, -9]
    assert rcs(res, f"{name}_b") == [0, 0], job_log(full_farm["root"], f"{name}_b")[-3000:]
    s = read_summary(runs / name)
    assert s["resumed_from"] == "global_step8" and s["precision"] == "bf16"
    assert s["zero_stage_effective"] == 2
    # equal to the bf16 uninterrupted run: the same fp32 masters, the same steps
    assert_same_weights(runs / f"{name}_ref", runs / name, tol=0.0)


@pytest.mark.faults
def test_hsd_torn_checkpoint(full_farm):
    res, runs = full_farm["results"], full_farm["runs"]
    assert rcs(res, "hsd_torn_a") == [-9, -9] and rcs(res, "hsd_torn_b") == [0, 0]
    assert read_summary(runs / "hsd_torn")["resumed_from"] == "global_step8"
    assert_same_weights(runs / "hsd_ref", runs / "hsd_torn")


@pytest.mark.faults
def test_inf_loss_names_step_and_term(full_farm):
    root, res, run = full_farm["root"], full_farm["results"], full_farm["runs"] / "tok_inf"
    assert rcs(res, "tok_inf") == [1, 1]
    line = error_line(root, "tok_inf")
    assert "non-finite loss at step 10" in line and "loss/" in line, line
    assert latest(run) == "global_step8" and ckpt_tags(run) == ["global_step8"]
    assert_loads(run, "global_step8")


@pytest.mark.faults
def test_a_rank_without_data_stops_every_rank(full_farm):
    root, res = full_farm["root"], full_farm["results"]["rank_empty"]
    assert [r["rc"] for r in res] == [2, 2]
    for rank in (0, 1):
        assert "had no sample of their own" in error_line(root, "rank_empty", rank)


@pytest.fixture
def ckpt_disk(tmp_path):
    """A tmpfs for a run's checkpoints (we are root in CI's container; skipped where
    mounting is refused). Yields (mount point, remount(size))."""
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size: int, remount: bool = False) -> subprocess.CompletedProcess:
        opts = f"{'remount,' if remount else ''}size={size}"
        return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                              capture_output=True, text=True)

    yield mnt, mount
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.faults
def test_disk_full_while_saving_a_checkpoint(ci_farm, ckpt_disk, tmp_path):
    mnt, mount = ckpt_disk
    ref = ci_farm["runs"] / "ref"
    tag = ref / "checkpoints" / "global_step24"
    pages = sum(-(-f.stat().st_size // 4096) * 4096 for f in tag.rglob("*") if f.is_file())
    size = int(1.5 * pages) // 4096 * 4096 + 8192  # one checkpoint fits, two do not
    proc = mount(size)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(mnt)
    etl = ci_farm["etl"]
    jobs = [tok_job("full_a", etl, run), tok_job("full_b", etl, run)]
    res = run_farm(tmp_path / "farm_a", jobs[:1])
    assert rcs(res, "full_a") == [1, 1]
    for rank in (0, 1):
        line = error_line(tmp_path / "farm_a", "full_a", rank)
        assert "could not be written" in line and "No space left on device" in line, line
        assert "global_step8 is intact" in line, line
    assert latest(run) == "global_step8" and ckpt_tags(run) == ["global_step8"]
    assert_loads(run, "global_step8")
    assert mount(64 * size, remount=True).returncode == 0  # room again: the rerun resumes
    res = run_farm(tmp_path / "farm_b", jobs[1:])
    assert rcs(res, "full_b") == [0, 0], job_log(tmp_path / "farm_b", "full_b")[-3000:]
    assert read_summary(run)["resumed_from"] == "global_step8"
    assert_same_weights(ref, run)
