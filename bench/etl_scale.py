"""A tenth of a billion rows on this box: the ETL at 10^8 rows against 10^7, then the loader.

    nice -n 10 python bench/etl_scale.py                      # 10M, 100M + loader, 10M
    python bench/etl_scale.py --rows 1000000 10000000 --work /tmp/s   # a quick look

Each ETL size runs in its own fresh process (``local[2]`` by default, as ``bench/etl.py``):
``higr_dist.etl.synthetic.generate`` writes the log (users = rows / ``--per-user``, a fixed
catalogue of ``--items``), then ``run_etl`` with the default ``EtlConfig`` and
``shuffle_partitions`` grown with the input (``--rows-per-partition``, so a task's share stays
the same size: what one would do on a cluster). Measured per size:

- wall seconds and rows/s of the ETL (and of the generation, apart); CPU seconds of the
  driver, the JVM and the Python workers (less sensitive than wall time to other jobs on the
  machine: the load average before and after is recorded too);
- peak RSS: the driver's Python (``getrusage``) and the JVM (``VmHWM``; in local mode the
  executors live in it, its heap capped by ``spark.driver.memory``);
- from Spark's event log (task metrics summed over all tasks): memory and disk bytes spilled,
  shuffle bytes written and read, the largest peak execution memory of a task;
- shard bytes and counts per kind (manifest) and the row accounting rows_in = rows_out +
  rows_quarantined.

The smaller size runs before and after the large one ("alongside": their mean is the
baseline), and the verdicts are: cost linear within 1.15x (ETL seconds per row, and CPU seconds
per row, at 100M over 10M) and memory flat (driver and JVM peaks within 1.15x).

Right after the large ETL (before the small size's repeat) the loader streams the large
output's ``slates/train`` for one epoch as 2 ranks (two
processes at once) x 2 spawned workers each, exactly once: every sample's key is hashed
(64-bit BLAKE2b) in the workers, the ranks' hashes together must have no duplicate and number
the manifest's sample count (as ``tests/test_loader.py`` accounts for keys, without holding
10^7 strings). Samples/s per rank and together. The collate is the hashing only: decode,
unpack and shuffle are measured, the model's collate is not (``bench/etl.py`` has that).

Disk: checked first (~100 bytes per row at the peak: the log, the shards and Spark's shuffle
files, which stay until the Spark context ends; docs/CLUSTER.md has the parts); put ``--work``
where it fits. Everything under ``--work`` is deleted afterwards unless
``--keep``. JSON: ``--out`` (``bench/results/etl_scale.json``), rewritten after every part
(``"complete": false`` until the verdicts are in); the sizing guide built on it is
``docs/CLUSTER.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from etl import _cpu_delta, _load_avg, _peak_rss_mb, _self_peak_rss_mb, _tree_cpu_s  # noqa: E402

#: disk needed per input row at the peak, with a margin (the log, the shards and the shuffle
#: files, all present at the end of the ETL: their sizes per row are in docs/CLUSTER.md)
BYTES_PER_ROW = 100
LINEAR_WITHIN = 1.15
FLAT_WITHIN = 1.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs=2, default=[10_000_000, 100_000_000],
                   metavar=("SMALL", "LARGE"), help="the two sizes (rows)")
    p.add_argument("--per-user", type=int, default=100, help="interactions per synthetic user")
    p.add_argument("--items", type=int, default=20_000, help="catalogue size (both sizes)")
    p.add_argument("--rows-per-partition", type=int, default=1_250_000,
                   help="shuffle_partitions = rows / this (8 at 10M, 80 at 100M)")
    p.add_argument("--master", default="local[2]", help="Spark master")
    p.add_argument("--driver-memory", default="2g", help="spark.driver.memory")
    p.add_argument("--no-repeat", action="store_true",
                   help="run the small size once (before the large one), not also after it")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--loader-ranks", type=int, default=2, help="ranks (processes at once)")
    p.add_argument("--batch-size", type=int, default=1024, help="loader batch size")
    p.add_argument("--skip-loader", action="store_true", help="no loader epoch")
    p.add_argument("--work", default="/tmp/higr-etl-scale",
                   help="scratch folder (data, shards, Spark's local dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch data afterwards")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "etl_scale.json"))
    # children
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tag", default=None, help=argparse.SUPPRESS)
    p.add_argument("--loader-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--etl-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# child: one ETL size
# --------------------------------------------------------------------------------------------


def _event_log_metrics(log_dir: Path) -> dict:
    """Task metrics summed over every task of the application's event log."""
    totals = {"tasks": 0, "memory_bytes_spilled": 0, "disk_bytes_spilled": 0,
              "shuffle_bytes_written": 0, "shuffle_bytes_read": 0,
              "max_task_peak_execution_memory": 0, "executor_run_time_s": 0.0,
              "executor_cpu_time_s": 0.0, "jvm_gc_time_s": 0.0}
    # Spark 4 rolls event logs by default: eventlog_v2_<app>/events_<n>_<app> (+ appstatus);
    # a single file <app> when rolling is off
    logs = sorted(p for p in log_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and not p.name.startswith("appstatus"))
    for path in logs:
        with open(path) as fh:
            for line in fh:
                if '"SparkListenerTaskEnd"' not in line[:60]:
                    continue
                m = json.loads(line).get("Task Metrics") or {}
                totals["tasks"] += 1
                totals["memory_bytes_spilled"] += m.get("Memory Bytes Spilled", 0)
                totals["disk_bytes_spilled"] += m.get("Disk Bytes Spilled", 0)
                sw = m.get("Shuffle Write Metrics", {})
                sr = m.get("Shuffle Read Metrics", {})
                totals["shuffle_bytes_written"] += sw.get("Shuffle Bytes Written", 0)
                totals["shuffle_bytes_read"] += (sr.get("Remote Bytes Read", 0)
                                                 + sr.get("Local Bytes Read", 0))
                totals["max_task_peak_execution_memory"] = max(
                    totals["max_task_peak_execution_memory"], m.get("Peak Execution Memory", 0))
                totals["executor_run_time_s"] += m.get("Executor Run Time", 0) / 1000
                totals["executor_cpu_time_s"] += m.get("Executor CPU Time", 0) / 1e9
                totals["jvm_gc_time_s"] += m.get("JVM GC Time", 0) / 1000
    totals["executor_run_time_s"] = round(totals["executor_run_time_s"], 1)
    totals["executor_cpu_time_s"] = round(totals["executor_cpu_time_s"], 1)
    totals["jvm_gc_time_s"] = round(totals["jvm_gc_time_s"], 1)
    totals["event_logs"] = len(logs)
    if not totals["tasks"]:
        raise RuntimeError(f"no task metrics in Spark's event log under {log_dir}")
    return totals


