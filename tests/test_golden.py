"""Golden losses of HSD and ORPO: their first 10 logged losses (fp32, ZeRO-1, seed 0, world of
one) equal ``tests/golden/{hsd,orpo}_tiny.json`` to rtol 1e-5 (the tokenizer's golden is
checked in ``test_engine_dist.py``).

The runs are exactly what ``tests/golden_regen.py --stage hsd --stage orpo`` does: the test
runs that script in a plain ``python`` process (no launcher environment) into a temporary
folder and compares what it wrote with the committed files. On a deliberate change of
numerics regenerate with the command each file names, and say why in the commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STAGES = ("hsd", "orpo")

pytestmark = pytest.mark.dist  # real DeepSpeed engines, one per stage


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    args = [arg for stage in STAGES for arg in ("--stage", stage)]
    proc = subprocess.run([sys.executable, str(HERE / "golden_regen.py"), *args,
                           "--out-dir", str(out)], cwd=HERE.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_golden_losses(regenerated, stage):
    golden_file = HERE / "golden" / f"{stage}_tiny.json"
    golden = json.loads(golden_file.read_text())
    got = json.loads((regenerated / golden_file.name).read_text())
    assert got["job"] == golden["job"] and got["steps"] == golden["steps"] == list(range(1, 11))
    assert set(got["losses"]) == set(golden["losses"]) and "loss/total" in golden["losses"]
    for tag, expected in golden["losses"].items():
        assert got["losses"][tag] == pytest.approx(expected, rel=golden["rtol"]), (
            f"{stage} {tag} drifted from {golden_file}; if the change is deliberate run "
            f"{golden['regenerate']}")
    total = golden["losses"]["loss/total"]
    assert total[-1] < total[0]  # the golden run learns: a frozen model would pass vacuously
