"""What writing the four user folders costs in Python, per user: the ETL's floor outside Spark.

    python bench/shard_write.py --out bench/results/shard_write.json
    python bench/shard_write.py --users 2000 --repeats 1 --out /tmp/shard_write.json  # quick

The user folders (``slates/{train,val,test}``, ``prefs``) are written by Python workers: per
user, :func:`higr_dist.etl.writer.build_user_kinds` cuts the records and
:func:`higr_dist.data.shardio.write_shard` encodes each (schema check + JSON + zstd) and adds
it to a tar through webdataset's ``TarWriter`` (blocks of records, one member each). This bench runs exactly that code, in one
process, on real synthetic sequences, with no Spark around it, and splits the time into:

- ``build``: sequences -> records (``build_user_kinds``);
- ``encode``: ``schema.encode`` of every record (dict check, JSON, zstd);
- ``write_per_record``: ``write_shard`` of every folder with one record per tar member (how
  the user folders were stored before blocks: encode + tar member + fsync + sha256);
- ``write_blocks``: what the ETL's writer does now (``ShardTask``): each record's JSON, then
  ``records_per_block`` records per member (one zstd frame and one tar member per block),
  fsync, sha256; side by side with ``write_per_record`` in the same run, with bytes on disk;
- ``encode_stdlib_json``: the same record bodies through the standard library's ``json``
  (numpy list fields converted with ``tolist()`` inside the timing)
  (what the codec used before orjson) + the same zstd, side by side in the same run.

The sequences: the first ``--users`` users of a synthetic log (``higr_dist.etl.synthetic``,
100 interactions per user, 20,000 items; generated once with Spark under ``--work`` when
``--log`` is not given), read with pyarrow and ordered by time as the ETL orders them.
Reported per user and per record, and scaled to the 100,000 users of the 10M-row ETL bench:
CPU seconds, and wall seconds on 2 cores if both cores did nothing else.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

USERS_AT_10M = 100_000  # bench/etl.py's 10M-row size: 100 interactions per user


def _log(args: argparse.Namespace) -> str:
    """The interaction log to read: --log, or a synthetic one generated once."""
    if args.log:
        return args.log
    data = Path(args.work) / "data"
    if not (data / "interactions").is_dir():
        from higr_dist.etl.spark import get_spark
        from higr_dist.etl.synthetic import SyntheticConfig, generate

        spark = get_spark(app_name="bench-shard-write", master="local[2]")
        generate(spark, SyntheticConfig(users=10_000, items=20_000, interactions_per_user=100),
                 str(data))
        spark.stop()
    return str(data / "interactions")


def _as_list(value):
    """The stdlib json's fallback for the numpy arrays records hold (their lists)."""
    return value.tolist()


