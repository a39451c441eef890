"""The ETL job: interaction log + items table -> validated, split, featurised WebDataset shards.

Pipeline (see docs/DESIGN.md "ETL output folder" for the contract)::

    items table --validate--> catalogue (dense item_idx) --> item_index/, quarantine_items/
    interactions --validate (1 shuffle, by user; 1 aggregate)--> quarantine/ + per-user
        sorted arrays = sequences (persisted)
            sequences --> co-occurrence (training regions) --> collaborative vectors + top
                          pairs (one numpy pass per item: features.collab)
            catalogue --> content vectors (category ids + caption n-grams)
            writers: items/, pairs/ (a Spark stage each), and slates/{train,val,test}/ +
            prefs/ (one stage for the four), each folder with shards.json
    manifest.json (written last: its presence marks a complete output)

Only aggregates and metadata reach the driver: per-reason counts, per-partition counts of the
catalogue sort, sample counts, one row per shard. Rows never do.

Entry points: :func:`run_etl` (library) and :func:`main` (``etl/build_shards.py``, runnable
with ``spark-submit`` or plain python, which starts ``local[*]``).

Output location: inputs may be any Hadoop-FS URI, but ``out_dir`` must be a POSIX path that
every executor sees (local disk for ``local[*]``, a shared file system on a cluster): shards are
written by the executors with atomic renames.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession

from higr_dist.config import ConfigError, config_hash, load, to_dict
from higr_dist.etl import features
from higr_dist.etl.catalog import build_catalog
from higr_dist.etl.config import INTERACTION_REASONS, EtlConfig, SourceConfig
from higr_dist.etl.sequences import build_sequences, sample_counts
from higr_dist.etl.sources import (
    movielens_layout,
    read_interactions,
    read_items,
    resolve_format,
)
from higr_dist.etl.spark import materialise, session_conf
from higr_dist.etl.validate import (
    by_user,
    classify_interactions,
    quarantined,
    sort_aggregate,
)
from higr_dist.etl.writer import (
    USER_KINDS,
    build_items,
    build_pairs,
    num_shards,
    user_kinds_builder,
    write_kind,
    write_kinds,
)
from higr_dist.layout import EtlLayout
from higr_dist.schema import SCHEMA_VERSION

__all__ = ["EtlConfig", "SourceConfig", "run_etl", "main", "OUTPUT_ENTRIES",
           "quarantine_warnings"]

#: Everything the ETL writes under ``out_dir`` (what ``overwrite`` removes, and nothing else).
OUTPUT_ENTRIES = tuple(p.name for p in EtlLayout(Path(".")).entries())

#: feature vectors of catalogues up to this many bytes are broadcast to the pair join
_BROADCAST_FEATURE_BYTES = 64 << 20


class _Timer:
    """Wall-clock seconds per named phase (reported in the manifest)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - t0, 3)


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    present = [e for e in OUTPUT_ENTRIES if (out_dir / e).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{out_dir} already holds ETL output {present}; "
                              "pass overwrite=True (--overwrite) to replace it")
    _remove_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _remove_output(out_dir: Path, best_effort: bool = False) -> None:
    """Delete the ETL's entries under ``out_dir`` (:data:`OUTPUT_ENTRIES` and the manifest's
    temporary file, nothing else); ``best_effort``: after a failure, go on past errors."""
    for entry in (*OUTPUT_ENTRIES, "manifest.json.tmp"):
        path = out_dir / entry
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=best_effort)
        elif path.exists():
            path.unlink()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _reason_counts(quarantine: DataFrame) -> dict[str, int]:
    """Quarantined rows per reason (every reason listed, zeros included)."""
    counts = {r["reason"]: r["count"] for r in quarantine.groupBy("reason").count().collect()}
    unknown = set(counts) - set(INTERACTION_REASONS)
    if unknown:
        raise RuntimeError(f"unexpected quarantine reasons {sorted(unknown)}")
    return {r: counts.get(r, 0) for r in INTERACTION_REASONS}


def _records(expected: dict, kind_dir: str) -> int:
    """Records a user kind stores (blocks hold several): one per user with a window for the
    grouped kinds."""
    return expected["groups"].get(kind_dir, expected[kind_dir])


def _items_format(cfg: EtlConfig, items: str) -> str:
    """The items table's format: the configured one, or detected from its own path."""
    return resolve_format(cfg.source, items)


