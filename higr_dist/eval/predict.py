"""Predictors: a trained model -> "the slate this model recommends" for a batch of contexts.

Design
------
One function, :func:`slate_predictor`, turns any of the project's slate models into a
``Predict`` callable ``SlateBatch -> [B, N] item_idx`` (numpy), chosen by the model's class:

- :class:`~higr_dist.models.hsd.HSD` (pretrained, ORPO- or DPO-aligned): trie-constrained
  coarse-to-fine decoding (``higr_dist.decode.hier``);
- :class:`~higr_dist.models.flat.Flat`: trie-constrained beam search over the flattened slate;
- :class:`~higr_dist.models.sasrec.SASRec`: the top-N scored next items.

Everything that answers "what would this model serve" goes through here: the evaluation
harness, the trainer's periodic validation (model selection) and slate generation, so the
model chosen on validation is scored exactly as it is evaluated. The batch is moved to the
model's device and the answer comes back on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from higr_dist.data.slates import SlateBatch
from higr_dist.decode.trie import SidTrie

Predict = Callable[[SlateBatch], np.ndarray]
"""A batch of contexts -> ``[B, N]`` int64 item_idx, one ranked slate per context."""


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def slate_predictor(model: nn.Module, trie: SidTrie | None, beam: int = 10,
                    rank: str = "placed") -> Predict:
    """The serving answer of ``model`` (see the module docstring); ``trie``, ``beam`` and
    ``rank`` (``higr_dist.decode.hier.RANKS``) are used by the SID decoders only (SASRec
    needs no trie)."""
    from higr_dist.decode.flat import flat_beam_decode
    from higr_dist.decode.hier import coarse_to_fine_decode
    from higr_dist.models.flat import Flat
    from higr_dist.models.hsd import HSD
    from higr_dist.models.sasrec import SASRec

    dev = _device(model)
    if isinstance(model, HSD | Flat):
        if trie is None:
            raise ValueError(f"{type(model).__name__} decodes under a SID trie; none was given")
        decode = coarse_to_fine_decode if isinstance(model, HSD) else flat_beam_decode
        trie = trie.to(dev)

        def predict(b: SlateBatch) -> np.ndarray:
            return decode(model, b.hist_codes.to(dev), b.hist_mask.to(dev), b.hist_fb.to(dev),
                          trie, beam=beam, rank=rank).items.cpu().numpy()

        return predict
    if isinstance(model, SASRec):
        def predict_sasrec(b: SlateBatch) -> np.ndarray:
            with torch.inference_mode():
                was = model.training
                model.eval()
                try:
                    return model.recommend(b.hist_items.to(dev), b.hist_mask.to(dev),
                                           k=b.target_items.shape[1]).cpu().numpy()
                finally:
                    model.train(was)

        return predict_sasrec
    raise TypeError(f"no predictor for a {type(model).__name__}")
