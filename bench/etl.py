"""ETL throughput: synthetic generation + the whole ETL on 1M and 10M rows, and loader speed.

What is measured, per size (each size in its own fresh process, so peak memory is per size):

- ``gen``: ``higr_dist.etl.synthetic.generate`` (a Spark job) writing the log and items table;
- ``etl``: ``higr_dist.etl.build.run_etl`` on that output, end to end (catalogue, validation +
  quarantine, sequences, features, every shard folder, manifest), with its phase timers;
- rows/s of each, and of both together;
- peak RSS of the driver's Python process (``getrusage``) and of the JVM (driver and, in local
  mode, the executors: ``VmHWM`` of the JVM process): a driver that collected rows would grow
  with the input; ours should stay flat from 1M to 10M;
- the loader: ``higr_dist.data.loader.StreamingLoader`` streaming ``slates/train`` with the HSD
  stage's real collate (``SlateCollate`` over a random SID table) for ``--loader-seconds``,
  after Spark has stopped; samples/s with 0 workers (in process) and ``--loader-workers``.

The ETL runs with the default ``EtlConfig`` (128-d features, 10k samples per shard) except
``shuffle_partitions``; the catalogue size is fixed (``--items``) while users grow with the rows,
so the 10x ratio is the cost of 10x interactions. Output: a table on stdout, JSON at ``--out``.
Targets: >= 0.5 M rows/s end to end on ``local[2]``; ETL time ratio 10M / 1M <= 11.

    python bench/etl.py                                  # 1M and 10M rows, local[2]
    python bench/etl.py --rows 1000000 --out /tmp/etl.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000],
                   help="interaction rows per size (users = rows / --per-user)")
    p.add_argument("--per-user", type=int, default=100, help="interactions per synthetic user")
    p.add_argument("--items", type=int, default=20_000, help="catalogue size (all sizes)")
    p.add_argument("--master", default="local[2]", help="Spark master")
    p.add_argument("--driver-memory", default="2g", help="spark.driver.memory")
    p.add_argument("--shuffle-partitions", type=int, default=8, help="EtlConfig.shuffle_partitions")
    p.add_argument("--loader-seconds", type=float, default=20.0,
                   help="seconds of loader streaming per setting (0 = skip the loader)")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers (2nd run)")
    p.add_argument("--batch-size", type=int, default=256, help="loader batch size")
    p.add_argument("--work", default="runs/bench/etl", help="scratch folder (data + ETL output)")
    p.add_argument("--keep", action="store_true", help="keep the scratch data afterwards")
    p.add_argument("--out", default="bench/results/etl.json", help="JSON results file")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one size
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # child: result file
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# child: one size
# --------------------------------------------------------------------------------------------


def _peak_rss_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def _self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tree_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process's descendants: the JVM and the
    Python workers it forked (alive until Spark stops), plus this driver process."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu, name = {}, {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        head, _, tail = stat.rpartition(")")
        fields = tail.split()
        pid = int(entry)
        parent[pid], name[pid] = int(fields[1]), head.partition("(")[2]
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    me = os.getpid()
    out = {"driver": cpu.get(me, 0.0), "jvm": 0.0, "workers": 0.0}
    stack = list(children.get(me, []))
    while stack:
        pid = stack.pop()
        out["jvm" if name[pid] == "java" else "workers"] += cpu[pid]
        stack += children.get(pid, [])
    return out


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: round(after[k] - before[k], 1) for k in after}
    d["total"] = round(sum(d.values()), 1)
    return d


def _loader_rate(etl_dir: Path, num_items: int, workers: int, batch_size: int,
                 seconds: float, scratch: Path) -> dict:
    """Samples/s of the streaming loader over slates/train with the HSD collate."""
    import numpy as np

    from higr_dist.data.loader import LoaderConfig, StreamingLoader
    from higr_dist.data.shardio import list_shards
    from higr_dist.data.slates import SlateCollate
    from higr_dist.layout import EtlLayout
    from higr_dist.schema import FOLDERS

    sid_dir = scratch / "sids"
    sid_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(sid_dir / "sid_table.npy", rng.integers(0, 256, size=(num_items, 3), dtype=np.int64))
    (sid_dir / "sid_meta.json").write_text(json.dumps({"K": 256, "L": 3, "num_items": num_items}))
    shards = list_shards(EtlLayout(etl_dir).kind("slates/train"))
    cfg = LoaderConfig(num_workers=workers, shuffle_buffer=1000)
    loader = StreamingLoader(shards, FOLDERS["slates/train"], SlateCollate(sid_dir, 5, 50),
                             batch_size, cfg)
    samples, t0, first = 0, time.perf_counter(), None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t0  # worker start + first shard open
            t0, samples = time.perf_counter(), 0
            continue
        samples += batch.num_samples
        if time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - t0
    return {"workers": workers, "batch_size": batch_size, "samples": samples,
            "seconds": round(dt, 3), "samples_per_s": round(samples / dt, 1) if dt else None,
            "first_batch_s": round(first or 0.0, 3)}


def run_one(args: argparse.Namespace) -> dict:
    from higr_dist.config import load
    from higr_dist.etl.build import run_etl
    from higr_dist.etl.config import EtlConfig
    from higr_dist.etl.spark import get_spark
    from higr_dist.etl.synthetic import SyntheticConfig, generate
    from higr_dist.layout import RunLayout

    rows = args.one
    users = rows // args.per_user
    scratch = Path(args.work).resolve() / f"rows{rows}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    layout = RunLayout(scratch)  # the scratch folder is laid out as a run's: data/ and etl/
    spark = get_spark(app_name="bench-etl", master=args.master,
                      shuffle_partitions=args.shuffle_partitions,
                      driver_memory=args.driver_memory)
    jvm_pid = int(spark._jvm.java.lang.ProcessHandle.current().pid())
    syn = SyntheticConfig(users=users, items=args.items, interactions_per_user=args.per_user)
    c0, t0 = _tree_cpu_s(), time.perf_counter()
    inter, items = generate(spark, syn, str(layout.data))
    gen_s, c1 = time.perf_counter() - t0, _tree_cpu_s()
    etl_cfg = load(EtlConfig, None, [f"shuffle_partitions={args.shuffle_partitions}"])
    t0 = time.perf_counter()
    manifest = run_etl(spark, etl_cfg, inter, items, layout.etl.root, overwrite=True)
    etl_s, c2 = time.perf_counter() - t0, _tree_cpu_s()
    jvm_peak = _peak_rss_mb(jvm_pid)
    py_peak = _self_peak_rss_mb()
    spark.stop()
    if manifest["rows_in"] != rows:
        raise RuntimeError(f"generated {manifest['rows_in']} rows, asked for {rows}")
    out = {
        "rows": rows, "users": users, "items": args.items,
        "gen_s": round(gen_s, 3), "etl_s": round(etl_s, 3),
        "gen_rows_per_s": round(rows / gen_s), "etl_rows_per_s": round(rows / etl_s),
        "total_rows_per_s": round(rows / (gen_s + etl_s)),
        "gen_cpu_s": _cpu_delta(c0, c1), "etl_cpu_s": _cpu_delta(c1, c2),
        "driver_python_peak_rss_mb": round(py_peak, 1),
        "jvm_peak_rss_mb": round(jvm_peak, 1),
        "etl_phases_s": manifest["timings_s"],
        "samples": {k: v["samples"] for k, v in manifest["kinds"].items()},
        "shards": {k: len(v["shards"]) for k, v in manifest["kinds"].items()},
        "shard_bytes": sum(s["bytes"] for v in manifest["kinds"].values() for s in v["shards"]),
    }
    Path(args.result).write_text(json.dumps(out, indent=1))  # kept if the loader part fails
    if args.loader_seconds > 0:
        out["loader"] = [
            _loader_rate(layout.etl.root, manifest["num_items"], w, args.batch_size,
                         args.loader_seconds, scratch)
            for w in (0, args.loader_workers)]
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# parent: every size, table, JSON
# --------------------------------------------------------------------------------------------


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _child(args: argparse.Namespace, rows: int, result: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", str(rows), "--result", str(result),
           "--per-user", str(args.per_user), "--items", str(args.items),
           "--master", args.master, "--driver-memory", args.driver_memory,
           "--shuffle-partitions", str(args.shuffle_partitions),
           "--loader-seconds", str(args.loader_seconds),
           "--loader-workers", str(args.loader_workers), "--batch-size", str(args.batch_size),
           "--work", args.work] + (["--keep"] if args.keep else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPARK_LOCAL_IP": "127.0.0.1",
           "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    load_before = _load_avg()
    subprocess.run(cmd, check=True, env=env)
    res = json.loads(result.read_text())
    res["load_avg_before"], res["load_avg_after"] = load_before, _load_avg()
    return res


def _table(results: list[dict]) -> str:
    head = ("| rows | gen s | gen rows/s | ETL s | ETL rows/s | gen+ETL rows/s | "
            "driver py peak MiB | JVM peak MiB | loader samples/s (0 / N workers) |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        ld = r.get("loader", [])
        rates = " / ".join(f"{x['samples_per_s']:,.0f}" for x in ld) if ld else "-"
        lines.append(
            f"| {r['rows']:,} | {r['gen_s']:.1f} | {r['gen_rows_per_s']:,} | {r['etl_s']:.1f} | "
            f"{r['etl_rows_per_s']:,} | {r['total_rows_per_s']:,} | "
            f"{r['driver_python_peak_rss_mb']:.0f} | {r['jvm_peak_rss_mb']:.0f} | {rates} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        res = run_one(args)
        Path(args.result).write_text(json.dumps(res, indent=1))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = [_child(args, rows, work / f"result-{rows}.json") for rows in args.rows]
    summary = {
        "bench": "etl", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "master": args.master, "shuffle_partitions": args.shuffle_partitions,
        "results": results,
    }
    by_rows = {r["rows"]: r for r in results}
    if len(results) >= 2:
        lo, hi = min(by_rows), max(by_rows)
        summary["scaling"] = {
            "rows_ratio": hi / lo,
            "etl_time_ratio": round(by_rows[hi]["etl_s"] / by_rows[lo]["etl_s"], 2),
            "gen_time_ratio": round(by_rows[hi]["gen_s"] / by_rows[lo]["gen_s"], 2),
            "driver_python_peak_ratio": round(by_rows[hi]["driver_python_peak_rss_mb"]
                                              / by_rows[lo]["driver_python_peak_rss_mb"], 2),
            "jvm_peak_ratio": round(by_rows[hi]["jvm_peak_rss_mb"]
                                    / by_rows[lo]["jvm_peak_rss_mb"], 2),
        }
    print(_table(results))
    if "scaling" in summary:
        print(json.dumps(summary["scaling"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