def run_one(args: argparse.Namespace) -> dict:
    from higr_dist.config import load
    from higr_dist.etl.build import run_etl
    from higr_dist.etl.config import EtlConfig
    from higr_dist.etl.spark import get_spark
    from higr_dist.etl.synthetic import SyntheticConfig, generate
    from higr_dist.layout import RunLayout

    rows = args.one
    users = rows // args.per_user
    partitions = max(8, rows // args.rows_per_partition)
    scratch = Path(args.work).resolve() / f"rows{rows}-{args.tag}"
    shutil.rmtree(scratch, ignore_errors=True)
    layout = RunLayout(scratch)  # data/ and etl/ as in a run folder, next to Spark's scratch
    events = scratch / "events"
    events.mkdir(parents=True)
    local = scratch / "spark-local"
    # the event log (spill and shuffle metrics), Spark's scratch under --work
    os.environ["PYSPARK_SUBMIT_ARGS"] = (
        f"--conf spark.eventLog.enabled=true --conf spark.eventLog.dir=file://{events} "
        f"--conf spark.eventLog.compress=false --conf spark.local.dir={local} pyspark-shell")
    spark = get_spark(app_name=f"bench-etl-scale-{rows}", master=args.master,
                      shuffle_partitions=partitions, driver_memory=args.driver_memory)
    jvm_pid = int(spark._jvm.java.lang.ProcessHandle.current().pid())
    syn = SyntheticConfig(users=users, items=args.items, interactions_per_user=args.per_user)
    c0, t0 = _tree_cpu_s(), time.perf_counter()
    inter, items = generate(spark, syn, str(layout.data))
    gen_s, c1 = time.perf_counter() - t0, _tree_cpu_s()
    data_bytes = sum(p.stat().st_size for p in layout.data.rglob("*") if p.is_file())
    etl_cfg = load(EtlConfig, None, [f"shuffle_partitions={partitions}"])
    t0 = time.perf_counter()
    manifest = run_etl(spark, etl_cfg, inter, items, layout.etl.root, overwrite=True)
    etl_s, c2 = time.perf_counter() - t0, _tree_cpu_s()
    jvm_peak = _peak_rss_mb(jvm_pid)
    py_peak = _self_peak_rss_mb()
    spark.stop()
    if manifest["rows_in"] != rows:
        raise RuntimeError(f"generated {manifest['rows_in']} rows, asked for {rows}")
    shutil.rmtree(layout.data, ignore_errors=True)
    shutil.rmtree(local, ignore_errors=True)
    kinds = manifest["kinds"]
    return {
        "rows": rows, "users": users, "items": args.items, "tag": args.tag,
        "shuffle_partitions": partitions,
        "gen_s": round(gen_s, 1), "etl_s": round(etl_s, 1),
        "etl_rows_per_s": round(rows / etl_s), "gen_rows_per_s": round(rows / gen_s),
        "gen_cpu_s": _cpu_delta(c0, c1), "etl_cpu_s": _cpu_delta(c1, c2),
        "driver_python_peak_rss_mb": round(py_peak, 1), "jvm_peak_rss_mb": round(jvm_peak, 1),
        "spark_metrics": _event_log_metrics(events),
        "etl_phases_s": manifest["timings_s"],
        "accounting": {k: manifest[k] for k in ("rows_in", "rows_out", "rows_quarantined")},
        "accounting_holds": manifest["rows_in"] == manifest["rows_out"]
        + manifest["rows_quarantined"],
        "input_bytes": data_bytes,
        "samples": {k: v["samples"] for k, v in kinds.items()},
        "shards": {k: len(v["shards"]) for k, v in kinds.items()},
        "shard_bytes": {k: sum(s["bytes"] for s in v["shards"]) for k, v in kinds.items()},
        "shard_bytes_total": sum(s["bytes"] for v in kinds.values() for s in v["shards"]),
        "etl_dir": str(layout.etl.root),
    }


# --------------------------------------------------------------------------------------------
# child: one loader rank
# --------------------------------------------------------------------------------------------


class KeyHashes:
    """Collate: the batch's sample keys as 64-bit BLAKE2b hashes (runs in the workers)."""

    def __call__(self, samples: list[dict]):
        import numpy as np

        return np.fromiter((int.from_bytes(hashlib.blake2b(s["__key__"].encode(),
                                                           digest_size=8).digest(), "little")
                            for s in samples), dtype=np.uint64, count=len(samples))


def run_loader_rank(args: argparse.Namespace) -> dict:
    import numpy as np

    from higr_dist.data.loader import LoaderConfig, StreamingLoader
    from higr_dist.data.shardio import list_shards
    from higr_dist.layout import EtlLayout
    from higr_dist.schema import FOLDERS

    shards = list_shards(EtlLayout(Path(args.etl_dir)).kind("slates/train"))
    cfg = LoaderConfig(num_workers=args.loader_workers, shuffle_buffer=1000)
    loader = StreamingLoader(shards, FOLDERS["slates/train"], KeyHashes(), args.batch_size, cfg,
                             rank=args.loader_rank, world_size=args.loader_ranks)
    parts, t0, first = [], time.perf_counter(), None
    for batch in loader:  # one epoch
        if first is None:
            first = time.perf_counter() - t0
        parts.append(batch)
    seconds = time.perf_counter() - t0
    hashes = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
    np.save(args.result + ".npy", hashes)
    return {"rank": args.loader_rank, "samples": int(hashes.size), "seconds": round(seconds, 1),
            "samples_per_s": round(hashes.size / seconds), "first_batch_s": round(first or 0, 2),
            "shards": len(shards), "epoch_after": loader.epoch,
            "peak_rss_mb": round(_self_peak_rss_mb(), 1)}


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SPARK_LOCAL_IP": "127.0.0.1",
            "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "PYTHONPATH": str(ROOT)}


def _common(args: argparse.Namespace) -> list[str]:
    return ["--per-user", str(args.per_user), "--items", str(args.items),
            "--rows-per-partition", str(args.rows_per_partition), "--master", args.master,
            "--driver-memory", args.driver_memory, "--work", args.work,
            "--loader-workers", str(args.loader_workers),
            "--loader-ranks", str(args.loader_ranks), "--batch-size", str(args.batch_size)]


def _etl_child(args: argparse.Namespace, rows: int, tag: str) -> dict:
    result = Path(args.work) / f"result-{rows}-{tag}.json"
    before = _load_avg()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--one", str(rows), "--tag", tag,
                    "--result", str(result), *_common(args)], check=True, env=_env())
    res = json.loads(result.read_text())
    res["process_s"] = round(time.perf_counter() - t0, 1)
    res["load_avg_before"], res["load_avg_after"] = before, _load_avg()
    print(f"[etl_scale] {rows:,} rows ({tag}): ETL {res['etl_s']} s, "
          f"{res['etl_rows_per_s']:,} rows/s, JVM peak {res['jvm_peak_rss_mb']:.0f} MiB, "
          f"load {before} -> {res['load_avg_after']}", flush=True)
    return res


