"""KuaiRec caption/category side files -> the generic items table (issue #6).

Two files of KuaiRec 2.0 describe the 10,728 videos:

- ``kuairec_caption_category.csv``: ``video_id, manual_cover_text, caption, topic_tag,
  first/second/third_level_category_id, first/second/third_level_category_name``;
- ``item_categories.csv``: ``video_id, feat`` where ``feat`` is a list of tag ids like ``[8]`` or
  ``"[27, 9]"``.

Both may be plain or zstd-compressed (``.zst``, how the project's data folder ships them).

The carriage-return quirk
-------------------------
Four captions of the real file hold a bare ``\\r`` (in unquoted fields, e.g. ``...王朝\\r！``); a
default CSV reader (pandas' C parser, Python's ``csv`` module, Spark's univocity parser with
automatic line-separator detection) treats it as a line end and returns 10,732 broken rows.
The only record terminator of the file is ``\\n``. We therefore (1) normalise ``\\r\\n`` to
``\\n`` (so CRLF files work: a ``\\r`` directly before ``\\n`` is a line ending, never content; in
the real file every bare ``\\r`` is followed by other characters), then (2) parse with pandas and
``lineterminator="\\n"``, which keeps any other ``\\r`` as field content, quoted or not, while
quoted fields may still span lines. Composed caption text maps ``\\r``/``\\n`` to spaces.

Two entry points, one parser
----------------------------
- :func:`read_caption_table` / :func:`read_items` (plain Python, pandas): for benchmarks and
  small tools; reads the whole (catalogue-sized, ~2 MB) file.
- :func:`read_items_spark`: a Spark source for the ETL. Files are read with
  ``binaryFiles`` and parsed per file inside the executors by the same function, so both paths
  agree byte for byte and nothing is collected to the driver. Trade-off: one task per file, not
  per block. That is what Spark's own ``multiLine`` CSV reader does too (a multi-line CSV is not
  splittable), and it lets us read ``.zst`` (Hadoop's zstd codec needs native libraries that a
  pip-installed Spark lacks) and pin the quirk handling above instead of relying on univocity's
  line-separator detection. Caption tables are catalogue-sized, not log-sized, so one task per
  file is never the bottleneck.

Output (generic items schema + extras), one row per video:
``item_id`` (str), ``category`` (ids, primary first), ``caption`` (cover text + caption + topic
tags, whitespace-normalised), ``cat1``/``cat2``/``cat3`` (the three category levels, unknown =
:data:`UNKNOWN_CATEGORY`) and ``tags`` (``item_categories.csv`` ids, empty when not given).
The three levels use disjoint id ranges in KuaiRec (1-39, 110-749, 1051-2676), so
``category = [cat1, cat2, cat3]`` minus unknown levels is a flat id space with the first-level
category as primary (what the tokenizer's SID metrics are measured against).
"""

from __future__ import annotations

import ast
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

CAPTION_COLUMNS: tuple[str, ...] = (
    "video_id", "manual_cover_text", "caption", "topic_tag",
    "first_level_category_id", "first_level_category_name",
    "second_level_category_id", "second_level_category_name",
    "third_level_category_id", "third_level_category_name",
)
"""Columns of ``kuairec_caption_category.csv`` as published (header row required)."""

CATEGORY_COLUMNS: tuple[str, ...] = ("video_id", "feat")
"""Columns of ``item_categories.csv``."""

KUAIREC_UNKNOWN_ID = -124
"""KuaiRec's id for an unknown category level (its name is ``UNKNOWN``)."""

UNKNOWN_CATEGORY = 0
"""Our id for an unknown level (no KuaiRec level uses 0; non-negative ids keep bincount-style
metrics safe)."""

UNKNOWN_TEXT = "UNKNOWN"
"""KuaiRec's placeholder for a missing manual cover text."""

ITEM_COLUMNS: tuple[str, ...] = ("item_id", "category", "caption", "cat1", "cat2", "cat3", "tags")
"""Columns of the items table produced by both readers, in this order."""


@dataclass
class KuaiRecCaptionConfig:
    """How the caption file becomes the generic items table (``items.kuairec_captions:``)."""

    category_source: Literal["levels", "tags"] = "levels"
    """What fills ``category``: ``levels`` = [first, second, third]-level category ids without
    unknown levels (primary = first level; an item whose first level is unknown gets
    ``[UNKNOWN_CATEGORY]`` first); ``tags`` = the ``item_categories.csv`` list (needs that file)."""
    include_cover_text: bool = True
    """Put the manual cover text (when not ``UNKNOWN``) into ``caption``."""
    include_topic_tags: bool = True
    """Put the topic tags (``[a,b]`` -> ``a b``) into ``caption``."""

    def validate(self) -> list[str]:
        if self.category_source not in ("levels", "tags"):
            return [f"category_source must be 'levels' or 'tags', got {self.category_source!r}"]
        return []