def run_etl(spark: SparkSession, cfg: EtlConfig, interactions: str, items: str,
            out_dir: str | Path, *, overwrite: bool = False) -> dict:
    """Run the whole ETL into ``out_dir``; return the manifest (also written as manifest.json)."""
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems)
    out = Path(check_output_path(str(out_dir))).resolve()
    _prepare_output(out, overwrite)
    timer = _Timer()
    persisted: list[DataFrame] = []

    def keep(df: DataFrame) -> DataFrame:
        # deserialized: the columnar cache's batches are kept as built; the serialized level
        # (pyspark's MEMORY_AND_DISK) serializes every batch again (the cost at 10M rows:
        # docs/BENCHMARKS.md, "Figures behind design choices")
        persisted.append(df.persist(StorageLevel.MEMORY_AND_DISK_DESER))
        return persisted[-1]

    t_start = time.perf_counter()
    try:
        with session_conf(spark, "spark.sql.shuffle.partitions", cfg.shuffle_partitions):
            manifest = _run(spark, cfg, interactions, items, out, timer, keep)
        if manifest["rows_in"] == 0:  # an empty data set is a mistake, not a result
            raise ValueError(f"the interaction log {interactions} has no rows (an empty or "
                             "header-only file?)")
        manifest["timings_s"] = {**timer.times,
                                 "total": round(time.perf_counter() - t_start, 3)}
        # the manifest names the quarantine folders relative to itself (the same manifest
        # wherever the output lies); the console names them in full
        manifest["warnings"] = quarantine_warnings(manifest, cfg, None)
        _write_json(EtlLayout(out).manifest, manifest)
    except BaseException:
        # a failed ETL (bad input, a full disk, an interrupt) leaves no output: complete
        # shards without their manifest would read as a smaller data set
        _remove_output(out, best_effort=True)
        raise
    finally:
        for df in persisted:
            df.unpersist()
    for line in quarantine_warnings(manifest, cfg, out):
        print(f"etl: WARNING: {line}", file=sys.stderr, flush=True)
    return manifest


#: what a quarantine reason usually means, for the warning (docs/DESIGN.md lists the reasons)
_REASON_HINTS = {
    "bad_timestamp": "times must be epoch seconds in [timestamp_min, timestamp_max): a time "
                     "column in milliseconds (or microseconds) is quarantined whole",
    "unknown_item": "the interactions name items the items table lacks (or quarantined)",
    "short_user": "users need 2 x holdout + min_history valid interactions",
    "bad_feedback": "feedback must be a finite number >= 0",
    "null_user": "empty user ids (wrong user_col or csv_delimiter?)",
    "null_item": "empty item ids (wrong item_col or csv_delimiter?)",
    "duplicate": "exact copies of a row",
    "bad_category": "category tokens that are numbers but not integers, or malformed fields",
    "conflicting_item": "one item id with different categories or captions",
}


def quarantine_warnings(manifest: dict, cfg: EtlConfig, out: Path | None) -> list[str]:
    """One line per table (interactions, items) whose quarantined share exceeds
    ``cfg.quarantine_warn_share``: the share, the top reasons with counts, what the top one
    usually means and where the rows are (under ``out``; relative to the output when None)."""
    lines = []
    folders = EtlLayout(Path("."))
    tables = (("interaction rows", manifest, folders.quarantine.name),
              ("items-table rows", manifest["items_table"], folders.quarantine_items.name))
    for what, part, where in tables:
        rows_in, bad = int(part["rows_in"]), int(part["rows_quarantined"])
        if not bad or bad <= cfg.quarantine_warn_share * rows_in:
            continue
        reasons = sorted(((n, r) for r, n in part["quarantine_by_reason"].items() if n),
                         reverse=True)
        top = ", ".join(f"{r} {n:,}" for n, r in reasons[:3])
        lines.append(f"{bad / rows_in:.1%} of the {what} ({bad:,} of {rows_in:,}) were "
                     f"quarantined (> quarantine_warn_share {cfg.quarantine_warn_share:g}): "
                     f"{top}; {reasons[0][1]}: {_REASON_HINTS.get(reasons[0][1], '')}; the rows "
                     f"are in {where if out is None else out / where}")
    return lines


