"""Input adapters: interaction logs and items tables -> one canonical shape.

Design
------
CSV is read with *all columns as strings* (no schema inference), because the quarantine must
keep the bad rows exactly as read, and because parsing is then one explicit, null-safe step
(``try_cast``: Spark 4 runs in ANSI mode, where a plain cast of a bad string raises) instead of
a reader-specific surprise. An items table in Parquet is cast to strings the same way (its
list columns then read "[3, 17]").

A Parquet *interaction log* keeps its numeric, string, boolean, timestamp and date columns in
their own types (other types are cast to strings): they are already exactly as read, a
numeric column needs no parsing (``cast("double")``), and exact-duplicate detection groups on
8-byte values instead of their decimal text, which halved that aggregate at 10M rows (12 s ->
5 s on 2 cores). A timestamp or date time column becomes epoch seconds (``unix_micros / 1e6``;
dates at midnight UTC), so a data-lake table with a real ``TIMESTAMP`` column needs no
conversion first. Consequences: the quarantine keeps those columns typed, and duplicates
follow Spark's value equality for floating point (NaN equals NaN, -0.0 equals 0.0).

On top of the string columns each adapter defines *canonical* columns as Spark expressions:

``interactions``  ``_user`` (trimmed id or null), ``_item``, ``_ts`` (epoch seconds, double or
                  null when unparseable), ``_wr`` (watch ratio, double or null), ``_xbad``
                  (an optional feedback column holds a bad value)
``items``         ``_item``, ``_cat_tokens`` (array<string> of category id tokens, null when
                  the field is empty), ``_caption`` (string or null)

A caption source (issue #6, e.g. ``kuairec_caption_category.csv``) plugs in by producing a
DataFrame ``(item_id, caption)`` and passing it through :func:`attach_captions`; the features
code only ever reads ``_caption``.

Formats: ``csv``/``parquet`` (generic, column names from :class:`SourceConfig`) and
``kuairec`` (``big_matrix.csv``/``small_matrix.csv`` + ``item_categories.csv`` as published;
``timestamp`` may be missing, then the text ``time`` column, in ``kuairec_time_zone``, is used).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BooleanType,
    DateType,
    NumericType,
    StringType,
    TimestampNTZType,
    TimestampType,
)

from higr_dist.etl.config import SourceConfig

#: Internal column names start with '_' so they never clash with source columns.
INTERNAL_PREFIX = "_"


@dataclass(frozen=True)
class Source:
    """A source as read: the DataFrame and the names of its source columns."""

    df: DataFrame
    """all source columns (as read: see the module docstring) plus canonical ``_*`` columns"""
    columns: tuple[str, ...]
    """the source columns, in file order (what the quarantine keeps)"""
    canonical: tuple[tuple[str, Column], ...] = ()
    """the canonical columns as expressions of the source columns alone (name, expression),
    for plans that drop and re-derive them (exact-duplicate detection groups on the source
    columns only)"""


def resolve_format(src: SourceConfig, path: str) -> str:
    """``auto`` -> ``csv`` for paths ending in .csv (or .csv.gz ...), else ``parquet``."""
    if src.format != "auto":
        return src.format
    return "csv" if re.search(r"\.csv(\.[a-z0-9]+)?/?$", path.lower()) else "parquet"


def effective_source(src: SourceConfig) -> SourceConfig:
    """The column mapping actually used: KuaiRec's published names for ``kuairec``."""
    if src.format != "kuairec":
        return src
    return dataclasses.replace(
        src, user_col="user_id", item_col="video_id", time_col="timestamp",
        feedback_col="watch_ratio", extra_feedback_cols=["play_duration", "video_duration"],
        items_item_col="video_id", items_category_col="feat", items_caption_col="caption",
        category_separator=",")


def _read_strings(spark: SparkSession, path: str, fmt: str, src: SourceConfig,
                  multiline: bool = False, keep_types: bool = False) -> DataFrame:
    """Read ``path`` with every column as a string; with ``keep_types``, Parquet's numeric,
    string, boolean, timestamp and date columns keep their types (the rest become strings)."""
    if fmt in ("csv", "kuairec"):
        return (spark.read.option("header", "true").option("inferSchema", "false")
                .option("sep", src.csv_delimiter).option("multiLine", str(multiline).lower())
                .option("escape", '"').option("mode", "PERMISSIVE").csv(path))
    if fmt == "parquet":
        df = spark.read.parquet(path)
        kept = ((NumericType, StringType, BooleanType, TimestampType, TimestampNTZType,
                 DateType) if keep_types else (StringType,))
        return df.select([F.col(f.name) if isinstance(f.dataType, kept)
                          else F.col(f.name).cast("string").alias(f.name)
                          for f in df.schema.fields])
    raise ValueError(f"unknown source format {fmt!r}")


