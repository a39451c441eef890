"""The ETL's configuration: one dataclass per section, loaded with :func:`higr_dist.config.load`.

``EtlConfig`` holds everything that shapes the ETL's output (split protocol, feedback semantics,
feature sizes, sharding); ``SourceConfig`` says how to read the inputs (format, column names).
Both are hashed into the manifest (``config_hash``), so two output folders built with equal
configs from equal inputs are byte-identical, and a changed knob is visible.

Trade-off: the split protocol requires ``holdout == slate_size`` (the held-out block *is* the
target slate of the val/test samples), which keeps every slate sample the same shape for the
collate functions downstream; the paper uses N = 5 for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

#: Quarantine reasons for interaction rows, in precedence order (a row gets the first that fits).
INTERACTION_REASONS = ("null_user", "null_item", "unknown_item", "bad_timestamp",
                       "bad_feedback", "duplicate", "short_user")
#: Quarantine reasons for rows of the items table.
ITEM_REASONS = ("null_item", "bad_category", "duplicate", "conflicting_item")


@dataclass
class SourceConfig:
    """How to read the interaction log and the items table (any Hadoop-FS URI Spark can read)."""

    format: Literal["auto", "csv", "parquet", "kuairec", "movielens"] = "auto"
    """``auto``: CSV when the path ends in .csv, else Parquet. ``kuairec``: KuaiRec's
    big/small_matrix.csv + item_categories.csv as published (video_id, feat "[27, 9]", float
    timestamps with a text ``time`` column as fallback). ``movielens``: GroupLens's MovieLens
    files as published (u.data + u.item, ratings.dat + movies.dat, or ratings.csv + movies.csv;
    see ``movielens_layout``): genres become category names, titles captions, ratings the
    feedback through ``rating_feedback``; the column names below are not used."""
    user_col: str = "user_id"
    """interactions: user id column (integers or strings; compared as trimmed strings)"""
    item_col: str = "item_id"
    """interactions: item id column"""
    time_col: str = "timestamp"
    """interactions: epoch seconds (integer or float) column; in Parquet also a TIMESTAMP or
    DATE column (converted to epoch seconds, UTC)"""
    feedback_col: str = "watch_ratio"
    """interactions: the feedback signal every sample carries (watch ratio)"""
    extra_feedback_cols: list[str] = field(default_factory=lambda: ["play_duration", "like"])
    """optional feedback columns, validated when present (non-negative, not NaN)"""
    csv_delimiter: str = ","
    """field separator of CSV inputs"""
    items_item_col: str = "item_id"
    """items table: item id column"""
    items_category_col: str = "category"
    """items table: categories: integer ids or names ("3", "3|17", "Action|Comedy", "[27, 9]" or
    a Parquet list); names get integer ids in the catalogue (``higr_dist.etl.catalog``)"""
    items_caption_col: str = "caption"
    """items table: optional caption text (content features); absent -> no caption part"""
    category_separator: str = "|"
    """separator of several categories in one text field (KuaiRec's "[a, b]" uses ',')"""
    kuairec_time_zone: str = "Asia/Shanghai"
    """time zone of KuaiRec's text ``time`` column, used only when ``timestamp`` is missing"""
    movielens_layout: Literal["auto", "ml-100k", "ml-1m", "ml-latest"] = "auto"
    """``movielens``: which GroupLens layout the files have. ``auto`` tells it from each file's
    published name: ``u.data`` (or ``u1.base`` ...) / ``u.item`` = ml-100k (tab / '|', no
    header, 19 genre flags), ``ratings.dat`` / ``movies.dat`` = ml-1m ('::'), ``ratings.csv``
    / ``movies.csv`` = ml-latest, ml-latest-small, ml-20m, ml-25m ... (CSV with a header,
    half-star ratings, "(no genres listed)" = no genre); set it for renamed files"""
    rating_feedback: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATING_FEEDBACK))
    """``movielens``: rating -> feedback (the watch-ratio value every sample carries, judged by
    ``negative_threshold`` / ``engaged_threshold`` / ``effective_threshold``). The points are
    joined by straight lines: a half star is interpolated between its neighbours (3.5 -> 1.5
    with the default {0.5: 0.05, 1: 0.1, 2: 0.5, 3: 1.0, 4: 2.0, 5: 3.0}: >= 4 stars is an
    effective view, 3 engaged, <= 1 negative feedback). A rating below the smallest or above
    the largest point, unparseable or NaN is ``bad_feedback``. Keys are ratings (numbers;
    YAML ``{1: 0.1, ...}``), values >= 0 and non-decreasing with the rating"""

    def problems(self) -> list[str]:
        """What is wrong with the section (reported by :meth:`EtlConfig.validate`)."""
        try:
            points = rating_points(self.rating_feedback)
        except ValueError as e:
            return [f"source.rating_feedback: {e}"]
        values = [f for _, f in points]
        if any(not math.isfinite(f) or f < 0 for f in values):
            return [f"source.rating_feedback: feedback values must be finite and >= 0, "
                    f"got {values}"]
        if values != sorted(values):
            return [f"source.rating_feedback: feedback must not decrease as the rating grows, "
                    f"got {points}"]
        return []


