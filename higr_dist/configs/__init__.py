"""The shipped configs: package data, addressable by name wherever higr-dist is installed.

Layout: one folder per scale (``tiny``: the CPU demo; ``kuairec``: one GPU node; ``cluster``:
a multi-node job, with the model ladder in ``cluster/ladder``), each with the whole run
(``run.yaml``), the ETL (``etl.yaml``) and one job file per stage (``hsd.yaml`` ...).

Every place that takes a config file takes a *reference* (:func:`resolve`):

- a file that exists, absolute or relative to the working directory: that file; a user's own
  config always wins over a shipped one of the same name;
- otherwise a shipped config by name: ``tiny`` (a scale: its ``run.yaml``), ``tiny/hsd`` or
  ``tiny/hsd.yaml`` (one file of a scale), and ``configs/tiny/hsd.yaml`` (the same, as the
  path reads in a checkout's documentation).

A run records the files it resolved to (absolute paths) in its resolved config, so a stage
launched on another node reads the same file the driver checked.
"""

from __future__ import annotations

from pathlib import Path

#: the folder of the shipped configs
HERE = Path(__file__).resolve().parent


def scales() -> list[str]:
    """The shipped scales (``tiny``, ``kuairec``, ``cluster``)."""
    return sorted(p.name for p in HERE.iterdir() if (p / "run.yaml").is_file())


def shipped(name: str) -> Path | None:
    """The shipped config file ``name`` refers to (see the module docstring), or None."""
    rel = str(name).strip().removeprefix("./").removeprefix("configs/")
    if not rel or rel.startswith(("/", "..")):
        return None
    base = (HERE / rel).resolve()
    if HERE not in base.parents:
        return None
    for cand in (base, base / "run.yaml", base.with_name(base.name + ".yaml")):
        if cand.is_file():
            return cand
    return None


def resolve(ref: str | Path) -> Path:
    """The config file ``ref`` names: an existing file first, else a shipped config; a name
    that is neither comes back unchanged (the caller reports it as not found)."""
    path = Path(ref)
    if path.is_file():
        return path
    return shipped(str(ref)) or path


def all_files() -> list[Path]:
    """Every shipped config file (YAML), sorted; not the bases that others extend
    (``_<name>.yaml``: incomplete on their own)."""
    return sorted(p for p in HERE.rglob("*.yaml") if not p.name.startswith("_"))


def bases() -> list[Path]:
    """The shipped bases (``_<name>.yaml``) that configs extend."""
    return sorted(p for p in HERE.rglob("_*.yaml"))
