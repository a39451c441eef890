"""Input adapters: interaction logs and items tables -> one canonical shape.

Design
------
CSV is read with *all columns as strings* (no schema inference), because the quarantine must
keep the bad rows exactly as read, and because parsing is then one explicit, null-safe step
(``try_cast``: Spark 4 runs in ANSI mode, where a plain cast of a bad string raises) instead of
a reader-specific surprise. An items table in Parquet is cast to strings the same way (its
list columns then read "[3, 17]").

A Parquet *interaction log* keeps its numeric, string, boolean, timestamp and date columns in
their own types (other types are cast to strings): they are already exactly as read, a numeric
column needs no parsing (``cast("double")``), and exact-duplicate detection groups on 8-byte
values instead of their decimal text, which makes that aggregate much cheaper
(docs/BENCHMARKS.md, "Figures behind design choices"). A timestamp or date time column becomes
epoch seconds (``unix_micros / 1e6``; dates at midnight UTC), so a data-lake table with a real
``TIMESTAMP`` column needs no conversion first. Consequences: the quarantine keeps those columns
typed, and duplicates follow Spark's value equality for floating point (NaN equals NaN, -0.0
equals 0.0).

On top of the string columns each adapter defines *canonical* columns as Spark expressions:

``interactions``  ``_user`` (trimmed id or null), ``_item``, ``_ts`` (epoch seconds, double or
                  null when unparseable), ``_wr`` (watch ratio, double or null), ``_xbad``
                  (an optional feedback column holds a bad value)
``items``         ``_item``, ``_cat_tokens`` (array<string> of category tokens, integer ids or
                  names, trimmed; null when the field is empty), ``_cat_bad`` (the category
                  field is malformed beyond its tokens, e.g. a MovieLens-100k genre flag that is
                  not 0/1), ``_caption`` (string or null)

Category tokens are split on ``category_separator`` (or on ',' inside "[a, b]") and trimmed;
inner spaces are kept ("Science Fiction"). The catalogue (``catalog.py``) turns them into
integer ids: integer tokens keep their value, names are numbered.

A caption source (issue #6, e.g. ``kuairec_caption_category.csv``) plugs in by producing a
DataFrame ``(item_id, caption)`` and passing it through :func:`attach_captions`; the features
code only ever reads ``_caption``.

Formats: ``csv``/``parquet`` (generic, column names from :class:`SourceConfig`),
``kuairec`` (``big_matrix.csv``/``small_matrix.csv`` + ``item_categories.csv`` as published;
``timestamp`` may be missing, then the text ``time`` column, in ``kuairec_time_zone``, is used)
and ``movielens`` (below).

MovieLens
---------
GroupLens's files as published, the layout told by each path's file name (or set with
``movielens_layout``); the columns keep GroupLens's names, so the quarantine shows rows as
published:

- ``ml-100k``: ``u.data`` (also ``u1.base`` ...: user, item, rating, epoch seconds; tab, no
  header) and ``u.item`` ('|', no header, latin-1: id, title, release date, video release date,
  IMDb URL and 19 genre flags 0/1 in the order of :data:`ML100K_GENRES`);
- ``ml-1m``: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat``
  (``MovieID::Title::Genres``, latin-1, genres "Action|Comedy");
- ``ml-latest`` (also ml-latest-small, ml-20m, ml-25m ...): ``ratings.csv`` (header
  ``userId,movieId,rating,timestamp``, half stars) and ``movies.csv`` (header
  ``movieId,title,genres``, UTF-8, quoted titles with commas, "(no genres listed)" = none).

Files with no header are read with quoting off (a title may hold a '"'). Genres become category
*names* (numbered by the catalogue), titles the captions. The rating becomes the canonical
feedback ``_wr`` (the watch-ratio slot, with its thresholds: negative < 0.2, engaged >= 1,
effective >= 2 by default) through ``rating_feedback``: a piecewise-linear map through its
points, by default 0.5 -> 0.05, 1 -> 0.1, 2 -> 0.5, 3 -> 1.0, 4 -> 2.0, 5 -> 3.0 (so 4 and 4.5
stars are effective views, 3 and 3.5 engaged, 1 and below negative feedback); half stars
interpolate (3.5 -> 1.5). A rating outside the map's range (below its smallest or above its
largest point), unparseable or NaN gets no feedback value: ``bad_feedback``, quarantined as
read. Trade-off: a rating is explicit feedback, a watch ratio implicit; the map keeps one
feedback slot (and one set of thresholds) for every downstream consumer instead of a second
code path for explicit ratings.
"""

from __future__ import annotations

import dataclasses
import posixpath
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

from higr_dist.etl.config import SourceConfig, rating_points

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
    if fmt == "movielens":
        return _movielens_ratings(spark, path, src)
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


