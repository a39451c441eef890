"""Typed configuration: dataclasses in, dataclasses out, every problem reported at once.

Design
------
Each section of a config is a ``@dataclass`` that lives next to the code that uses it
(``LoaderConfig`` in ``higr_dist/data``, ``TrainConfig`` in ``higr_dist/engine`` ...). This module
only knows how to turn plain dicts (YAML files, ``key=value`` overrides) into those dataclasses and
back, with precedence::

    dataclass defaults  <  YAML file (a shipped config or the user's)  <  CLI overrides (``a.b.c=value``)

Validation is strict and *collecting*: unknown keys, wrong types and missing required fields are
all gathered into one :class:`ConfigError` whose ``problems`` list holds one human-readable line
each, so a preflight can print every problem at once and never a traceback. A mistyped field
(``[]``, ``null``, ``"nan"`` where a number belongs) is reported once, by the type check; a
section's own ``validate`` (range and cross-field checks) still runs, and when one of its
comparisons meets the mistyped value (a TypeError) that section's range checks wait until the
type is fixed (``tests/test_faults_config.py`` fuzzes every shipped config for tracebacks).

Trade-off: we hand-roll the ~150 lines of dict->dataclass conversion instead of pulling in
pydantic/omegaconf: the type surface we need is small (scalars, Optional, Literal, list, dict,
nested dataclasses), and error messages stay in our words with dotted paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import subprocess
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config failed validation. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))


# --------------------------------------------------------------------------------------------
# YAML and overrides
# --------------------------------------------------------------------------------------------


#: libyaml's safe loader where PyYAML was built with it (the same YAML, ~10x faster), else
#: the pure-Python one
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


#: the key by which a config file extends others (composition, :func:`load_yaml`)
EXTENDS = "extends"


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping; a missing file or a non-mapping top level is a ConfigError.

    ``path`` is a config reference (:func:`higr_dist.configs.resolve`): a file, or the name of
    a shipped config (``tiny``, ``tiny/hsd``).

    Composition: a file may start with ``extends: <ref>`` (or a list of refs, later ones
    winning); each is read the same way (a file next to this one first, then the reference
    as above, so ``extends: cluster/_slate`` works from any folder) and this file's keys are
    merged over it, sections key by key (:func:`merge_layer`)."""
    from higr_dist import configs

    p = configs.resolve(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p} (nor a shipped config; shipped: "
                           f"{', '.join(configs.scales())}, e.g. tiny or tiny/hsd)"])
    data = _read_mapping(p)
    refs = data.pop(EXTENDS, None)
    if refs is None:
        return data
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip()
                                                          for r in refs):
        raise ConfigError([f"{p}: {EXTENDS}: expected a config name or file (or a list of "
                           f"them), got {refs!r}"])
    here = p.resolve()
    base: dict = {}
    for ref in refs:
        beside = configs.candidate(p.parent / ref)
        target = beside if beside is not None else configs.resolve(ref)
        if not target.is_file():
            raise ConfigError([f"{p}: {EXTENDS}: no config {ref!r} (neither beside it nor "
                               f"shipped)"])
        if target.resolve() in (*_chain, here):
            raise ConfigError([f"{p}: {EXTENDS}: {ref!r} extends {p.name} again (a cycle)"])
        base = merge_layer(base, load_yaml(target, (*_chain, here)))
    return merge_layer(base, data)


#: the section and key by which a model section names a size (``model: {preset: 100m}``)
PRESET_SECTION, PRESET = "model", "preset"


def merge_layer(base: dict, top: dict) -> dict:
    """:func:`deep_merge` of one config layer over the layers below it, where a layer that
    names a model size (``model: {preset: ...}``) replaces the lower layers' model section
    whole: the size is the preset's, then this and higher layers' own model keys on top."""
    section = top.get(PRESET_SECTION)
    if isinstance(section, dict) and PRESET in section:
        base = {k: v for k, v in base.items() if k != PRESET_SECTION}
    return deep_merge(base, top)


