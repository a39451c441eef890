"""Stages ``orpo`` and ``dpo`` through the real engine: 2 CPU ranks (gloo) under torchrun.

One launch (a driver calling ``engine.train`` twice, ~30 s on 2 cores) on real PREF shards
read by the real streaming loader, negatives built in the loader's collate:

- ``orpo`` under ZeRO-3 + bf16 + activation checkpointing: the step must go through the
  engine's forward (``PreferenceHSD.forward``), or ZeRO-3 would hand the HSD's root parameters
  (bos, heads) over partitioned and the backward prologue would never run;
- ``dpo`` under ZeRO-2 fp32, its frozen reference defaulting to ``init_from``.

Both start from the same "pretrained" HSD (fp32 state dict). Each must raise the preference
margin and pair accuracy, keep every logged term finite, and export fp32 weights that load
strictly into a plain ``HSD`` and make the chosen slates likelier than the init did.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    PREF_MODEL,
    PREF_N,
    PREF_NUM_ITEMS,
    PREF_STEPS,
    pref_job,
    write_pref_inputs,
)

from higr_dist.models.hsd import HSD, HSDConfig

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
    root = tmp_path_factory.mktemp("orpo_dist")
    etl, sid, init = write_pref_inputs(root)
    jobs = {"orpo": pref_job("orpo", etl, sid, init, root / "orpo", 3, "bf16",
                             {"lambda_or": 0.5}, {"activation_checkpointing": True}),
            "dpo": pref_job("dpo", etl, sid, init, root / "dpo", 2, "fp32",
                            {"beta": 0.1, "nll_weight": 0.1})}
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
    return {"root": root, "sid": sid, "init": init, **{n: root / n for n in jobs}}


@pytest.mark.parametrize("stage", ["orpo", "dpo"])
def test_preference_stage_trains_under_deepspeed(runs, stage):
    s = json.loads((runs[stage] / "summary.json").read_text())
    assert s["world_size"] == 2 and s["final_step"] == PREF_STEPS[stage]
    first, final = s["losses"]["first"], s["losses"]["final"]
    pref = "loss/or_loss" if stage == "orpo" else "loss/dpo_loss"
    for key in ("loss/total", "loss/nll", pref, "loss/margin", "loss/pair_acc",
                "loss/margin_o1", "loss/pair_acc_o3"):
        assert math.isfinite(first[key]) and math.isfinite(final[key]), key
    assert final["loss/margin"] > first["loss/margin"], (stage, first, final)
    assert final["loss/pair_acc"] > first["loss/pair_acc"], (stage, first, final)
    assert final[pref] < first[pref]
    # the run checked its export: final/model_fp32.pt, reread, gives the live engine's outputs
    rt = s["export"]["roundtrip"]
    assert rt["checked"] and "error" not in rt, rt
    assert rt["max_abs_diff"] <= 1e-5 * max(1.0, rt["max_abs_output"]), rt
    if stage == "orpo":
        assert s["zero_stage"] == 3 and s["precision"] == "bf16"
        assert s["export"]["objectives"] == ["o1", "o2", "o3"]
    else:
        assert s["export"]["reference_from"] == str(runs["init"])


@pytest.mark.parametrize("stage", ["orpo", "dpo"])
def test_exported_weights_are_a_plain_hsd_that_prefers_the_chosen(runs, stage):
    cfg = HSDConfig(**PREF_MODEL)
    state = torch.load(runs[stage] / "final" / "model_fp32.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    model = HSD(cfg)
    model.load_state_dict(state, strict=True)  # same keys as the pretraining model
    init = HSD(cfg)
    init.load_state_dict(torch.load(runs["init"], weights_only=True), strict=True)
    table = torch.from_numpy(np.load(runs["sid"] / "sid_table.npy"))
    B = 64  # fresh contexts of the training pattern: the slate is the N items after the newest
    hist = torch.randint(0, PREF_NUM_ITEMS, (B, 4), generator=torch.Generator().manual_seed(5))
    chosen = (hist[:, -1:] + torch.arange(1, PREF_N + 1)) % PREF_NUM_ITEMS  # [B, N]
    rejected = chosen.flip(-1)  # an O1-style permutation
    slates = table[torch.stack([chosen, rejected], 1)]  # [B, 2, N, L]
    args = (table[hist], torch.ones(B, 4, dtype=torch.bool), torch.ones(B, 4))
    with torch.no_grad():
        trained = model.eval().slate_logprobs(*args, slates).mean(dim=(-2, -1))  # [B, 2]
        before = init.eval().slate_logprobs(*args, slates).mean(dim=(-2, -1))
    gain = (trained[:, 0] - trained[:, 1]) - (before[:, 0] - before[:, 1])  # [B]
    assert gain.mean() > 0.2 and (gain > 0).float().mean() > 0.75, (stage, gain)
    assert (trained[:, 0] - before[:, 0]).mean() > 0  # y+ itself became likelier
