"""Golden losses of the tiny tokenizer: what ``tests/golden/tokenizer_tiny.json`` holds and how
it is (re)made.

Regenerate (from the repository root; ~15 s)::

    .venv/bin/python tests/golden_regen.py        # or: .venv/bin/python -m tests.golden_regen

The run: ``configs/tiny/tokenizer.yaml`` as shipped (ZeRO-1, fp32, seed 0, global batch 64 =
micro 16 x 4 accumulation), on the deterministic tiny pair shards of
:func:`test_engine.write_tiny_etl` with the config's own ``model.input_dim`` features, as a
world of one (no launcher environment, the engine trains in-process), for :data:`STEPS`
optimizer steps, logging every step. The losses are read back from the run's TensorBoard event
files (``loss/total`` and its terms, steps 1..STEPS), so the golden test checks the whole path:
shards -> loader -> stage -> DeepSpeed step -> logged means.

``tests/test_engine_dist.py::test_golden_losses`` repeats exactly this run (in its world-of-one
driver process, as the first run there) and compares with rtol 1e-5. Regenerate only after a
deliberate change of numerics (model, loss, optimizer, data order, the tiny config) and say
why in the commit; a drift nobody intended is what the test is there to catch. The figures are
CPU fp32 with ``OMP_NUM_THREADS=1``; another CPU family may round differently.
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

from test_engine import write_tiny_etl  # noqa: E402

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


def read_losses(run: Path) -> dict[str, list[float]]:
    """tag -> the logged value at steps 1..STEPS, from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in TAGS:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        if steps != list(range(1, STEPS + 1)):
            raise ValueError(f"{run / 'tb'}: {tag} logged at steps {steps}, expected 1..{STEPS}")
        out[tag] = [float(e.value) for e in events]
    return out


def record(losses: dict[str, list[float]]) -> dict:
    """The golden file's content: the losses plus what produced them."""
    import deepspeed
    import torch

    return {
        "what": f"first {STEPS} logged losses of configs/tiny/tokenizer.yaml (fp32, seed 0, "
                "world size 1, in-process) on test_engine.write_tiny_etl shards",
        "config": str(TINY.relative_to(ROOT)),
        "overrides": ["inputs.etl_dir=<tmp>/etl", "run.out_dir=<tmp>/run", *OVERRIDES],
        "regenerate": ".venv/bin/python tests/golden_regen.py",
        "rtol": 1e-5,
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        "steps": list(range(1, STEPS + 1)),
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate tests/golden/tokenizer_tiny.json.")
    p.add_argument("--out", type=Path, default=GOLDEN, help="file to write")
    args = p.parse_args(argv)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # a world of one, exactly like the test's driver
    from higr_dist.engine.config import load_job
    from higr_dist.engine.trainer import shutdown, train

    with tempfile.TemporaryDirectory() as tmp:
        etl = write_golden_etl(Path(tmp) / "etl")
        run = Path(tmp) / "run"
        train(load_job(TINY, golden_overrides(etl, run)))
        shutdown()
        losses = read_losses(run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record(losses), indent=2) + "\n")
    print(f"wrote {args.out}: loss/total {losses['loss/total'][0]:.6f} -> "
          f"{losses['loss/total'][-1]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
