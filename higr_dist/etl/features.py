"""Item feature vectors ``x`` and positive pairs, computed in Spark SQL (no Python UDF).

Design
------
``x = [content (L2-normed, content_dim) | collaborative (L2-normed, collab_dim)]``.

Both parts are *signed random projections of sparse count vectors* (the hashing trick and a
fixed random projection in one step): feature ``f`` with count ``w`` contributes
``w * r_f`` where ``r_f in {-1, +1}^d`` is read off the bits of ``xxhash64(seed, block, f)``
(64 dimensions per hash). This is an Achlioptas/JL projection: inner products of the sparse
vectors are preserved in expectation, no projection matrix is stored anywhere, and the sums are
sums of integers, exact in float64, so ``x`` is bit-identical whatever the summation order.
Trade-off: +-1 entries instead of Gaussian ones, which costs nothing measurable for JL
embeddings and keeps everything in the JVM (d aggregate columns).

- content: features of an item are its category ids (``c:<id>``, the primary one counted
  ``primary_category_weight`` times) and the character n-grams of its caption (``g<n>:<text>``,
  lower-cased, whitespace collapsed; characters, so Chinese captions work). The category block
  and the caption block are L2-normalised separately, the caption block weighted by
  ``caption_weight``, summed and normalised again.
- collaborative: co-occurrence of items within ``cooc_window`` positions in a user's
  *training* region (val/test blocks excluded, so nothing about held-out targets leaks into the
  tokenizer), negative-feedback interactions left out. The projection of an item's
  co-occurrence row is ``sum_j count_ij * r_j``. Items without co-occurrence get zeros.
- pairs: the top ``pairs_per_item`` partners per item by count (ties: smaller item_idx), and
  ``(i, i, weight 0)`` for an item without partner, so every item is an anchor at least once.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from higr_dist.etl.config import EtlConfig

_CONTENT, _CAPTION, _COLLAB = 0, 1, 2  # hash streams of the three projections


def _zeros(dim: int) -> Column:
    return F.array_repeat(F.lit(0.0), dim)


def _normalise(v: Column, scale: float | Column = 1.0) -> Column:
    """scale * v / ||v||; a zero vector stays zero."""
    norm = F.sqrt(F.aggregate(v, F.lit(0.0), lambda acc, x: acc + x * x))
    return F.transform(v, lambda x: F.when(norm > 0, x / norm * scale).otherwise(0.0))


def _ngram_at(text: Column, n: int):
    """The lambda ``i -> "g<n>:" + text[i : i + n]`` (1-based) for ``F.transform``."""
    return lambda i: F.concat(F.lit(f"g{n}:"), F.substring(text, i, n))


def _feature_rows(index: DataFrame, cooc: DataFrame, cfg: EtlConfig) -> DataFrame:
    """(item_idx, part, f, w): category ids, caption n-grams and co-occurring items as features."""
    cats = index.select("item_idx", F.posexplode("categories").alias("p", "c")).select(
        "item_idx", F.lit(_CONTENT).alias("part"),
        F.concat(F.lit("c:"), F.col("c").cast("string")).alias("f"),
        F.when(F.col("p") == 0, cfg.primary_category_weight).otherwise(1).cast("long").alias("w"))
    text = F.trim(F.regexp_replace(F.lower(F.coalesce("caption", F.lit(""))), r"\s+", " "))
    grams = []
    for n in cfg.ngram_sizes:
        g = F.when(F.length(text) >= n, F.transform(
            F.sequence(F.lit(1), F.length(text) - n + 1), _ngram_at(text, n)))
        grams.append(F.coalesce(g, F.array().cast("array<string>")))
    caps = index.select("item_idx", F.explode(F.concat(*grams)).alias("f")).select(
        "item_idx", F.lit(_CAPTION).alias("part"), "f", F.lit(1).cast("long").alias("w"))
    collab = cooc.select(F.col("a").alias("item_idx"), F.lit(_COLLAB).alias("part"),
                         F.concat(F.lit("i:"), F.col("b").cast("string")).alias("f"), "w")
    return cats.unionByName(caps).unionByName(collab)


def item_features(index: DataFrame, cooc: DataFrame, cfg: EtlConfig) -> DataFrame:
    """(item_idx, item_id, categories, x array<float>) for every catalogue item.

    One shuffle (by item_idx) for all three projections: per (item, part) the signed sums,
    normalised per part; per item the parts are assembled into x.
    """
    dc, dk = cfg.content_dim, cfg.collab_dim
    dim = max(dc, dk)
    blocks = (dim + 63) // 64
    rows = _feature_rows(index, cooc, cfg).repartition(cfg.shuffle_partitions, "item_idx")
    # bit k % 64 of xxhash64(seed, part, k // 64, feature): +1 / -1 for dimension k
    hashed = rows.select("item_idx", "part", F.col("w").cast("double").alias("w"), *[
        F.xxhash64(F.lit(cfg.seed), F.col("part"), F.lit(b), F.col("f")).alias(f"h{b}")
        for b in range(blocks)])
    sums = [F.sum(F.col("w") * (F.shiftright(F.col(f"h{k // 64}"), k % 64).bitwiseAND(1) * 2 - 1))
            for k in range(dim)]
    per_part = hashed.groupBy("item_idx", "part").agg(F.array(*sums).alias("v"))
    size = F.when(F.col("part") == _COLLAB, dk).otherwise(dc)
    scale = F.when(F.col("part") == _CAPTION, F.lit(cfg.caption_weight)).otherwise(F.lit(1.0))
    per_part = per_part.select("item_idx", "part",
                               _normalise(F.slice("v", 1, size), scale).alias("v"))
    parts = per_part.groupBy("item_idx").agg(F.collect_list(F.struct("part", "v")).alias("ps"))

    def total(which: tuple[int, ...], d: int) -> Column:
        # sum of <= 2 vectors: commutative, so bit-identical whatever the collect order
        chosen = F.filter("ps", lambda p: p["part"].isin(*which))
        return F.aggregate(chosen, _zeros(d), lambda acc, p: F.zip_with(
            acc, p["v"], lambda a, b: a + b))

    x = F.concat(_normalise(total((_CONTENT, _CAPTION), dc)), total((_COLLAB,), dk))
    vectors = parts.select("item_idx", x.cast("array<float>").alias("x"))
    return index.join(vectors, "item_idx", "left").select(
        "item_idx", "item_id", "categories",
        F.coalesce("x", _zeros(dc + dk).cast("array<float>")).alias("x"))


def cooccurrence(seq: DataFrame, cfg: EtlConfig) -> DataFrame:
    """User sequences -> (a, b, w): co-occurrence counts in training regions (both directions)."""
    n = F.size("items")
    end = n - 2 * cfg.holdout
    kept = seq.where(n >= cfg.min_user_interactions).select(
        F.filter(F.arrays_zip(F.slice("items", 1, end).alias("i"), F.slice("fb", 1, end).alias("w")),
                 lambda z: z["w"] >= cfg.negative_threshold)["i"].alias("seq"))
    pairs = kept.select("seq", F.posexplode("seq").alias("p", "a")).select(
        "a", F.explode(F.slice("seq", F.col("p") + 2, cfg.cooc_window)).alias("b"))
    both = pairs.where(F.col("a") != F.col("b")).select(F.explode(F.array(
        F.struct(F.col("a").alias("a"), F.col("b").alias("b")),
        F.struct(F.col("b").alias("a"), F.col("a").alias("b")))).alias("e")).select("e.a", "e.b")
    return both.groupBy("a", "b").agg(F.count("*").alias("w"))


def top_pairs(cooc: DataFrame, index: DataFrame, cfg: EtlConfig) -> DataFrame:
    """(anchor, positive, weight, rank): top-P partners per item; self-pair for loners."""
    rows = index.select(F.col("item_idx").alias("a")).join(cooc, "a", "left")
    order = Window.partitionBy("a").orderBy(F.col("w").desc_nulls_last(), F.col("b").asc())
    top = rows.withColumn("rank", F.row_number().over(order)).where(
        F.col("rank") <= cfg.pairs_per_item)
    return top.select(F.col("a").alias("anchor"),
                      F.coalesce("b", "a").alias("positive"),
                      F.coalesce(F.col("w").cast("double"), F.lit(0.0)).alias("weight"),
                      "rank")


def pair_rows(pairs: DataFrame, feats: DataFrame, broadcast: bool) -> DataFrame:
    """Denormalise both feature vectors into each pair."""
    xs = feats.select("item_idx", "x")
    if broadcast:
        xs = F.broadcast(xs)
    a = xs.select(F.col("item_idx").alias("anchor"), F.col("x").alias("x_anchor"))
    p = xs.select(F.col("item_idx").alias("positive"), F.col("x").alias("x_positive"))
    return pairs.join(a, "anchor").join(p, "positive").select(
        "anchor", "positive", "weight", "rank", "x_anchor", "x_positive")
