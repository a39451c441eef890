"""``bench/gpu_check.py --dry-run``: the GPU check's whole plumbing on the CPU at the tiny preset
(data, bf16 ZeRO-2 training with activation checkpointing, fp32/bf16 parity, kill and resume,
HiGR/flat decoding through the eval harness, collecting the GPU tests) and its one JSON
report. ~45-60 s on 2 cores (six processes importing DeepSpeed), hence ``slow``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert list(phases) == ["environment", "data", "train", "parity", "resume", "decode",
                            "gpu_tests"]
    assert report["ok"] and all(p["ok"] for p in phases.values())
    train = phases["train"]
    assert (train["precision"], train["zero_stage_effective"], train["steps"]) == ("bf16", 2, 12)
    assert train["mfu"] > 0 and train["samples_per_s"] > 0  # CPU peak from the table
    assert phases["parity"]["steps"] == 12 and phases["parity"]["max_rel_diff"] < 0.03
    assert phases["resume"]["resumed_from"] == "global_step4"
    assert phases["resume"]["rel_diff"] < 1e-4
    assert set(phases["decode"]["by_batch"]) == {"1", "8"}
    assert all(r["speedup"] > 0 for r in phases["decode"]["by_batch"].values())
    assert phases["gpu_tests"]["collected"] >= 6
    assert phases["environment"]["peak_tflops"]["bf16"] > 0
