"""docs/CONFIG.md is generated from the config dataclasses and kept current."""

from __future__ import annotations

import dataclasses

from higr_dist.tools import config_reference as ref


def test_config_reference_is_current():
    """Fails when a config field, default or docstring changed without regenerating the doc."""
    want = ref.generate()
    have = ref.DOC.read_text() if ref.DOC.is_file() else ""
    assert have == want, f"{ref.DOC} is stale: run `{ref.REGENERATE}` and commit the result"


def test_reference_lists_every_field_of_every_section():
    from higr_dist.engine.config import JobConfig
    from higr_dist.etl.config import EtlConfig
    from higr_dist.pipeline import PipelineConfig
    from higr_dist.stages.base import get_stage, known_stages

    text = ref.generate()

    def keys(cls, path=""):
        import typing

        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{path}.{f.name}" if path else f.name
            yield key
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], key)

    classes = [(PipelineConfig, ""), (EtlConfig, ""), (JobConfig, "")]
    for name in known_stages():
        stage = get_stage(name)
        classes += [(stage.model_config_cls, "model"), (stage.loss_config_cls, "loss")]
    for cls, path in classes:
        for key in keys(cls, path):
            assert f"| `{key}` |" in text, key


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "CONFIG.md"
    stale.write_text("# old\n")
    assert ref.main(["--check", "--out", str(stale)]) == 1
    assert ref.REGENERATE in capsys.readouterr().err
    assert ref.main(["--out", str(stale)]) == 0
    assert ref.main(["--check", "--out", str(stale)]) == 0
