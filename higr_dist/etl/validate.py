"""Validation of interaction rows: every input row comes out exactly once, kept or with a reason.

Design
------
One pass, one shuffle. Rows are hash-partitioned by the canonical user id ``_user`` first;
everything after that (exact-duplicate detection, the per-user valid count for ``short_user``,
and later the per-user sequences) groups by keys that include ``_user``, so Spark reuses that
partitioning and adds no further exchange of the interaction rows.

- Exact duplicates: ``groupBy(_user, all source columns)`` with a count ``n`` (a hash
  aggregate inside each partition; ``_user`` is in the key only so that the user partitioning
  is reused), then the other canonical columns are derived again from the source columns
  (functions of them: carrying them through the aggregate as keys cost hashing two more
  strings per row), and every row is re-expanded to its ``n`` copies: the first copy of a
  valid row is kept, copies 2..n are ``duplicate``. Bad rows keep their own reason for every
  copy.
- Reasons, in precedence order (:data:`higr_dist.etl.config.INTERACTION_REASONS`): null user,
  null item, item not in the catalogue, timestamp unparseable or outside
  ``[timestamp_min, timestamp_max)``, feedback unparseable/NaN/infinite/negative (watch ratio or
  a present optional feedback column), duplicate, and finally ``short_user`` for valid rows of a
  user with fewer than ``2 * holdout + min_history`` valid rows: valid but unusable, so
  quarantined, never dropped.

The output keeps the source columns (strings, for the quarantine) on quarantined rows only:
they are null on kept rows, which never read them, so the persisted frame stays small (the
valid path is most of the log). Typed columns for the valid path: ``_idx`` (item_idx), ``_ts``
(long epoch seconds, floored), ``_wr`` (watch ratio rounded to ``feedback_decimals``).
"""

from __future__ import annotations

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
    columns (null on valid rows), ``_user``, ``_idx``, ``_ts``, ``_wr``, ``reason``;
    hash-partitioned by ``_user`` into ``cfg.shuffle_partitions`` partitions.
    """
    cols = list(src.columns)
    derived = [e.alias(n) for n, e in src.canonical if n != "_user"]  # _item, _ts, _wr, _xbad
    parts = src.df.select(*cols, "_user").repartition(cfg.shuffle_partitions, "_user")
    distinct = (parts.groupBy("_user", *cols).agg(F.count("*").alias("_n"))
                .select("_user", *cols, "_n", *derived))
    ids = item_ids.select(F.col("item_id").alias("_item_key"), F.col("item_idx").alias("_idx"))
    if num_items <= cfg.broadcast_items_max:
        ids = F.broadcast(ids)
    joined = distinct.join(ids, distinct["_item"] == ids["_item_key"], "left").drop("_item_key")
    rows = (joined.withColumn("_reason0", _row_reason(cfg))
            .withColumn("_copy", F.explode(F.sequence(F.lit(1), F.col("_n")))))
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
        "reason",
    )
