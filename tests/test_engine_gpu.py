"""The engine's CUDA path on one GPU (``gpu`` marker: skipped without one).

Every test runs its training in a plain ``python`` subprocess with no launcher environment, so
the engine makes a world of one itself; on a CUDA machine ``deepspeed.get_accelerator()`` picks
NCCL and ``cuda:0``. The pytest process itself has its GPUs hidden (``tests/conftest.py``); the
subprocesses get the first one back through :func:`conftest.gpu_env`.

A world of one normally runs ZeRO-0 (``ds_config.effective_zero_stage``); these runs set
``HIGR_ZERO_AT_WORLD_ONE=1`` so DeepSpeed's ZeRO-1/2/3 code paths (BF16_Optimizer with fp32
accumulation, bucketed reduce with ``overlap_comm`` on CUDA streams, ZeRO-3 parameter gathers
under activation checkpointing) run on the device, as on a cluster. What they cover that the
CPU tests cannot:

- the tokenizer in bf16 under ZeRO-1 (NCCL initialisation, DeepSpeed's bf16 section, the client
  ``torch.optim.AdamW(fused=True)`` on CUDA tensors, CUDA max-allocated memory, MFU from the
  device table, the fp32 export and ``stage.finalize`` from GPU weights);
- HSD in bf16 under ZeRO-2 and ZeRO-3 with activation checkpointing;
- ORPO and DPO steps in bf16 (DPO's frozen reference on the GPU, buffers fp32);
- kill and resume on the GPU (CUDA RNG state, sharded optimizer state);
- decoding on the GPU (HiGR coarse-to-fine and flat beam search through the eval harness's
  device placement), compared with the CPU.

``HIGR_GPU_TESTS_ON_CPU=1`` runs the same file on the CPU (device assertions skipped), to check
its plumbing without a GPU. ~2-3 min on one H100 (mostly process start-up).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import NUM_GPUS, gpu_env
from helpers import (
    ROOT,
    RUNS_DRIVER,
    SLATE_STEPS,
    TINY,
    TINY_TRAIN,
    TOKENIZER_TAGS,
    assert_ok,
    assert_trained,
    dist_env,
    pref_job,
    read_scalars,
    slate_job,
    tiny_overrides,
    write_pref_inputs,
    write_slate_inputs,
    write_tiny_etl,
)

pytestmark = [pytest.mark.gpu, pytest.mark.dist]

ON_GPU = NUM_GPUS > 0

SOLO_DRIVER = """
import sys
from higr_dist.engine.config import load_job
from higr_dist.engine.trainer import shutdown, train

if __name__ == "__main__":
    for config in sys.argv[1:]:
        train(load_job(config))
    shutdown()
"""


def _genv(zero_at_one: bool = True) -> dict:
    env = gpu_env(dist_env())
    if zero_at_one:
        env["HIGR_ZERO_AT_WORLD_ONE"] = "1"
    return env


def _run(cmd: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _write_jobs(root: Path, jobs: dict[str, dict]) -> list[str]:
    paths = []
    for name, job in jobs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job))
        paths.append(str(path))
    return paths


def test_tiny_tokenizer_trains_in_bf16_zero1_on_one_gpu(tmp_path):
    etl = write_tiny_etl(tmp_path / "etl")
    driver = tmp_path / "driver.py"
    driver.write_text(RUNS_DRIVER)
    run = tmp_path / "bf16"
    spec = " ".join([*tiny_overrides(etl, run), *TINY_TRAIN, "train.precision=bf16",
                     "train.zero_stage=1", "train.progress_bar=false"])
    assert_ok(_run([sys.executable, str(driver), str(TINY), spec], _genv()))
    s = assert_trained(run)
    assert (s["world_size"], s["precision"], s["zero_stage_effective"]) == (1, "bf16", 1)
    scalars = read_scalars(run)
    assert TOKENIZER_TAGS - {"health/mfu"} <= set(scalars)
    state = torch.load(run / "final" / "model_fp32.pt")
    assert state["encoder.0.weight"].dtype == torch.float32
    assert state["encoder.0.weight"].device.type == "cpu"
    assert (run / "export" / "sid_table.npy").is_file()
    if ON_GPU:
        assert s["device"] != "cpu"
        assert "health/device_max_alloc_gb" in scalars
        assert all(v > 0 for _, v in scalars["health/device_max_alloc_gb"])
        # MFU from the device table (train.peak_tflops: 0), logged when the device is known
        from higr_dist.engine.ds_config import peak_tflops

        if peak_tflops(s["device"], "bf16") > 0:
            assert all(0 < v < 1 for _, v in scalars["health/mfu"])


# --------------------------------------------------------------------------------------------
# HSD under ZeRO-2 / ZeRO-3, kill and resume, decoding
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hsd_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gpu_hsd")
    etl, sid = write_slate_inputs(root)
    ckpt = {"activation_checkpointing": True}
    jobs = {"zero2": slate_job("hsd", etl, sid, root / "zero2", 2, "bf16", ckpt),
            "zero3": slate_job("hsd", etl, sid, root / "zero3", 3, "bf16", ckpt),
            "flat": slate_job("flat", etl, sid, root / "flat", 2, "bf16")}
    driver = root / "driver.py"
    driver.write_text(SOLO_DRIVER)
    assert_ok(_run([sys.executable, str(driver), *_write_jobs(root, jobs)], _genv()))
    return {"root": root, "etl": etl, "sid": sid, "steps": SLATE_STEPS["hsd"], "job": slate_job,
            **{n: root / n for n in jobs}}


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_hsd_bf16_zero_with_activation_checkpointing(hsd_runs, name):
    s = _summary(hsd_runs[name])
    assert s["final_step"] == hsd_runs["steps"] and s["precision"] == "bf16"
    assert s["zero_stage_effective"] == {"zero2": 2, "zero3": 3}[name]
    first, final = s["losses"]["first"]["loss/total"], s["losses"]["final"]["loss/total"]
    assert final < 0.75 * first, (name, first, final)
    from higr_dist.config import from_dict
    from higr_dist.models.hsd import HSD, HSDConfig

    resolved = yaml.safe_load((hsd_runs[name] / "resolved_config.yaml").read_text())
    state = torch.load(hsd_runs[name] / "final" / "model_fp32.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    HSD(from_dict(HSDConfig, resolved["model"])).load_state_dict(state, strict=True)
    if ON_GPU:
        assert "health/device_max_alloc_gb" in read_scalars(hsd_runs[name])


def test_kill_and_resume_on_gpu(hsd_runs, tmp_path):
    job = hsd_runs["job"]("hsd", hsd_runs["etl"], hsd_runs["sid"], tmp_path / "run", 2, "bf16",
                          {"checkpoint_every": 4, "max_steps": 12})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    cmd = [sys.executable, "launcher/train.py", "--config", str(config)]
    killed = _run([*cmd, "train.kill_at_step=6"], _genv())
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "global_step4"
    assert_ok(_run([*cmd, "train.kill_at_step=6"], _genv()))  # the same command resumes
    s = _summary(tmp_path / "run")
    assert s["resumed_from"] == "global_step4" and s["final_step"] == 12
    assert np.isfinite(s["losses"]["final"]["loss/total"])


DECODE = """
import json, sys
from pathlib import Path
import numpy as np, torch
from higr_dist.decode.flat import flat_beam_decode
from higr_dist.decode.hier import coarse_to_fine_decode
from higr_dist.decode.trie import SidTrie
from higr_dist.eval.harness import load_stage_model, resolve_device