def _read_mapping(p: Path) -> dict:
    """One YAML file's top-level mapping (ConfigError in one line otherwise)."""
    try:
        data = yaml.load(p.read_text(), Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {' '.join(str(e).split())}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except OSError as e:
        raise ConfigError([f"{p}: cannot be read: {e.strerror or e}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: top level must be a mapping, got {type(data).__name__}"])
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} is not of the form key.path=value"])
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r} has an empty key"])
    try:
        value = yaml.load(raw, Loader=_YAML_LOADER) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Return a deep copy of ``data`` with ``key.path=value`` overrides applied (creates maps).

    The overrides are one layer (:func:`merge_layer`): ``model.preset=1b`` among them replaces
    the file's model section, and their other ``model.*`` keys apply over the preset."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    parsed = [(text, *parse_override(text)) for text in overrides or []]
    if any(path == [PRESET_SECTION, PRESET] for _, path, _ in parsed) \
            and isinstance(out.get(PRESET_SECTION), dict):
        out[PRESET_SECTION] = {}
    for text, path, value in parsed:
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError([f"override {text!r}: {part!r} is not a section"])
            node = nxt
        node[path[-1]] = value
    return out


def deep_merge(base: dict, top: dict) -> dict:
    """Merge ``top`` into a copy of ``base`` (maps merge recursively, everything else replaces)."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check/convert ``value`` against annotation ``tp``; append problems instead of raising."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _convert(value, arg, path, sub)
            if not sub:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in get_args(tp):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            problems.append(f"{path}: expected a list, got {value!r}")
            return value
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                problems.append(f"{path}: expected {len(args)} items, got {len(value)}")
                return value
            return tuple(_convert(v, a, f"{path}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return value
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _convert(v, vt, f"{path}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a section (mapping), got {value!r}")
            return value
        return _build(tp, value, path, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, path: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: unknown key{hint}; allowed: {', '.join(sorted(fields))}")
    missing = False
    mistyped = False
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            before = len(problems)
            kwargs[name] = _convert(data[name], hints[name], where, problems)
            # a problem inside (a sub-section's too) counts: this section's checks may
            # meet the value it left
            mistyped |= len(problems) > before
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where}: required but missing")
            missing = True
    if missing:
        return None  # type: ignore[return-value]
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        problems.append(f"{path or cls.__name__}: {e}")
        return None  # type: ignore[return-value]
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            found = check() or []
        except (TypeError, ValueError, AttributeError):
            # a range check compared a mistyped field (already reported by name): the
            # section's range checks wait until it is fixed; with every type right, a
            # failing check is a bug and keeps its traceback
            if not mistyped:
                raise
            found = []
        for msg in found:
            problems.append(f"{path}: {msg}" if path else msg)
    return obj


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; raise :class:`ConfigError` listing every problem.

    A dataclass may define ``validate(self) -> list[str]`` for cross-field checks; its messages
    are added to the problem list.
    """
    problems: list[str] = []
    obj = _build(cls, data, path, problems)
    if problems:
        raise ConfigError(problems)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (or nested containers of them) -> plain JSON/YAML-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         base: dict | None = None) -> T:
    """defaults < ``base`` < YAML at ``path`` < ``overrides``, validated into ``cls``."""
    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, load_yaml(path))
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (sorted-key JSON of :func:`to_dict`)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_sha(cwd: str | Path | None = None) -> str:
    """The checkout's commit (``+dirty`` when the tree has changes), or ``unknown`` (an
    installed package: its folder is not the top of a git checkout)."""
    here = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        if cwd is None:
            top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            if not top or Path(top).resolve() != here.parent:
                return "unknown"
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_metadata(run_dir: str | Path, cfg: Any, extra: dict | None = None) -> Path:
    """Write ``resolved_config.yaml`` and ``run_meta.json`` (the code: git SHA, package version
    and folder; the config hash) into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from higr_dist.layout import RESOLVED_CONFIG, RUN_META

    (run_dir / RESOLVED_CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    import higr_dist

    meta = {"git_sha": git_sha(), "version": higr_dist.__version__,
            "package": str(Path(higr_dist.__file__).resolve().parent),
            "config_hash": config_hash(cfg), **(extra or {})}
    path = run_dir / RUN_META
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path
