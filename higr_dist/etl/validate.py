"""Validation of interaction rows: every input row comes out exactly once, kept or with a reason.

Design
------
One pass, one shuffle. Rows are hash-partitioned by the canonical user id ``_user`` first;
everything after that (exact-duplicate detection, the per-user valid count for ``short_user``,
and later the per-user sequences) groups by keys that include ``_user``, so Spark reuses that
partitioning and adds no further exchange of the interaction rows.

- Exact duplicates: a window over (``_user``, ``_grp``, all source columns) numbers and counts
  the copies of each distinct row; only the first copy goes on, carrying its count. Its
  first copy is kept (if valid) and copies 2..n are ``duplicate``; bad rows keep their own
  reason for every copy. ``_grp`` is 0 for rows valid so far and a hash of the row for bad
  ones (so the null user's rows, or a million copies of one bad row, never pile up in one
  group of the aggregate below). That window's sort (by ``_user``, ``_grp``, then the source
  columns) also serves the per-user window of ``short_user`` and the aggregate, so
  validation costs one shuffle and one sort. Duplicates follow Spark's grouping equality:
  nulls equal, NaN equals NaN, -0.0 equals 0.0.
- Reasons, in precedence order (:data:`higr_dist.etl.config.INTERACTION_REASONS`): null user,
  null item, item not in the catalogue, timestamp unparseable or outside
  ``[timestamp_min, timestamp_max)``, feedback unparseable/NaN/infinite/negative (watch ratio or
  a present optional feedback column), duplicate, and finally ``short_user`` for valid rows of a
  user with fewer than ``2 * holdout + min_history`` valid rows: valid but unusable, so
  quarantined, never dropped.

The output keeps the source columns (as read, for the quarantine) only on distinct rows with
a quarantined copy: they are null on the rest, which never read them (the valid path is most
of the log). Typed columns for the valid path: ``_idx`` (item_idx), ``_ts`` (long epoch
seconds, floored), ``_wr`` (watch ratio rounded to ``feedback_decimals``).

:func:`by_user` then gathers, in one streaming sort aggregate over the same partitions and sort
order, each user's kept rows (for the sequences) and sets the quarantined rows apart, a distinct
row with its copy count each; :func:`quarantined` expands them to one row per copy. That
aggregate, ~one row per user, is what the ETL caches, instead of every classified row: caching
every classified row was a noticeable part of the ETL's time (docs/BENCHMARKS.md, "Figures
behind design choices"), and the sequences then re-read and re-grouped them. (Before, every copy
went through the aggregate, and Spark's object hash aggregate for ``collect_list`` fell back
past 128 keys per task to sorting every row a second time; see docs/BENCHMARKS.md.)
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from higr_dist.etl.config import EtlConfig
from higr_dist.etl.sources import Source
from higr_dist.etl.spark import session_conf


def _row_reason(cfg: EtlConfig) -> F.Column:
    """The first row-level reason that applies (null when the row is valid so far)."""
    ts, wr = F.col("_ts"), F.col("_wr")
    bad_ts = (ts.isNull() | F.isnan(ts) | (ts < F.lit(float(cfg.timestamp_min)))
              | (ts >= F.lit(float(cfg.timestamp_max))))
    bad_fb = (wr.isNull() | F.isnan(wr) | (F.abs(wr) == float("inf")) | (wr < 0)
              | F.col("_xbad"))
    return (F.when(F.col("_user").isNull(), "null_user")
            .when(F.col("_item").isNull(), "null_item")
            .when(F.col("_idx").isNull(), "unknown_item")
            .when(bad_ts, "bad_timestamp")
            .when(bad_fb, "bad_feedback"))


def classify_interactions(src: Source, item_ids: DataFrame, num_items: int,
                          cfg: EtlConfig) -> DataFrame:
    """Every distinct input row once, with its copies' reasons and the typed columns.

    ``item_ids`` has ``item_id`` and ``item_idx`` (the catalogue). Output columns: the source
    columns (null unless a copy is quarantined), ``_user``, ``_grp``, ``_idx``, ``_ts``,
    ``_wr``, ``reason`` (the first copy's: null = kept), ``_dups`` (the other copies, 0..) and
    ``_dup_reason`` (theirs: ``duplicate``, or the row's own reason for a bad row);
    hash-partitioned by ``_user`` into ``cfg.shuffle_partitions`` partitions and sorted by
    (``_user``, ``_grp``, source columns). So a row with ``n`` copies stands for ``n`` input
    rows: ``reason`` once and ``_dup_reason`` ``n - 1`` times.
    """
    cols = list(src.columns)
    derived = [e.alias(n) for n, e in src.canonical if n != "_user"]  # _item, _ts, _wr, _xbad
    ids = item_ids.select(F.col("item_id").alias("_item_key"), F.col("item_idx").alias("_idx"))
    if num_items <= cfg.broadcast_items_max:
        # the shuffle carries the source columns and _user only; the rest is derived after it
        parts = (src.df.select(*cols, "_user").repartition(cfg.shuffle_partitions, "_user")
                 .select(*cols, "_user", *derived))
        joined = parts.join(F.broadcast(ids), parts["_item"] == ids["_item_key"], "left")
    else:
        # a catalogue too big to broadcast: join first (a shuffle by item), then by user
        logged = src.df.select(*cols, "_user", *derived)
        joined = (logged.join(ids, logged["_item"] == ids["_item_key"], "left")
                  .repartition(cfg.shuffle_partitions, "_user"))
    joined = joined.drop("_item_key")
    # a row valid so far goes to group 0 of its user (the user's sequence); a bad row to the
    # group of its hash, so a user's bad rows (or the null user's) spread over many groups
    row_bad = F.col("_reason0").isNotNull()
    grp = F.when(~row_bad, F.lit(0)).otherwise(
        1 + F.pmod(F.xxhash64(*[F.col(c) for c in cols]), F.lit(_BAD_GROUPS)))
    rows = joined.withColumn("_reason0", _row_reason(cfg)).withColumn("_grp", grp)
    # the copies of one distinct row: numbered 1..n (any order: they are equal) and counted,
    # in one window operator (same partitioning and order, two frames)
    same_row = Window.partitionBy("_user", "_grp", *cols).orderBy(*cols)
    whole = same_row.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    rows = (rows.withColumn("_copy", F.row_number().over(same_row))
            .withColumn("_n", F.count(F.lit(1)).over(whole))
            .where(F.col("_copy") == 1))
    # valid distinct rows per user (a column once: referenced twice, the window is not re-run)
    per_user = Window.partitionBy("_user")
    rows = rows.withColumn("_valid", F.sum(F.when(~row_bad, 1).otherwise(0)).over(per_user))
    short = F.when(~row_bad & (F.col("_valid") < cfg.min_user_interactions),
                   F.lit("short_user"))
    rows = rows.withColumn("reason", F.coalesce(F.col("_reason0"), short))
    kept = F.col("reason").isNull()
    quarantined_copy = F.col("reason").isNotNull() | (F.col("_n") > 1)
    return rows.select(
        *[F.when(quarantined_copy, F.col(c)).alias(c) for c in cols], "_user", "_grp", "_idx",
        F.when(kept, F.floor("_ts")).cast("long").alias("_ts"),
        F.when(kept, F.round("_wr", cfg.feedback_decimals)).alias("_wr"),
        "reason", (F.col("_n") - 1).alias("_dups"),
        F.coalesce(F.col("_reason0"), F.lit("duplicate")).alias("_dup_reason"),
    )


#: a bad row's group in its user is 1 + its hash modulo this (see :func:`classify_interactions`)
_BAD_GROUPS = (1 << 31) - 1


def by_user(classified: DataFrame, columns: Sequence[str]) -> DataFrame:
    """The distinct rows of :func:`classify_interactions` in one streaming aggregate: the kept
    rows of each user together, and the quarantined copies apart.

    Output, grouped by (``_user``, ``_grp``):

    - ``ev``: the kept rows' (``t``, ``i``, ``w``) = (``_ts``, ``_idx``, ``_wr``) structs
      sorted (time order, ties by item then feedback: a total, deterministic order); only
      group 0 has any.
    - ``bad``: one struct per distinct row with quarantined copies: the source ``columns``,
      ``reason`` (the first copy's, null when that copy is kept), ``_dups`` (copies 2..n)
      and ``_dup_reason`` (theirs). :func:`quarantined` expands them to one row per copy.

    The keys and the copies window's sort order start with (``_user``, ``_grp``), so Spark
    plans a sort aggregate on the window's output with no further shuffle or sort, and holds
    one group at a time (:func:`sort_aggregate`: the object hash aggregate Spark picks for
    ``collect_list`` spills past 128 keys per task into a sort of every row again).
    """
    entry = F.struct(*[F.col(c) for c in columns], F.col("reason"), F.col("_dups"),
                     F.col("_dup_reason"))
    event = F.struct(F.col("_ts").alias("t"), F.col("_idx").alias("i"), F.col("_wr").alias("w"))
    # collect_list skips nulls: each list takes only its own rows
    has_bad = F.col("reason").isNotNull() | (F.col("_dups") > 0)
    return classified.groupBy("_user", "_grp").agg(
        F.sort_array(F.collect_list(F.when(F.col("reason").isNull(), event))).alias("ev"),
        F.collect_list(F.when(has_bad, entry)).alias("bad"))


def sort_aggregate(spark: SparkSession):
    """Plan ``collect_list`` aggregates as sort aggregates inside the block (see
    :func:`by_user`); a frame persisted inside it keeps that plan. The session's setting is
    restored afterwards."""
    return session_conf(spark, "spark.sql.execution.useObjectHashAggregateExec", "false")


def quarantined(users: DataFrame) -> DataFrame:
    """The quarantined rows of :func:`by_user`'s output, one per copy: the source columns and
    ``reason``."""
    entries = users.select(F.explode("bad").alias("_b")).select("_b.*")
    first = entries.where(F.col("reason").isNotNull()).drop("_dups", "_dup_reason")
    copies = (entries.where(F.col("_dups") > 0)
              .withColumn("_k", F.explode(F.sequence(F.lit(1), F.col("_dups"))))
              .withColumn("reason", F.col("_dup_reason")).drop("_k", "_dups", "_dup_reason"))
    return first.unionByName(copies)
