"""The model card: which pure model class, with which config, an exported weights file is.

Every stage's exported weights (``final/model_fp32.pt``) get a card beside them
(``final/model.json``: the class's import path and its config's values), so whatever serves or
evaluates the weights rebuilds the model from the run folder alone, without the training stage
that made it (a stage may wrap a model for training: ORPO scores candidate slates through a
subclass of HSD; the card names the pure model in ``higr_dist.models`` it derives from).
"""

from __future__ import annotations

import importlib
import typing

from torch import nn

from higr_dist.config import from_dict, to_dict

_PACKAGE = "higr_dist.models."


def card(model: nn.Module) -> dict:
    """The card of ``model``: the first class of its hierarchy defined in ``higr_dist.models``
    and its ``cfg`` (every model here is built as ``Class(cfg)``)."""
    cls = next((c for c in type(model).__mro__ if c.__module__.startswith(_PACKAGE)), None)
    if cls is None:
        raise TypeError(f"{type(model).__name__} derives from no model of {_PACKAGE[:-1]}")
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "config": to_dict(model.cfg)}


def build(card: dict) -> nn.Module:
    """The model a card describes, freshly initialised (load the weights into it)."""
    module, _, name = str(card.get("class", "")).rpartition(".")
    if not module.startswith(_PACKAGE):
        raise ValueError(f"model card names {card.get('class')!r}, not a model of "
                         f"{_PACKAGE[:-1]}")
    cls = getattr(importlib.import_module(module), name)
    config_cls = typing.get_type_hints(cls.__init__)["cfg"]
    return cls(from_dict(config_cls, dict(card.get("config") or {})))