def _nonempty(tokens: Column) -> Column:
    """Trimmed tokens without the empty ones; null when none is left."""
    kept = F.filter(F.transform(tokens, lambda t: F.trim(t)), lambda t: t != "")
    return F.when(tokens.isNull() | (F.size(kept) == 0), None).otherwise(kept)


def _category_tokens(raw: Column, separator: str) -> Column:
    """"3", "3|17", "Action|Film Noir" -> trimmed tokens; "[27, 9]" (a Parquet list read as
    text) -> ["27", "9"] whatever ``separator``; empty field -> null."""
    text = F.trim(raw)
    listed = text.startswith("[")
    body = F.when(listed, F.regexp_replace(text, r"^\[|\]$", "")).otherwise(text)
    tokens = F.when(listed, F.split(body, ",")).otherwise(F.split(body, re.escape(separator)))
    return _nonempty(tokens)


def read_items(spark: SparkSession, path: str, src: SourceConfig,
               fmt: str | None = None) -> Source:
    """Read an items table into strings + ``_item``, ``_cat_tokens``, ``_caption``.

    ``fmt`` defaults to the interactions' format (``kuairec`` reads item_categories.csv);
    Parquet list columns arrive as their string form ("[3, 17]") and parse the same way.
    """
    fmt = fmt or resolve_format(src, path)
    if fmt == "movielens":
        return _movielens_movies(spark, path, src)
    if fmt == "kuairec" and src.format != "kuairec":
        src = dataclasses.replace(src, format="kuairec")
    eff = effective_source(src)
    df = _read_strings(spark, path, "csv" if fmt == "kuairec" else fmt, eff, multiline=True)
    cols = tuple(df.columns)
    _check_columns(cols, [eff.items_item_col, eff.items_category_col], "items", path)
    # Parquet lists cast to string read "[3, 17]": split on ',' whatever the separator
    tokens = _category_tokens(F.col(eff.items_category_col), eff.category_separator)
    caption = (F.col(eff.items_caption_col) if eff.items_caption_col in cols
               else F.lit(None).cast("string"))
    return _items_source(df, cols, F.col(eff.items_item_col), tokens, caption)


def _items_source(df: DataFrame, cols: tuple[str, ...], item: Column, tokens: Column,
                  caption: Column, cat_bad: Column | None = None) -> Source:
    """The items table's source columns plus the canonical ones (module docstring)."""
    cat_bad = F.lit(False) if cat_bad is None else cat_bad
    df = df.select(*[F.col(c) for c in cols], _id(item).alias("_item"),
                   tokens.alias("_cat_tokens"), cat_bad.alias("_cat_bad"),
                   caption.alias("_caption"))
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


# --------------------------------------------------------------------------------------------
# MovieLens (GroupLens's published files; see the module docstring)
# --------------------------------------------------------------------------------------------

#: MovieLens-100k's 19 genres, in the order of u.item's flag columns (GroupLens's u.genre).
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")

#: ml-latest's genres field of a movie without genre
ML_NO_GENRES = "(no genres listed)"


def _genre_column(genre: str) -> str:
    """u.item's flag column name for a genre: ``Children's`` -> ``genre_childrens``."""
    return "genre_" + genre.lower().replace("'", "").replace("-", "_")


@dataclass(frozen=True)
class MovieLensLayout:
    """How one GroupLens release lays out its two files."""

    name: str
    """``ml-100k``, ``ml-1m`` or ``ml-latest``"""
    ratings_sep: str
    """field separator of the ratings file"""
    movies_sep: str
    """field separator of the movies file"""
    header: bool
    """the files start with a header row (then the column names below are checked)"""
    ratings_columns: tuple[str, str, str, str]
    """user, item, rating, timestamp: the header's names, or the names given (no header)"""
    movies_columns: tuple[str, ...]
    """movie id, title, then the genres field (or ml-100k's 19 flags after 3 more fields)"""
    movies_encoding: str
    """text encoding of the movies file (titles with accents)"""


ML_LAYOUTS = {
    "ml-100k": MovieLensLayout(
        "ml-100k", "\t", "|", False, ("user_id", "item_id", "rating", "timestamp"),
        ("movie_id", "movie_title", "release_date", "video_release_date", "imdb_url",
         *[_genre_column(g) for g in ML100K_GENRES]), "ISO-8859-1"),
    "ml-1m": MovieLensLayout(
        "ml-1m", "::", "::", False, ("UserID", "MovieID", "Rating", "Timestamp"),
        ("MovieID", "Title", "Genres"), "ISO-8859-1"),
    "ml-latest": MovieLensLayout(
        "ml-latest", ",", ",", True, ("userId", "movieId", "rating", "timestamp"),
        ("movieId", "title", "genres"), "UTF-8"),
}