def _run(spark: SparkSession, cfg: EtlConfig, interactions: str, items: str, out: Path,
         timer: _Timer, keep) -> dict:
    with timer.phase("catalog"):
        catalog = build_catalog(read_items(spark, items, cfg.source, _items_format(cfg, items)),
                                cfg)
        folders = EtlLayout(out)
        catalog.index.write.mode("overwrite").parquet(str(folders.item_index))
        catalog.quarantine.write.mode("overwrite").parquet(str(folders.quarantine_items))
        # downstream reads the written index back: a file relation, unlike the checkpointed
        # frame (whose recorded range partitioning keeps old attribute ids), stays equal to
        # itself when a plan uses it twice, so Spark's cache matching keeps working (without
        # this, features and pairs recomputed validation and sequences from the raw log)
        index = spark.read.parquet(str(folders.item_index))

    with timer.phase("validate"):
        # validation, the quarantine and the per-user sequences: one shuffle, one aggregate
        source = read_interactions(spark, interactions, cfg.source)
        with sort_aggregate(spark):  # planned (and cached) as a streaming sort aggregate
            users = keep(by_user(classify_interactions(source, index, catalog.num_items, cfg),
                                 source.columns))
            seq = build_sequences(users)
            expected = sample_counts(seq, cfg)  # computes and caches ``users``
        rows_out = expected["rows"]  # the kept rows: all in the sequences
        bad = quarantined(users)
        by_reason = _reason_counts(bad)
        rows_in = source.df.count()
        quarantined_rows = sum(by_reason.values())
        if rows_in != rows_out + quarantined_rows:
            raise RuntimeError(f"row accounting broken: {rows_in} in != {rows_out} out + "
                               f"{quarantined_rows} quarantined")
        bad.write.mode("overwrite").parquet(str(folders.quarantine))

    with timer.phase("features"):
        collab = materialise(features.collab(seq, cfg, catalog.num_items))
        feats = materialise(features.item_features(index, collab, cfg))

    kinds: dict[str, dict] = {}
    with timer.phase("write_items"):
        kinds["items"] = write_kind(feats, out, "items", num_shards(catalog.num_items, cfg),
                                    ["item_idx"], ["item_idx"], build_items, reorder=False)
    with timer.phase("write_pairs"):
        pairs = materialise(features.top_pairs(collab, index))
        num_pairs = pairs.count()
        dim = cfg.content_dim + cfg.collab_dim
        small = catalog.num_items * dim * 4 <= _BROADCAST_FEATURE_BYTES
        kinds["pairs"] = write_kind(features.pair_rows(pairs, feats, small), out, "pairs",
                                    num_shards(num_pairs, cfg), ["anchor"], ["anchor", "rank"],
                                    build_pairs, reorder=False, block=cfg.records_per_block)
    with timer.phase("write_users"):
        # one stage for the four user folders, sized for the largest (val/test: a record per
        # user; train and prefs have at most one per user)
        kinds.update(write_kinds(seq, out, USER_KINDS, num_shards(expected["users"], cfg),
                                 ["user_id"], ["user_id"], user_kinds_builder(cfg),
                                 reorder=True, block=cfg.records_per_block))

    for kind_dir in USER_KINDS:
        wrote = (kinds[kind_dir]["samples"], kinds[kind_dir]["records"])
        planned = (expected[kind_dir], _records(expected, kind_dir))
        if wrote != planned:
            raise RuntimeError(f"{kind_dir}: wrote {wrote[0]} samples in {wrote[1]} records, "
                               f"planned {planned[0]} in {planned[1]}")
    return {
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash(cfg),
        "config": to_dict(cfg),
        "inputs": {"interactions": interactions, "items": items,
                   "format": resolve_format(cfg.source, interactions)},
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_quarantined": quarantined_rows,
        "quarantine_by_reason": by_reason,
        "items_table": {"rows_in": catalog.rows_in, "rows_out": catalog.num_items,
                        "rows_quarantined": sum(catalog.quarantine_by_reason.values()),
                        "quarantine_by_reason": catalog.quarantine_by_reason},
        "num_items": catalog.num_items,
        "num_users": expected["users"],
        "num_pairs": num_pairs,
        "feature_dim": cfg.content_dim + cfg.collab_dim,
        "feedback": {"field": cfg.source.feedback_col,
                     "effective_threshold": cfg.effective_threshold,
                     "engaged_threshold": cfg.engaged_threshold,
                     "negative_threshold": cfg.negative_threshold},
        "kinds": kinds,
        "spark": {"version": spark.version, "master": spark.sparkContext.master},
    }


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="build_shards.py",
        description="HiGR ETL: interaction log + items table -> WebDataset shards.")
    p.add_argument("--interactions", required=True,
                   help="interaction log (CSV/Parquet, any URI; movielens: u.data, "
                        "ratings.dat or ratings.csv)")
    p.add_argument("--items", required=True,
                   help="items table (CSV/Parquet, any URI; movielens: u.item, movies.dat or "
                        "movies.csv)")
    p.add_argument("--output", required=True, help="output folder (POSIX path seen by executors)")
    p.add_argument("--config", default=None, help="EtlConfig: a file, or a shipped one by name (cluster/etl)")
    p.add_argument("--format", choices=["auto", "csv", "parquet", "kuairec", "movielens"],
                   default=None, help="input format (sets source.format); movielens: "
                   "GroupLens's files as published, layout told by their names")
    p.add_argument("--master", default=None,
                   help="Spark master when run as plain python (default local[*])")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ETL output")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. seed=3)")
    return p.parse_args(argv)


