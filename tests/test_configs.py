"""Every shipped config (package data, higr_dist/configs) loads into its typed dataclass, and the files that must
agree with each other do (model sections of stages that share weights, tokenizer input width vs
the ETL's feature width, SID shape vs the tokenizer). No I/O beyond reading the YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from higr_dist import configs
from higr_dist.config import load, load_yaml, to_dict
from higr_dist.configs import HERE as CONFIGS
from higr_dist.engine.config import load_job
from higr_dist.etl.config import EtlConfig
from higr_dist.pipeline import PipelineConfig

FILES = configs.all_files()
SCALES = configs.scales()


def _kind(path: Path) -> str:
    if path.name == "etl.yaml":
        return "etl"
    if path.name.startswith("run"):
        return "run"
    return "job"


def test_there_are_configs_for_every_scale():
    assert {"tiny", "kuairec", "cluster"} <= set(SCALES)
    for scale in ("tiny", "kuairec", "cluster"):
        names = {p.name for p in (CONFIGS / scale).glob("*.yaml")}
        assert {"etl.yaml", "tokenizer.yaml", "hsd.yaml", "orpo.yaml"} <= names, scale


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONFIGS)) for p in FILES])
def test_config_loads(path: Path):
    kind = _kind(path)
    if kind == "etl":
        cfg = load(EtlConfig, path)
        assert cfg.validate() == []
    elif kind == "run":
        cfg = load(PipelineConfig, path)
        assert cfg.validate() == []
        # a shipped run refers to shipped files by name, so it runs wherever it is installed
        for ref in [*cfg.stages.values(), cfg.etl]:
            assert configs.shipped(ref) is not None, ref
    else:
        job = load_job(path)
        assert job.stage == load_yaml(path)["stage"]
        # batch sizes are derived, never hard-coded: the global batch splits evenly
        assert job.train.global_batch_size % job.train.micro_batch_size == 0


@pytest.mark.parametrize("scale", ["tiny", "kuairec", "cluster"])
def test_stage_configs_agree(scale: str):
    d = CONFIGS / scale
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


def test_config_references_resolve_to_shipped_files_unless_a_file_exists(tmp_path, monkeypatch):
    """``tiny``, ``tiny/hsd``, ``tiny/hsd.yaml`` and ``configs/tiny/hsd.yaml`` name shipped
    files from any folder; a file of that name in the working folder wins; a name that is
    neither is one line naming the shipped scales."""
    from higr_dist.config import ConfigError

    monkeypatch.chdir(tmp_path)
    assert configs.resolve("tiny") == CONFIGS / "tiny" / "run.yaml"
    for ref in ("tiny/hsd", "tiny/hsd.yaml", "configs/tiny/hsd.yaml", "cluster/ladder/hsd_1b"):
        assert configs.resolve(ref).is_file() and CONFIGS in configs.resolve(ref).parents, ref
    for ref in ("../tiny/hsd", "/tiny/hsd", "tiny/../../pyproject.toml", "", "nope"):
        assert configs.shipped(ref) is None, ref
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "hsd.yaml").write_text("stage: hsd\n")
    assert configs.resolve("tiny/hsd.yaml") == Path("tiny/hsd.yaml")  # the user's file
    assert configs.resolve("tiny/hsd") == CONFIGS / "tiny" / "hsd.yaml"
    with pytest.raises(ConfigError) as e:
        load_yaml("tiny/nope")
    assert e.value.problems == ["config file not found: tiny/nope (nor a shipped config; "
                                "shipped: cluster, kuairec, tiny, e.g. tiny or tiny/hsd)"]