hsd_dir, flat_dir, sid_dir = sys.argv[1:4]
table = np.load(f"{sid_dir}/sid_table.npy")
trie = SidTrie.from_table(table, json.loads(Path(f"{sid_dir}/sid_meta.json").read_text())["K"])
g = torch.Generator().manual_seed(0)
hist = torch.randint(0, table.shape[0], (32, 5), generator=g)
args = (torch.from_numpy(table)[hist], torch.ones(32, 5, dtype=torch.bool), torch.ones(32, 5))
dev = resolve_device("auto")
out = {"device": str(dev)}
for name, d, decode in (("higr", hsd_dir, coarse_to_fine_decode),
                        ("flat", flat_dir, flat_beam_decode)):
    rows = {}
    for where in ("cpu", dev):
        _, model = load_stage_model(Path(d), where)
        res = decode(model, *(a.to(where) for a in args), trie.to(where), beam=4)
        assert res.items.device.type == torch.device(where).type
        rows[str(where)] = res.items.cpu().tolist()
    out[name] = rows
print(json.dumps(out))
"""


def test_decoding_on_gpu_matches_cpu(hsd_runs):
    script = hsd_runs["root"] / "decode.py"
    script.write_text(DECODE)
    proc = _run([sys.executable, str(script), str(hsd_runs["zero2"]), str(hsd_runs["flat"]),
                 str(hsd_runs["sid"])], _genv(zero_at_one=False))
    assert_ok(proc)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["device"].startswith("cuda" if ON_GPU else "cpu")
    for name in ("higr", "flat"):
        cpu, dev = out[name]["cpu"], out[name][out["device"]]
        assert all(len(set(r)) == len(r) and min(r) >= 0 for r in dev)
        same = np.mean([a == b for a, b in zip(cpu, dev)])
        assert same >= 0.9, (name, same)  # fp32 both; near-tied beams may differ


# --------------------------------------------------------------------------------------------
# ORPO and DPO
# --------------------------------------------------------------------------------------------


def test_orpo_and_dpo_steps_in_bf16(tmp_path):
    etl, sid, init = write_pref_inputs(tmp_path)
    jobs = {"orpo": pref_job("orpo", etl, sid, init, tmp_path / "orpo", 2, "bf16",
                             {"lambda_or": 0.5}, {"activation_checkpointing": True}),
            "dpo": pref_job("dpo", etl, sid, init, tmp_path / "dpo", 2, "bf16",
                            {"beta": 0.1, "nll_weight": 0.1})}
    for job in jobs.values():
        job["data"]["num_workers"] = 0
    driver = tmp_path / "driver.py"
    driver.write_text(SOLO_DRIVER)
    assert_ok(_run([sys.executable, str(driver), *_write_jobs(tmp_path, jobs)], _genv()))
    for name in jobs:
        s = _summary(tmp_path / name)
        assert s["precision"] == "bf16" and s["zero_stage_effective"] == 2
        first, final = s["losses"]["first"], s["losses"]["final"]
        assert all(np.isfinite(v) for v in [*first.values(), *final.values()]), (name, final)
        assert final["loss/margin"] > first["loss/margin"], (name, first, final)
