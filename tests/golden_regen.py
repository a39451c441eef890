"""Golden losses: what ``tests/golden/*.json`` hold and how they are (re)made.

Regenerate (from the repository root; ~15 s each)::

    .venv/bin/python tests/golden_regen.py                  # the tokenizer's
    .venv/bin/python tests/golden_regen.py --stage hsd      # or orpo; --stage all: every one

Three goldens, each the first :data:`STEPS` logged losses of one stage as a world of one (no
launcher environment, the engine trains in-process), fp32, ZeRO-1, seed 0, logging every
step, read back from the run's TensorBoard event files (``loss/total`` and its terms), so a
golden test checks the whole path: shards -> loader -> stage -> DeepSpeed step -> logged means.

- ``tokenizer_tiny.json``: ``tiny/tokenizer`` as shipped (global batch 64 = micro 16 x 4
  accumulation) on the deterministic pair shards of ``helpers.write_tiny_etl`` with the config's own
  ``model.input_dim`` features; ``tests/test_engine_dist.py::test_golden_losses`` repeats it.
- ``hsd_tiny.json`` and ``orpo_tiny.json``: a tiny HSD (:data:`SLATE_JOBS`, spelled out here
  so no shared helper can move it) on the slate shards of ``helpers.write_slate_inputs``, and
  ORPO from the fixed initial HSD of ``helpers.write_pref_inputs`` on its preference shards;
  ``tests/test_golden.py`` repeats them (this script, in a subprocess) and compares.

Compared with rtol 1e-5. Regenerate only after a deliberate change of numerics (model, loss,
optimizer, data order, the tiny configs) and say why in the commit; a drift nobody intended is
what the tests are there to catch. The figures are CPU fp32 with ``OMP_NUM_THREADS=1``;
another CPU family may round differently.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # `python -m tests.golden_regen` puts only the cwd on the path
    sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: the figures are 1-thread

from helpers import write_pref_inputs, write_slate_inputs, write_tiny_etl  # noqa: E402

from higr_dist.configs import HERE as CONFIGS  # noqa: E402

TINY = CONFIGS / "tiny" / "tokenizer.yaml"
GOLDEN = HERE / "golden" / "tokenizer_tiny.json"
#: optimizer steps recorded
STEPS = 10
#: TensorBoard tags recorded and compared
TAGS = ("loss/total", "loss/rec", "loss/quant", "loss/con")
#: the only changes to configs/tiny/tokenizer.yaml besides the data and run folders
OVERRIDES = [f"train.max_steps={STEPS}", "train.log_every=1", "train.checkpoint_every=0",
             "train.progress_bar=false"]


def write_golden_etl(out: Path) -> Path:
    """The tiny pair shards with as many features as the tiny config's ``model.input_dim``."""
    from higr_dist.engine.config import load_job

    return write_tiny_etl(out, dim=load_job(TINY).model.input_dim)


def golden_overrides(etl: Path, out_dir: Path) -> list[str]:
    """Overrides of configs/tiny/tokenizer.yaml for the golden run (data + run folder)."""
    return [f"inputs.etl_dir={etl}", f"run.out_dir={out_dir}", *OVERRIDES]


def read_losses(run: Path, tags: tuple[str, ...] = TAGS) -> dict[str, list[float]]:
    """tag -> the logged value at steps 1..STEPS, from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from higr_dist.layout import StageLayout

    tb = StageLayout(run).tensorboard
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in tags:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        if steps != list(range(1, STEPS + 1)):
            raise ValueError(f"{tb}: {tag} logged at steps {steps}, expected 1..{STEPS}")
        out[tag] = [float(e.value) for e in events]
    return out


def record(losses: dict[str, list[float]]) -> dict:
    """The golden file's content: the losses plus what produced them."""
    import deepspeed
    import torch

    return {
        "what": f"first {STEPS} logged losses of configs/tiny/tokenizer.yaml (fp32, seed 0, "
                "world size 1, in-process) on helpers.write_tiny_etl shards",
        "config": str(TINY.relative_to(ROOT)),
        "overrides": ["inputs.etl_dir=<tmp>/etl", "run.out_dir=<tmp>/run", *OVERRIDES],
        "regenerate": ".venv/bin/python tests/golden_regen.py",
        "rtol": 1e-5,
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        "steps": list(range(1, STEPS + 1)),
        "losses": losses,
    }


# --------------------------------------------------------------------------------------------
# HSD and ORPO
# --------------------------------------------------------------------------------------------