def _one_line(exc: BaseException) -> str:
    """A user error as one line: a config's problems joined, else the message's first line."""
    if isinstance(exc, ConfigError):
        return "invalid config: " + "; ".join(exc.problems)
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


_ERRNO_LINE = re.compile(r"^\s*(\w*Error: \[Errno \d+\][^\n]*)$", re.M)


def write_failure(exc: BaseException) -> str | None:
    """One line for a failed write of the output (a full disk, a quota, a vanished mount),
    whether the driver's own (an OSError) or an executor's (a Spark job failure whose Python
    error carries an errno); None for anything else."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"writing the output failed: {type(exc).__name__}: {exc}"
    found = _ERRNO_LINE.findall(str(exc))
    if found:
        return f"a Spark task could not write the output: {found[-1].strip()}"
    return None


def check_input_path(path: str, what: str) -> None:
    """Fail early, before Spark starts, when a local input path (or glob) matches nothing.

    URIs with another scheme (hdfs://, s3a://, ...) are left to Spark, which names them.
    """
    scheme, sep, rest = path.partition("://")
    if sep and scheme != "file":
        return
    local = rest if sep else path
    found = glob.glob(local) if any(c in local for c in "*?[") else os.path.exists(local)
    if not found:
        raise FileNotFoundError(f"{what} not found: {path}")


def check_output_path(path: str) -> str:
    """``out_dir`` as a POSIX path (``file://`` stripped); other URIs are refused."""
    scheme, sep, rest = str(path).partition("://")
    if sep and scheme != "file":
        raise ValueError(f"--output must be a POSIX path every executor sees (a shared file "
                         f"system on a cluster), got the URI {path}")
    return rest if sep else str(path)


def main(argv: list[str] | None = None) -> int:
    """Command line entry: user errors (config, paths, input columns) print one line, exit 2."""
    from pyspark.errors import AnalysisException

    from higr_dist.etl.spark import get_spark

    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.format:
        overrides.append(f"source.format={args.format}")
    try:
        cfg = load(EtlConfig, args.config, overrides)
        problems = cfg.validate()
        if problems:
            raise ConfigError(problems)
        check_input_path(args.interactions, "--interactions")
        check_input_path(args.items, "--items")
        if cfg.source.format == "movielens":  # a file name it cannot place: before Spark starts
            movielens_layout(cfg.source, args.interactions, "ratings")
            movielens_layout(cfg.source, args.items, "movies")
        out = check_output_path(args.output)
        spark = get_spark(app_name="higr-etl", master=args.master,
                          shuffle_partitions=cfg.shuffle_partitions)
        manifest = run_etl(spark, cfg, args.interactions, args.items, out,
                           overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, AnalysisException) as e:
        print(f"build_shards.py: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a write that failed: one line, exit 1, no output left behind
        line = write_failure(e)
        if line is None:
            raise
        print(f"build_shards.py: error: {line}; nothing of the output was kept", file=sys.stderr)
        return 1
    summary = {k: manifest[k] for k in ("rows_in", "rows_out", "rows_quarantined",
                                        "quarantine_by_reason", "num_items", "num_users")}
    summary["samples"] = {k: v["samples"] for k, v in manifest["kinds"].items()}
    summary["seconds"] = manifest["timings_s"]["total"]
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
