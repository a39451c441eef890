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

import hashlib
import tempfile
from importlib import resources
from pathlib import Path


def _folder() -> Path:
    """The shipped configs as a folder: the package's own, or, when the package is imported
    from a zip (``spark-submit --py-files higr_dist.zip``, a driver in cluster mode), a copy
    extracted once per zip content into the temporary folder."""
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
    out = Path(tempfile.gettempdir()) / f"higr-dist-configs-{digest.hexdigest()[:12]}"
    for name, data in files.items():
        path = out / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
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
