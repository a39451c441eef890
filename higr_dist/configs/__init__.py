"""The shipped configs: package data, addressable by name wherever higr-dist is installed.

Layout: one folder per scale (``tiny``: the CPU demo; ``kuairec``: one GPU node; ``cluster``:
a multi-node job, with the model ladder in ``cluster/ladder``), each with the whole run
(``run.yaml``), the ETL (``etl.yaml``) and one job file per stage (``hsd.yaml`` ...).

Every place that takes a config file takes a *reference* (:func:`resolve`):

- a file that exists, absolute or relative to the working directory (``ref``, ``ref.yaml``
  or ``ref/run.yaml``): that file; a user's own config always wins over a shipped one of the
  same name;
- otherwise a shipped config by name: ``tiny`` (a scale: its ``run.yaml``), ``tiny/hsd`` or
  ``tiny/hsd.yaml`` (one file of a scale), and ``configs/tiny/hsd.yaml`` (the same, as the
  path reads in a checkout's documentation).

``higr run`` hands each stage it launches the absolute path of the file it resolved, so a
stage started in another folder (or on another node with the same install) reads the file the
driver checked; the run's ``resolved_config.yaml`` keeps the references as given.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path


def _folder() -> Path:
    """The shipped configs as a folder: the package's own, or, when the package is imported
    from a zip (``spark-submit --py-files higr_dist.zip``, a driver in cluster mode), a copy
    extracted into a private temporary folder per user and zip content (written whole, then
    renamed into place; an existing copy is used only when every file in it is identical)."""
    here = Path(__file__).resolve().parent
    if here.is_dir():
        return here
    files: dict[str, bytes] = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, name + "/")
            elif child.name.endswith(".yaml"):
                files[name] = child.read_bytes()

    walk(resources.files(__name__), "")
    digest = hashlib.sha256(b"".join(k.encode() + v for k, v in sorted(files.items())))
    root = Path(tempfile.gettempdir()).resolve()
    out = root / f"higr-dist-configs-{os.getuid()}-{digest.hexdigest()[:16]}"

    def intact(folder: Path) -> bool:
        return all((folder / n).is_file() and (folder / n).read_bytes() == b
                   for n, b in files.items())

    if out.is_dir() and intact(out):
        return out
    staging = Path(tempfile.mkdtemp(prefix=".higr-dist-configs-", dir=root))
    for name, data in files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(data)
    try:
        os.replace(staging, out)  # atomic; fails when another process got there first
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not intact(out):
            raise
    return out


#: the folder of the shipped configs
HERE = _folder()


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
    return candidate(base)


def candidate(path: Path) -> Path | None:
    """The file a reference names at ``path``: ``path`` itself, ``path.yaml`` or
    ``path/run.yaml`` (a scale), whichever exists first; None when none does."""
    for cand in (path, path.with_name(path.name + ".yaml"), path / "run.yaml"):
        if cand.is_file():
            return cand
    return None


def resolve(ref: str | Path) -> Path:
    """The config file ``ref`` names: the user's first (a file at ``ref``, ``ref.yaml`` or
    ``ref/run.yaml`` from the working folder), else a shipped config; a name that is neither
    comes back unchanged (the caller reports it as not found)."""
    path = Path(ref)
    return candidate(path) or shipped(str(ref)) or path


def all_files() -> list[Path]:
    """Every shipped config file (YAML), sorted; not the bases that others extend
    (``_<name>.yaml``: incomplete on their own)."""
    return sorted(p for p in HERE.rglob("*.yaml") if not p.name.startswith("_"))


def bases() -> list[Path]:
    """The shipped bases (``_<name>.yaml``) that configs extend."""
    return sorted(p for p in HERE.rglob("_*.yaml"))
