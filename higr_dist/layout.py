"""Where everything of a run lives: the one module that knows the run folder's layout.

A pipeline run (``higr run --name demo``) is one folder::

    runs/demo/
      resolved_config.yaml  run_meta.json       the run's config and code (RunLayout)
      data/                                     the embedded synthetic log, when used
      etl/                                      the ETL output (EtlLayout)
        manifest.json  item_index/  quarantine/  <kind>/shards.json + shards ...
      <stage>/                                  one folder per stage (StageLayout)
        resolved_config.yaml  run_meta.json  summary.json  tb/  checkpoints/
        final/model_fp32.pt + model.json  best/model_fp32.pt  export/ (the tokenizer's SIDs)
      report.json  report.md  plots/  slates.jsonl  beam_sweep.json (bench/beam_sweep.py)

A stage launched alone (``-m higr_dist.launch``) writes the same stage folder wherever its
``run.out_dir`` points. Everything else asks this module for paths; the file names are its
constants, so a changed layout is one edit here.

Artifacts (what :mod:`higr_dist.stages.graph` connects): ``etl`` (the ETL output), ``sids``
(the tokenizer's export) and ``<stage>.weights`` (a stage's exported fp32 weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESOLVED_CONFIG = "resolved_config.yaml"
RUN_META = "run_meta.json"
SUMMARY = "summary.json"
WEIGHTS = "model_fp32.pt"
#: the shard listing in every sample-kind folder of the ETL output
SHARD_LISTING = "shards.json"
#: the folder of DeepSpeed checkpoint tags in a stage folder, and the file naming the newest
CHECKPOINTS = "checkpoints"
LATEST = "latest"
#: artifacts that are not a stage's weights
ETL, SIDS = "etl", "sids"
WEIGHTS_SUFFIX = ".weights"


def weights_artifact(stage: str) -> str:
    """The artifact name of ``stage``'s exported weights (``hsd.weights``)."""
    return f"{stage}{WEIGHTS_SUFFIX}"


@dataclass(frozen=True)
class EtlLayout:
    """The ETL output folder."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def item_index(self) -> Path:
        return self.root / "item_index"

    @property
    def quarantine(self) -> Path:
        """Interaction rows the ETL rejected, with the reason (Parquet)."""
        return self.root / "quarantine"

    @property
    def quarantine_items(self) -> Path:
        """Items-table rows the ETL rejected, with the reason (Parquet)."""
        return self.root / "quarantine_items"

    #: the sample kinds' top folders (``slates/train`` lies under ``slates``)
    KIND_TOPS = ("items", "pairs", "slates", "prefs")

    def entries(self) -> list[Path]:
        """Everything the ETL writes here (what its ``overwrite`` removes, and nothing else)."""
        return [self.manifest, self.quarantine, self.quarantine_items, self.item_index,
                *(self.root / top for top in self.KIND_TOPS)]

    def kind(self, kind: str) -> Path:
        """The folder of one sample kind (``pairs``, ``slates/train`` ...)."""
        return self.root / kind


@dataclass(frozen=True)
class StageLayout:
    """One stage's folder (its ``run.out_dir``)."""

    root: Path

    @property
    def resolved_config(self) -> Path:
        return self.root / RESOLVED_CONFIG

    @property
    def run_meta(self) -> Path:
        return self.root / RUN_META

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def final_weights(self) -> Path:
        """The exported fp32 weights (the kept ones: the best validation step's when selected)."""
        return self.root / "final" / WEIGHTS

    @property
    def model_card(self) -> Path:
        """Which model class and config the final weights are (:mod:`higr_dist.models.card`)."""
        return self.root / "final" / "model.json"

    @property
    def best_weights(self) -> Path:
        """The best validation step's fp32 weights while training runs."""
        return self.root / "best" / WEIGHTS

    @property
    def export(self) -> Path:
        """What a stage exports besides its weights (the tokenizer: SID tables, trie)."""
        return self.root / "export"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def finished(self) -> bool:
        """Whether training ended here (summary written, fp32 weights and their model card
        exported). A stage trained by a version that wrote no card is not: rerunning its
        command resumes from its last checkpoint and exports again, card included."""
        return all(p.is_file() for p in (self.summary, self.final_weights, self.model_card))


@dataclass(frozen=True)
class RunLayout:
    """A pipeline run folder (``<out_root>/<name>``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def resolved_config(self) -> Path:
        return self.root / RESOLVED_CONFIG

    @property
    def run_meta(self) -> Path:
        return self.root / RUN_META

    @property
    def data(self) -> Path:
        """The embedded synthetic log (generated once per run)."""
        return self.root / "data"

    @property
    def data_done(self) -> Path:
        """Written last by the synthetic generator: its paths and config."""
        return self.data / "_SUCCESS.json"

    @property
    def etl(self) -> EtlLayout:
        return EtlLayout(self.root / "etl")

    def stage(self, name: str) -> StageLayout:
        return StageLayout(self.root / name)

    @property
    def sids(self) -> Path:
        """The tokenizer's export: SID table, trie, item features, SID report."""
        return self.stage("tokenizer").export

    def artifact(self, name: str) -> Path:
        """The path of an artifact of this run (see the module docstring)."""
        if name == ETL:
            return self.etl.root
        if name == SIDS:
            return self.sids
        if name.endswith(WEIGHTS_SUFFIX):
            return self.stage(name.removesuffix(WEIGHTS_SUFFIX)).final_weights
        raise KeyError(f"unknown artifact {name!r}")

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def beam_sweep(self) -> Path:
        """Quality against beam width (``bench/beam_sweep.py``), read by the report's plots."""
        return self.root / "beam_sweep.json"

    @property
    def slates(self) -> Path:
        """The generated slates (JSON lines)."""
        return self.root / "slates.jsonl"