# ---------------------------------------------------------------------------------------------
# bytes -> DataFrame (the one parser both paths use)
# ---------------------------------------------------------------------------------------------


def _decompress(data: bytes, name: str) -> bytes:
    """zstd frames (by magic number or a ``.zst`` name) -> raw bytes; anything else unchanged."""
    if data[:4] == b"\x28\xb5\x2f\xfd" or name.endswith(".zst"):
        import zstandard

        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            return reader.read()
    return data


def parse_csv_bytes(data: bytes, name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """One CSV file's bytes (plain or zstd) -> all-string DataFrame with exactly ``columns``.

    ``\\n`` is the only record terminator (see the module docstring); empty fields stay ``""``.
    Raises ValueError when the header does not hold every expected column.
    """
    text = _decompress(data, name).decode("utf-8-sig").replace("\r\n", "\n")
    df = pd.read_csv(io.StringIO(text), lineterminator="\n", dtype=str, keep_default_na=False,
                     na_filter=False, engine="c")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing}; header is {list(df.columns)}")
    return df[list(columns)]


def _read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"KuaiRec file not found: {p}")
    return p.read_bytes()


def read_caption_table(path: str | Path) -> pd.DataFrame:
    """``kuairec_caption_category.csv[.zst]`` -> all-string DataFrame (10,728 rows on the real
    file), columns :data:`CAPTION_COLUMNS`."""
    return parse_csv_bytes(_read_bytes(path), str(path), CAPTION_COLUMNS)


def read_category_table(path: str | Path) -> pd.DataFrame:
    """``item_categories.csv[.zst]`` -> all-string DataFrame, columns ``video_id, feat``."""
    return parse_csv_bytes(_read_bytes(path), str(path), CATEGORY_COLUMNS)


# ---------------------------------------------------------------------------------------------
# field parsing
# ---------------------------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")


def parse_topic_tags(text: str) -> list[str]:
    """``"[五爱市场,搞笑]"`` -> ``["五爱市场", "搞笑"]``; ``"[]"`` or ``""`` -> ``[]``."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    return [t.strip() for t in body.split(",") if t.strip()]


def parse_id_list(text: str, where: str) -> list[int]:
    """``"[27, 9]"`` / ``"[8]"`` / ``"[]"`` -> list of ints; raises ValueError with ``where``."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ValueError(f"{where}: not a list of ids: {text!r}") from None
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{where}: not a list of ids: {text!r}")
    return [int(v) for v in value]


