"""Settings that follow the data: what ``higr run`` derives from the ETL's manifest.

Design
------
A stage config fixes the model *family* (depth, width, heads, schedule shape); some settings
only make sense relative to the user's log and catalogue, and a default chosen on one log is
wrong on another (a 32-way codebook is fine for 1,000 items and crowds 50,000 into shared
SIDs; a step budget that is 6 epochs of one log is a tenth of an epoch of another). The
pipeline therefore reads the ETL manifest once and derives them, the same way for every
model, before any stage starts:

- **codebook size K** (tokenizer and every SID model): the smallest power of two with
  ``K^2 >= items_per_leaf_cell * num_items``, clamped to ``[k_min, k_max]``: the first two
  code layers can then give most items a cell of their own and the last layer mostly
  separates near-duplicates (collisions fall with K; decoding cost grows with it);
- **hashed identity buckets** (HSD, flat, ORPO, DPO): ``id_buckets_per_item x num_items``
  rounded up to a power of two, at most ``id_buckets_max`` (two hashes per item make a full
  collision rare at any size, ``higr_dist.models.hsd.HashedIdEmbedding``);
- **the tokenizer's input width**: the ETL's feature dimension;
- **training length** in passes over the training samples, the same for every slate model:
  ``epochs`` (with periodic validation selecting the kept weights and ``patience`` stopping
  early), and the tokenizer's steps from its pair count;
- **the catalogue bound**: a config scale serves at most ``max_items`` items and
  ``max_interactions`` rows; beyond that the run stops before training with one line naming
  the config to use (a CPU demo config never silently serves a production catalogue).

Derived values are passed to each stage as ``key=value`` overrides *before* the run's own
``stage_overrides``, so an explicit override always wins; every stage's
``resolved_config.yaml`` records the values it trained with, and the run logs them.
``sizing.enabled: false`` turns all of it off (the stage files are used as written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from higr_dist.config import ConfigError

#: stages whose model section is an HSDConfig (SID decoders)
SID_MODEL_STAGES = ("hsd", "flat", "orpo", "dpo")
#: stages that train on slates and are selected on validation
SLATE_STAGES = ("hsd", "flat", "sasrec", "orpo", "dpo")


@dataclass
class SizingConfig:
    """The run config's ``sizing:`` section (see the module docstring)."""

    enabled: bool = True
    """Derive the settings below from the ETL manifest (false: use the stage files as is)."""
    k_min: int = 16
    """Smallest codebook size."""
    k_max: int = 256
    """Largest codebook size (the paper's 256 for 10^4-10^5 items)."""
    items_per_leaf_cell: float = 1.0
    """K is the smallest power of two with K^2 >= this x num_items."""
    id_buckets_per_item: float = 2.0
    """Hashed identity rows per catalogue item (0 = no identity embedding)."""
    id_buckets_max: int = 1 << 20
    """Most hashed identity rows."""
    epochs: int = 3
    """Passes over the training slates for every slate model (HSD, flat, SASRec)."""
    align_epochs: float = 1.0
    """Passes over the preference samples for alignment (ORPO, DPO)."""
    validations_per_epoch: int = 1
    """Validations per epoch (model selection on the validation split)."""
    patience: int = 2
    """Stop a slate model after this many validations without a new best (0 = never)."""
    validation_users: int = 1000
    """Validation users scored per validation (0 = all): bounds its cost on large logs."""
    tokenizer_pair_epochs: float = 1.5
    """Passes over the co-occurrence pairs for the tokenizer (at least its configured steps)."""
    max_items: int = 50_000
    """Most catalogue items this config scale serves."""
    max_interactions: int = 20_000_000
    """Most interaction rows this config scale serves."""
    larger_config: str = "kuairec"
    """The config to name when the data is too large for this one."""

    def validate(self) -> list[str]:
        problems = []
        if not 2 <= self.k_min <= self.k_max:
            problems.append(f"need 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        for name in ("items_per_leaf_cell", "id_buckets_per_item", "align_epochs",
                     "tokenizer_pair_epochs"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.validation_users < 0:
            problems.append(f"validation_users: must be >= 0, got {self.validation_users}")
        for name in ("epochs", "validations_per_epoch", "max_items", "max_interactions",
                     "id_buckets_max"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            problems.append(f"patience: must be >= 0, got {self.patience}")
        return problems


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, x))))


