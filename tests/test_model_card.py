"""The model card beside every export (``final/model.json``) rebuilds the pure model the
weights belong to, without the stage that trained it: the weights load strictly and the
rebuilt model computes what the original did."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from higr_dist.models import card
from higr_dist.models.flat import Flat
from higr_dist.models.hsd import HSD, HSDConfig
from higr_dist.models.pcrq_vae import PCRQVAE, PCRQVAEConfig
from higr_dist.models.sasrec import SASRec, SASRecConfig

HSD_CFG = HSDConfig(K=8, L=3, N=4, d_model=16, n_heads=2, ctx_layers=1, planner_layers=2,
                    gen_layers=2, history_len=6)


def _models():
    from higr_dist.stages.orpo import PreferenceHSD

    torch.manual_seed(0)
    return [HSD(HSD_CFG), Flat(HSD_CFG), SASRec(SASRecConfig(num_items=50, d_model=16,
                                                                n_heads=2, history_len=6)),
            PCRQVAE(PCRQVAEConfig(input_dim=12, hidden_dims=[16], K=8, L=3)),
            PreferenceHSD(replace(HSD_CFG, d_model=32))]


@pytest.mark.parametrize("index", range(5))
def test_card_rebuilds_the_model_and_its_weights_load_strictly(index):
    model = _models()[index]
    c = json.loads(json.dumps(card.card(model)))  # what final/model.json holds
    assert c["class"].startswith("higr_dist.models.")
    rebuilt = card.build(c)
    assert type(rebuilt).__module__.startswith("higr_dist.models.")
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    for (k, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), k
    assert rebuilt.cfg == model.cfg


def test_a_training_subclass_is_carded_as_the_pure_model():
    from higr_dist.stages.orpo import PreferenceHSD

    c = card.card(PreferenceHSD(HSD_CFG))
    assert c["class"] == "higr_dist.models.hsd.HSD"


def test_a_card_naming_anything_else_is_refused():
    with pytest.raises(ValueError, match="not a model of higr_dist.models"):
        card.build({"class": "os.system", "config": {}})
    with pytest.raises(TypeError, match="derives from no model"):
        card.card(torch.nn.Linear(2, 2))
