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
  ``mapInArrow`` (the cost of handing user rows to Python workers);
- ``fused_floor``: the cheapest single-pass shape an ETL with this output could take, as one
  Spark job: the per-user shuffle and sorted ``collect_list`` -> one Python pass that writes
  ``--records-per-user`` records per user (a fixed ``--record-bytes`` JSON body each: record
  *building* costs nothing here) into tar members of ``--records-per-block`` records each
  (webdataset ``TarWriter``, one zstd frame per member, as the ETL stores them)
  and forms the co-occurrence pairs with the ETL's own numpy kernel
  (``features.cooc_counts``), packed one row per item as the ETL ships them
  (``features.pack_partners``) -> the shuffle of those packed partial counts by item, sorted
  by item -> a Python ``mapInArrow`` that only unpacks them. Everything else the ETL does is
  left out: validation reasons, duplicate detection, the catalogue, hashing and projecting
  the co-occurrence rows, top pairs, items and pairs shards, the quarantine, counting passes.
  So an ETL writing the same shards in this shape costs at least this on the same cores.
- ``fused_floor_dedup``: ``fused_floor`` with exact-duplicate detection added the cheapest way
  Spark offers: inside the same user shuffle, identical rows are grouped and counted
  (``groupBy(all columns).count()``: a hash aggregate, no second exchange, as the user
  partitioning satisfies it) before the per-user ``collect_list``, the count riding along.
  Duplicates must be found (the issue's quarantine reason), so this is the floor of any ETL
  that writes these shards from a raw log; still without validation reasons, the catalogue,
  features, items and pairs shards, the quarantine.

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
    p.add_argument("--records-per-user", type=int, default=4,
                   help="tar members per user in fused_floor (slates/train, val, test, prefs)")
    p.add_argument("--record-bytes", type=int, default=1100,
                   help="JSON body of each fused_floor record before zstd (the ETL's mean)")
    p.add_argument("--records-per-block", type=int, default=32,
                   help="fused_floor records per tar member (1 = one member per record)")
    p.add_argument("--cooc-window", type=int, default=5,
                   help="co-occurrence distance in fused_floor (0: no co-occurrence shuffle)")
    p.add_argument("--fused-only", action="store_true",
                   help="time fused_floor and fused_floor_dedup alone")
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

    users = df.repartition(8, "user_id")  # the user shuffle every case starts from
    copies = users.groupBy(*df.columns)  # identical rows (no second exchange)

    def sequences(frame, *extra: str):
        """One row per user: the time-sorted (timestamp, item, feedback, *extra) structs."""
        return frame.groupBy("user_id").agg(F.sort_array(F.collect_list(
            F.struct("timestamp", "item_id", "watch_ratio", *extra))).alias("ev"))

    by_user = sequences(users)
    if not args.fused_only:
        timed("scan_count", lambda: df.count())
        timed("scan_count_again", lambda: df.count())
        timed("scan_all_cols_noop", lambda: noop(df))
        timed("shuffle_sort_collect_noop", lambda: noop(by_user))
        timed("dedup_shuffle_noop", lambda: noop(copies.count()))
        timed("shuffle_collect_mapInArrow",
              lambda: by_user.mapInArrow(passthrough, "n long").agg(F.sum("n")).collect())
    fused = _fused_floor(by_user, Path(args.work) / "fused_shards", args)
    shuffled: dict[str, int] = {}  # (a, b) pairs through the second shuffle
    timed("fused_floor", lambda: shuffled.update(n=int(fused.agg(F.sum("n")).first()[0] or 0)))
    # the same with the copies of each distinct row counted in the user shuffle; the count
    # rides along (the ETL needs it for the quarantine), else Spark prunes it
    by_user_dedup = sequences(copies.agg(F.count("*").alias("_n")), "_n")
    fused_dedup = _fused_floor(by_user_dedup, Path(args.work) / "fused_dedup_shards", args)
    timed("fused_floor_dedup", lambda: fused_dedup.agg(F.sum("n")).first())
    out = {"bench": "spark_floor", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "machine": {"platform": platform.platform(), "spark": spark.version},
           "command": "python bench/spark_floor.py " + " ".join(sys.argv[1:]),
           "rows": args.rows, "master": args.master, "gen_s": round(gen_s, 2), "seconds": res,
           "fused_floor": {"records_per_user": args.records_per_user,
                           "record_bytes": args.record_bytes,
                           "records_per_block": args.records_per_block,
                           "cooc_window": args.cooc_window,
                           "cooc_partial_rows": shuffled["n"]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


def _fused_floor(by_user, shard_dir: Path, args: argparse.Namespace):
    """The ``fused_floor`` plan (see the module docstring); its rows: ``n`` per Python batch."""
    import pyarrow as pa

    from higr_dist.etl.config import EtlConfig
    from higr_dist.etl.features import COOC_SCHEMA

    shard_dir.mkdir(parents=True, exist_ok=True)
    cfg = EtlConfig()  # the ETL's defaults: split sizes and feedback thresholds
    kinds, body = args.records_per_user, (b"1234567890," * (args.record_bytes // 11 + 1))
    body, window, per_block = body[:args.record_bytes], args.cooc_window, args.records_per_block

    def user_pass(batches):
        import webdataset as wds
        import zstandard
        from pyspark import TaskContext

        from higr_dist.etl.features import cooc_counts, pack_partners

        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
        pid = TaskContext.get().partitionId()
        with open(shard_dir / f"shard-{pid}.tar", "wb") as fh:
            tar = wds.TarWriter(fh, mtime=0, encoder=False)
            held: list[list[bytes]] = [[] for _ in range(kinds)]  # records per folder

            def flush(k: int, key: str) -> None:
                blob = b"[" + b",".join(held[k]) + b"]"
                tar.write({"__key__": key, "json.zst": cctx.compress(blob)})
                held[k].clear()

            for b in batches:
                ev = b.column(b.schema.get_field_index("ev"))  # list<struct<t, item, wr>>
                offsets = ev.offsets.to_numpy()
                items = ev.values.field("item_id").to_numpy()
                fb = ev.values.field("watch_ratio").to_numpy()
                users = b.column(b.schema.get_field_index("user_id")).to_pylist()
                for u in users:
                    for k in range(kinds):
                        held[k].append(body)
                        if len(held[k]) == per_block:
                            flush(k, f"{u:016x}{k}")
                a, bb, w = cooc_counts(offsets, items, fb, cfg.holdout, cfg.min_user_interactions,
                                       cfg.negative_threshold, window)
                yield pack_partners(a, bb, w)
            for k in range(kinds):
                if held[k]:
                    flush(k, f"last{k}")
            tar.close()

    def count(batches):  # partial (a, b) pairs that went through the shuffle
        from higr_dist.etl.features import unpack_partners

        for b in batches:
            n = len(unpack_partners(b)[0])
            yield pa.RecordBatch.from_arrays([pa.array([n], pa.int64())], names=["n"])

    pairs = by_user.mapInArrow(user_pass, COOC_SCHEMA)
    return pairs.repartition(8, "a").sortWithinPartitions("a").mapInArrow(count, "n long")


if __name__ == "__main__":
    sys.exit(main())