def _check_columns(columns: tuple[str, ...], required: list[str], what: str, path: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{what} {path}: missing column(s) {missing}; has {list(columns)}")
    internal = [c for c in columns if c.startswith(INTERNAL_PREFIX) or c == "reason"]
    if internal:
        raise ValueError(f"{what} {path}: column name(s) {internal} are reserved "
                         "(leading '_' or 'reason'); rename them")


def _id(col: Column) -> Column:
    """Trimmed id; empty -> null."""
    t = F.trim(col)
    return F.when(t == "", None).otherwise(t)


def _number(col: Column) -> Column:
    """String -> double; null when empty or unparseable (never raises, ANSI-safe)."""
    return F.trim(col).try_cast("double")


def _is_numeric(df: DataFrame, name: str) -> bool:
    return isinstance(df.schema[name].dataType, NumericType)


def _text(df: DataFrame, name: str) -> Column:
    """A column of any read type as a string."""
    return (F.col(name) if isinstance(df.schema[name].dataType, StringType)
            else F.col(name).cast("string"))


def _as_number(df: DataFrame, name: str) -> Column:
    """A column as double: a plain cast when numeric, else :func:`_number` of its text."""
    return F.col(name).cast("double") if _is_numeric(df, name) else _number(_text(df, name))


def _bad_number(df: DataFrame, name: str) -> Column:
    """A present optional feedback value that is unparseable, NaN, infinite or negative."""
    v, text = _as_number(df, name), _text(df, name)
    present = (F.col(name).isNotNull() if _is_numeric(df, name)
               else text.isNotNull() & (F.trim(text) != ""))
    return present & (v.isNull() | F.isnan(v) | (F.abs(v) == float("inf")) | (v < 0))


def _as_seconds(df: DataFrame, name: str) -> Column:
    """A time column as epoch seconds (double): timestamps and dates converted (UTC), other
    types as :func:`_as_number`."""
    dtype = df.schema[name].dataType
    if isinstance(dtype, (TimestampType, TimestampNTZType)):
        return F.unix_micros(F.col(name).cast("timestamp")) / F.lit(1e6)
    if isinstance(dtype, DateType):
        return F.unix_date(F.col(name)).cast("double") * F.lit(86400.0)
    return _as_number(df, name)


def read_interactions(spark: SparkSession, path: str, src: SourceConfig) -> Source:
    """Read an interaction log (see module docstring) into strings + canonical columns."""
    fmt = resolve_format(src, path)
    eff = effective_source(src)
    df = _read_strings(spark, path, fmt, eff, keep_types=True)
    cols = tuple(df.columns)
    _check_columns(cols, [eff.user_col, eff.item_col, eff.time_col, eff.feedback_col],
                   "interactions", path)
    ts = _as_seconds(df, eff.time_col)
    if fmt == "kuairec" and "time" in cols:
        # KuaiRec: `timestamp` is sometimes missing while the text `time` (local time) is not
        local = F.try_to_timestamp(F.trim(F.col("time")))
        ts = F.coalesce(ts, F.unix_micros(F.to_utc_timestamp(local, eff.kuairec_time_zone))
                        / F.lit(1e6))
    extras = [c for c in eff.extra_feedback_cols if c in cols]
    xbad = F.lit(False)
    for c in extras:
        xbad = xbad | _bad_number(df, c)
    canonical = (("_user", _id(_text(df, eff.user_col))),
                 ("_item", _id(_text(df, eff.item_col))),
                 ("_ts", ts),
                 ("_wr", _as_number(df, eff.feedback_col)),
                 ("_xbad", xbad))
    df = df.select(*[F.col(c) for c in cols], *[e.alias(n) for n, e in canonical])
    return Source(df=df, columns=cols, canonical=canonical)


def _category_tokens(raw: Column, separator: str) -> Column:
    """"3", "3|17", "[27, 9]" -> ["3", "17"]...; empty field -> null."""
    body = F.regexp_replace(raw, r"[\[\]\s]", "")
    tokens = F.filter(F.split(body, re.escape(separator)), lambda t: t != "")
    return F.when(raw.isNull() | (F.size(tokens) == 0), None).otherwise(tokens)


def read_items(spark: SparkSession, path: str, src: SourceConfig,
               fmt: str | None = None) -> Source:
    """Read an items table into strings + ``_item``, ``_cat_tokens``, ``_caption``.

    ``fmt`` defaults to the interactions' format (``kuairec`` reads item_categories.csv);
    Parquet list columns arrive as their string form ("[3, 17]") and parse the same way.
    """
    fmt = fmt or resolve_format(src, path)
    if fmt == "kuairec" and src.format != "kuairec":
        src = dataclasses.replace(src, format="kuairec")
    eff = effective_source(src)
    df = _read_strings(spark, path, "csv" if fmt == "kuairec" else fmt, eff, multiline=True)
    cols = tuple(df.columns)
    _check_columns(cols, [eff.items_item_col, eff.items_category_col], "items", path)
    sep = eff.category_separator
    # Parquet lists cast to string read "[3, 17]": split those on ',' whatever the separator
    raw_cat = F.col(eff.items_category_col)
    tokens = F.when(F.trim(raw_cat).startswith("["), _category_tokens(raw_cat, ",")).otherwise(
        _category_tokens(raw_cat, sep))
    caption = (F.col(eff.items_caption_col) if eff.items_caption_col in cols
               else F.lit(None).cast("string"))
    df = df.select(*[F.col(c) for c in cols], _id(F.col(eff.items_item_col)).alias("_item"),
                   tokens.alias("_cat_tokens"), caption.alias("_caption"))
    return Source(df=df, columns=cols)


def attach_captions(items: Source, captions: DataFrame, item_col: str = "item_id",
                    caption_col: str = "caption") -> Source:
    """Replace ``_caption`` with text from a separate caption table (first caption per id).

    ``captions`` holds ``item_col`` and ``caption_col``; ids are matched as trimmed strings.
    Items without a caption row keep their own ``_caption`` (often null).
    """
    cap = (captions.select(_id(F.col(item_col).cast("string")).alias("_cap_item"),
                           F.col(caption_col).cast("string").alias("_cap_text"))
           .where(F.col("_cap_item").isNotNull())
           .groupBy("_cap_item").agg(F.min("_cap_text").alias("_cap_text")))
    df = (items.df.join(cap, items.df["_item"] == cap["_cap_item"], "left")
          .withColumn("_caption", F.coalesce(F.col("_cap_text"), F.col("_caption")))
          .drop("_cap_item", "_cap_text"))
    return Source(df=df, columns=items.columns)
