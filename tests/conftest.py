"""Shared test fixtures.

- one local Spark session per test run (the JVM costs ~6 s to start), `local[2]`;
- environment for real multi-process runs: OMP_NUM_THREADS=1, loopback Spark, the venv python;
- GPUs hidden from every process the tests start: the multi-rank CPU jobs must run gloo on
  the CPU even on a GPU machine, where DeepSpeed would otherwise pick CUDA + NCCL and put two
  ranks on one GPU. The GPUs are counted through NVML, CUDA is initialised in this process when
  there are any (so in-process ``gpu`` tests keep them: a CUDA context reads
  ``CUDA_VISIBLE_DEVICES`` once, at initialisation), then ``CUDA_VISIBLE_DEVICES`` is set to ""
  for every child; the ``gpu`` tests start theirs with :func:`gpu_env`, which restores the
  original visibility. The ``*_dist`` tests also set it in the environments they build.
  ``HIGR_GPU_TESTS_ON_CPU=1`` runs the ``gpu`` tests on the CPU instead of skipping them (a
  check of their plumbing, not of CUDA).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# the shared test toolkit's asserts report their values like the tests' own
pytest.register_assert_rewrite("helpers")

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def _count_gpus() -> int:
    """CUDA devices visible to this process, without initialising CUDA (NVML)."""
    try:
        import torch

        return torch.cuda.device_count()  # NVML-based until CUDA is initialised
    except Exception:  # pragma: no cover
        return 0


#: the visibility the session started with (None = unset: all devices)
VISIBLE_AT_START: str | None = os.environ.get("CUDA_VISIBLE_DEVICES")
#: CUDA devices the gpu tests may use
NUM_GPUS: int = _count_gpus()
#: run the gpu tests on the CPU (their plumbing only)
GPU_TESTS_ON_CPU: bool = os.environ.get("HIGR_GPU_TESTS_ON_CPU") == "1"
if NUM_GPUS:
    try:
        import torch

        torch.cuda.init()  # this process keeps its GPUs (in-process gpu tests) ...
    except Exception:  # pragma: no cover - NVML sees a GPU that CUDA cannot use
        NUM_GPUS = 0
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # ... every process the tests start: none


def gpu_env(base: dict | None = None, devices: int = 1) -> dict:
    """Environment for a ``gpu`` test's subprocess: ``base`` (default: this process's) with the
    first ``devices`` of the GPUs the session started with visible again."""
    env = dict(os.environ if base is None else base)
    if GPU_TESTS_ON_CPU and not NUM_GPUS:
        env["CUDA_VISIBLE_DEVICES"] = ""
        return env
    ids = ([d for d in VISIBLE_AT_START.split(",") if d.strip()] if VISIBLE_AT_START
           else [str(i) for i in range(NUM_GPUS)])
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:devices])
    return env


def pytest_collection_modifyitems(config, items):
    # fault tests (docs/RELIABILITY.md): the full suite runs when -m names ``faults``
    # (make test-faults); otherwise only those marked faults(ci=True) run, the rest are
    # deselected, so ``make test`` stays inside CI's time
    if "faults" not in (config.getoption("markexpr", "") or ""):
        heavy = [i for i in items if (m := i.get_closest_marker("faults")) is not None
                 and not m.kwargs.get("ci")]
        if heavy:
            config.hook.pytest_deselected(items=heavy)
            items[:] = [i for i in items if i not in heavy]
    if NUM_GPUS == 0 and not GPU_TESTS_ON_CPU:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def spark():
    """One local Spark session for the whole test run."""
    from higr_dist.etl.spark import get_spark

    session = get_spark(app_name="higr-tests", master="local[2]")
    yield session
    session.stop()