def sequence_batch(log: str, users: int):
    """The first ``users`` users' sequences as the ETL's sequence rows (a RecordBatch)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(log, format="parquet").to_table(
        columns=["user_id", "item_id", "timestamp", "watch_ratio"])
    first = pc.sort_indices(pc.unique(table["user_id"]))[:users]
    keep = pc.take(pc.unique(table["user_id"]), first)
    table = table.filter(pc.is_in(table["user_id"], value_set=keep))
    table = table.sort_by([("user_id", "ascending"), ("timestamp", "ascending"),
                           ("item_id", "ascending")])
    user = table["user_id"].to_numpy()
    _, item_idx = np.unique(table["item_id"].to_numpy(), return_inverse=True)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    offsets = np.r_[starts, len(user)].astype(np.int32)
    ids = user[starts]
    lists = [pa.ListArray.from_arrays(offsets, pa.array(v)) for v in (
        item_idx.astype(np.int64), np.round(table["watch_ratio"].to_numpy(), 4),
        table["timestamp"].to_numpy().astype(np.int64))]
    uhash = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)).view(np.int64)
    return pa.RecordBatch.from_arrays(
        [pa.array([str(u) for u in ids]), pa.array(uhash), *lists],
        names=["user_id", "uhash", "items", "fb", "ts"])


def run_once(batch, cfg, out_dir: Path) -> dict:
    import zstandard

    from higr_dist.data.shardio import write_encoded, write_shard
    from higr_dist.etl.writer import USER_KINDS, ShardTask, build_user_kinds
    from higr_dist.schema import FOLDERS
    from higr_dist.schema.codec import ZSTD_LEVEL

    stored = [FOLDERS[k].inner or FOLDERS[k] for k in USER_KINDS]  # the kind of one record
    t0 = time.perf_counter()
    per_folder: list[list] = [[] for _ in USER_KINDS]
    for folder, built in build_user_kinds(batch, cfg):
        per_folder[folder].append(built)
    for records in per_folder:
        records.sort(key=lambda s: (s[0], s[1]))
    t1 = time.perf_counter()
    for folder, records in enumerate(per_folder):
        for _, _, sample in records:
            stored[folder].encode(sample)
    t2 = time.perf_counter()
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    for folder, records in enumerate(per_folder):  # the same bodies through the stdlib's json
        schema = stored[folder]
        for _, _, sample in records:
            body = {**{k: sample[k] for k in schema.field_names}, "_v": schema.version}
            cctx.compress(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False, default=_as_list).encode())
    t3 = time.perf_counter()
    bytes_per_record = 0
    for folder, records in enumerate(per_folder):  # one record per tar member (before blocks)
        bytes_per_record += write_shard(out_dir / f"r{folder}.tar", stored[folder], (
            (key, sample) for _, key, sample in records))["bytes"]
    t4 = time.perf_counter()
    task = ShardTask(folders=(), builder=None, reorder=True, block=cfg.records_per_block)
    bytes_blocks = 0
    for folder, records in enumerate(per_folder):  # the ETL's writer: dump, then blocks
        schema = FOLDERS[USER_KINDS[folder]]
        dumped = [(key, stored[folder].dumps(sample), stored[folder].count(sample))
                  for _, key, sample in records]
        bytes_blocks += write_encoded(out_dir / f"b{folder}.tar", schema,
                                      task._members(schema, dumped))["bytes"]
    t5 = time.perf_counter()
    return {"build_s": t1 - t0, "encode_s": t2 - t1, "encode_stdlib_json_s": t3 - t2,
            "write_per_record_s": t4 - t3, "write_blocks_s": t5 - t4,
            "bytes_per_record": bytes_per_record, "bytes_blocks": bytes_blocks,
            "records": {k: len(r) for k, r in zip(USER_KINDS, per_folder)}}


def main(argv: list[str] | None = None) -> int:
    from higr_dist.config import load
    from higr_dist.etl.config import EtlConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=5000, help="users whose records are written")
    p.add_argument("--repeats", type=int, default=3, help="runs; medians are reported")
    p.add_argument("--log", default=None, help="interaction log (Parquet); default: synthetic")
    p.add_argument("--work", default="runs/bench/shard_write", help="where the log is generated")
    p.add_argument("--out", default="bench/results/shard_write.json", help="JSON results file")
    args = p.parse_args(argv)

    cfg = load(EtlConfig, None, [])  # the defaults bench/etl.py runs
    batch = sequence_batch(_log(args), args.users)
    users = batch.num_rows
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            runs.append(run_once(batch, cfg, Path(tmp)))
    parts = ("build_s", "encode_s", "encode_stdlib_json_s", "write_per_record_s",
             "write_blocks_s")
    med = {k: statistics.median(r[k] for r in runs) for k in parts}
    records = sum(runs[0]["records"].values())
    per_user_us = {k.removesuffix("_s"): round(v / users * 1e6, 1) for k, v in med.items()}
    per_user_us["total"] = round((med["build_s"] + med["write_blocks_s"]) / users * 1e6, 1)
    per_user_us["total_per_record_members"] = round(
        (med["build_s"] + med["write_per_record_s"]) / users * 1e6, 1)
    cpu_10m = per_user_us["total"] * USERS_AT_10M / 1e6
    result = {
        "bench": "shard_write",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "command": "python bench/shard_write.py " + " ".join(argv or sys.argv[1:]),
        "users": users, "records": runs[0]["records"],
        "records_per_user": round(records / users, 2),
        "records_per_block": cfg.records_per_block,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "us_per_user": per_user_us,
        "us_per_record": {
            "encode": round(med["encode_s"] / records * 1e6, 1),
            "write_per_record": round(med["write_per_record_s"] / records * 1e6, 1),
            "write_blocks": round(med["write_blocks_s"] / records * 1e6, 1)},
        "bytes_per_record": {"per_record_members": round(runs[0]["bytes_per_record"] / records),
                             "blocks": round(runs[0]["bytes_blocks"] / records)},
        "write_speedup_blocks": round(med["write_per_record_s"] / med["write_blocks_s"], 2),
        "at_10M_rows": {"users": USERS_AT_10M, "cpu_s": round(cpu_10m, 1),
                        "wall_s_on_2_cores": round(cpu_10m / 2, 1)},
        "runs": runs,
    }
    print(f"{users} users, {records} records ({result['records_per_user']} per user), "
          f"medians of {args.repeats}; blocks of {cfg.records_per_block}")
    print(f"{'part':26s} {'us/user':>9s}")
    for k in ("build", "encode", "encode_stdlib_json", "write_per_record", "write_blocks",
              "total_per_record_members", "total"):
        print(f"{k:26s} {per_user_us[k]:9.1f}")
    print(f"per record: write {result['us_per_record']['write_per_record']} us and "
          f"{result['bytes_per_record']['per_record_members']} bytes one per member, "
          f"{result['us_per_record']['write_blocks']} us and "
          f"{result['bytes_per_record']['blocks']} bytes in blocks "
          f"({result['write_speedup_blocks']}x)")
    print(f"at 10M rows ({USERS_AT_10M} users): {cpu_10m:.1f} CPU-s = "
          f"{cpu_10m / 2:.1f} s on 2 cores (the target's whole budget is 20 s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
