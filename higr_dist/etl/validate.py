"""Validation of interaction rows: every input row comes out exactly once, kept or with a reason.

Design
------
One pass, one shuffle. Rows are hash-partitioned by the canonical user id ``_user`` first;
everything after that (exact-duplicate detection, the per-user valid count for ``short_user``,
and later the per-user sequences) groups by keys that include ``_user``, so Spark reuses that
partitioning and adds no further exchange of the interaction rows.

- Exact duplicates: a window over (``_user``, all source columns) numbers the copies of each
  distinct row (``_copy``, ``row_number``): the first copy of a valid row is kept, copies
  2..n are ``duplicate``; bad rows keep their own reason for every copy. That window's sort
  (by ``_user``, then the source columns) also serves the per-user window of ``short_user``
  and leaves duplicates adjacent, so validation costs one shuffle and one sort. (It replaced a
  hash aggregate on the same keys followed by re-expanding every row to its ``n`` copies:
  ~10% slower at 10M rows, and the aggregate was followed by the per-user sort anyway.)
  Duplicates follow Spark's grouping equality: nulls equal, NaN equals NaN, -0.0 equals 0.0.
- Reasons, in precedence order (:data:`higr_dist.etl.config.INTERACTION_REASONS`): null user,
  null item, item not in the catalogue, timestamp unparseable or outside
  ``[timestamp_min, timestamp_max)``, feedback unparseable/NaN/infinite/negative (watch ratio or
  a present optional feedback column), duplicate, and finally ``short_user`` for valid rows of a
  user with fewer than ``2 * holdout + min_history`` valid rows: valid but unusable, so
  quarantined, never dropped.

The output keeps the source columns (strings, for the quarantine) on quarantined rows only:
they are null on kept rows, which never read them (the valid path is most of the log). Typed
columns for the valid path: ``_idx`` (item_idx), ``_ts`` (long epoch seconds, floored),
``_wr`` (watch ratio rounded to ``feedback_decimals``).

:func:`by_user` then gathers, in one aggregate over the same partitions, each user's kept
rows (for the sequences) and sets the quarantined rows apart. That aggregate, ~one row per
user, is what the ETL caches, instead of every classified row: caching 10M classified rows
cost ~4 s of a 10M-row ETL on 2 cores, and the sequences then re-read and re-grouped them.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from higr_dist.etl.config import EtlConfig
from higr_dist.etl.sources import Source


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
    """Every input row once, with ``reason`` (null = valid) and the typed columns.

    ``item_ids`` has ``item_id`` and ``item_idx`` (the catalogue). Output columns: the source
    columns (null on valid rows), ``_user``, ``_idx``, ``_ts``, ``_wr``, ``_copy`` (1 for the
    first of a set of exact duplicates, 2.. for the others), ``reason``; hash-partitioned by
    ``_user`` into ``cfg.shuffle_partitions`` partitions.
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
    # copies of one distinct row are numbered 1..n (any order: they are equal)
    same_row = Window.partitionBy("_user", *cols).orderBy(*cols)
    rows = (joined.withColumn("_reason0", _row_reason(cfg))
            .withColumn("_copy", F.row_number().over(same_row)))
    reason = F.coalesce(F.col("_reason0"), F.when(F.col("_copy") > 1, F.lit("duplicate")))
    rows = rows.withColumn("_r1", reason)
    per_user = Window.partitionBy("_user")
    valid_count = F.sum(F.when(F.col("_r1").isNull(), 1).otherwise(0)).over(per_user)
    short = F.when(F.col("_r1").isNull() & (valid_count < cfg.min_user_interactions),
                   F.lit("short_user"))
    rows = rows.withColumn("reason", F.coalesce(F.col("_r1"), short))
    bad = F.col("reason").isNotNull()
    return rows.select(
        *[F.when(bad, F.col(c)).alias(c) for c in cols], "_user", "_idx",
        F.when(F.col("_r1").isNull(), F.floor("_ts")).cast("long").alias("_ts"),
        F.when(F.col("_r1").isNull(), F.round("_wr", cfg.feedback_decimals)).alias("_wr"),
        "_copy", "reason",
    )


#: quarantined rows go to groups 1..2^31-1 of their user (see :func:`by_user`)
_BAD_GROUPS = (1 << 31) - 1


def by_user(classified: DataFrame, columns: Sequence[str]) -> DataFrame:
    """The classified rows in one aggregate: the kept rows of each user together, and the
    quarantined rows apart.

    Output, grouped by (``_user``, ``_grp``):

    - ``_grp`` 0, one row per user with kept rows: ``ev``, the user's (``t``, ``i``, ``w``) =
      (``_ts``, ``_idx``, ``_wr``) structs sorted (time order, ties by item then feedback:
      a total, deterministic order); ``bad`` empty.
    - ``_grp`` > 0: quarantined rows, grouped by a 31-bit hash of the row and its copy
      number, so a user's bad rows (or the null user's, or a million copies of one row)
      never pile up in one row: in practice one row each. ``bad``: structs of the source
      ``columns`` and ``reason``; ``ev`` empty.

    The keys include ``_user``, so Spark reuses :func:`classify_interactions`' partitioning:
    no shuffle.
    """
    bad = F.col("reason").isNotNull()
    row_hash = F.xxhash64(F.col("_user"), *[F.col(c) for c in columns], F.col("_copy"))
    grp = F.when(bad, 1 + F.pmod(row_hash, F.lit(_BAD_GROUPS))).otherwise(0)
    event = F.struct(F.col("_ts").alias("t"), F.col("_idx").alias("i"), F.col("_wr").alias("w"))
    # collect_list skips nulls: each list takes only its own rows
    ev = F.sort_array(F.collect_list(F.when(~bad, event)))
    rows = F.collect_list(F.when(bad, F.struct(*[F.col(c) for c in columns], F.col("reason"))))
    return classified.withColumn("_grp", grp).groupBy("_user", "_grp").agg(
        ev.alias("ev"), rows.alias("bad"))


def quarantined(users: DataFrame) -> DataFrame:
    """The quarantined rows of :func:`by_user`'s output: the source columns and ``reason``."""
    return users.where(F.col("_grp") > 0).select(F.explode("bad").alias("_b")).select("_b.*")
