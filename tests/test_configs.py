"""Every shipped config under configs/ loads into its typed dataclass, and the files that must
agree with each other do (model sections of stages that share weights, tokenizer input width vs
the ETL's feature width, SID shape vs the tokenizer). No I/O beyond reading the YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from higr_dist.config import load, load_yaml, to_dict
from higr_dist.engine.config import load_job
from higr_dist.etl.config import EtlConfig
from higr_dist.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SCALES = sorted(p.name for p in (ROOT / "configs").iterdir() if p.is_dir())


def _kind(path: Path) -> str:
    if path.name == "etl.yaml":
        return "etl"
    if path.name.startswith("run"):
        return "run"
    return "job"


def test_there_are_configs_for_every_scale():
    assert {"tiny", "kuairec", "cluster"} <= set(SCALES)
    for scale in ("tiny", "kuairec", "cluster"):
        names = {p.name for p in (ROOT / "configs" / scale).glob("*.yaml")}
        assert {"etl.yaml", "tokenizer.yaml", "hsd.yaml", "orpo.yaml"} <= names, scale


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_config_loads(path: Path):
    kind = _kind(path)
    if kind == "etl":
        cfg = load(EtlConfig, path)
        assert cfg.validate() == []
    elif kind == "run":
        cfg = load(PipelineConfig, path)
        assert cfg.validate() == []
        for stage_file in cfg.stages.values():
            assert (ROOT / stage_file).is_file(), stage_file
        assert (ROOT / cfg.etl).is_file(), cfg.etl
    else:
        job = load_job(path)
        assert job.stage == load_yaml(path)["stage"]
        # batch sizes are derived, never hard-coded: the global batch splits evenly
        assert job.train.global_batch_size % job.train.micro_batch_size == 0


@pytest.mark.parametrize("scale", ["tiny", "kuairec", "cluster"])
def test_stage_configs_agree(scale: str):
    d = ROOT / "configs" / scale
    etl = load(EtlConfig, d / "etl.yaml")
    tok = load_job(d / "tokenizer.yaml")
    assert tok.model.input_dim == etl.content_dim + etl.collab_dim
    hsd = load_job(d / "hsd.yaml")
    assert (hsd.model.K, hsd.model.L) == (tok.model.K, tok.model.L)
    assert hsd.model.N == etl.slate_size
    # ORPO/DPO and the flat baseline start from / match the HSD model section
    for name in ("orpo", "dpo", "flat"):
        if (d / f"{name}.yaml").is_file():
            assert to_dict(load_job(d / f"{name}.yaml").model) == to_dict(hsd.model), name
