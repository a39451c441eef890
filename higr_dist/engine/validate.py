"""Periodic validation during training and the choice of the weights a run keeps.

Design
------
Every slate model is selected the same way (METHOD.md, evaluation protocol; the pipeline's
"baselines get equal care"): every ``every_epochs`` of training and once at the end, the
trainer scores the model on the **validation** split (each user's N interactions just before
the test window, the history stopping before them) with NDCG@5 on effective views, exactly as
the evaluation harness scores test: the same predictor (:func:`higr_dist.eval.predict.
slate_predictor`: trie-constrained decoding for the SID models, top-N for SASRec), the same
metric accumulator. The best-scoring weights are written to ``best/model_fp32.pt`` when they
improve and become ``final/model_fp32.pt`` at the end (``keep_best``); ``patience``
validations without improvement stop training early. Test users never inform a choice.

Distribution: the validation is a collective. Each rank decodes every ``world_size``-th user
of the split (all ranks stream the small val shards), the exact sums of
:class:`~higr_dist.eval.metrics.SlateMetrics` are all-reduced, so every rank gets the same
score and takes the same keep/stop decision (no rank can leave the loop alone). Under ZeRO-3
the parameters are gathered for the decode. Decoding draws no random numbers and runs in eval
mode, so validation changes neither the training RNG streams nor the data position: a run
with validation trains the same weights as one without, and resume is unaffected.

Trade-off: the val decode costs wall time on every rank, growing with the users decoded (a
run logs it as ``val/seconds``; docs/BENCHMARKS.md, "Figures behind design choices");
``max_users`` bounds it for large logs.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from higr_dist.data.loader import iterate_samples
from higr_dist.data.shardio import list_shards
from higr_dist.data.slates import SlateCollate
from higr_dist.decode.hier import RANKS
from higr_dist.decode.trie import SidTrie
from higr_dist.eval.metrics import SlateMetrics
from higr_dist.layout import EtlLayout
from higr_dist.schema import FOLDERS

#: the metric that selects models (effective-view NDCG@5, the report's headline)
METRIC = "ndcg5"


@dataclass
class ValidateConfig:
    """The ``validation:`` section: periodic validation and which weights a run keeps."""

    every_epochs: float = 0.0
    """Validate every this many epochs of training (and once at the end); 0 = never: the run
    keeps its last weights."""
    at_start: bool = False
    """Also score the weights the run starts from, before the first step, as a candidate: a
    stage that starts from trained weights (alignment) then keeps them unless training beats
    them on validation."""
    max_users: int = 0
    """Score at most this many validation users (0 = all): bounds the cost on large logs."""
    beam: int = 10
    """Beam width of the trie-constrained decoders (as evaluation's)."""
    rank: str = "mass"
    """Slate ranking of the SID decoders (``higr_dist.decode.hier.RANKS``, as evaluation's)."""
    patience: int = 0
    """Stop training after this many validations in a row without a new best (0 = never)."""
    min_delta: float = 0.0
    """A validation score must beat the best by more than this to count as a new best."""
    keep_best: bool = True
    """Export the best validation weights as ``final/model_fp32.pt`` (else the last ones)."""

    def validate(self) -> list[str]:
        problems = []
        if not self.every_epochs >= 0:
            problems.append(f"every_epochs: must be >= 0 (0 = never), got {self.every_epochs}")
        for name in ("max_users", "patience"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.beam < 1:
            problems.append(f"beam: must be >= 1, got {self.beam}")
        if self.rank not in RANKS:
            problems.append(f"rank: must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if not self.min_delta >= 0:
            problems.append(f"min_delta: must be >= 0, got {self.min_delta}")
        return problems

    @property
    def enabled(self) -> bool:
        return self.every_epochs > 0


def effective_threshold(etl_dir: Path) -> float:
    """The ETL's effective-view threshold (manifest ``feedback``), 2.0 when not recorded."""
    manifest = EtlLayout(Path(etl_dir)).manifest
    if manifest.is_file():
        fb = json.loads(manifest.read_text()).get("feedback", {})
        return float(fb.get("effective_threshold", 2.0))
    return 2.0


@contextlib.contextmanager
def gathered(module: nn.Module, zero_stage: int):
    """Full parameters inside the block (ZeRO-3 gathers them on every rank; else a no-op)."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


class Validator:
    """Scores a slate model on this rank's share of the validation users (a collective)."""

    def __init__(self, etl_dir: str | Path, sid_dir: str | Path, slate_size: int,
                 history_len: int, cfg: ValidateConfig, rank: int = 0, world_size: int = 1,
                 batch_size: int = 128):
        self.etl_dir, self.sid_dir = Path(etl_dir), Path(sid_dir)
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.collate = SlateCollate(self.sid_dir, slate_size, history_len)
        self.threshold = effective_threshold(self.etl_dir)
        self._trie = None

    def _mine(self):
        """This rank's validation samples (every world_size-th user, up to max_users)."""
        shards = list_shards(EtlLayout(Path(self.etl_dir)).kind("slates/val"))
        for n, s in enumerate(iterate_samples(shards, FOLDERS["slates/val"])):
            if self.cfg.max_users and n >= self.cfg.max_users:
                return
            if n % self.world_size == self.rank:
                yield s

    def score(self, model: nn.Module) -> dict[str, float]:
        """NDCG@5 (and recall, hit) on effective views over all ranks' users."""
        from higr_dist.eval.predict import slate_predictor

        if self._trie is None and not _is_sasrec(model):
            self._trie = SidTrie.from_export(self.sid_dir)
        predict = slate_predictor(model, self._trie, self.cfg.beam, self.cfg.rank)
        acc = SlateMetrics(self.threshold)
        buf: list[dict] = []

        def flush() -> None:
            batch = self.collate(buf)
            acc.update(predict(batch), batch.target_items.numpy(), batch.target_fb.numpy())
            buf.clear()

        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for s in self._mine():
                    buf.append(s)
                    if len(buf) == self.batch_size:
                        flush()
                if buf:
                    flush()
        finally:
            model.train(was)
        names = sorted(acc.sums)
        counts = sorted(acc.counts)
        vec = torch.tensor([acc.sums[k] for k in names] + [acc.counts[k] for k in counts],
                           dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = next(model.parameters()).device
            vec = vec.to(dev)
            dist.all_reduce(vec)
            vec = vec.cpu()
        total = SlateMetrics(self.threshold)
        total.sums = {k: float(v) for k, v in zip(names, vec[: len(names)].tolist())}
        total.counts = {k: int(v) for k, v in zip(counts, vec[len(names):].tolist())}
        eff = total.result()["effective"]
        return {METRIC: eff["ndcg5"], "recall5": eff["recall5"], "hit5": eff["hit5"],
                "users": float(total.counts["users"])}


def _is_sasrec(model: nn.Module) -> bool:
    from higr_dist.models.sasrec import SASRec

    return isinstance(model, SASRec)