#: the slate stages' job sections (the data and run folders are filled in per run)
_TRAIN = {"zero_stage": 1, "precision": "fp32", "global_batch_size": 32,
          "micro_batch_size": 16, "max_steps": STEPS, "lr": 1e-2, "warmup_steps": 2,
          "weight_decay": 0.0, "checkpoint_every": 0, "log_every": 1, "progress_bar": False}
SLATE_JOBS = {
    "hsd": {"stage": "hsd", "data": {"num_workers": 0, "shuffle_buffer": 64},
            "train": _TRAIN, "validation": {"every_epochs": 0.0},
            "model": {"K": 8, "L": 3, "N": 4, "d_model": 32, "n_heads": 2, "ctx_layers": 1,
                      "planner_layers": 2, "gen_layers": 1, "history_len": 6, "dropout": 0.0},
            "loss": {"lambda_ild": 0.1}},
    "orpo": {"stage": "orpo", "data": {"num_workers": 0, "shuffle_buffer": 32},
             "train": _TRAIN, "validation": {"every_epochs": 0.0},
             "model": {"K": 8, "L": 2, "N": 3, "d_model": 32, "n_heads": 2, "ctx_layers": 1,
                       "planner_layers": 2, "gen_layers": 1, "history_len": 6, "dropout": 0.0},
             "loss": {"lambda_or": 0.5}},
}
SLATE_TAGS = {"hsd": ("loss/total", "loss/ce", "loss/ild"),
              "orpo": ("loss/total", "loss/nll", "loss/or_loss")}
GOLDENS = {"tokenizer": GOLDEN, "hsd": HERE / "golden" / "hsd_tiny.json",
           "orpo": HERE / "golden" / "orpo_tiny.json"}


def slate_job(stage: str, root: Path) -> dict:
    """The golden job of ``stage`` (hsd, orpo) with its inputs written under ``root``."""
    job = json.loads(json.dumps(SLATE_JOBS[stage]))
    if stage == "hsd":
        etl, sid = write_slate_inputs(root / "inputs")
        job["inputs"] = {"etl_dir": str(etl), "sid_dir": str(sid)}
    else:
        etl, sid, init = write_pref_inputs(root / "inputs")
        job["inputs"] = {"etl_dir": str(etl), "sid_dir": str(sid), "init_from": str(init)}
    job["run"] = {"name": f"golden-{stage}", "out_dir": str(root / "run"), "seed": 0}
    return job


def slate_record(stage: str, losses: dict[str, list[float]]) -> dict:
    import deepspeed
    import torch

    return {
        "what": f"first {STEPS} logged losses of the tiny {stage} job in tests/golden_regen.py "
                "(fp32, ZeRO-1, seed 0, world size 1, in-process)",
        "job": {k: v for k, v in SLATE_JOBS[stage].items()},
        "inputs": "helpers.write_slate_inputs" if stage == "hsd" else
                  "helpers.write_pref_inputs",
        "regenerate": f".venv/bin/python tests/golden_regen.py --stage {stage}",
        "rtol": 1e-5,
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        "steps": list(range(1, STEPS + 1)),
        "losses": losses,
    }


def run_golden(stage: str, root: Path) -> dict:
    """Train ``stage``'s golden run under ``root``; its golden file's content."""
    from higr_dist.engine.config import load_job, resolve_job
    from higr_dist.engine.trainer import train

    if stage == "tokenizer":
        etl = write_golden_etl(root / "etl")
        train(load_job(TINY, golden_overrides(etl, root / "run")))
        return record(read_losses(root / "run"))
    train(resolve_job(slate_job(stage, root)))
    return slate_record(stage, read_losses(root / "run", SLATE_TAGS[stage]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate tests/golden/*.json.")
    p.add_argument("--stage", action="append", choices=[*GOLDENS, "all"],
                   help="which golden (repeatable; default: tokenizer)")
    p.add_argument("--out-dir", type=Path, default=HERE / "golden",
                   help="folder to write <stage>_tiny.json into")
    args = p.parse_args(argv)
    stages = list(GOLDENS) if "all" in (args.stage or []) else (args.stage or ["tokenizer"])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # a world of one, exactly like the tests' drivers
    from higr_dist.engine.trainer import shutdown

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for stage in dict.fromkeys(stages):
        with tempfile.TemporaryDirectory() as tmp:
            content = run_golden(stage, Path(tmp))
        out = args.out_dir / GOLDENS[stage].name
        out.write_text(json.dumps(content, indent=2) + "\n")
        total = content["losses"]["loss/total"]
        print(f"wrote {out}: loss/total {total[0]:.6f} -> {total[-1]:.6f}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