def codebook_size(num_items: int, cfg: SizingConfig) -> int:
    """K for a catalogue of ``num_items`` (see the module docstring)."""
    k = _pow2_at_least(math.sqrt(cfg.items_per_leaf_cell * num_items))
    return int(min(cfg.k_max, max(cfg.k_min, k)))


def id_buckets(num_items: int, cfg: SizingConfig) -> int:
    """Rows of the hashed identity table (0 = none)."""
    if cfg.id_buckets_per_item <= 0:
        return 0
    return int(min(cfg.id_buckets_max, _pow2_at_least(cfg.id_buckets_per_item * num_items)))


def check_scale(manifest: dict, cfg: SizingConfig) -> None:
    """Raise a one-line :class:`ConfigError` when the data is larger than this scale serves."""
    items, rows = int(manifest["num_items"]), int(manifest["rows_out"])
    too_big = []
    if items > cfg.max_items:
        too_big.append(f"{items:,} items (at most {cfg.max_items:,})")
    if rows > cfg.max_interactions:
        too_big.append(f"{rows:,} interactions (at most {cfg.max_interactions:,})")
    if too_big:
        raise ConfigError([f"sizing: the data has {' and '.join(too_big)}, more than this "
                           f"config's models serve; use --config {cfg.larger_config} (or raise "
                           f"sizing.max_items / sizing.max_interactions knowingly)"])


def _steps(epochs: float, samples: int, batch: int) -> int:
    return max(1, math.ceil(epochs * samples / max(1, batch)))


def derive(manifest: dict, cfg: SizingConfig, batch: dict[str, int],
           steps: dict[str, int] | None = None) -> dict[str, list[str]]:
    """Stage name -> ``key=value`` overrides derived from an ETL manifest.

    ``batch``: each stage's ``train.global_batch_size``; ``steps``: each stage's configured
    ``train.max_steps`` (the tokenizer trains at least that long).
    """
    if not cfg.enabled:
        return {}
    steps = steps or {}
    items = int(manifest["num_items"])
    K = codebook_size(items, cfg)
    buckets = id_buckets(items, cfg)
    kinds = manifest.get("kinds", {})

    def samples(kind: str) -> int:
        entry = kinds.get(kind, {})
        return int(entry.get("samples", 0))

    out: dict[str, list[str]] = {}
    if "tokenizer" in batch:
        tok = max(steps.get("tokenizer", 1),
                  _steps(cfg.tokenizer_pair_epochs, samples("pairs"), batch["tokenizer"]))
        out["tokenizer"] = [f"model.K={K}", f"model.input_dim={int(manifest['feature_dim'])}",
                            f"train.max_steps={tok}", "train.epochs=0"]
    select = f"validation.every_epochs={1.0 / cfg.validations_per_epoch:g}"
    users = f"validation.max_users={cfg.validation_users}"
    for stage in SLATE_STAGES:
        if stage not in batch:
            continue
        if stage in ("orpo", "dpo"):
            # alignment: a fixed share of an epoch of preference samples; the pretrained
            # weights are a candidate (at_start), so alignment is kept only if it helps
            ov = [f"train.max_steps={_steps(cfg.align_epochs, samples('prefs'), batch[stage])}",
                  "train.epochs=0", f"validation.every_epochs={cfg.align_epochs / 2:g}",
                  "validation.at_start=true", "validation.patience=0", users]
        else:
            ov = [f"train.epochs={cfg.epochs}", "train.max_steps=0", select,
                  f"validation.patience={cfg.patience}", users]
        if stage in SID_MODEL_STAGES:
            ov = [f"model.K={K}", f"model.id_buckets={buckets}", *ov]
        out[stage] = ov
    return out
