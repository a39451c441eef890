"""Loss modules shared by stages (preference alignment: ORPO, DPO)."""

from higr_dist.losses.preference import (
    DPOLoss,
    DPOLossConfig,
    FrozenReference,
    ORPOLoss,
    ORPOLossConfig,
    PreferenceOutput,
    SlateLogprobs,
    log1mexp,
    log_odds,
    masked_mean,
    slate_logp,
)

__all__ = ["DPOLoss", "DPOLossConfig", "FrozenReference", "ORPOLoss", "ORPOLossConfig",
           "PreferenceOutput", "SlateLogprobs", "log1mexp", "log_odds", "masked_mean", "slate_logp"]
