"""What the minimum Spark operations of any such ETL cost on this machine (the ETL's floor).

    python bench/spark_floor.py --rows 10000000 --out bench/results/spark_floor.json

Generates the synthetic log (``higr_dist.etl.synthetic``, Parquet) once under ``--work``, then
times, each in the same session, on ``local[2]`` with 8 shuffle partitions:

- ``scan_count``: counting the rows (Parquet metadata; the second count is cached pages);
- ``scan_all_cols_noop``: reading every column of every row (``noop`` sink, nothing written);
- ``shuffle_sort_collect_noop``: one shuffle by user + a time-sorted ``collect_list`` per
  user: what building the per-user sequences costs at the least;
- ``dedup_shuffle_noop``: one shuffle grouping identical rows (exact-duplicate detection);
- ``shuffle_collect_mapInArrow``: the per-user shuffle feeding a pass-through Python
  ``mapInArrow`` (the cost of handing user rows to Python workers).

The ETL needs at least two shuffles (per-user sequences and co-occurrence counts) plus its
writers, so these numbers bound what ``bench/etl.py`` can reach on the same cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa
    from pyspark.sql import functions as F

    from higr_dist.etl.spark import get_spark
    from higr_dist.etl.synthetic import SyntheticConfig, generate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--master", default="local[2]")
    p.add_argument("--work", default="runs/bench/spark_floor")
    p.add_argument("--out", default="bench/results/spark_floor.json")
    args = p.parse_args(argv)
    spark = get_spark(app_name="spark-floor", master=args.master, shuffle_partitions=8)
    data = Path(args.work) / f"data{args.rows}"
    t0 = time.perf_counter()
    inter, _ = generate(spark, SyntheticConfig(users=args.rows // 100, items=20_000,
                                               interactions_per_user=100), str(data))
    gen_s = time.perf_counter() - t0
    df = spark.read.parquet(inter)
    res: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        t = time.perf_counter()
        fn()
        res[name] = round(time.perf_counter() - t, 2)
        print(f"{name:28s} {res[name]:7.2f} s", flush=True)

    def noop(frame) -> None:
        frame.write.format("noop").mode("overwrite").save()

    def passthrough(batches):
        for b in batches:
            yield pa.RecordBatch.from_arrays([pa.array([b.num_rows], pa.int64())], names=["n"])

    by_user = df.repartition(8, "user_id").groupBy("user_id").agg(F.sort_array(F.collect_list(
        F.struct("timestamp", "item_id", "watch_ratio"))).alias("ev"))
    timed("scan_count", lambda: df.count())
    timed("scan_count_again", lambda: df.count())
    timed("scan_all_cols_noop", lambda: noop(df))
    timed("shuffle_sort_collect_noop", lambda: noop(by_user))
    timed("dedup_shuffle_noop", lambda: noop(df.repartition(8, "user_id")
                                             .groupBy(*df.columns).count()))
    timed("shuffle_collect_mapInArrow",
          lambda: by_user.mapInArrow(passthrough, "n long").agg(F.sum("n")).collect())
    out = {"bench": "spark_floor", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "spark": spark.version},
           "command": "python bench/spark_floor.py " + " ".join(sys.argv[1:]),
           "rows": args.rows, "master": args.master, "gen_s": round(gen_s, 2), "seconds": res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
