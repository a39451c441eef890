"""The item catalogue: validate the items table and assign dense ``item_idx``.

Design
------
``item_idx`` is the rank of ``item_id`` in string order (DESIGN.md), computed distributed: a
range-partitioned sort, one count per partition (the only thing that reaches the driver, one
row per partition), then ``idx = offset[partition] + position in partition``. The sorted frame
is checkpointed before the counts are taken, so both uses see the same partitions even though
range boundaries come from sampling; the result depends only on the global order, so it is
deterministic.

Category ids: a category token is an integer id or a *name* ("Action"). Integer tokens keep
their value; the distinct names get ``base + 1, base + 2, ...`` in sorted (binary string)
order, ``base`` = max(0, the largest integer token), both taken over the rows that pass the
row checks (a name seen only in quarantined rows uses no id). So an all-names table gets
1..K, a mixed table never maps a name onto an integer id, and the ids depend only on the set
of tokens, never on Spark's partitioning or the row order. Nothing reaches the driver: one
global aggregate gathers the sorted distinct names (catalogue-sized, in practice tens to
thousands) and the largest integer into a single ``map<string, long>`` row that every items row
is joined with (a broadcast cross join). Downstream stays integer: the index's
``categories`` are array<long> (features hash them as ``c:<id>``); ``category_tokens`` keeps
the tokens as read next to them, so the name of an id can be looked up in ``item_index/``.
Trade-off: a name's id shifts when a new name sorting before it (or a larger integer id)
appears in the table; a hash would be stable across tables but 63 bits wide and not dense.

Items-table rows are validated like interactions (never dropped silently) and quarantined to
``DIR/quarantine_items/`` with a reason: ``null_item``, ``bad_category`` (a token that is a
number but not a 64-bit integer, e.g. "1.5", "1e3", "NaN"; a malformed category field such as
a MovieLens-100k genre flag that is not 0/1; or a name whose id would overflow 64 bits),
``duplicate`` (exact duplicate row beyond the first) and ``conflicting_item`` (same id,
different attributes: the row with the smallest (categories, caption) is kept,
deterministically). An empty category field is not an error: the item gets
``[unknown_category]``. A table with no valid item at all stops the ETL with one line that
counts the rows per reason and shows the first quarantined row.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from higr_dist.etl.config import ITEM_REASONS, EtlConfig
from higr_dist.etl.sources import Source
from higr_dist.etl.spark import materialise


@dataclass
class Catalog:
    """The validated catalogue."""

    index: DataFrame
    """item_idx (long, dense), item_id (string), categories (array<long>), caption (string),
    category_tokens (array<string>: the tokens ``categories`` came from, null when the field
    was empty); checkpointed, one row per item"""
    quarantine: DataFrame
    """rejected items-table rows: the source columns (strings) + reason"""
    num_items: int
    """rows of ``index``"""
    rows_in: int
    """rows of the items table as read"""
    quarantine_by_reason: dict[str, int]
    """rejected rows per reason (every reason listed, zeros included)"""


def _is_bad_token(t: Column) -> Column:
    """A number that is not a 64-bit integer ("1.5", "1e3", "NaN", 20 digits): not a name."""
    return t.try_cast("long").isNull() & t.try_cast("double").isNotNull()


def _category_ids(rows: DataFrame) -> DataFrame:
    """One row, ``_cat_ids``: map name -> id for every name token of ``rows`` (see the module
    docstring); an id that would overflow a long is null."""
    t = F.col("t")
    as_long = t.try_cast("long")
    one = rows.select(F.explode("_cat_tokens").alias("t")).agg(
        F.greatest(F.coalesce(F.max(as_long), F.lit(0)), F.lit(0)).cast("long").alias("base"),
        F.sort_array(F.collect_set(F.when(as_long.isNull(), t))).alias("names"))
    ids = F.transform("names", lambda _, k: F.try_add(F.col("base"), (k + 1).cast("long")))
    return one.select(F.map_from_arrays("names", ids).alias("_cat_ids"))


def _classify(items: Source, cfg: EtlConfig) -> DataFrame:
    """One row per input row with its reason (null = kept) and parsed categories."""
    cols = list(items.columns)
    cat_bad = ("_cat_bad",) if "_cat_bad" in items.df.columns else ()
    df = items.df.groupBy(*cols, "_item", "_cat_tokens", *cat_bad, "_caption").agg(
        F.count("*").alias("_n"))
    bad_field = F.coalesce(F.exists("_cat_tokens", _is_bad_token), F.lit(False))
    if cat_bad:
        bad_field = bad_field | F.coalesce(F.col("_cat_bad"), F.lit(False))
    df = df.withColumn("_row_ok", F.col("_item").isNotNull() & ~bad_field)
    df = df.crossJoin(F.broadcast(_category_ids(df.where("_row_ok"))))
    cats = F.when(F.col("_cat_tokens").isNull(), F.array(F.lit(cfg.unknown_category).cast("long")))
    cats = cats.otherwise(F.transform("_cat_tokens", lambda t: F.coalesce(
        t.try_cast("long"), F.try_element_at(F.col("_cat_ids"), t))))
    unmapped = F.coalesce(F.exists(cats, lambda c: c.isNull()), F.lit(False))
    reason0 = (F.when(F.col("_item").isNull(), "null_item")
               .when(~F.col("_row_ok") | unmapped, "bad_category"))
    df = df.select(*cols, "_item", "_cat_tokens", "_caption", "_n", cats.alias("categories"),
                   reason0.alias("_reason0"))
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
    return ordered.select(idx.alias("item_idx"), "item_id", "categories", "caption",
                          "category_tokens")


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
    if kept == 0:
        raise ValueError(_no_valid_item(classified, items, rows_in, by_reason))
    valid = classified.where(F.col("reason").isNull()).select(
        F.col("_item").alias("item_id"), "categories", F.col("_caption").alias("caption"),
        F.col("_cat_tokens").alias("category_tokens"))
    index = materialise(_dense_index(valid, max(1, cfg.shuffle_partitions)))
    quarantine = classified.where(F.col("reason").isNotNull()).select(*items.columns, "reason")
    return Catalog(index=index, quarantine=quarantine, num_items=kept, rows_in=rows_in,
                   quarantine_by_reason={r: by_reason.get(r, 0) for r in ITEM_REASONS})


def _no_valid_item(classified: DataFrame, items: Source, rows_in: int,
                   by_reason: dict[str, int]) -> str:
    """The one-line error of a table without a valid item: rows per reason and the first
    quarantined row (one row reaches the driver)."""
    if rows_in == 0:
        return "the items table has no valid item: it has no rows"
    counts = ", ".join(f"{r} {by_reason[r]}" for r in ITEM_REASONS if by_reason.get(r))
    first = (classified.where(F.col("reason").isNotNull())
             .orderBy(*[F.col(c).asc_nulls_first() for c in items.columns]).first())
    shown = ", ".join(f"{c}={first[c]!r}" for c in items.columns)
    if len(shown) > 160:
        shown = shown[:157] + "..."
    return (f"the items table has no valid item: {rows_in} rows, all quarantined ({counts}); "
            f"first: {first['reason']}: {shown}")
