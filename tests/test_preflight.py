"""Preflight: bad configs and hostfiles are rejected with one clear line each, never a traceback.

In-process calls of ``preflight(...)`` / ``main(argv)`` against real shards on disk, plus one
plain ``python launcher/train.py`` run that must exit 2 before initialising anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_overrides, write_tiny_etl

from higr_dist.configs import HERE as CONFIGS
from higr_dist.engine.hostfile import parse_hostfile_text, world_size
from higr_dist.engine.preflight import main, preflight

ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIGS / "tiny" / "tokenizer.yaml"


@pytest.fixture(scope="module")
def etl(tmp_path_factory) -> Path:
    return write_tiny_etl(tmp_path_factory.mktemp("preflight") / "etl")


@pytest.fixture
def ok(etl, tmp_path) -> list[str]:
    """Overrides that make configs/tiny/tokenizer.yaml valid for the tiny shards."""
    return tiny_overrides(etl, tmp_path / "run")


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)


def _hostfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def test_valid_job_passes(ok, tmp_path, capsys):
    assert preflight(TINY, ok, world_size=2) == []
    hosts = _hostfile(tmp_path, "# two nodes\nnode-a slots=2\n\nnode-b slots=2  # comment\n")
    assert preflight(TINY, ok, hostfile=hosts) == []  # world 4: 64 = 16 x 1 x 4
    assert main(["--config", str(TINY), "--world-size", "2", *ok]) == 0
    assert "preflight: OK" in capsys.readouterr().out


def test_unknown_keys_and_wrong_types(ok):
    problems = preflight(TINY, [*ok, "train.zero_stagee=2", "train.lr=fast", "data.bogus=1",
                                "model.latentdim=3"])
    assert any(p.startswith("train.zero_stagee: unknown key (did you mean 'zero_stage'?)")
               for p in problems)
    assert any(p == "train.lr: expected a number, got 'fast'" for p in problems)
    assert any(p.startswith("data.bogus: unknown key") for p in problems)
    assert any(p.startswith("model.latentdim: unknown key (did you mean 'latent_dim'?)")
               for p in problems)
    assert len(problems) == 4


def test_zero_stage_out_of_range(ok):
    assert preflight(TINY, [*ok, "train.zero_stage=4"]) == [
        "train: zero_stage: must be 0, 1, 2 or 3, got 4"]


def test_missing_shard_directory(ok, tmp_path):
    problems = preflight(TINY, [*ok, f"data.shards={tmp_path / 'nowhere'}"])
    assert problems == [f"shard directory not found: {tmp_path / 'nowhere'} (run the ETL "
                        "first, or fix data.shards)"]


def test_too_few_shards_for_ranks_times_workers(ok, etl):
    problems = preflight(TINY, [*ok, "data.num_workers=2", "train.global_batch_size=64"],
                         world_size=4)
    assert problems == [f"too few shards: 4 in {etl / 'pairs'} for 4 rank(s) x 2 worker(s) = 8 "
                        "readers (each reader streams whole shards); lower data.num_workers or "
                        "write more shards"]


def test_batch_sizes_must_divide(ok):
    (problem,) = preflight(TINY, ok, world_size=3)
    assert problem.startswith("train.global_batch_size (64) must be a multiple of "
                              "train.micro_batch_size x world size (16 x 3 = 48)")
    assert preflight(TINY, [*ok, "train.global_batch_size=40"]) == [
        "train: global_batch_size (40) must be a multiple of micro_batch_size (16)"]


def test_stage_inputs_checked(ok):
    problems = preflight(TINY, [*ok, "model.input_dim=32"])
    assert len(problems) == 1 and problems[0].startswith("model.input_dim: 32 but the items")


def test_hostfile_syntax_duplicates_and_slots(ok, tmp_path):
    hosts = _hostfile(tmp_path, "node-a slots=2\nnode-b slots=two\nnode-c\nnode-a slots=2\n"
                                "node-d slots=0\n")
    problems = preflight(TINY, ok, hostfile=hosts)
    assert problems == [
        f"{hosts}:2: slots must be a positive integer, got 'two'",
        f"{hosts}:3: expected '<host> slots=<N>', got 'node-c'",
        f"{hosts}:4: duplicate host 'node-a' (first on line 1)",
        f"{hosts}:5: slots must be a positive integer, got '0'",
    ]
    assert preflight(TINY, ok, hostfile=tmp_path / "absent") == [
        f"hostfile not found: {tmp_path / 'absent'}"]


def test_hostfile_slots_must_match_world_size(ok, tmp_path, monkeypatch):
    hosts = _hostfile(tmp_path, "node-a slots=2\nnode-b slots=2\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    problems = preflight(TINY, ok, hostfile=hosts)
    assert problems == [f"hostfile {hosts}: 2 host(s) with 4 slots in total, but WORLD_SIZE=2 "
                        "(launch with all slots or fix the slots)"]
    monkeypatch.delenv("WORLD_SIZE")
    problems = preflight(TINY, ok, hostfile=hosts, world_size=8)
    assert problems[0] == f"hostfile {hosts}: 4 slots in total, but --world-size 8"
    assert "(16 x 8 = 128)" in problems[1]  # and the batch check uses the world size asked for


def test_precision_unsupported_on_device(ok):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this machine supports fp16")
    (problem,) = preflight(TINY, [*ok, "train.precision=fp16"])
    assert problem.startswith("train.precision: fp16 is not supported on this device")


def test_main_prints_every_problem_and_exits_2(ok, capsys):
    rc = main(["--config", str(TINY), "--world-size", "3", *ok, "train.zero_stage=9",
               "train.bogus=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines()[0] == "preflight: 2 problem(s):"
    assert "  - train.bogus: unknown key" in err and "zero_stage: must be 0, 1, 2 or 3" in err
    assert "Traceback" not in err
    assert main(["--config", "configs/none.yaml"]) == 2
    assert "config file not found: configs/none.yaml" in capsys.readouterr().err


def test_hostfile_parser_and_example():
    hosts, problems = parse_hostfile_text((ROOT / "hostfile.example").read_text())
    assert problems == [] and len(hosts) == 4 and world_size(hosts) == 32
    assert [h.name for h in hosts][0] == "h20-node-01"
    assert parse_hostfile_text("# only comments\n")[1] == ["hostfile: no hosts (expected lines "
                                                          "like 'node1 slots=8')"]


def test_launcher_fails_fast_with_exit_code_2(ok, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "launcher/train.py", "--config", str(TINY), *ok,
                           "model.input_dim=32", "data.shards=/no/such/dir"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "preflight: 2 problem(s):" in proc.stderr
    assert "  - model.input_dim: 32 but the items in" in proc.stderr
    assert "shard directory not found: /no/such/dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    # nothing was initialised: no process group, no DeepSpeed engine, no run folder
    assert not (tmp_path / "run").exists()
    assert "deepspeed" not in (proc.stdout + proc.stderr).lower()


def test_launcher_accepts_the_deepspeed_local_rank_argument():
    """``deepspeed`` starts ``higr_dist.launch --local_rank=<n> <user args>``; torchrun does not
    pass it. Both spellings parse, before or after the options."""
    from higr_dist import launch as launcher

    a = launcher.parse_args(["--local_rank=1", "--config", "c.yaml", "train.zero_stage=2"])
    assert (a.local_rank, a.config, a.overrides) == (1, "c.yaml", ["train.zero_stage=2"])
    b = launcher.parse_args(["--config", "c.yaml", "--local-rank", "3"])
    assert (b.local_rank, b.overrides) == (3, [])
    assert launcher.parse_args(["--config", "c.yaml"]).local_rank is None


def test_zero_options_checked_against_deepspeed_schema(ok):
    problems = preflight(TINY, [*ok, "train.zero_options={overlap_com: true, "
                                     "reduce_bucket_size: big}"])
    assert sorted(problems) == [
        "train.zero_options.overlap_com: Extra inputs are not permitted",
        "train.zero_options.reduce_bucket_size: Input should be a valid integer, unable to parse "
        "string as an integer"]
    assert preflight(TINY, [*ok, "train.zero_options={stage: 2}"]) == [
        "train: zero_options.stage: set train.zero_stage instead"]
    assert preflight(TINY, [*ok, "train.zero_options={overlap_comm: true, "
                                 "reduce_bucket_size: 2000000}"]) == []
