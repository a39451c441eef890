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

    format: Literal["auto", "csv", "parquet", "kuairec"] = "auto"
    """``auto``: CSV when the path ends in .csv, else Parquet. ``kuairec``: KuaiRec's
    big/small_matrix.csv + item_categories.csv as published (video_id, feat "[27, 9]", float
    timestamps with a text ``time`` column as fallback)."""
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
    """items table: category ids: "3", "3|17", "[27, 9]" or a Parquet list"""
    items_caption_col: str = "caption"
    """items table: optional caption text (content features); absent -> no caption part"""
    category_separator: str = "|"
    """separator of several category ids in one text field (KuaiRec's "[a, b]" uses ',')"""
    kuairec_time_zone: str = "Asia/Shanghai"
    """time zone of KuaiRec's text ``time`` column, used only when ``timestamp`` is missing"""


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
    disk and ~50 us to write whatever its size; 1 = one record per member"""
    min_shards: int = 4
    """fewest shards per kind; >= ranks x loader workers of the largest training job"""
    seed: int = 0
    """seed of the feature hashing / projections and of the within-shard sample order"""
    shuffle_partitions: int = 8
    """Spark shuffle partitions of the job (users are hash-partitioned into this many)"""
    timestamp_min: int = 946684800
    """earliest valid timestamp (epoch seconds, inclusive; default 2000-01-01)"""
    timestamp_max: int = 4102444800
    """latest valid timestamp (epoch seconds, exclusive; default 2100-01-01)"""
    broadcast_items_max: int = 2_000_000
    """catalogues up to this many items are broadcast to the interaction join"""

    def validate(self) -> list[str]:
        problems = []
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
        if self.caption_weight < 0:
            problems.append("caption_weight must be >= 0")
        if not 0 <= self.feedback_decimals <= 8:
            problems.append("feedback_decimals must be in [0, 8]")
        return problems

    @property
    def min_user_interactions(self) -> int:
        """Valid interactions a user needs for the split: val and test blocks + min_history."""
        return 2 * self.holdout + self.min_history