def parse_category_id(text: str, where: str) -> int:
    """A category id field -> int, KuaiRec's unknown (-124) -> :data:`UNKNOWN_CATEGORY`."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{where}: category id is not an integer: {text!r}") from None
    return UNKNOWN_CATEGORY if value == KUAIREC_UNKNOWN_ID else value


def compose_caption(cover: str, caption: str, topic_tag: str, cfg: KuaiRecCaptionConfig) -> str:
    """Cover text + caption + topic tags as one whitespace-normalised string (``\\r``, ``\\n``
    and runs of spaces become one space); ``UNKNOWN`` cover texts are left out."""
    parts = []
    if cfg.include_cover_text and cover.strip() != UNKNOWN_TEXT:
        parts.append(cover)
    parts.append(caption)
    if cfg.include_topic_tags:
        parts.extend(parse_topic_tags(topic_tag))
    return _SPACE.sub(" ", " ".join(parts)).strip()


def category_list(cat1: int, cat2: int, cat3: int, tags: list[int],
                  cfg: KuaiRecCaptionConfig, where: str) -> list[int]:
    """The ``category`` ids of one item (primary first; see :class:`KuaiRecCaptionConfig`)."""
    if cfg.category_source == "tags":
        if not tags:
            raise ValueError(f"{where}: category_source='tags' but the item has no tag ids "
                             "(is item_categories.csv given?)")
        return list(tags)
    return [cat1] + [c for c in (cat2, cat3) if c != UNKNOWN_CATEGORY]


# ---------------------------------------------------------------------------------------------
# raw tables -> items table
# ---------------------------------------------------------------------------------------------


def build_items(captions: pd.DataFrame, categories: pd.DataFrame | None,
                cfg: KuaiRecCaptionConfig) -> pd.DataFrame:
    """Raw string tables -> items table with :data:`ITEM_COLUMNS` (one row per caption row,
    in file order). Videos of ``categories`` absent from ``captions`` are ignored; duplicate
    video ids in either table raise ValueError (a catalogue has one row per item)."""
    problems = cfg.validate()
    if problems:
        raise ValueError("; ".join(problems))
    for name, df in (("captions", captions), ("item_categories", categories)):
        if df is not None and df["video_id"].duplicated().any():
            dups = df.loc[df["video_id"].duplicated(), "video_id"].head(5).tolist()
            raise ValueError(f"{name}: duplicate video_id values, e.g. {dups}")
    tag_map: dict[str, list[int]] = {}
    if categories is not None:
        tag_map = {vid.strip(): parse_id_list(feat, f"item_categories video_id={vid}")
                   for vid, feat in zip(categories["video_id"], categories["feat"])}
    rows = []
    for r in captions.itertuples(index=False):
        vid = r.video_id.strip()
        where = f"caption file video_id={vid}"
        if not vid:
            raise ValueError(f"caption file: empty video_id in row {r}")
        c1 = parse_category_id(r.first_level_category_id, where)
        c2 = parse_category_id(r.second_level_category_id, where)
        c3 = parse_category_id(r.third_level_category_id, where)
        tags = tag_map.get(vid, [])
        rows.append((vid, category_list(c1, c2, c3, tags, cfg, where),
                     compose_caption(r.manual_cover_text, r.caption, r.topic_tag, cfg),
                     c1, c2, c3, tags))
    return pd.DataFrame(rows, columns=list(ITEM_COLUMNS))


def read_items(caption_path: str | Path, categories_path: str | Path | None = None,
               cfg: KuaiRecCaptionConfig | None = None) -> pd.DataFrame:
    """Plain-Python reader: the KuaiRec side files -> items table (:data:`ITEM_COLUMNS`)."""
    cfg = cfg or KuaiRecCaptionConfig()
    cats = read_category_table(categories_path) if categories_path is not None else None
    return build_items(read_caption_table(caption_path), cats, cfg)


# ---------------------------------------------------------------------------------------------
# Spark source
# ---------------------------------------------------------------------------------------------


def _spark_items_schema():
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("item_id", T.StringType(), False),
        T.StructField("category", T.ArrayType(T.IntegerType(), False), False),
        T.StructField("caption", T.StringType(), False),
        T.StructField("cat1", T.IntegerType(), False),
        T.StructField("cat2", T.IntegerType(), False),
        T.StructField("cat3", T.IntegerType(), False),
        T.StructField("tags", T.ArrayType(T.IntegerType(), False), False),
    ])


def _parse_files(columns: tuple[str, ...]):
    """Executor-side: (path, bytes) -> raw string rows of that file (a picklable closure)."""

    def parse(record: tuple[str, bytes]):
        path, data = record
        df = parse_csv_bytes(bytes(data), path, columns)
        yield from df.itertuples(index=False, name=None)

    return parse


def _raw_table(spark, path: str, columns: tuple[str, ...]):
    """All files matching ``path`` -> DataFrame of string columns, parsed in the executors."""
    from pyspark.sql import types as T

    schema = T.StructType([T.StructField(c, T.StringType(), False) for c in columns])
    rdd = spark.sparkContext.binaryFiles(str(path)).flatMap(_parse_files(columns))
    return spark.createDataFrame(rdd, schema)


def read_items_spark(spark, caption_path: str, categories_path: str | None = None,
                     cfg: KuaiRecCaptionConfig | None = None):
    """Spark source: KuaiRec side files (any Hadoop-FS path or glob, plain or ``.zst``) ->
    DataFrame with :data:`ITEM_COLUMNS` (``category``/``tags`` are ``array<int>``).

    Parsing, caption composition and category mapping run in the executors with the same
    functions as :func:`read_items`; the tag table is joined by ``video_id`` (left join: items
    without a tag row get ``tags = []``). Duplicate video ids are not checked here (the ETL's
    validation owns that); a malformed id field fails the job with the video id in the message.
    """
    from pyspark.sql import functions as F

    cfg = cfg or KuaiRecCaptionConfig()
    problems = cfg.validate()
    if problems:
        raise ValueError("; ".join(problems))
    spark.sparkContext.addPyFile(__file__)  # the executors unpickle this module's functions
    caps = _raw_table(spark, caption_path, CAPTION_COLUMNS)
    if categories_path is not None:
        tags = _raw_table(spark, categories_path, CATEGORY_COLUMNS)
        caps = caps.join(tags, on="video_id", how="left")
    else:
        caps = caps.withColumn("feat", F.lit(None).cast("string"))
    cols = list(CAPTION_COLUMNS) + ["feat"]

    def to_items(rows):
        for row in rows:
            r = dict(zip(cols, row))
            vid = r["video_id"].strip()
            where = f"caption file video_id={vid}"
            c1 = parse_category_id(r["first_level_category_id"], where)
            c2 = parse_category_id(r["second_level_category_id"], where)
            c3 = parse_category_id(r["third_level_category_id"], where)
            tags = (parse_id_list(r["feat"], f"item_categories video_id={vid}")
                    if r["feat"] is not None else [])
            yield (vid, category_list(c1, c2, c3, tags, cfg, where),
                   compose_caption(r["manual_cover_text"], r["caption"], r["topic_tag"], cfg),
                   c1, c2, c3, tags)

    rdd = caps.select(*cols).rdd.map(tuple).mapPartitions(to_items)
    return spark.createDataFrame(rdd, _spark_items_schema())
