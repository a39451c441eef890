"""A job farm for the fault tests: many short multi-rank training jobs for one import of torch.

``python tests/farm.py SPEC.json`` is started once per rank (``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` in the environment; :func:`run_farm` starts them). Each rank process imports
torch, DeepSpeed and the engine once, then runs the spec's jobs in order, each in a *forked*
child that is a real rank process of that job: it sets ``WORLD_SIZE``/``MASTER_PORT`` for the
job, redirects its output to ``<logs>/<job>.rank<R>.log`` and runs ``higr_dist.launch``'s
``main`` (preflight, train, the one-line errors and exit codes), so a ``kill -9`` of the job
(``train.kill_at_step``) kills that child only and the farm goes on with the next job. Jobs of
world 1 run on rank 0 only. Per job and rank the parent records the exit code (a negative
signal number when killed) and the wall time, in ``<logs>/results.rank<R>.json``.

Why: importing torch + DeepSpeed costs ~4 s per process on a CPU; the fault suite runs ~25 jobs
at world 2, which would be ~50 process starts (minutes of imports) as separate launches.

Job options (``spec["jobs"]`` entries): ``name``, ``world`` (1 or 2), ``port``, ``config``
(YAML path), ``overrides`` (list).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(job: dict, rank: int, logs: Path) -> int:
    os.environ.update(WORLD_SIZE=str(job["world"]), LOCAL_WORLD_SIZE=str(job["world"]),
                      MASTER_PORT=str(job["port"]))
    log = open(logs / f"{job['name']}.rank{rank}.log", "w")  # noqa: SIM115 - lives to exit
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    from higr_dist import launch

    return launch.main(["--config", job["config"], *job.get("overrides", [])])


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    logs = Path(spec["logs"])
    # everything a job imports lazily, imported once before the forks (~10 s per job else)
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.muon.original_muon  # noqa: F401 - imports torch._dynamo
    import torch

    import higr_dist.engine.trainer  # noqa: F401
    from higr_dist.stages.base import import_builtin_stages

    import_builtin_stages()
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)

    results = {}
    for job in spec["jobs"]:
        if rank >= job["world"]:
            continue
        t0 = time.time()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(job, rank, logs)
            except BaseException:  # a bug: the traceback goes to the job's log
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        results[job["name"]] = {"rc": os.waitstatus_to_exitcode(status), "start": t0,
                                "end": time.time()}
    (logs / f"results.rank{rank}.json").write_text(json.dumps(results, indent=1))


def run_farm(root: Path, jobs: list[dict], timeout: float = 900) -> dict[str, list[dict]]:
    """Run ``jobs`` on two rank processes; {job name: [rank 0 result, rank 1 result?]}.

    Each job needs ``name``, ``world``, ``config`` and ``overrides``; ports are assigned here.
    """
    import socket
    import subprocess

    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            job["port"] = s.getsockname()[1]
    spec = root / "farm.json"
    spec.write_text(json.dumps({"logs": str(logs), "jobs": jobs}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1",
               CUDA_VISIBLE_DEVICES="", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    procs = [subprocess.Popen([sys.executable, str(Path(__file__)), str(spec)], cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:  # a farm past its time (a hung job): its processes go, the test fails
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out: dict[str, list[dict]] = {}
    for r in range(2):
        path = logs / f"results.rank{r}.json"
        assert path.is_file(), f"farm rank {r} died (exit {procs[r].returncode})"
        for name, res in json.loads(path.read_text()).items():
            out.setdefault(name, []).append(res)
    return out


def job_log(root: Path, name: str, rank: int = 0) -> str:
    return (root / "logs" / f"{name}.rank{rank}.log").read_text()


if __name__ == "__main__":
    main(sys.argv[1])
