"""Exported weights round-trip: ``final/model_fp32.pt``, reloaded into a fresh model, gives the
live model's outputs, for every stage and ZeRO stage (docs/RELIABILITY.md).

At the end of every run the trainer runs the live model (the DeepSpeed engine, every rank
taking part: under ZeRO-3 the forward gathers the partitioned weights) on rank 0's first batch
of the epoch, writes ``final/model_fp32.pt``, reads the file back into a model built fresh by
the stage, runs it on the same batch and compares everything the model's forward returns
(logits, codes, embeddings) to 1e-5 relative; under bf16 each reloaded tensor is cast to its
live counterpart's dtype (DeepSpeed casts parameters, not buffers). A mismatch stops the run
(exit 1, one line). The figures land in ``summary.json`` (``export.roundtrip``); these tests read them and check
the file independently too (the keys and shapes the stage's model expects, every value finite).

Jobs are real two-rank ``launcher/train.py`` runs on the farm (``tests/farm.py``): the whole
matrix, tokenizer / HSD / ORPO x ZeRO 0-3 x fp32, and bf16 at ZeRO-2 and 3, is ``make
test-faults``. In ``make test`` the same check is asserted on the runs other tests make anyway
(``test_hsd_dist.py``: HSD ZeRO-3 bf16, flat, SASRec; ``test_orpo_dist.py``: ORPO and DPO
under ZeRO-3 bf16), and :func:`test_a_wrong_export_is_caught` runs.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from farm import job_log, run_farm
from helpers import stage_job, tok_job, with_out, write_stage_configs, write_tiny_etl

pytestmark = pytest.mark.dist

#: short runs: the check is about the weights a run ends with, not about training well
SHORT = {"max_steps": 6, "checkpoint_every": 0}
CI = [("tokenizer", 2, "bf16"), ("hsd", 3, "bf16")]
FULL = [(stage, zero, "fp32") for stage in ("tokenizer", "hsd", "orpo") for zero in (0, 1, 2, 3)]
FULL += [(stage, zero, "bf16") for stage in ("tokenizer", "hsd", "orpo") for zero in (2, 3)]


def _name(stage: str, zero: int, precision: str) -> str:
    return f"{stage}_z{zero}_{precision}"


def _jobs(root, cases) -> list[dict]:
    stages = write_stage_configs(root)
    etl = write_tiny_etl(root / "etl")
    jobs = []
    for stage, zero, precision in cases:
        name = _name(stage, zero, precision)
        train = {**SHORT, "zero_stage": zero, "precision": precision}
        if stage == "tokenizer":
            jobs.append(tok_job(name, etl, root / "runs" / name,
                                *[f"train.{k}={json.dumps(v)}" for k, v in train.items()]))
        else:
            job = with_out(stage_job(name, stages[stage], **train), root / "runs" / name)
            job["overrides"].append("validation.every_epochs=0")  # keep the last weights
            jobs.append(job)
    return jobs


def _farm(root, cases) -> dict:
    jobs = _jobs(root, cases)
    t0 = time.time()
    results = run_farm(root, jobs, timeout=1800)
    print(f"export farm: {len(jobs)} jobs in {time.time() - t0:.0f}s")
    return {"root": root, "results": results}


@pytest.fixture(scope="module")
def ci_runs(tmp_path_factory):
    return _farm(tmp_path_factory.mktemp("export_ci"), CI)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    return _farm(tmp_path_factory.mktemp("export_full"), [c for c in FULL if c not in CI])


def _check(farm: dict, case: tuple[str, int, str]) -> None:
    from higr_dist.stages.base import get_stage

    stage, zero, precision = case
    name = _name(*case)
    root, res = farm["root"], farm["results"]
    assert [r["rc"] for r in res[name]] == [0, 0], job_log(root, name)[-3000:]
    run = root / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zero_stage_effective"] == zero and summary["precision"] == precision
    check = summary["export"]["roundtrip"]
    assert check["checked"] and "error" not in check, check
    assert check["tensors"] >= 1 and check["elements"] > 0, check
    assert check["integers_equal"], check
    # fp32: the same weights and the same kernels give the same numbers; bf16: the fp32 masters
    # cast to bf16 are the live bf16 weights
    assert check["max_abs_diff"] <= 1e-5 * max(1.0, check["max_abs_output"]), check
    state = torch.load(run / "final" / "model_fp32.pt", map_location="cpu", weights_only=True)
    assert all(t.dtype != torch.bfloat16 for t in state.values())
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    # the keys and shapes a model built from the run's resolved config expects
    from higr_dist.engine.config import load_job

    job = load_job(run / "resolved_config.yaml")
    model, _ = get_stage(stage).build(job.model, job.loss, job.inputs)
    want = model.state_dict()
    assert want.keys() == state.keys()
    assert all(want[k].shape == state[k].shape for k in want)

@pytest.mark.faults
@pytest.mark.parametrize("case", CI, ids=[_name(*c) for c in CI])
def test_export_reproduces_the_live_model(ci_runs, case):
    _check(ci_runs, case)


@pytest.mark.faults
@pytest.mark.parametrize("case", [c for c in FULL if c not in CI],
                         ids=[_name(*c) for c in FULL if c not in CI])
def test_export_reproduces_the_live_model_every_stage_and_zero(full_runs, case):
    _check(full_runs, case)


def test_a_wrong_export_is_caught():
    """The comparison the trainer runs: a changed value or code is an error, one line."""
    from higr_dist.engine.trainer import _compare_outputs

    logits, codes = torch.randn(4, 8), torch.randint(0, 16, (4, 3))
    same = _compare_outputs([logits, codes], [logits.clone(), codes.clone()], 1e-5, "f.pt")
    assert "error" not in same and same["max_abs_diff"] == 0.0 and same["elements"] == 44
    off = _compare_outputs([logits, codes], [logits + 1e-3, codes.clone()], 1e-5, "f.pt")
    assert "does not reproduce the live model" in off["error"] and off["max_abs_diff"] > 0
    codes2 = codes.clone()
    codes2[0, 0] += 1
    assert "integer outputs differ" in _compare_outputs([codes], [codes2], 1e-5, "f.pt")["error"]
    assert "forward returns" in _compare_outputs([logits], [logits[:2]], 1e-5, "f.pt")["error"]
    assert "\n" not in off["error"]
