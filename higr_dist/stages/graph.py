"""The stage graph: which stage feeds which, derived from what each stage declares.

Every registered stage declares ``consumes`` (its ``inputs.<field>`` -> the artifact it reads)
and ``produces`` (the artifacts it writes); artifacts are named in :mod:`higr_dist.layout`
(``etl``, ``sids``, ``<stage>.weights``), which also knows where each lives in a run folder.
The pipeline asks this module for the order to train a run's stages in and for each stage's
input paths, so a new stage is a registered class with these two attributes, not a new branch
in the pipeline.

The order is topological; among stages that are ready at the same time, the run config's
order wins (the shipped runs list tokenizer, hsd, flat, sasrec, orpo).
"""

from __future__ import annotations

from collections.abc import Iterable

from higr_dist import layout
from higr_dist.stages.base import get_stage


def consumes(name: str) -> dict[str, str]:
    """``inputs`` field -> artifact, for stage ``name``."""
    return dict(get_stage(name).consumes)


def produces(name: str) -> tuple[str, ...]:
    """The artifacts stage ``name`` writes (its weights always among them)."""
    return (layout.weights_artifact(name), *get_stage(name).produces)


def problems(names: Iterable[str]) -> list[str]:
    """One line per artifact a stage of ``names`` consumes that none of them produces."""
    names = list(names)
    made = {a: s for s in names for a in produces(s)} | {layout.ETL: "etl"}
    out = []
    for s in names:
        for field, artifact in consumes(s).items():
            if artifact not in made:
                maker = _producer(artifact)
                out.append(f"stages: {s} reads {artifact} (inputs.{field})"
                           + (f", which stage {maker} writes; add {maker}" if maker else ""))
    return out


def _producer(artifact: str) -> str | None:
    from higr_dist.stages.base import known_stages

    return next((s for s in known_stages() if artifact in produces(s)), None)


def order(names: Iterable[str]) -> list[str]:
    """``names`` in an order where every stage comes after the stages it reads from
    (ValueError: a cycle, or an artifact no stage of ``names`` produces)."""
    names = list(dict.fromkeys(names))
    bad = problems(names)
    if bad:
        raise ValueError("; ".join(bad))
    made_by = {a: s for s in names for a in produces(s)}
    needs = {s: {made_by[a] for a in consumes(s).values() if a in made_by} - {s}
             for s in names}
    done: list[str] = []
    while len(done) < len(names):
        ready = [s for s in names if s not in done and needs[s] <= set(done)]
        if not ready:
            raise ValueError(f"stages: a cycle among {', '.join(s for s in names if s not in done)}")
        done.append(ready[0])
    return done


def input_overrides(name: str, run: layout.RunLayout) -> list[str]:
    """``inputs.<field>=<path>`` for stage ``name`` in run folder ``run``."""
    return [f"inputs.{field}={run.artifact(artifact)}"
            for field, artifact in consumes(name).items()]
