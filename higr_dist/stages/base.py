"""The contract between the one trainer (``higr_dist.engine``) and a training stage.

A stage is a small spec: which sample kind it streams, how samples become a typed batch, which
model and loss it builds, and what it exports when training ends. The trainer owns everything
else (DeepSpeed, precision, checkpoints, logging, data position), so adding a stage never
touches the training loop. A stage is any object with these attributes (stages that share an
implementation share a base class, as ``hsd`` and ``flat`` do); :func:`register` makes it
discoverable by name from configs (``stage: hsd``). A stage is stateless: everything a call
needs comes in through its arguments (the configs and ``StageInputs``), so the trainer may
ask in any order, and two jobs never see each other's values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class StageInputs:
    """Where a stage finds what earlier steps produced (the ``inputs:`` config section)."""

    etl_dir: str = ""
    """ETL output folder (has manifest.json and one sub-folder per sample kind)."""
    sid_dir: str = ""
    """Tokenizer export folder (sid_table.npy, trie, sid_meta.json); empty for the tokenizer."""
    init_from: str = ""
    """fp32 state-dict file (``*.pt``) to initialise the model from (e.g. HSD for ORPO)."""
    reference_from: str = ""
    """fp32 state-dict file of a frozen reference model (DPO only)."""


class Batch(Protocol):
    """A typed batch of tensors. Implementations are small dataclasses."""

    def to(self, device: torch.device, float_dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to ``device``; cast floating *inputs* to ``float_dtype`` when given."""

    @property
    def num_samples(self) -> int:
        """Samples in this batch (for samples/s)."""

    @property
    def num_tokens(self) -> int:
        """Tokens the model processes for this batch (for tokens/s); samples when tokenless."""


@dataclass
class StepOutput:
    """What one forward+loss returns: the scalar to backprop and named terms to log."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Stage(Protocol):
    name: str
    """Registry name (``tokenizer``, ``hsd``, ``orpo``, ``dpo`` ...)."""
    sample_kind: str
    """Folder under the ETL output that this stage streams (``pairs``, ``slates/train``, ``prefs``)."""
    consumes: dict[str, str]
    """``inputs`` field -> the artifact it reads (:mod:`higr_dist.layout`: ``etl``, ``sids``,
    ``hsd.weights``); :mod:`higr_dist.stages.graph` orders stages and fills inputs from it."""
    produces: tuple[str, ...]
    """Artifacts written besides the stage's own weights (the tokenizer: ``sids``)."""
    model_config_cls: type
    """Dataclass for the config's ``model:`` section."""
    loss_config_cls: type
    """Dataclass for the config's ``loss:`` section."""
    validates: bool
    """Whether the model answers with slates (``validation:`` scores it on the val split and
    selects the kept weights); the tokenizer does not."""

    def validate(self, model_cfg: Any, loss_cfg: Any, inputs: StageInputs) -> list[str]:
        """Cross-section checks for preflight (e.g. sid_dir exists); one message per problem."""

    def build(self, model_cfg: Any, loss_cfg: Any, inputs: StageInputs) -> tuple[nn.Module, nn.Module]:
        """Return ``(model, loss_module)``; the loss module holds no trainable parameters."""

    def make_collate(self, model_cfg: Any, loss_cfg: Any, inputs: StageInputs) -> Callable[[list[dict]], Batch]:
        """A picklable function ``list[decoded sample dict] -> Batch`` run in loader workers."""

    def step(self, model: nn.Module, loss_module: nn.Module, batch: Batch) -> StepOutput:
        """Forward + loss for one micro-batch (model may be the DeepSpeed engine)."""

    def flops_per_sample(self, model_cfg: Any, loss_cfg: Any, inputs: StageInputs) -> float:
        """Training FLOPs per sample (forward+backward, ~6 x params x tokens), for MFU; from
        the configs and inputs alone (a stage keeps no state between calls)."""

    def finalize(self, model: nn.Module, model_cfg: Any, loss_cfg: Any, inputs: StageInputs,
                 out_dir: Path) -> dict:
        """Rank 0, after training, with consolidated fp32 weights loaded: export artefacts
        (e.g. the SID table) into ``out_dir``; return a JSON-able summary for the report."""


_REGISTRY: dict[str, Callable[[], Stage]] = {}
_BUILTINS_IMPORTED = False


def register(name: str) -> Callable[[Callable[[], Stage]], Callable[[], Stage]]:
    """Decorator: ``@register("hsd") def hsd_stage() -> Stage``."""

    def deco(factory: Callable[[], Stage]) -> Callable[[], Stage]:
        _REGISTRY[name] = factory
        return factory

    return deco


def get_stage(name: str) -> Stage:
    """Instantiate a registered stage by name (imports the built-in stages on first use)."""
    import_builtin_stages()
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def known_stages() -> list[str]:
    import_builtin_stages()
    return sorted(_REGISTRY)


def import_builtin_stages() -> None:
    """Import the stage modules so their ``@register`` decorators run (once; a registry that
    already holds some stage, say one imported directly, still gets every built-in one)."""
    global _BUILTINS_IMPORTED
    if _BUILTINS_IMPORTED:
        return
    import importlib

    for mod in ("tokenizer", "hsd", "orpo"):
        try:
            importlib.import_module(f"higr_dist.stages.{mod}")
        except ModuleNotFoundError as e:
            # only tolerate the stage module itself being absent (during development)
            if e.name != f"higr_dist.stages.{mod}":
                raise
    _BUILTINS_IMPORTED = True
