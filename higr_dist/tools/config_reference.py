"""The configuration reference, generated from the config dataclasses: ``docs/CONFIG.md``.

    python -m higr_dist.tools.config_reference            # rewrite docs/CONFIG.md
    python -m higr_dist.tools.config_reference --check    # exit 1 when it is stale

Every section of the three kinds of config file (the pipeline's ``run.yaml``, the ETL's
``etl.yaml``, a stage's job file with its stage-specific ``model:`` and ``loss:``), every field
with its type, default and the docstring written under it in the dataclass. The dataclasses are
the single source: ``tests/test_config_reference.py`` fails when the committed file differs
from what this module generates, and says how to regenerate it.

Why in the package (not bench/ or a script folder): the reference is built by importing the
same classes the loader validates against, so it must import exactly what an installed
``higr_dist`` ships; the test and the command line then need no path tricks.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "CONFIG.md"
REGENERATE = "python -m higr_dist.tools.config_reference"


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal written right under it in the class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def type_name(tp) -> str:
    """A short, readable type: ``int``, ``list[int]``, ``'fp32' | 'bf16'``, ``SectionName``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if tp is type(None):
        return "None"
    if tp is typing.Any:
        return "section"
    return getattr(tp, "__name__", str(tp))


def default_of(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def show_default(value: object) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, str):
        return f"`{value!r}`" if value else "`''`"
    if isinstance(value, bool) or value is None:
        return f"`{json.dumps(value)}`"
    if isinstance(value, list | tuple | dict):
        return f"`{json.dumps(value, default=str)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def section(cls: type, path: str, out: list[str], title: str | None = None) -> None:
    """A table for ``cls`` at ``path``, then one for each nested dataclass field."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    nested = []
    doc = inspect.cleandoc(cls.__doc__ or "")
    out += [f"### {title or f'`{path}`'}", "", f"`{cls.__module__}.{cls.__qualname__}`: "
            f"{_cell(doc.splitlines()[0]) if doc else ''}", "",
            "| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        value = default_of(f)
        key = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(tp):
            nested.append((tp, key))
            out.append(f"| `{key}` | section | see below | {_cell(docs.get(f.name, ''))} |")
            continue
        out.append(f"| `{key}` | {type_name(tp)} | {show_default(value)} | "
                   f"{_cell(docs.get(f.name, ''))} |")
    out.append("")
    for tp, key in nested:
        section(tp, key, out)


def stage_sections(out: list[str]) -> None:
    from higr_dist.stages.base import get_stage, known_stages

    for name in known_stages():
        stage = get_stage(name)
        out += [f"## Stage `{name}`: `model:` and `loss:`", "",
                f"In a job file with `stage: {name}` (shipped: `<scale>/{name}`, e.g. `tiny/{name}`).",
                ""]
        section(stage.model_config_cls, "model", out)
        section(stage.loss_config_cls, "loss", out)


def generate() -> str:
    from higr_dist.engine.config import JobConfig
    from higr_dist.etl.config import EtlConfig
    from higr_dist.run_config import PipelineConfig

    out = ["# Configuration reference", "",
           f"Generated from the config dataclasses by `{REGENERATE}`; do not edit by hand "
           "(`tests/test_config_reference.py` fails when this file is stale). The defaults are "
           "the dataclasses'; the shipped configs (`higr_dist/configs/<scale>/`, named "
           "`<scale>/<file>`: `tiny/hsd`) set some of them "
           "differently, and `higr run` sizes a few from the data (`sizing:` below). "
           "Precedence: dataclass default < the YAML file < `key=value` overrides on the "
           "command line. Every run writes its resolved config into its run folder.", "",
           "Composition: a file may begin with `extends: <config>` (or a list; a file beside "
           "it or a shipped name such as `cluster/_slate`), and its own keys are merged over "
           "that base section by section; the shipped stage files extend per-scale bases "
           "(`<scale>/_stage`, `<scale>/_slate`). In a job file, `model: {preset: 100m}` "
           "starts the model section from a named size (`higr_dist.models.hsd.PRESETS`: "
           "tiny, 25m, 100m and the ladder 0.05b .. 2b; stages hsd, flat, orpo, dpo) and the "
           "section's other keys override it.", "",
           "Three kinds of file:", "",
           "- the pipeline (`higr run --config <scale>` or a file): "
           "[run.yaml](#the-pipeline-runyaml);",
           "- the ETL (`etl/build_shards.py --config`, or `etl:` of run.yaml): "
           "[etl.yaml](#the-etl-etlyaml);",
           "- one training stage (`python -m higr_dist.launch --config`, or `stages:` of "
           "run.yaml): "
           "[job file](#a-stage-job-file), with a `model:` and `loss:` section per stage.", "",
           "## The pipeline: `run.yaml`", ""]
    section(PipelineConfig, "", out, title="top level")
    out += ["## The ETL: `etl.yaml`", ""]
    section(EtlConfig, "", out, title="top level")
    out += ["## A stage job file", ""]
    section(JobConfig, "", out, title="top level")
    stage_sections(out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write (or --check) docs/CONFIG.md.")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    p.add_argument("--out", type=Path, default=DOC)
    args = p.parse_args(argv)
    text = generate()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