#: published file names (compression suffix stripped) -> layout, per role
_ML_NAMES = {
    "ratings": ((r"u[0-9a-z]*\.(data|base|test)", "ml-100k"), (r"ratings\.dat", "ml-1m"),
                (r"ratings\.csv", "ml-latest")),
    "movies": ((r"u\.item", "ml-100k"), (r"movies\.dat", "ml-1m"), (r"movies\.csv", "ml-latest")),
}


def movielens_layout(src: SourceConfig, path: str, role: str) -> MovieLensLayout:
    """The layout of a ``ratings`` or ``movies`` file: ``src.movielens_layout``, or told by the
    file name as GroupLens publishes it (a compression suffix such as .gz is ignored)."""
    if src.movielens_layout != "auto":
        return ML_LAYOUTS[src.movielens_layout]
    name = posixpath.basename(path.rstrip("/")).lower()
    name = re.sub(r"\.(gz|bz2|zst|lz4|deflate|snappy)$", "", name)
    for pattern, layout in _ML_NAMES[role]:
        if re.fullmatch(pattern, name):
            return ML_LAYOUTS[layout]
    published = {"ratings": "u.data, ratings.dat or ratings.csv",
                 "movies": "u.item, movies.dat or movies.csv"}[role]
    raise ValueError(f"movielens: cannot tell the layout of {path} (expected {published} as "
                     "GroupLens publishes them); rename it or set source.movielens_layout")


def _read_movielens(spark: SparkSession, path: str, layout: MovieLensLayout, role: str,
                    what: str) -> DataFrame:
    """One GroupLens file as all-string columns named as in :class:`MovieLensLayout`."""
    ratings = role == "ratings"
    names = layout.ratings_columns if ratings else layout.movies_columns
    reader = (spark.read.option("sep", layout.ratings_sep if ratings else layout.movies_sep)
              .option("encoding", "UTF-8" if ratings else layout.movies_encoding)
              .option("mode", "PERMISSIVE"))
    if layout.header:
        df = (reader.option("header", "true").option("inferSchema", "false")
              .option("escape", '"').csv(path))
        _check_columns(tuple(df.columns), list(names), what, path)
        return df
    # no header: GroupLens's fields are never quoted, and a title may hold a '"'
    schema = ", ".join(f"`{c}` string" for c in names)
    return reader.option("header", "false").option("quote", "").schema(schema).csv(path)


def rating_feedback(rating: Column, src: SourceConfig) -> Column:
    """A rating (double) -> feedback through ``src.rating_feedback``'s points, linear between
    them; null outside their range (or for a null/NaN rating): ``bad_feedback``."""
    points = rating_points(src.rating_feedback)
    r0, f0 = points[0]
    out = F.when(rating == F.lit(r0), F.lit(f0))
    for (a, fa), (b, fb) in zip(points, points[1:]):
        out = out.when((rating > F.lit(a)) & (rating <= F.lit(b)),
                       F.lit(fa) + (rating - F.lit(a)) * F.lit((fb - fa) / (b - a)))
    return out  # otherwise null (NaN compares above every number in Spark: null too)


def _movielens_ratings(spark: SparkSession, path: str, src: SourceConfig) -> Source:
    layout = movielens_layout(src, path, "ratings")
    df = _read_movielens(spark, path, layout, "ratings", "interactions")
    cols = tuple(df.columns)
    user, item, rating, ts = layout.ratings_columns
    canonical = (("_user", _id(F.col(user))),
                 ("_item", _id(F.col(item))),
                 ("_ts", _number(F.col(ts))),
                 ("_wr", rating_feedback(_number(F.col(rating)), src)),
                 ("_xbad", F.lit(False)))
    df = df.select(*[F.col(c) for c in cols], *[e.alias(n) for n, e in canonical])
    return Source(df=df, columns=cols, canonical=canonical)


def _movielens_movies(spark: SparkSession, path: str, src: SourceConfig) -> Source:
    layout = movielens_layout(src, path, "movies")
    df = _read_movielens(spark, path, layout, "movies", "items")
    cols = tuple(df.columns)
    movie, title = layout.movies_columns[:2]
    if layout.name == "ml-100k":
        flags = [F.trim(F.col(_genre_column(g))) for g in ML100K_GENRES]
        tokens = _nonempty(F.array(*[F.when(f == "1", F.lit(g)).otherwise(F.lit(""))
                                     for f, g in zip(flags, ML100K_GENRES)]))
        # a flag that is not 0/1 (or missing: a short row) is a malformed genre field
        cat_bad = F.lit(False)
        for f in flags:
            cat_bad = cat_bad | ~F.coalesce(f.isin("0", "1"), F.lit(False))
        return _items_source(df, cols, F.col(movie), tokens, F.col(title), cat_bad)
    genres = _category_tokens(F.col(layout.movies_columns[2]), "|")
    tokens = _nonempty(F.filter(genres, lambda t: t != ML_NO_GENRES))
    return _items_source(df, cols, F.col(movie), tokens, F.col(title))
