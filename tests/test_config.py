"""The typed config loader: precedence, strict validation, every problem reported at once."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from higr_dist.config import ConfigError, config_hash, from_dict, load, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    """learning rate"""
    mode: Literal["a", "b"] = "a"
    """mode"""


@dataclass
class Outer:
    name: str
    """required"""
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)

    def validate(self):
        return ["steps must be positive"] if self.steps <= 0 else []


def test_precedence_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\nsteps: 5\ninner: {lr: 0.5}\n")
    cfg = load(Outer, f, ["inner.mode=b", "steps=7"])
    assert (cfg.name, cfg.steps, cfg.inner.lr, cfg.inner.mode) == ("x", 7, 0.5, "b")
    assert load(Outer, f).inner.mode == "a"  # default survives when not set


def test_all_problems_collected():
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"steps": "many", "inner": {"lr": "fast", "mode": "c", "lrr": 1},
                          "bogus": 1})
    text = "\n".join(e.value.problems)
    assert "name: required but missing" in text
    assert "steps: expected an integer, got 'many'" in text
    assert "inner.lr: expected a number" in text
    assert "inner.mode: expected one of 'a', 'b'" in text
    assert "inner.lrr: unknown key" in text and "did you mean 'lr'" in text
    assert "bogus: unknown key" in text
    assert len(e.value.problems) == 6


def test_validate_hook_and_roundtrip():
    with pytest.raises(ConfigError, match="steps must be positive"):
        from_dict(Outer, {"name": "x", "steps": 0})
    cfg = from_dict(Outer, {"name": "x", "tags": ["a"]})
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert config_hash(cfg) == config_hash(from_dict(Outer, to_dict(cfg)))
    assert config_hash(cfg) != config_hash(from_dict(Outer, {"name": "y"}))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load(Outer, None, ["steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load(Outer, tmp_path / "nope.yaml")


def test_float_written_without_a_dot_is_a_number():
    from dataclasses import dataclass

    from higr_dist.config import from_dict

    @dataclass
    class C:
        lr: float = 1.0

    assert from_dict(C, {"lr": "3e-4"}).lr == 3e-4
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(C, {"lr": "fast"})
