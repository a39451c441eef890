"""The hsd, flat and sasrec stages through the real engine: 2 CPU ranks (gloo) under torchrun.

One launch (a driver calling ``engine.train`` three times, ~30-40 s on 2 cores) trains on real
slate shards with a learnable pattern (the slate is the N items after the newest history
item):

- ``hsd`` under ZeRO-3 + bf16 + activation checkpointing (the model must keep every parameter
  inside its owner's forward, or ZeRO-3 would hand it a partitioned tensor);
- ``flat`` under ZeRO-1 fp32; ``sasrec`` under ZeRO-2 fp32 (num_items from sid_meta.json).

Each must lower its loss, export consolidated fp32 weights that load strictly into a fresh
model, and the trained HSD / flat models must decode valid, distinct items.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    SLATE_H,
    SLATE_K,
    SLATE_N,
    SLATE_NUM_ITEMS,
    SLATE_STEPS,
    slate_job,
    write_slate_inputs,
)

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import sys
from higr_dist.engine.config import load_job
from higr_dist.engine.trainer import shutdown, train

# loader workers are spawned and re-import this file: only the launch runs it
if __name__ == "__main__":
    for config in sys.argv[1:]:
        train(load_job(config))
    shutdown()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hsd_dist")
    etl, sid = write_slate_inputs(root)
    jobs = {"hsd": slate_job("hsd", etl, sid, root / "hsd", 3, "bf16",
                             {"activation_checkpointing": True}),
            "flat": slate_job("flat", etl, sid, root / "flat", 1, "fp32"),
            "sasrec": slate_job("sasrec", etl, sid, root / "sasrec", 2, "fp32"),
            # model selection: validation every 1/4 epoch (2 steps); a new best must gain 1.0
            # NDCG, which never happens, so the first validation's weights must be the ones
            # kept; hsd_last is the same run keeping its last weights
            "hsd_val": slate_job("hsd", etl, sid, root / "hsd_val", 1, "fp32",
                                 steps=SLATE_STEPS["hsd_val"],
                                 validation={"every_epochs": 0.25, "min_delta": 1.0, "beam": 4}),
            "hsd_last": slate_job("hsd", etl, sid, root / "hsd_last", 1, "fp32",
                                  steps=SLATE_STEPS["hsd_last"],
                                  validation={"every_epochs": 0.25, "beam": 4,
                                              "keep_best": False})}
    configs = []
    for name, job in jobs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        configs.append(str(path))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"),
               CUDA_VISIBLE_DEVICES="")  # CPU ranks (gloo) even on a GPU machine
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(driver), *configs],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {"root": root, "sid": sid, **{n: root / n for n in jobs}}


@pytest.mark.parametrize("stage", ["hsd", "flat", "sasrec"])
def test_stage_trains_under_deepspeed(runs, stage):
    s = json.loads((runs[stage] / "summary.json").read_text())
    assert s["world_size"] == 2 and s["final_step"] == SLATE_STEPS[stage]
    first = s["losses"]["first"]["loss/total"]
    final = s["losses"]["final"]["loss/total"]
    assert final < 0.75 * first, (stage, first, final)
    assert s["export"]["params"] > 0
    # the run checked its export: final/model_fp32.pt, reread, gives the live engine's outputs
    rt = s["export"]["roundtrip"]
    assert rt["checked"] and "error" not in rt, rt
    assert rt["max_abs_diff"] <= 1e-5 * max(1.0, rt["max_abs_output"]), rt
    if stage == "hsd":
        assert s["zero_stage"] == 3 and s["precision"] == "bf16"
        assert "loss/ild" in s["losses"]["final"]


def test_exported_models_load_and_decode(runs):
    from higr_dist.config import from_dict
    from higr_dist.decode.flat import flat_beam_decode
    from higr_dist.decode.hier import coarse_to_fine_decode
    from higr_dist.decode.trie import SidTrie
    from higr_dist.models.flat import Flat
    from higr_dist.models.hsd import HSD, HSDConfig

    table = np.load(runs["sid"] / "sid_table.npy")
    trie = SidTrie.from_table(table, SLATE_K)
    hist_items = torch.tensor([[3, 10, 20], [5, 7, 40]])
    hc = torch.from_numpy(table)[hist_items]
    hm = torch.ones(2, 3, dtype=torch.bool)
    hf = torch.ones(2, 3)
    # the true slates
    want = (hist_items[:, -1:] + torch.arange(1, SLATE_N + 1)) % SLATE_NUM_ITEMS
    target = torch.from_numpy(table)[want][:, None]  # [B, 1, N, L]
    for stage, cls, decode in (("hsd", HSD, coarse_to_fine_decode),
                               ("flat", Flat, flat_beam_decode)):
        resolved = yaml.safe_load((runs[stage] / "resolved_config.yaml").read_text())
        cfg = from_dict(HSDConfig, resolved["model"])
        model = cls(cfg)
        state = torch.load(runs[stage] / "final" / "model_fp32.pt", weights_only=True)
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
        model.load_state_dict(state, strict=True)
        res = decode(model.eval(), hc, hm, hf, trie, beam=4)
        assert ((res.items >= 0) & (res.items < SLATE_NUM_ITEMS)).all()
        assert all(len(set(r)) == SLATE_N for r in res.items.tolist())
        # the exported weights are the trained ones: the true slates became more likely
        with torch.no_grad():
            trained = model.slate_logprobs(hc, hm, hf, target).mean()
            fresh = cls(cfg).eval().slate_logprobs(hc, hm, hf, target).mean()
        assert trained > fresh + 0.3, (stage, trained.item(), fresh.item())


def test_the_best_validation_weights_are_the_ones_kept(runs):
    """Selection on validation: the exported weights are the best validation step's (here the
    first, by construction), not the last; validating changes no training step; re-scoring the
    exported model on the validation split gives the recorded best score."""
    from higr_dist.engine.validate import ValidateConfig, Validator
    from higr_dist.eval.harness import load_stage_model

    s = json.loads((runs["hsd_val"] / "summary.json").read_text())
    last = json.loads((runs["hsd_last"] / "summary.json").read_text())
    val = s["validation"]
    steps = [h["step"] for h in val["history"]]
    # every 2 steps, and the end
    assert steps == list(range(2, SLATE_STEPS["hsd_val"] + 1, 2)), steps
    assert val["kept"] == "best" and val["best"]["step"] == 2
    assert last["validation"]["kept"] == "last"
    # validation does not perturb training: same losses with and without selection
    assert s["losses"]["final"] == last["losses"]["final"]
    assert [h["ndcg5"] for h in val["history"]] == \
        [h["ndcg5"] for h in last["validation"]["history"]]
    kept = torch.load(runs["hsd_val"] / "final" / "model_fp32.pt", weights_only=True)
    best = torch.load(runs["hsd_val"] / "best" / "model_fp32.pt", weights_only=True)
    final_last = torch.load(runs["hsd_last"] / "final" / "model_fp32.pt", weights_only=True)
    assert all(torch.equal(kept[k], best[k]) for k in kept)
    assert any(not torch.equal(kept[k], final_last[k]) for k in kept)  # not the last weights
    _, model = load_stage_model(runs["hsd_val"])
    score = Validator(runs["root"] / "etl", runs["sid"], SLATE_N, SLATE_H,
                      ValidateConfig(every_epochs=1, beam=4)).score(model)
    assert score["ndcg5"] == pytest.approx(val["history"][0]["ndcg5"], abs=1e-9)
    assert score["users"] == 48
