"""Entry point that ``deepspeed`` / ``torchrun`` start on every rank: preflight, then train.

Launch commands (run from the repository root)::

    # tiny, CPU, 2 ranks on this machine (gloo); what the tests run
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 launcher/train.py \\
        --config configs/tiny/tokenizer.yaml
    # one machine, N GPUs (NCCL)
    deepspeed --num_gpus 8 launcher/train.py --config configs/kuairec/tokenizer.yaml
    torchrun --standalone --nproc_per_node 8 launcher/train.py --config configs/kuairec/tokenizer.yaml
    # a cluster (see hostfile.example: H20 nodes, 8 slots each; shared filesystem for runs/)
    higr-preflight --config configs/cluster/tokenizer.yaml --hostfile hostfile
    deepspeed --hostfile hostfile launcher/train.py --config configs/cluster/tokenizer.yaml
    # any config value can be overridden: key.path=value (after the options)
    torchrun --standalone --nproc_per_node 2 launcher/train.py \\
        --config configs/tiny/tokenizer.yaml train.zero_stage=3 train.precision=bf16

Single process without a launcher (``python launcher/train.py --config ...``) trains as a world
of one. Re-running the same command resumes from the latest checkpoint of the run folder.

Every rank runs the preflight (:mod:`higr_dist.engine.preflight`) before initialising anything
and exits with code 2, printing one line per problem, when the job is invalid. ``--local_rank``
(passed by the ``deepspeed`` launcher) is accepted; ranks are read from the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable without install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from higr_dist.engine.preflight import preflight, report  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train one HiGR stage with DeepSpeed (any launcher).")
    p.add_argument("--config", required=True, help="job YAML (configs/<scale>/<stage>.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (LOCAL_RANK in the environment wins)")
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = os.environ.get("RANK", "0")
    problems = preflight(args.config, args.overrides, world_size=world)
    if problems:
        report(problems, prefix=f"[rank {rank}] " if world > 1 else "")
        return 2

    from higr_dist.engine.config import load_job
    from higr_dist.engine.trainer import shutdown, train

    train(load_job(args.config, args.overrides))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