def _loader(args: argparse.Namespace, etl_dir: str, expected: int) -> dict:
    import numpy as np

    before = _load_avg()
    t0 = time.perf_counter()
    procs, results = [], []
    for rank in range(args.loader_ranks):
        result = str(Path(args.work) / f"loader-rank{rank}")
        procs.append((result, subprocess.Popen(
            [sys.executable, __file__, "--loader-rank", str(rank), "--etl-dir", etl_dir,
             "--result", result, *_common(args)], env=_env())))
    for result, proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"loader rank failed: {proc.args}")
        results.append(json.loads(Path(result + ".json").read_text()))
    wall = time.perf_counter() - t0
    hashes = np.concatenate([np.load(r + ".npy") for r, _ in procs])
    per_rank = [np.load(r + ".npy") for r, _ in procs]
    distinct = int(np.unique(hashes).size)
    cross = int(np.intersect1d(per_rank[0], per_rank[1]).size) if len(per_rank) == 2 else None
    return {"kind": "slates/train", "ranks": args.loader_ranks,
            "workers_per_rank": args.loader_workers, "batch_size": args.batch_size,
            "expected_samples": expected, "samples": int(hashes.size), "distinct": distinct,
            "shared_between_ranks": cross,
            "exactly_once": int(hashes.size) == distinct == expected,
            "wall_s": round(wall, 1), "samples_per_s": round(hashes.size / wall),
            "per_rank": results, "load_avg_before": before, "load_avg_after": _load_avg()}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def _scaling(runs: list[dict], small: int, large: int) -> dict | None:
    """The large size against the mean of the small size's runs so far (None until both)."""
    smalls = [r for r in runs if r["rows"] == small]
    bigs = [r for r in runs if r["rows"] == large]
    if not smalls or not bigs:
        return None
    big = bigs[0]

    def base(key: str, sub: str | None = None) -> float:
        vals = [r[key][sub] if sub else r[key] for r in smalls]
        return sum(vals) / len(vals)

    per_row = large / small
    scaling = {
        "rows_ratio": per_row,
        "small_runs": len(smalls),
        "etl_s_per_row_ratio": _ratio(big["etl_s"] / per_row, base("etl_s")),
        "etl_cpu_s_per_row_ratio": _ratio(big["etl_cpu_s"]["total"] / per_row,
                                          base("etl_cpu_s", "total")),
        "driver_python_peak_ratio": _ratio(big["driver_python_peak_rss_mb"],
                                           base("driver_python_peak_rss_mb")),
        "jvm_peak_ratio": _ratio(big["jvm_peak_rss_mb"], base("jvm_peak_rss_mb")),
        "shard_bytes_per_row_ratio": _ratio(big["shard_bytes_total"] / per_row,
                                            base("shard_bytes_total")),
        "small_runs_etl_s": [r["etl_s"] for r in smalls],
        "small_runs_etl_cpu_s": [r["etl_cpu_s"]["total"] for r in smalls],
    }
    scaling["cost_linear_within_1_15"] = (scaling["etl_s_per_row_ratio"] <= LINEAR_WITHIN
                                          and scaling["etl_cpu_s_per_row_ratio"] <= LINEAR_WITHIN)
    scaling["memory_flat_within_1_15"] = (scaling["driver_python_peak_ratio"] <= FLAT_WITHIN
                                          and scaling["jvm_peak_ratio"] <= FLAT_WITHIN)
    return scaling


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        Path(args.result).write_text(json.dumps(run_one(args), indent=1))
        return 0
    if args.loader_rank is not None:
        Path(args.result + ".json").write_text(json.dumps(run_loader_rank(args), indent=1))
        return 0

    small, large = args.rows
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = BYTES_PER_ROW * large + BYTES_PER_ROW * small
    print(f"[etl_scale] {work}: {free / 2**30:.1f} GiB free, ~{need / 2**30:.1f} GiB needed",
          flush=True)
    if free < need:
        print(f"[etl_scale] not enough disk under {work}: pass --work on a larger file system",
              file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    summary = {
        "bench": "etl_scale", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                     / 2**30, 1)},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "master": args.master, "driver_memory": args.driver_memory,
        "work": str(work), "disk_free_gib_before": round(free / 2**30, 1),
        "complete": False, "runs": [], "scaling": None, "loader": None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        """The JSON so far (after every part, so a run cut short keeps what it measured)."""
        summary["total_s"] = round(time.perf_counter() - t_all, 1)
        summary["scaling"] = _scaling(summary["runs"], small, large)
        runs = [{k: v for k, v in r.items() if k != "etl_dir"} for r in summary["runs"]]
        out.write_text(json.dumps({**summary, "runs": runs}, indent=1))

    def drop(path: str) -> None:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)

    runs = summary["runs"]
    try:
        runs.append(_etl_child(args, small, "before"))
        drop(runs[0]["etl_dir"])
        write()
        runs.append(_etl_child(args, large, "large"))
        big = runs[1]
        write()
        # the loader before the repeat of the small size: the epoch is the part a run cut short
        # by time would otherwise lose
        if not args.skip_loader:
            summary["loader"] = _loader(args, big["etl_dir"], big["samples"]["slates/train"])
            write()
        drop(big["etl_dir"])
        if not args.no_repeat:
            runs.append(_etl_child(args, small, "after"))
            drop(runs[-1]["etl_dir"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary["complete"] = True
    write()
    scaling = summary["scaling"]
    loader = summary["loader"]
    print(json.dumps({"scaling": scaling, "loader": {k: v for k, v in (loader or {}).items()
                                                     if k != "per_rank"}}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
