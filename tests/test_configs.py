"""Every shipped config (package data, higr_dist/configs) loads into its typed dataclass, and the files that must
agree with each other do (model sections of stages that share weights, tokenizer input width vs
the ETL's feature width, SID shape vs the tokenizer). No I/O beyond reading the YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from higr_dist import configs
from higr_dist.config import ConfigError, deep_merge, load, load_yaml, to_dict
from higr_dist.configs import HERE as CONFIGS
from higr_dist.engine.config import load_job
from higr_dist.etl.config import EtlConfig
from higr_dist.models.hsd import PRESETS
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
    monkeypatch.chdir(tmp_path)
    assert configs.resolve("tiny") == CONFIGS / "tiny" / "run.yaml"
    for ref in ("tiny/hsd", "tiny/hsd.yaml", "configs/tiny/hsd.yaml", "cluster/ladder/hsd_1b"):
        assert configs.resolve(ref).is_file() and CONFIGS in configs.resolve(ref).parents, ref
    for ref in ("../tiny/hsd", "/tiny/hsd", "tiny/../../pyproject.toml", "", "nope"):
        assert configs.shipped(ref) is None, ref
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "hsd.yaml").write_text("stage: hsd\n")
    assert configs.resolve("tiny/hsd.yaml") == Path("tiny/hsd.yaml")  # the user's file
    assert configs.resolve("tiny/hsd") == Path("tiny/hsd.yaml")  # with or without .yaml
    assert configs.resolve("tiny/flat") == CONFIGS / "tiny" / "flat.yaml"  # none of the user's
    with pytest.raises(ConfigError) as e:
        load_yaml("tiny/nope")
    assert e.value.problems == ["config file not found: tiny/nope (nor a shipped config; "
                                "shipped: cluster, kuairec, tiny, e.g. tiny or tiny/hsd)"]


# --------------------------------------------------------------------------------------------
# composition: bases (``_<name>.yaml``), ``extends:`` and ``model: {preset: ...}``
# --------------------------------------------------------------------------------------------

#: the stages that share one HSD model section per scale (through the scale's slate base)
SLATE_STAGES = ("hsd", "flat", "orpo", "dpo")
LADDER = sorted((CONFIGS / "cluster" / "ladder").glob("hsd_*.yaml"))


def _raw(path: Path) -> dict:
    """A file's own keys, as written (no composition)."""
    return yaml.safe_load(path.read_text()) or {}


def _extends(path: Path) -> list[Path]:
    """The files ``path`` names in ``extends:`` (beside it first, then a shipped name), the
    way :func:`higr_dist.config.load_yaml` finds them."""
    refs = _raw(path).get("extends") or []
    out = []
    for ref in [refs] if isinstance(refs, str) else refs:
        beside = path.parent / ref
        out.append((beside if beside.is_file() else configs.resolve(ref)).resolve())
    return out


def _base_model_fields(path: Path) -> set[str]:
    """The HSD model fields that the bases of ``path`` set (a preset sets every field)."""
    model: dict = {}
    for base in _extends(path):
        model = deep_merge(model, load_yaml(base).get("model") or {})
    fields = set(model) - {"preset"}
    if "preset" in model:
        fields |= set(to_dict(PRESETS[model["preset"]]))
    return fields


@pytest.mark.parametrize("scale", ["tiny", "kuairec", "cluster"])
def test_configs_compose_from_their_bases(scale: str):
    """The HSD stages of a scale extend its bases and state no model field a base sets (so
    their model sections cannot drift apart); each ladder file is its preset, named by the
    file, plus only what differs from that preset."""
    for name in SLATE_STAGES:
        path = CONFIGS / scale / f"{name}.yaml"
        raw = _raw(path)
        assert raw.get("extends"), f"{path}: no extends:"
        assert all(p.is_file() and p.name.startswith("_") for p in _extends(path)), path
        restated = set(raw.get("model") or {}) & _base_model_fields(path)
        assert not restated, f"{path}: restates model fields its base sets: {sorted(restated)}"
    if scale != "cluster":
        return
    assert len(LADDER) >= 6
    for path in LADDER:
        raw = _raw(path)
        assert raw.get("extends"), f"{path}: no extends:"
        size = path.stem.removeprefix("hsd_")
        model = raw.get("model")
        assert isinstance(model, dict) and model.get("preset") == size, (path, model)
        preset = to_dict(PRESETS[size])
        same = {k for k, v in model.items() if k != "preset" and preset.get(k) == v}
        assert not same, f"{path}: restates the {size} preset's own {sorted(same)}"
        assert to_dict(load_job(path).model) == deep_merge(preset, {k: v for k, v in model.items()
                                                                     if k != "preset"}), path


