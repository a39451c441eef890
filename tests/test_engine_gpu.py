"""The engine's CUDA path: the tiny tokenizer trains in bf16 on one GPU (skipped without one).

One plain ``python`` process with no launcher environment, so the engine makes a world of one
itself; on a CUDA machine ``deepspeed.get_accelerator()`` picks NCCL and ``cuda:0``. What this
covers that the CPU tests cannot: NCCL initialisation, DeepSpeed's bf16 section on a GPU, the
client ``torch.optim.AdamW(fused=True)`` on CUDA tensors under ZeRO-1, CUDA max-allocated
memory in the logs, the fp32 export and ``stage.finalize`` from GPU weights. ~30 s (mostly
imports); the same short schedule as the CPU tests.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_engine import tiny_overrides, write_tiny_etl
from test_engine_dist import DRIVER, ROOT, TAGS, TINY, TRAIN, _assert_trained, _env, _ok, _scalars

pytestmark = [pytest.mark.gpu, pytest.mark.dist]


def test_tiny_tokenizer_trains_in_bf16_on_one_gpu(tmp_path):
    etl = write_tiny_etl(tmp_path / "etl")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "bf16"
    spec = " ".join([*tiny_overrides(etl, run), *TRAIN, "train.precision=bf16",
                     "train.peak_tflops=100", "train.progress_bar=false"])  # MFU on any GPU
    env = _env()
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    _ok(subprocess.run([sys.executable, str(driver), str(TINY), spec], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600))
    s = _assert_trained(run)
    assert (s["world_size"], s["precision"]) == (1, "bf16")
    assert s["device"] == torch.cuda.get_device_name(0)
    scalars = _scalars(run)
    assert TAGS | {"mem/device_max_alloc_gb"} <= set(scalars)
    assert all(v > 0 for _, v in scalars["mem/device_max_alloc_gb"])
    state = torch.load(run / "final" / "model_fp32.pt")
    assert state["encoder.0.weight"].dtype == torch.float32
    assert state["encoder.0.weight"].device.type == "cpu"
    assert (run / "export" / "sid_table.npy").is_file()

