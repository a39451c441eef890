"""What ``higr run`` derives from the ETL manifest (``higr_dist.sizing``)."""

from __future__ import annotations

import pytest

from higr_dist.config import ConfigError
from higr_dist.sizing import SizingConfig, check_scale, codebook_size, derive, id_buckets


def _manifest(items: int, rows: int = 10_000, train: int = 2_000, prefs: int = 500,
              pairs: int = 1_000) -> dict:
    return {"num_items": items, "rows_out": rows, "feature_dim": 64,
            "kinds": {"slates/train": {"samples": train}, "prefs": {"samples": prefs},
                      "pairs": {"samples": pairs}}}


@pytest.mark.parametrize("items,K", [(10, 16), (1_000, 32), (1_682, 64), (4_000, 64),
                                     (10_728, 128), (200_000, 256), (10**7, 256)])
def test_codebook_grows_with_the_catalogue(items, K):
    assert codebook_size(items, SizingConfig()) == K
    assert K * K >= min(items, 256 * 256) or K == 256


def test_identity_buckets_are_a_power_of_two_and_bounded():
    cfg = SizingConfig()
    assert id_buckets(1_000, cfg) == 2048
    assert id_buckets(3_000, cfg) == 8192
    assert id_buckets(10**8, cfg) == cfg.id_buckets_max
    assert id_buckets(1_000, SizingConfig(id_buckets_per_item=0)) == 0


def test_derived_overrides_reach_every_stage_the_same_way():
    ov = derive(_manifest(2_000), SizingConfig(epochs=5),
                batch={s: 128 for s in ("tokenizer", "hsd", "flat", "sasrec", "orpo")}
                | {"tokenizer": 64}, steps={"tokenizer": 200})
    assert "model.K=64" in ov["tokenizer"] and "model.input_dim=64" in ov["tokenizer"]
    assert "train.max_steps=200" in ov["tokenizer"]  # 1.5 x 1000 pairs / 64 = 24 < 200
    for stage in ("hsd", "flat", "sasrec"):  # equal care: the same length and selection
        assert {"train.epochs=5", "train.max_steps=0", "validation.every_epochs=1",
                "validation.patience=2"} <= set(ov[stage]), stage
    for stage in ("hsd", "flat", "orpo"):
        assert "model.K=64" in ov[stage] and "model.id_buckets=4096" in ov[stage]
    assert not any(o.startswith("model.") for o in ov["sasrec"])
    assert {"train.max_steps=4", "validation.at_start=true"} <= set(ov["orpo"])  # 500 / 128
    assert derive(_manifest(2_000), SizingConfig(enabled=False), batch={"hsd": 128}) == {}


def test_a_catalogue_too_large_for_the_scale_is_refused_in_one_line():
    check_scale(_manifest(50_000), SizingConfig())
    with pytest.raises(ConfigError) as e:
        check_scale(_manifest(60_000, rows=30_000_000), SizingConfig())
    msg = str(e.value)
    assert "60,000 items" in msg and "30,000,000 interactions" in msg and "kuairec" in msg
    assert len(e.value.problems) == 1 and "\n" not in e.value.problems[0]


def test_sizing_config_rejects_nonsense():
    problems = SizingConfig(k_min=300, epochs=0, patience=-1).validate()
    assert len(problems) == 3
