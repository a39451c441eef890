"""``launch.mode: inprocess``: every stage trains in the ``higr run`` process as a world of one,
sharing one process group, which the run destroys afterwards (with the launcher variables it
set) when it created it, so a caller that did not own it (a notebook, a test session that later
forks gloo workers) inherits nothing. The end-to-end test launches stages through torchrun;
this is the in-process world's contract, in a fresh process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

PROBE = """
import os
import torch.distributed as dist
from higr_dist.engine.trainer import init_distributed
from higr_dist.pipeline import _in_process_world

os.environ["MASTER_PORT"] = "0"  # one the caller set: must be back afterwards
with _in_process_world():
    init_distributed()  # what the first in-process stage does
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    init_distributed()  # the next stage joins the same group
    assert dist.is_initialized()
assert not dist.is_initialized(), "the run left its process group behind"
assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
assert os.environ["MASTER_PORT"] == "0"
print("ok")
"""


def test_in_process_world_is_shared_then_destroyed(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
