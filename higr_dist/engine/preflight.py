"""Preflight: check a job (config, shards, batch sizes, hostfile, device) before launching it.

``higr-preflight --config F [--hostfile H] [--world-size N] [key=value ...]`` prints one line per
problem and exits 2, or prints a one-line OK and exits 0. ``launcher/train.py`` runs the same
checks on every rank before it initialises anything, so a bad job fails in seconds with words,
not after minutes of start-up with a traceback.

Design
------
Every check appends human-readable strings to one list; nothing raises to the caller. The
checks are independent where they can be (a bad hostfile does not hide a bad config), and a
later check that needs an earlier result (the shard count needs a valid ``data`` section) is
skipped when that result is missing, since its problem is already reported. An unexpected
exception inside a check (a bug, an unreadable file) is reported as a problem naming the check
and the exception, not swallowed and not shown as a traceback.

Shared paths: :func:`check_shared_paths` is the one check that needs the running job (every
rank, after the process group exists), so the trainer calls it at training start rather than
:func:`preflight`: rank 0 writes a token file into ``out_dir`` and broadcasts its content;
every rank reads it back (a run folder that is not shared breaks checkpoints and resume, which
assume one folder all ranks write into). The training shards are compared by content instead
(rank 0's fingerprint of the shard listing and each listed shard's size): they are input, maybe
read-only, and identical copies on every node would serve as well as one shared folder. A
mismatch fails every rank with one line naming the path and the ranks/hosts that differ,
instead of a hang or a missing-file traceback minutes later.

World size: ``world_size`` argument, else the hostfile's total slots, else ``WORLD_SIZE`` (set
by the launchers), else 1. When both a hostfile and ``WORLD_SIZE`` are present they must
agree. Device checks (precision support) run against this machine's accelerator, i.e. they are
meaningful on the training nodes (where the launcher runs them), not on a CPU login node.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from higr_dist.config import ConfigError
from higr_dist.engine.config import JobConfig, load_job
from higr_dist.engine.hostfile import parse_hostfile
from higr_dist.engine.hostfile import world_size as hostfile_world_size
from higr_dist.layout import SHARD_LISTING


def _guard(name: str, problems: list[str], check: Callable[[], list[str]]) -> None:
    """Run one check; an unexpected exception becomes a problem line naming the check."""
    try:
        problems.extend(check())
    except Exception as e:  # reported, not swallowed: preflight output is the error channel
        problems.append(f"{name}: check failed with {type(e).__name__}: {e}")


def _env_world_size(problems: list[str]) -> int | None:
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        problems.append(f"WORLD_SIZE={raw!r} is not a positive integer")
        return None
    return int(raw)


def check_world(hostfile: str | None, world_size: int | None) -> tuple[int, list[str]]:
    """Resolve the world size and check the hostfile against it -> (world, problems)."""
    problems: list[str] = []
    env_world = _env_world_size(problems)
    implied = None
    if hostfile:
        hosts, host_problems = parse_hostfile(hostfile)
        problems += host_problems
        if hosts:
            implied = hostfile_world_size(hosts)
            if env_world is not None and env_world != implied:
                problems.append(f"hostfile {hostfile}: {len(hosts)} host(s) with {implied} slots "
                                f"in total, but WORLD_SIZE={env_world} (launch with all slots or "
                                "fix the slots)")
            if world_size is not None and world_size != implied:
                problems.append(f"hostfile {hostfile}: {implied} slots in total, but "
                                f"--world-size {world_size}")
    if world_size is not None and world_size < 1:
        problems.append(f"world size must be >= 1, got {world_size}")
    world = world_size or implied or env_world or 1
    return max(world, 1), problems


def check_shards(job: JobConfig, sample_kind: str, world: int) -> list[str]:
    """The stage's shard folder exists and has enough shards for ranks x workers."""
    from higr_dist.data.shardio import list_shards

    if not job.data.shards and not job.inputs.etl_dir:
        return ["inputs.etl_dir: not set (or set data.shards to the shard folder)"]
    folder = job.shard_dir(sample_kind)
    if not folder.is_dir():
        return [f"shard directory not found: {folder} (run the ETL first, or fix "
                f"{'data.shards' if job.data.shards else 'inputs.etl_dir'})"]
    try:
        shards = list_shards(folder)
    except FileNotFoundError as e:
        return [str(e)]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        return [f"{folder}/shards.json lists {len(missing)} shard(s) that do not exist, e.g. "
                f"{missing[0]}"]
    workers = max(1, job.data.num_workers)
    readers = world * workers
    if len(shards) < readers:
        return [f"too few shards: {len(shards)} in {folder} for {world} rank(s) x {workers} "
                f"worker(s) = {readers} readers (each reader streams whole shards); lower "
                "data.num_workers or write more shards"]
    if job.train.epochs and not job.train.max_steps and not (folder / SHARD_LISTING).is_file():
        return [f"train.epochs without train.max_steps needs {folder / SHARD_LISTING} (sample "
                "counts size the LR schedule); set train.max_steps"]
    return []


