"""The engine for real: 2 CPU ranks (gloo) under torchrun, training the real tokenizer stage.

Launches (each process imports torch + DeepSpeed, ~4 s; the whole file takes ~1.5 min on 2
cores):

1. reference: ``torchrun launcher/train.py --config configs/tiny/tokenizer.yaml`` (ZeRO-1,
   fp32) -> loss falls, TensorBoard tags, run folder, fp32 export, stage export;
2. killed: the same job with ``train.kill_at_step`` -> every rank SIGKILLs itself mid-run;
3. resumed: the same command again -> resumes from the last checkpoint and must end with the
   reference's weights, loss, LR and step;
4. ZeRO-2, ZeRO-3 and bf16 jobs in one ``deepspeed --num_gpus 2`` launch (a driver calling
   ``engine.train`` three times; on CPU the launcher starts CPU ranks);
5. a world of one without any launcher (plain ``python``), three runs in one process: the
   golden run (``tests/golden_regen.py``: the tiny config as shipped, 10 steps, losses must
   match ``tests/golden/tokenizer_tiny.json``), ZeRO-0 training, then RQ-KMeans (nothing to
   train).

The shards are uneven on purpose (56/56/56/24 pairs) so ranks hold different numbers of
batches every epoch; every run checks each epoch saw every sample exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from golden_regen import GOLDEN, golden_overrides, read_losses, write_golden_etl
from helpers import (
    ROOT,
    RUNS_DRIVER,
    TINY,
    TINY_DIM,
    TINY_TRAIN,
    TOKENIZER_TAGS,
    assert_ok,
    assert_trained,
    dist_env,
    free_port,
    read_scalars,
    read_summary,
    tiny_overrides,
    torchrun,
    write_tiny_etl,
)

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def etl(tmp_path_factory) -> Path:
    return write_tiny_etl(tmp_path_factory.mktemp("engine") / "etl")


@pytest.fixture(scope="module")
def reference(etl) -> Path:
    run = etl.parent / "reference"
    assert_ok(torchrun("launcher/train.py",
                       ["--config", str(TINY), *tiny_overrides(etl, run), *TINY_TRAIN]))
    return run


def test_launcher_trains_tokenizer_on_two_ranks(reference):
    s = assert_trained(reference)
    assert (s["world_size"], s["zero_stage"], s["precision"]) == (2, 1, "fp32")
    assert s["resumed_from"] is None and s["throughput"]["median_samples_per_s"] > 0
    assert 0 <= s["throughput"]["data_wait_share"] < 1  # whole run, rank 0
    # run folder: metadata, the last M checkpoints, fp32 export, stage export
    assert "git_sha" in json.loads((reference / "run_meta.json").read_text())
    assert "zero_stage: 1" in (reference / "resolved_config.yaml").read_text()
    tags = sorted(p.name for p in (reference / "checkpoints").glob("global_step*"))
    assert tags == ["global_step16", "global_step24"]
    assert (reference / "checkpoints" / "latest").read_text() == "global_step24"
    from higr_dist.models.pcrq_vae import PCRQVAE, PCRQVAEConfig

    state = torch.load(reference / "final" / "model_fp32.pt")
    assert all(t.dtype in (torch.float32, torch.int64, torch.bool) for t in state.values())
    model = PCRQVAE(PCRQVAEConfig(input_dim=TINY_DIM, hidden_dims=[32, 16], latent_dim=8, K=16,
                                  L=3))
    model.load_state_dict(state)  # strict: the consolidated dict is complete
    assert bool(model.quantizer.initialized)
    sids = __import__("numpy").load(reference / "export" / "sid_table.npy")
    assert sids.shape == (96, 3) and len({tuple(r) for r in sids}) == 96
    assert s["export"]["num_items"] == 96


def test_tensorboard_has_every_scalar(reference):
    scalars = read_scalars(reference)
    assert TOKENIZER_TAGS <= set(scalars), TOKENIZER_TAGS - set(scalars)
    assert [step for step, _ in scalars["loss/total"]] == [4, 8, 12, 16, 20, 24]
    lrs = [v for _, v in scalars["opt/lr"]]
    assert lrs[0] > lrs[-1] > 0  # cosine decay after the 2-step warmup
    assert all(0 <= v <= 1 for _, v in scalars["health/data_wait_share"])
    assert all(v > 0 for _, v in scalars["health/mfu"])
    # codebook diagnostics have their own group: loss/ holds only the objective's terms
    assert not [t for t in scalars if t.startswith("loss/") and ("perplexity" in t or "dead" in t)]


def test_killed_run_resumes_to_identical_weights(reference, etl):
    run = etl.parent / "killed"
    args = ["--config", str(TINY), *tiny_overrides(etl, run), *TINY_TRAIN,
            "train.kill_at_step=13"]
    killed = torchrun("launcher/train.py", args)
    assert killed.returncode != 0  # SIGKILLed at step 13, last checkpoint at step 8
    assert not (run / "summary.json").exists()
    assert (run / "checkpoints" / "latest").read_text() == "global_step8"
    assert_ok(torchrun("launcher/train.py", args))  # the same command again: resumes
    s, ref = read_summary(run), read_summary(reference)
    assert s["resumed_from"] == "global_step8" and s["final_step"] == ref["final_step"]
    assert s["samples_per_epoch"] == ref["samples_per_epoch"]
    a = torch.load(reference / "final" / "model_fp32.pt")
    b = torch.load(run / "final" / "model_fp32.pt")
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item()
        assert diff < 1e-6, (k, diff)
    assert s["losses"]["final"]["loss/total"] == pytest.approx(
        ref["losses"]["final"]["loss/total"], abs=1e-6)
    lr_ref, lr_run = read_scalars(reference)["opt/lr"], read_scalars(run)["opt/lr"]
    assert lr_run[-1] == pytest.approx(lr_ref[-1], rel=1e-9)


@pytest.fixture
def deepspeed_port():
    """A free master port for one ``deepspeed`` launch; afterwards removes the CPU all-reduce
    shared-memory files (~66 MB each, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_
    <port>_<rank>``) that launch may have left, whether or not the test passed. Only this
    port's files: other jobs on the machine keep theirs."""
    port = free_port()
    yield port
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        path.unlink(missing_ok=True)