def test_every_base_is_extended_by_a_shipped_config():
    """No dead base: each ``_<name>.yaml`` is reached from a shipped config's ``extends:``
    chain, and says in its opening comment what extends it."""
    reached: set[Path] = set()
    todo = [p.resolve() for p in FILES]
    while todo:
        for base in _extends(todo.pop()):
            if base not in reached:
                reached.add(base)
                todo.append(base)
    bases = configs.bases()
    assert bases, "no shipped bases"
    for base in bases:
        assert base.resolve() in reached, f"{base}: extended by no shipped config"
        assert base.read_text().startswith("# "), f"{base}: no opening comment"
    assert not any(p.name.startswith("_") for p in FILES)  # all_files() skips the bases


def test_a_copied_config_still_finds_its_bases(tmp_path):
    """Bases are named by scale (``cluster/_slate``), so a shipped file copied anywhere (the
    fault tests write edited copies to a temp folder) resolves to the same values."""
    for path in (CONFIGS / "cluster" / "hsd.yaml", LADDER[0], CONFIGS / "tiny" / "sasrec.yaml"):
        copy = tmp_path / path.name
        copy.write_text(path.read_text())
        assert to_dict(load_job(copy)) == to_dict(load_job(path)), path


@pytest.mark.parametrize("text, says", [
    ("extends: []\n", "extends: expected a config name or file"),
    ("extends: [tiny/_stage, '']\n", "extends: expected a config name or file"),
    ("extends: 3\n", "extends: expected a config name or file"),
    ("extends: no_such_base\n", "extends: no config 'no_such_base'"),
    ("extends: job.yaml\n", "a cycle"),
    ("extends: other.yaml\n", "a cycle"),
], ids=["empty", "blank", "number", "missing", "itself", "loop"])
def test_a_bad_extends_is_one_line(tmp_path, text: str, says: str):
    (tmp_path / "other.yaml").write_text("extends: job.yaml\n")  # job -> other -> job
    job = tmp_path / "job.yaml"
    job.write_text(text + "stage: hsd\n")
    for load_it in (load_yaml, load_job):
        with pytest.raises(ConfigError) as e:
            load_it(job)
        assert len(e.value.problems) == 1 and says in e.value.problems[0], e.value.problems
        assert "\n" not in e.value.problems[0]


def test_an_unknown_preset_names_the_known_ones(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("stage: hsd\nmodel: {preset: nope, d_model: 64}\n")
    with pytest.raises(ConfigError) as e:
        load_job(job)
    lines = [p for p in e.value.problems if "preset" in p]
    assert len(lines) == 1 and lines[0].startswith("model.preset: unknown preset 'nope'"), lines
    assert all(name in lines[0] for name in PRESETS), lines
    # a known preset with an override: the preset's values, then the file's
    job.write_text("stage: hsd\nmodel: {preset: 25m, dropout: 0.0}\n")
    assert to_dict(load_job(job).model) == {**to_dict(PRESETS["25m"]), "dropout": 0.0}


def test_shipped_configs_resolve_from_the_code_zip(tmp_path):
    """A Spark driver in cluster mode imports the package from ``make etl-env``'s code zip
    (``--py-files``): the shipped configs resolve by name there too."""
    import subprocess
    import sys

    etl = Path(__file__).resolve().parents[1] / "etl"
    sys.path.insert(0, str(etl))
    try:
        import pack_env
    finally:
        sys.path.remove(str(etl))
    code = pack_env.build_code_zip(tmp_path)
    probe = ("import higr_dist; from higr_dist.config import load_yaml; "
             "print(higr_dist.__file__); print(load_yaml('cluster/etl')['samples_per_shard']); "
             "print(load_yaml('cluster/hsd')['train']['zero_stage'])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(code),
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, per_shard, zero = proc.stdout.split()
    assert where.startswith(str(code))
    assert int(per_shard) == load_yaml(CONFIGS / "cluster" / "etl.yaml")["samples_per_shard"]
    assert int(zero) == 2


def test_a_preset_replaces_the_model_fields_of_the_layers_below_it(tmp_path):
    """``model.preset`` in a layer (a file, a file extending a base, the command line) sizes
    the model whole: fields spelled out by lower layers do not leak into it, and the same
    layer's or higher layers' fields apply over the preset."""
    from higr_dist.config import to_dict
    from higr_dist.models.hsd import preset

    want = to_dict(preset("100m"))
    on_cli = to_dict(load_job("tiny/hsd", ["model.preset=100m"]).model)
    assert on_cli == want  # tiny/hsd spells out every field; none survives
    tweaked = to_dict(load_job("tiny/hsd", ["model.preset=100m", "model.dropout=0.3"]).model)
    assert tweaked == {**want, "dropout": 0.3}
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: tiny/hsd\nmodel: {preset: 25m, history_len: 30}\n")
    assert to_dict(load_job(mine).model) == {**to_dict(preset("25m")), "history_len": 30}
    over = to_dict(load_job(mine, ["model.K=64"]).model)  # a higher layer's field applies
    assert over == {**to_dict(preset("25m")), "history_len": 30, "K": 64}