#: ``SourceConfig.rating_feedback``'s default (MovieLens stars -> watch-ratio feedback)
DEFAULT_RATING_FEEDBACK = {"0.5": 0.05, "1": 0.1, "2": 0.5, "3": 1.0, "4": 2.0, "5": 3.0}


def rating_points(mapping: dict) -> list[tuple[float, float]]:
    """``rating_feedback`` as (rating, feedback) points sorted by rating; ValueError (one line)
    when empty, when a key is not a finite number, or when two keys are the same rating."""
    if not isinstance(mapping, dict):
        raise ValueError(f"must be a mapping of rating: feedback, got {mapping!r}")
    if not mapping:
        raise ValueError("needs at least one rating: feedback point")
    points: dict[float, float] = {}
    for key, value in mapping.items():
        try:
            rating = float(key)
        except (TypeError, ValueError):
            raise ValueError(f"rating {key!r} is not a number") from None
        if not math.isfinite(rating):
            raise ValueError(f"rating {key!r} is not finite")
        if rating in points:
            raise ValueError(f"rating {key!r} is given twice")
        try:
            points[rating] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"rating {key!r}: feedback {value!r} is not a number") from None
    return sorted(points.items())


@dataclass
class EtlConfig:
    """Everything that shapes the ETL output (see docs/DESIGN.md, "ETL output folder")."""

    source: SourceConfig = field(default_factory=SourceConfig)
    """input format and column names"""
    slate_size: int = 5
    """N: items per target slate"""
    history_len: int = 50
    """most recent interactions kept as a sample's history"""
    stride: int = 5
    """step between consecutive training target windows (== slate_size: disjoint targets)"""
    min_history: int = 5
    """fewest history items a sample may have (>= 1)"""
    holdout: int = 5
    """leave-out block: last ``holdout`` = test targets, the ``holdout`` before = validation"""
    effective_threshold: float = 2.0
    """watch_ratio >= this is an *effective view* (KuaiRec README); recorded for evaluation"""
    engaged_threshold: float = 1.0
    """watch_ratio >= this is *engaged*: eligible for a preference sample's chosen slate y+"""
    negative_threshold: float = 0.2
    """watch_ratio < this is *negative feedback*: O2 negatives, excluded from co-occurrence"""
    pref_window: int = 10
    """interactions per preference window (default 2N); windows tile the training part"""
    max_negatives: int = 5
    """most negative-feedback items kept per preference sample (earliest first)"""
    pairs_per_item: int = 5
    """P: top co-occurring partners per item written as positive pairs"""
    cooc_window: int = 5
    """two interactions co-occur when at most this many positions apart in a user's sequence"""
    content_dim: int = 64
    """content part of x: signed random projection of hashed category ids + caption n-grams"""
    collab_dim: int = 64
    """collaborative part of x: signed random projection of each item's co-occurrence row"""
    ngram_sizes: list[int] = field(default_factory=lambda: [2, 3])
    """character n-gram sizes of caption features (character-based, so Chinese text works)"""
    caption_max_chars: int = 1000
    """caption features read the first this many characters of the normalised caption (an
    n-gram at position i costs a walk over the i characters before it in Spark's UTF-8
    strings, so a caption's cost grows with the square of its length: a 1 MB caption would
    keep a task busy for hours); the whole caption is kept in the item table"""
    caption_weight: float = 1.0
    """weight of the (L2-normed) caption block against the (L2-normed) category block"""
    primary_category_weight: int = 2
    """count weight of the first (primary) category id against 1 for the others"""
    unknown_category: int = -1
    """category id given to items whose category field is empty"""
    feedback_decimals: int = 4
    """watch ratios are rounded to this many decimals in samples (compact, exact JSON)"""
    samples_per_shard: int = 10000
    """target records per shard: items and pairs get max(min_shards, ceil(records / this))
    shards; the four user folders share one count, sized by the users (one val and one test
    record each; train and prefs have at most one record per user)"""
    records_per_block: int = 32
    """per-user records (val/test slates, a user's train or prefs group) stored per tar
    member in the user folders (``higr_dist.schema.codec.block_of``): a member costs ~1 KB on
    disk and a fixed Python write time whatever its size (docs/BENCHMARKS.md, "Shard
    writing"); 1 = one record per member"""
    min_shards: int = 4
    """fewest shards per kind; >= ranks x loader workers of the largest training job"""
    seed: int = 0
    """seed of the feature hashing / projections and of the within-shard sample order"""
    shuffle_partitions: int = 8
    """Spark shuffle partitions of the job (users are hash-partitioned into this many)"""
    timestamp_min: int = 0
    """earliest valid timestamp (epoch seconds, inclusive; default 1970-01-01: MovieLens-100k
    is from 1997, so plausible data is never quarantined; negative times are)"""
    timestamp_max: int = 4102444800
    """latest valid timestamp (epoch seconds, exclusive; default 2100-01-01). It also catches
    a time column in *milliseconds*: any millisecond time after 1970-02-17 (4.1e9 ms), e.g.
    1.7e12 for 2023, is past 2100 read as seconds, so every such row is ``bad_timestamp``
    (convert the column to seconds first)"""
    broadcast_items_max: int = 2_000_000
    """catalogues up to this many items are broadcast to the interaction join"""
    quarantine_warn_share: float = 0.05
    """warn (stderr, and ``warnings`` in the manifest) when more than this share of the
    interaction rows, or of the items table, is quarantined, with the top reasons and what
    each means: losing data is never silent (0 = warn on any quarantined row, 1 = never)"""

    def validate(self) -> list[str]:
        problems = self.source.problems() if isinstance(self.source, SourceConfig) else []
        positive = ("slate_size", "history_len", "stride", "min_history", "holdout", "pref_window",
                    "pairs_per_item", "cooc_window", "content_dim", "collab_dim",
                    "samples_per_shard", "min_shards", "shuffle_partitions", "records_per_block")
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.holdout != self.slate_size:
            problems.append(f"holdout ({self.holdout}) must equal slate_size ({self.slate_size}): "
                            "the held-out block is the val/test target slate")
        if self.pref_window < self.slate_size:
            problems.append(f"pref_window ({self.pref_window}) must be >= slate_size "
                            f"({self.slate_size})")
        if self.max_negatives < 0:
            problems.append(f"max_negatives must be >= 0, got {self.max_negatives}")
        if not self.ngram_sizes or any(n < 1 for n in self.ngram_sizes):
            problems.append(f"ngram_sizes must be a non-empty list of sizes >= 1, "
                            f"got {self.ngram_sizes}")
        if not self.negative_threshold <= self.engaged_threshold <= self.effective_threshold:
            problems.append("thresholds must satisfy negative <= engaged <= effective, got "
                            f"{self.negative_threshold}, {self.engaged_threshold}, "
                            f"{self.effective_threshold}")
        if self.timestamp_min >= self.timestamp_max:
            problems.append("timestamp_min must be < timestamp_max")
        if self.caption_max_chars < 1:
            problems.append(f"caption_max_chars must be >= 1, got {self.caption_max_chars}")
        if self.caption_weight < 0:
            problems.append("caption_weight must be >= 0")
        if not 0 <= self.feedback_decimals <= 8:
            problems.append("feedback_decimals must be in [0, 8]")
        if not 0.0 <= self.quarantine_warn_share <= 1.0:
            problems.append(f"quarantine_warn_share must be in [0, 1], got "
                            f"{self.quarantine_warn_share}")
        return problems

    @property
    def min_user_interactions(self) -> int:
        """Valid interactions a user needs for the split: val and test blocks + min_history."""
        return 2 * self.holdout + self.min_history
