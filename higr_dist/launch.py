"""What ``deepspeed`` / ``torchrun`` start on every rank: preflight, then train one stage.

Launch commands (any folder; the configs are the shipped ones by name, or your own files)::

    # tiny, CPU, 2 ranks on this machine (gloo); what the tests run
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m higr_dist.launch \\
        --config tiny/tokenizer
    # one machine, N GPUs (NCCL)
    deepspeed --num_gpus 8 --module higr_dist.launch --config kuairec/tokenizer
    torchrun --standalone --nproc_per_node 8 -m higr_dist.launch --config kuairec/tokenizer
    # a cluster (see hostfile.example: H20 nodes, 8 slots each; shared filesystem for runs/)
    higr-preflight --config cluster/tokenizer --hostfile hostfile
    deepspeed --hostfile hostfile --module higr_dist.launch --config cluster/tokenizer
    # any config value can be overridden: key.path=value (after the options)
    torchrun --standalone --nproc_per_node 2 -m higr_dist.launch \\
        --config tiny/tokenizer train.zero_stage=3 train.precision=bf16

``launcher/train.py`` in a checkout is the same entry point as a file, for launchers that take
a script path (``deepspeed --hostfile hostfile launcher/train.py --config ...``).

Single process without a launcher (``python -m higr_dist.launch --config ...``) trains as a world
of one. Re-running the same command resumes from the latest checkpoint of the run folder.

Every rank runs the preflight (:mod:`higr_dist.engine.preflight`) before initialising anything
and exits with code 2, printing one line per problem, when the job is invalid. ``--local_rank``
(passed by the ``deepspeed`` launcher) is accepted; ranks are read from the environment.

A run the engine stops on purpose (:mod:`higr_dist.engine.errors`: no sample, a rank without
data, a non-finite loss, a checkpoint the disk could not hold, a run folder the ranks do not
share) and the user errors it meets (a config, a missing file, a corrupt shard) print one line
per rank, ``[rank R] train.py: error: ...``, and exit with code 2 (the input's fault) or 1 (the
run failed; its last complete checkpoint is intact); so does a rank whose collective failed
because a peer rank died (exit 1). Anything else is a bug: a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from higr_dist.engine.preflight import preflight, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train one HiGR stage with DeepSpeed (any launcher).")
    p.add_argument("--config", required=True, help="job config: a file, or a shipped one by name (tiny/hsd)")
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

    from higr_dist.config import ConfigError
    from higr_dist.data.loader import ShardError
    from higr_dist.engine.config import load_job
    from higr_dist.engine.errors import RunStopped, one_line
    from higr_dist.engine.trainer import shutdown, train

    try:
        train(load_job(args.config, args.overrides))
    except (RunStopped, ConfigError, ShardError, FileNotFoundError) as e:
        code = getattr(e, "exit_code", 2)
        print(f"[rank {rank}] train.py: error: {one_line(e)}", file=sys.stderr, flush=True)
        shutdown(wait=False)
        return code
    except RuntimeError as e:  # a peer rank died (killed, out of memory, ...): one line
        if not peer_lost(e):
            raise
        print(f"[rank {rank}] train.py: error: a peer rank is gone ({one_line(e)}); its own "
              "log says why; rerunning the command resumes from the last complete checkpoint",
              file=sys.stderr, flush=True)
        shutdown(wait=False)
        return 1
    shutdown()
    return 0


#: what gloo (and NCCL's socket layer) say when the other end of a collective vanished
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_lost(exc: BaseException) -> bool:
    """Whether a collective failed because a peer process is gone."""
    return any(s in str(exc) for s in _PEER_LOST)


if __name__ == "__main__":
    sys.exit(main())
