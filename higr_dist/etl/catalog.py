"""The item catalogue: validate the items table and assign dense ``item_idx``.

Design
------
``item_idx`` is the rank of ``item_id`` in string order (DESIGN.md), computed distributed: a
range-partitioned sort, one count per partition (the only thing that reaches the driver, one
row per partition), then ``idx = offset[partition] + position in partition``. The sorted frame
is checkpointed before the counts are taken, so both uses see the same partitions even though
range boundaries come from sampling; the result depends only on the global order, so it is
deterministic.

Items-table rows are validated like interactions (never dropped silently) and quarantined to
``DIR/quarantine_items/`` with a reason: ``null_item``, ``bad_category`` (a category token that
is not an integer), ``duplicate`` (exact duplicate row beyond the first) and
``conflicting_item`` (same id, different attributes: the row with the smallest
(categories, caption) is kept, deterministically). An empty category field is not an error: the
item gets ``[unknown_category]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from higr_dist.etl.config import ITEM_REASONS, EtlConfig
from higr_dist.etl.sources import Source
from higr_dist.etl.spark import materialise


@dataclass
class Catalog:
    """The validated catalogue."""

    index: DataFrame
    """item_idx (long, dense), item_id (string), categories (array<long>), caption (string);
    checkpointed, one row per item"""
    quarantine: DataFrame
    """rejected items-table rows: the source columns (strings) + reason"""
    num_items: int
    """rows of ``index``"""
    rows_in: int
    """rows of the items table as read"""
    quarantine_by_reason: dict[str, int]
    """rejected rows per reason (every reason listed, zeros included)"""


def _classify(items: Source, cfg: EtlConfig) -> DataFrame:
    """One row per input row with its reason (null = kept) and parsed categories."""
    cols = list(items.columns)
    df = items.df.groupBy(*cols, "_item", "_cat_tokens", "_caption").agg(F.count("*").alias("_n"))
    bad_cat = F.coalesce(F.exists("_cat_tokens", lambda t: t.try_cast("long").isNull()),
                         F.lit(False))
    reason0 = F.when(F.col("_item").isNull(), "null_item").when(bad_cat, "bad_category")
    cats = F.when(F.col("_cat_tokens").isNull(), F.array(F.lit(cfg.unknown_category).cast("long")))
    cats = cats.otherwise(F.transform("_cat_tokens", lambda t: t.try_cast("long")))
    df = df.select("*", reason0.alias("_reason0"), cats.alias("categories"))
    # among distinct valid rows, one per item id survives; the others conflict
    keep_order = Window.partitionBy("_item").orderBy(
        F.col("categories").cast("string"), F.col("_caption").asc_nulls_first(), *cols)
    df = df.withColumn("_rank", F.when(F.col("_reason0").isNull(),
                                       F.row_number().over(keep_order)))
    df = df.withColumn("_copy", F.explode(F.sequence(F.lit(1), F.col("_n"))))
    reason = (F.when(F.col("_reason0").isNotNull(), F.col("_reason0"))
              .when(F.col("_copy") > 1, "duplicate")
              .when(F.col("_rank") > 1, "conflicting_item"))
    return df.withColumn("reason", reason)


def _dense_index(valid: DataFrame, partitions: int) -> DataFrame:
    """Add ``item_idx`` = rank of ``item_id`` (string order), computed distributed."""
    ordered = (valid.repartitionByRange(partitions, "item_id").sortWithinPartitions("item_id")
               .withColumn("_pid", F.spark_partition_id())
               .withColumn("_mid", F.monotonically_increasing_id()))
    ordered = materialise(ordered)
    counts = sorted((r["_pid"], r["count"]) for r in ordered.groupBy("_pid").count().collect())
    offsets, total = {}, 0
    for pid, n in counts:
        offsets[pid] = total
        total += n
    if not offsets:
        raise ValueError("the items table has no valid item")
    offset_map = F.create_map(*[F.lit(x) for kv in offsets.items() for x in kv])
    local = F.col("_mid") - F.shiftleft(F.col("_pid").cast("long"), 33)
    idx = F.element_at(offset_map, F.col("_pid")).cast("long") + local
    return ordered.select(idx.alias("item_idx"), "item_id", "categories", "caption")


def build_catalog(items: Source, cfg: EtlConfig) -> Catalog:
    """Validate the items table, assign dense ids; the index comes back checkpointed."""
    classified = materialise(_classify(items, cfg))
    by_reason = {r["reason"]: r["count"]
                 for r in classified.groupBy("reason").count().collect()}
    rows_in = items.df.count()
    kept = by_reason.pop(None, 0)
    if kept + sum(by_reason.values()) != rows_in:
        raise RuntimeError(f"items accounting broken: {rows_in} rows in, {kept} kept + "
                           f"{sum(by_reason.values())} quarantined")
    valid = classified.where(F.col("reason").isNull()).select(
        F.col("_item").alias("item_id"), "categories", F.col("_caption").alias("caption"))
    index = materialise(_dense_index(valid, max(1, cfg.shuffle_partitions)))
    quarantine = classified.where(F.col("reason").isNotNull()).select(*items.columns, "reason")
    return Catalog(index=index, quarantine=quarantine, num_items=kept, rows_in=rows_in,
                   quarantine_by_reason={r: by_reason.get(r, 0) for r in ITEM_REASONS})