def test_zero2_zero3_and_bf16_train_under_deepspeed_launcher(etl, tmp_path, deepspeed_port):
    driver = tmp_path / "driver.py"
    driver.write_text(RUNS_DRIVER)
    runs = {"zero2": ["train.zero_stage=2"], "zero3": ["train.zero_stage=3"],
            "bf16": ["train.zero_stage=2", "train.precision=bf16"]}
    specs = [" ".join([*tiny_overrides(etl, tmp_path / name), *TINY_TRAIN, *extra,
                       "data.num_workers=0", "train.progress_bar=false"])
             for name, extra in runs.items()]
    port = deepspeed_port
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2",
           "--master_port", str(port), str(driver), str(TINY), *specs]
    assert_ok(subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True,
                             timeout=300))
    # DeepSpeed's CPU shared-memory all-reduce buffers are removed by engine.shutdown()
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for name in runs:
        s = assert_trained(tmp_path / name)
        assert s["precision"] == ("bf16" if name == "bf16" else "fp32")
        state = torch.load(tmp_path / name / "final" / "model_fp32.pt")
        assert state["encoder.0.weight"].dtype == torch.float32
        assert (tmp_path / name / "export" / "sid_table.npy").is_file()


@pytest.fixture(scope="module")
def solo(etl, tmp_path_factory) -> Path:
    """One plain ``python`` process (no launcher env), three runs in it: golden, ZeRO-0, RQ-KMeans.

    The golden run goes first, as in ``tests/golden_regen.py`` (its own process)."""
    root = tmp_path_factory.mktemp("solo")
    driver = root / "driver.py"
    driver.write_text(RUNS_DRIVER)
    golden = " ".join(golden_overrides(write_golden_etl(root / "golden_etl"), root / "golden"))
    zero0 = " ".join([*tiny_overrides(etl, root / "zero0"), *TINY_TRAIN, "train.zero_stage=0",
                      "train.global_batch_size=32", "train.micro_batch_size=16",
                      "train.max_steps=12"])
    kmeans = " ".join([*tiny_overrides(etl, root / "kmeans"), "model.mode=rq_kmeans"])
    assert_ok(subprocess.run([sys.executable, str(driver), str(TINY), golden, zero0, kmeans],
                             cwd=ROOT, env=dist_env(), capture_output=True, text=True,
                             timeout=300))
    return root


def test_golden_losses(solo):
    """The tiny tokenizer config's first 10 losses (fp32, seed 0, world 1) are reproduced.

    On a deliberate change of numerics regenerate with ``.venv/bin/python tests/golden_regen.py``.
    """
    golden = json.loads(GOLDEN.read_text())
    got = read_losses(solo / "golden")
    assert set(got) == set(golden["losses"])
    for tag, expected in golden["losses"].items():
        assert got[tag] == pytest.approx(expected, rel=golden["rtol"]), (
            f"{tag} drifted from {GOLDEN}; if the change is deliberate run "
            f"{golden['regenerate']}")
    s = read_summary(solo / "golden")
    assert (s["world_size"], s["zero_stage"], s["precision"], s["final_step"]) == (1, 1, "fp32", 10)
    assert s["zero_stage_effective"] == 0  # one rank: nothing to partition


def test_world_of_one_in_process_three_runs(solo):
    """No launcher env: ``engine.train`` makes a world of one; later calls in the same process
    (what ``higr run`` does) reuse it; RQ-KMeans (nothing to train) goes straight to export."""
    s = assert_trained(solo / "zero0", steps=12, drop=1.0)
    assert s["world_size"] == 1 and s["zero_stage"] == 0
    assert "opt/grad_norm" in read_scalars(solo / "zero0")  # computed by hand at ZeRO-0
    k = read_summary(solo / "kmeans")
    assert k["final_step"] == 0 and k["export"]["num_items"] == 96
    assert (solo / "kmeans" / "export" / "sid_table.npy").is_file()