def check_precision(precision: str) -> list[str]:
    """The precision is supported by this machine's accelerator."""
    if precision == "fp32":
        return []
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    ok = acc.is_bf16_supported() if precision == "bf16" else acc.is_fp16_supported()
    if ok:
        return []
    return [f"train.precision: {precision} is not supported on this device "
            f"({acc.device_name()}); use {'bf16 or ' if acc.is_bf16_supported() else ''}fp32"]


def check_zero_options(options: dict) -> list[str]:
    """``train.zero_options`` against DeepSpeed's own ``zero_optimization`` schema."""
    if not options:
        return []
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**{**options, "stage": 0})
    except ValidationError as e:
        return [f"train.zero_options.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                for err in e.errors()]
    return []


def check_offload(job: JobConfig) -> list[str]:
    """ZeRO-Offload (``zero_options.offload_optimizer`` on cpu/nvme) with the client torch
    AdamW: DeepSpeed refuses it at start-up (it wants its own CPU Adam)."""
    from higr_dist.engine.ds_config import offloads_optimizer

    if offloads_optimizer(job.train) and job.train.optimizer == "torch":
        return ["train.optimizer: torch cannot run with ZeRO-Offload "
                "(train.zero_options.offload_optimizer); DeepSpeed needs its own CPU Adam: set "
                "train.optimizer to auto or deepspeed"]
    return []


def preflight(config_path: str | Path, overrides: list[str] | None = None,
              hostfile: str | Path | None = None, world_size: int | None = None) -> list[str]:
    """All problems with this job (empty list = OK to launch)."""
    world, problems = check_world(str(hostfile) if hostfile else None, world_size)
    try:
        job = load_job(config_path, overrides)
    except ConfigError as e:
        return problems + e.problems
    from higr_dist.stages.base import get_stage

    stage = get_stage(job.stage)
    _guard(f"stage {job.stage}", problems,
           lambda: list(stage.validate(job.model, job.loss, job.inputs)))
    problems += job.train.batch_problems(world)
    _guard("shards", problems, lambda: check_shards(job, stage.sample_kind, world))
    _guard("precision", problems, lambda: check_precision(job.train.precision))
    _guard("zero_options", problems, lambda: check_zero_options(job.train.zero_options))
    _guard("offload", problems, lambda: check_offload(job))
    return problems


# --------------------------------------------------------------------------------------------
# at training start (collective)
# --------------------------------------------------------------------------------------------


def shard_fingerprint(shard_dir: Path) -> str:
    """What this process sees of a shard folder: a digest of ``shards.json`` (when present) and
    of each listed shard's name and size (-1 when missing); ``missing: ...`` / ``unreadable:
    ...`` when it cannot list the folder."""
    from higr_dist.data.shardio import list_shards

    if not shard_dir.is_dir():
        return f"missing: {shard_dir}"
    h = hashlib.sha256()
    listing = shard_dir / SHARD_LISTING
    try:
        if listing.is_file():
            h.update(listing.read_bytes())
        for path in list_shards(shard_dir):
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                size = -1
            h.update(f"{Path(path).name}:{size};".encode())
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable: {type(e).__name__}: {e}"
    return h.hexdigest()


def _read_token(path: Path, wait_s: float) -> str | None:
    """The token file's text, retrying for up to ``wait_s`` (a shared filesystem may show a file
    another node just created only after its attribute cache expires); None if never seen."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return path.read_text()
        except OSError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)


def _who(ranks: list[tuple[int, str]]) -> str:
    hosts = sorted({h for _, h in ranks})
    return (f"rank(s) {', '.join(str(r) for r, _ in ranks)} on "
            f"{', '.join(hosts[:4])}{' ...' if len(hosts) > 4 else ''}")


def check_shared_paths(out_dir: Path, shard_dir: Path, wait_s: float = 10.0) -> None:
    """Collective (every rank, default process group): ``out_dir`` is one folder shared by all
    ranks and ``shard_dir`` has the same content on all ranks; otherwise raises the same
    one-line ``RuntimeError`` on every rank (see the module docstring)."""
    import torch.distributed as dist

    rank, host = dist.get_rank(), socket.gethostname()
    box: list[Any] = [None, None, None]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        path = out_dir / f".shared-check-{token}"
        path.write_text(token)
        box = [token, path.name, shard_fingerprint(shard_dir)]
    dist.broadcast_object_list(box, src=0)  # also the barrier after rank 0's write
    token, name, fingerprint = box
    mine = (rank, host, _read_token(out_dir / name, wait_s) == token,
            shard_fingerprint(shard_dir) == fingerprint)
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)  # every rank has read the token by now
    if rank == 0:
        (out_dir / name).unlink(missing_ok=True)
    blind = [(r, h) for r, h, ok, _ in seen if not ok]
    if blind:
        raise RuntimeError(f"run.out_dir {out_dir} is not shared by all ranks: {_who(blind)} "
                           f"cannot read the token rank 0 on {seen[0][1]} wrote there; put it "
                           "on a filesystem every node mounts at the same path")
    differ = [(r, h) for r, h, _, same in seen if not same]
    if differ:
        raise RuntimeError(f"training shards {shard_dir} differ between ranks: {_who(differ)} "
                           f"see another listing or other shard sizes than rank 0 on "
                           f"{seen[0][1]} (or none); put the ETL output on a filesystem every "
                           "node mounts, or identical copies at the same path")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="higr-preflight", description=(
        "Check a training job before launching it: config keys and types, stage inputs, shard "
        "folder and count, batch sizes, hostfile, precision on this device. Exit 0 when OK, 2 "
        "with one line per problem otherwise."))
    p.add_argument("--config", required=True, help="job config: a file, or a shipped one by name (tiny/hsd)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile ('<host> slots=<N>')")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks to check for (default: hostfile slots, else $WORLD_SIZE, else 1)")
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    return p


def report(problems: list[str], stream=None, prefix: str = "") -> None:
    """Print the problems (one line each) under a header."""
    stream = stream or sys.stderr
    print(f"{prefix}preflight: {len(problems)} problem(s):", file=stream)
    for line in problems:
        print(f"{prefix}  - {line}", file=stream)
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    """``higr-preflight`` (wired in ``higr_dist.cli:preflight_main``): 0 OK, 2 problems."""
    args = _parser().parse_args(argv)
    problems = preflight(args.config, args.overrides, args.hostfile, args.world_size)
    if problems:
        report(problems)
        return 2
    world, _ = check_world(args.hostfile, args.world_size)
    print(f"preflight: OK ({args.config}, world size {world})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
