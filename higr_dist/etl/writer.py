"""Writing sample shards from the executors.

Design
------
Kind folders with ``S`` shards each are written by one Spark stage with exactly ``S``
partitions: ``repartition(S, key) -> sortWithinPartitions(...) -> mapInArrow(ShardTask)``. The
task of partition ``p`` (``TaskContext.partitionId()``) builds the samples of its rows and
writes ``shard-<p>.tar`` of every folder with :func:`higr_dist.data.shardio.write_shard`
(atomic temp + rename, so a retried task simply rewrites it). Every partition runs a task,
empty ones too, so a folder always has exactly ``S`` shards (an empty shard is a valid, empty
tar). Only one metadata row per shard (name, samples, bytes, sha256) comes back to the driver.

The four user folders (``slates/{train,val,test}``, ``prefs``) are written by *one* stage
(:func:`build_user_kinds`): every one of them is built from the same per-user sequence row, so
one shuffle and one JVM -> Arrow -> Python transfer of the sequences serves all four (four
stages were a large share of the ETL's time, most of it moving the same rows four times:
docs/BENCHMARKS.md, "Figures behind design choices"). Trade-off: they share a shard count, sized
for the largest (val/test: one record per user), so ``slates/train`` and ``prefs`` may get a few
more, smaller shards than their own record counts would ask for; and a task holds one shard of
each of the four at once.

Determinism: hash partitioning by a stable key (Spark's Murmur3 of the user id / item_idx), a
total sort inside the partition, and for user-built kinds a re-ordering of the shard's samples
by a mixed 64-bit hash of (user, position), so consecutive samples come from different users
while the bytes stay a function of the input alone.

Memory: a user-kind task holds its shards' records (up to ``samples_per_shard`` per folder) to
re-order them, as their JSON (compressed per block once sorted), several times smaller than
the same records as dicts, so a task at the cluster config's 20k records per shard x 4 folders
holds a fraction of what dicts would take (per-record sizes: docs/BENCHMARKS.md, "Figures
behind design choices"); items and pairs stream straight into the tar (pairs
``records_per_block`` at a time).

Blocks (``higr_dist.schema.codec.block_of``): the user folders and pairs store up to
``records_per_block`` consecutive records per tar member, one zstd frame each: a member costs
~1 KB on disk (512-byte header, payload padded to 512 bytes) and a fixed Python time to write
whatever it holds (``bench/shard_write.py``; docs/BENCHMARKS.md, "Shard writing").

Grouped kinds (``slates/train``, ``prefs``): one record per user holds all of that user's
windows (``higr_dist.schema.slates``), so a shard's size target counts records (users), and
the manifest gives both ``records`` and ``samples`` (the windows they unpack to).

Arrow: rows arrive as ``pyarrow.RecordBatch``; list columns are read as (offsets, values) numpy
views, so building a sample is slicing (the codec writes numpy arrays as JSON lists).
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame

from higr_dist.data.shardio import (
    SHARD_PATTERN,
    TMP_DIR,
    write_encoded,
    write_listing,
    write_shard,
)
from higr_dist.etl.config import EtlConfig
from higr_dist.etl.sequences import pref_group, pref_windows_batch, slate_group, slate_samples
from higr_dist.layout import EtlLayout
from higr_dist.schema import FOLDERS, SCHEMAS, SampleSchema, blocks
from higr_dist.schema.codec import chunks

#: Spark schema of the metadata rows a shard task returns (one per folder it writes).
META_SCHEMA = ("folder int, shard int, name string, samples long, unpacked long, records long, "
               "bytes long, sha256 string")

#: the folders written from the per-user sequences, in :func:`build_user_kinds` order
USER_KINDS = ("slates/train", "slates/val", "slates/test", "prefs")

Built = tuple[int, str, dict]  # (order, key, sample)
#: (order, key, schema.encode(sample) or, for a block kind, schema.inner.dumps(sample), count)
Encoded = tuple[int, str, bytes, int]
Builder = Callable[[pa.RecordBatch], Iterable[Built]]
#: record batch -> (folder index, (order, key, sample)): one stage writing several folders
MultiBuilder = Callable[[pa.RecordBatch], Iterable[tuple[int, Built]]]


def num_shards(samples: int, cfg: EtlConfig) -> int:
    """Shard count of a kind: the size target, but never fewer than ``min_shards``."""
    return max(cfg.min_shards, math.ceil(samples / cfg.samples_per_shard))


class _Lists:
    """A list column of a record batch as numpy (offsets into values)."""

    def __init__(self, batch: pa.RecordBatch, name: str):
        col = batch.column(batch.schema.get_field_index(name))
        self.offsets = col.offsets.to_numpy()
        self.values = col.values.to_numpy(zero_copy_only=False)

    def __getitem__(self, row: int) -> np.ndarray:
        return self.values[self.offsets[row]:self.offsets[row + 1]]


def _column(batch: pa.RecordBatch, name: str) -> list:
    return batch.column(batch.schema.get_field_index(name)).to_pylist()


def _vectors(batch: pa.RecordBatch, name: str) -> list[np.ndarray]:
    """A binary column of little-endian float32 bytes as float32 arrays (zero-copy views)."""
    return [np.frombuffer(b, dtype="<f4") for b in _column(batch, name)]


# --------------------------------------------------------------------------------------------
# builders: record batch -> samples (module-level functions, bound with functools.partial)
# --------------------------------------------------------------------------------------------


def _user_rows(batch: pa.RecordBatch) -> Iterator[tuple]:
    users, uhash = _column(batch, "user_id"), _column(batch, "uhash")
    items, fb, ts = _Lists(batch, "items"), _Lists(batch, "fb"), _Lists(batch, "ts")
    for r in range(batch.num_rows):
        yield users[r], uhash[r], items[r], fb[r], ts[r]


def build_user_kinds(batch: pa.RecordBatch, cfg: EtlConfig) -> Iterator[tuple[int, Built]]:
    """Sequence rows -> records of every :data:`USER_KINDS` folder (index into it): the
    SLATE_GROUP (train), the val and test SLATEs and the PREF_GROUP of each user."""
    fb_lists = _Lists(batch, "fb")
    windows = pref_windows_batch(fb_lists.offsets, fb_lists.values, cfg)  # the whole batch's
    for row, (user, uhash, items, fb, ts) in enumerate(_user_rows(batch)):
        group = slate_group(user, uhash, items, fb, ts, cfg)
        if group is not None:
            yield 0, group
        for folder, split in ((1, "val"), (2, "test")):
            for built in slate_samples(user, uhash, items, fb, ts, split, cfg):
                yield folder, built
        prefs = pref_group(user, uhash, items, fb, ts, cfg, windows, row)
        if prefs is not None:
            yield 3, prefs


def build_items(batch: pa.RecordBatch) -> Iterator[Built]:
    """Item feature rows -> ITEM samples (key = zero-padded item_idx)."""
    idx, ids = _column(batch, "item_idx"), _column(batch, "item_id")
    cats, x = _Lists(batch, "categories"), _vectors(batch, "x")
    for r in range(batch.num_rows):
        yield idx[r], f"{idx[r]:010d}", {"item_idx": idx[r], "item_id": ids[r],
                                         "categories": cats[r].tolist(), "x": x[r]}


def build_pairs(batch: pa.RecordBatch) -> Iterator[Built]:
    """Pair rows -> PAIR samples (key = anchor, rank)."""
    anchor, pos = _column(batch, "anchor"), _column(batch, "positive")
    weight, rank = _column(batch, "weight"), _column(batch, "rank")
    xa, xp = _vectors(batch, "x_anchor"), _vectors(batch, "x_positive")
    for r in range(batch.num_rows):
        yield anchor[r], f"{anchor[r]:010d}_{rank[r]:04d}", {
            "anchor": anchor[r], "positive": pos[r], "weight": weight[r],
            "x_anchor": xa[r], "x_positive": xp[r]}


# --------------------------------------------------------------------------------------------
# the executor task
# --------------------------------------------------------------------------------------------


def _unique_keys(records: Iterable[tuple], where: str, seen: set[str]
                 ) -> Iterator[tuple]:
    """``records`` (key first) unchanged, failing on a repeated key; ``seen`` collects the
    keys (so its size is the records written)."""
    for record in records:
        if record[0] in seen:
            raise ValueError(f"{where}: duplicate sample key {record[0]!r}")
        seen.add(record[0])
        yield record


def _single(builder: Builder, batch: pa.RecordBatch) -> Iterator[tuple[int, Built]]:
    for built in builder(batch):
        yield 0, built


@dataclass(frozen=True)
class ShardTask:
    """``mapInArrow`` function: the batches of partition p -> shard p of every folder + one
    metadata row per folder."""

    folders: tuple[tuple[str, str], ...]
    """(absolute path of the kind folder, shared by all executors; sample kind, a
    ``higr_dist.schema.SCHEMAS`` key) per folder written"""
    builder: MultiBuilder
    """record batch -> (folder index, (order, key, sample))"""
    reorder: bool
    """sort each shard's samples by ``order`` (user kinds) instead of streaming them (only a
    single folder can stream)"""
    block: int = 1
    """records per tar member of a block kind (``higr_dist.schema.codec.block_of``)"""

    def _members(self, schema: SampleSchema, records: list[tuple[str, bytes, int]]
                 ) -> Iterator[tuple[str, bytes, int]]:
        """Sorted records -> tar members: themselves, or blocks of ``block`` records."""
        if schema.inner is None:
            yield from records
            return
        for chunk in chunks(records, self.block):
            yield chunk[0][0], schema.encode_block([k for k, _, _ in chunk],
                                                   [d for _, d, _ in chunk]), sum(
                c for _, _, c in chunk)

    def _write(self, folder: int, shard: int, built: Iterable[Built] | list[Encoded]
               ) -> pa.RecordBatch:
        directory, kind = self.folders[folder]
        schema = SCHEMAS[kind]
        path = Path(directory) / SHARD_PATTERN.format(shard)
        keys: set[str] = set()  # the keys of the records written
        if self.reorder:  # built: encoded (or dumped) records, held to be sorted
            records = list(_unique_keys(((key, blob, count) for _, key, blob, count
                                         in sorted(built, key=lambda r: (r[0], r[1]))),
                                        str(path), keys))
            meta = write_encoded(path, schema, self._members(schema, records))
        else:  # built: streamed into the tar (a block kind: ``block`` records at a time)
            records = _unique_keys(((key, sample) for _, key, sample in built), str(path), keys)
            meta = write_shard(path, schema, records if schema.inner is None else
                               blocks(records, self.block))
        return pa.RecordBatch.from_pydict({
            "folder": pa.array([folder], pa.int32()), "shard": pa.array([shard], pa.int32()),
            "name": [meta["name"]], "samples": pa.array([meta["samples"]], pa.int64()),
            "unpacked": pa.array([meta.get("unpacked", meta["samples"])], pa.int64()),
            "records": pa.array([len(keys)], pa.int64()),
            "bytes": pa.array([meta["bytes"]], pa.int64()), "sha256": [meta["sha256"]]})

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        shard = TaskContext.get().partitionId()
        built = (s for b in batches for s in self.builder(b))
        if len(self.folders) == 1 and not self.reorder:  # stream straight into the tar
            yield self._write(0, shard, (s for _, s in built))
            return
        if not self.reorder:
            raise ValueError("several folders from one task need reorder=True")
        # a task holds its shards' records until it has them all (to sort them): encoded, or
        # for a block kind its records' JSON (compressed per block once sorted); either is
        # several times smaller than the dicts (4 folders x samples_per_shard records each)
        schemas = [SCHEMAS[kind] for _, kind in self.folders]
        per_folder: list[list[Encoded]] = [[] for _ in self.folders]
        for folder, (order, key, sample) in built:
            schema = schemas[folder]
            if schema.inner is not None:
                blob, count = schema.inner.dumps(sample), schema.inner.count(sample)
            else:
                blob, count = schema.encode(sample), schema.count(sample)
            per_folder[folder].append((order, key, blob, count))
        for folder, records in enumerate(per_folder):
            yield self._write(folder, shard, records)


def write_kinds(df: DataFrame, out_dir: str | Path, kind_dirs: Sequence[str], shards: int,
                partition_by: list[str], sort_by: list[str], builder: MultiBuilder,
                reorder: bool, block: int = 1) -> dict[str, dict]:
    """Write folders ``kind_dirs`` with exactly ``shards`` shards each in one Spark stage;
    return their manifest entries. ``builder`` yields (index into ``kind_dirs``, record);
    ``block``: records per member of the block kinds among them."""
    folders = []
    for kind_dir in kind_dirs:
        directory = EtlLayout(Path(out_dir)).kind(kind_dir)
        directory.mkdir(parents=True, exist_ok=True)
        folders.append((str(directory.resolve()), FOLDERS[kind_dir].kind))
    task = ShardTask(tuple(folders), builder, reorder, block)
    rows = (df.repartition(shards, *partition_by).sortWithinPartitions(*sort_by)
            .mapInArrow(task, META_SCHEMA).collect())
    entries = {}
    for folder, kind_dir in enumerate(kind_dirs):
        mine = sorted((r for r in rows if r["folder"] == folder), key=lambda r: r["shard"])
        got = [r["shard"] for r in mine]
        if got != list(range(shards)):
            raise RuntimeError(f"{kind_dir}: expected shards 0..{shards - 1}, tasks reported "
                               f"{got}")
        directory, kind = Path(folders[folder][0]), folders[folder][1]
        fields = ("name", "samples", "bytes", "sha256") + (
            ("unpacked",) if SCHEMAS[kind].unpack is not None else ())
        metas = [{k: r[k] for k in fields} for r in mine]
        write_listing(directory, metas)
        tmp = directory / TMP_DIR
        if tmp.is_dir():  # write_shard's staging folder: empty, or leftovers of killed attempts
            shutil.rmtree(tmp)
        # samples = what a stage trains on (a grouped kind's unpacked windows); records = the
        # records stored (a user's group is one); members = tar members (blocks hold several)
        entries[kind_dir] = {"samples": sum(r["unpacked"] for r in mine),
                             "records": sum(r["records"] for r in mine),
                             "members": sum(m["samples"] for m in metas), "shards": metas}
    return entries


def write_kind(df: DataFrame, out_dir: str | Path, kind_dir: str, shards: int,
               partition_by: list[str], sort_by: list[str], builder: Builder,
               reorder: bool, block: int = 1) -> dict:
    """Write one kind folder with exactly ``shards`` shards; return its manifest entry."""
    return write_kinds(df, out_dir, [kind_dir], shards, partition_by, sort_by,
                       functools.partial(_single, builder), reorder, block)[kind_dir]


def user_kinds_builder(cfg: EtlConfig) -> MultiBuilder:
    return functools.partial(build_user_kinds, cfg=cfg)
