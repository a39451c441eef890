"""Build what a Spark cluster's executors need to run the ETL: ``make etl-env``.

    python etl/pack_env.py [--out dist] [--python PYTHON] [--cache .cache/etl-env]

writes two files into ``--out``:

- ``etl-env.tar.gz``: a virtual environment with the package's base dependencies and its
  ``etl`` extra (numpy, scipy, pyarrow, pandas, orjson, zstandard, pyyaml, webdataset; no
  torch), packed with venv-pack, for ``spark-submit --archives dist/etl-env.tar.gz#env --conf
  spark.pyspark.python=./env/bin/python`` (Spark's "Python Package Management", venv-pack).
  ``pyspark`` and ``py4j`` are left out: executors import the pyspark of the Spark that runs
  them (``$SPARK_HOME/python/lib``), which must match its JVM anyway. Test folders of the
  libraries are dropped (~95 MB of 430 MB; nothing imports them).
- ``higr_dist.zip``: this checkout's package, for ``--py-files`` (our code changes more often
  than its dependencies; it is rebuilt on every call, in a second).

The environment is built once per key (a hash of ``pyproject.toml``'s base and ``etl``
dependency lists, the interpreter and ``PACK_VERSION``) in ``--cache`` and reused; a changed
dependency list builds a new one.

venv-pack does not copy the interpreter: the archive's ``bin/python`` is a link to the
``--python`` it was built with (default: the interpreter under this venv), so that interpreter
must exist at the same path on every executor, with the driver's major.minor version (Spark
checks it). On Kubernetes, build it inside the executors' image; on YARN, on a node of the
cluster (or use conda-pack, which copies the interpreter).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: bump to rebuild every cached environment (the packing itself changed)
PACK_VERSION = 1
#: what the cluster's own Spark provides to its executors
PROVIDED = {"pyspark", "py4j"}
ENV_NAME = "etl-env.tar.gz"
CODE_NAME = "higr_dist.zip"


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Base dependencies + the ``etl`` extra, without what Spark provides."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["etl"]]
    name = re.compile(r"^\s*([A-Za-z0-9_.\-]+)")
    return [r for r in reqs if name.match(r).group(1).lower().replace("_", "-") not in PROVIDED]


def base_python() -> str:
    """The interpreter this venv was made from (what a new venv links to)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def env_key(python: str, pyproject: Path = ROOT / "pyproject.toml") -> str:
    """Cache key of an environment: pyproject.toml's dependency lists (base + etl; other
    edits of the file do not rebuild it), the interpreter, the packing."""
    h = hashlib.sha256()
    h.update(json.dumps(requirements(pyproject)).encode())
    h.update(f"{os.path.realpath(python)} {python_version(python)} {PACK_VERSION}".encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], **kw) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"pack_env: {' '.join(cmd)} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def pyspark_paths() -> list[str]:
    """pyspark.zip and py4j of the local Spark (for the import check), if pyspark is here."""
    try:
        import pyspark
    except ModuleNotFoundError:
        return []
    lib = Path(pyspark.__file__).parent / "python" / "lib"
    return [str(p) for p in sorted(lib.glob("*.zip"))]


def build_code_zip(out: Path) -> Path:
    """``higr_dist/**/*.py`` and the shipped configs (``*.yaml``, so a driver running from the
    zip finds ``--config cluster/etl``) as a zip for ``--py-files`` (fixed timestamps: same
    code, same bytes)."""
    dest = out / CODE_NAME
    tmp = out / f".{CODE_NAME}.{os.getpid()}"
    package = ROOT / "higr_dist"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted([*package.rglob("*.py"), *(package / "configs").rglob("*.yaml")]):
            info = zipfile.ZipInfo(str(path.relative_to(ROOT)), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    os.replace(tmp, dest)
    return dest


def check_env(python: str, code_zip: Path) -> None:
    """Import what executors import, with the env's python, our zip and Spark's pyspark, and
    fail if torch came along."""
    probe = ("import sys, higr_dist.etl.writer, higr_dist.etl.features, higr_dist.etl.sequences,"
             " higr_dist.etl.synthetic, scipy.sparse, pandas, pyarrow;"
             " bad = [m for m in ('torch', 'deepspeed') if m in sys.modules];"
             " assert not bad, bad")
    spark = pyspark_paths()
    if not spark:
        print("pack_env: no local pyspark: the executors' imports are not checked",
              file=sys.stderr)
        return
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join([str(code_zip), *spark])
    _run([python, "-c", probe], env=env, cwd=tempfile.gettempdir())


def _prune(cache: Path, key: str, python: str) -> None:
    """Drop the cached environments of ``python`` that ``key`` replaces (older dependency
    lists); other interpreters' environments stay."""
    for meta in cache.glob("*/env.json"):
        try:
            other = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if meta.parent.name != key and other.get("python") == python:
            shutil.rmtree(meta.parent, ignore_errors=True)


def build_env(python: str, cache: Path, key: str, code_zip: Path) -> Path:
    """The cached archive for ``key``, built first when absent."""
    dest = cache / key / ENV_NAME
    if dest.is_file():
        return dest
    reqs = requirements()
    work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache))
    try:
        venv = work / "venv"
        t0 = time.perf_counter()
        print(f"pack_env: building the ETL environment with {python} ({len(reqs)} requirements)",
              file=sys.stderr, flush=True)
        _run([python, "-m", "venv", str(venv)])
        vpy = str(venv / "bin" / "python")
        _run([vpy, "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs,
              "venv-pack>=0.2"])
        site = next((venv / "lib").glob("python3*/site-packages"))
        for tests in sorted(site.glob("*/**/tests")):  # never imported at run time
            if tests.is_dir():
                shutil.rmtree(tests, ignore_errors=True)
        check_env(vpy, code_zip)
        freeze = subprocess.run([vpy, "-m", "pip", "freeze"], capture_output=True, text=True,
                                check=True).stdout.split()
        packed = work / ENV_NAME
        _run([str(venv / "bin" / "venv-pack"), "-p", str(venv), "-o", str(packed), "-q"])
        (work / "env.json").write_text(json.dumps({
            "python": os.path.realpath(python), "python_version": python_version(python),
            "requirements": reqs, "installed": freeze, "key": key,
            "build_s": round(time.perf_counter() - t0, 1)}, indent=1))
        shutil.rmtree(venv)
        final = cache / key
        if final.exists():  # built meanwhile by another process: keep theirs
            return dest
        os.replace(work, final)
        work = final
        print(f"pack_env: built {dest} ({dest.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        _prune(cache, key, os.path.realpath(python))
        return dest
    finally:
        if work != cache / key:
            shutil.rmtree(work, ignore_errors=True)


def pack(out: Path, python: str | None = None, cache: Path | None = None) -> dict[str, Path]:
    """Build (or reuse) the environment and write both files into ``out``; returns their
    paths (``env``, ``code``) and the cached archive (``cached``)."""
    python = python or base_python()
    cache = (cache or ROOT / ".cache" / "etl-env").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    code = build_code_zip(out)
    cached = build_env(python, cache, env_key(python), code)
    env = out / ENV_NAME
    if not (env.is_file() and os.path.samefile(env, cached)):
        tmp = out / f".{ENV_NAME}.{os.getpid()}"
        try:
            os.link(cached, tmp)
        except OSError:  # another file system
            shutil.copyfile(cached, tmp)
        os.replace(tmp, env)
    return {"env": env, "code": code, "cached": cached}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pack_env.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "dist"), help="where to write the two files")
    p.add_argument("--python", default=None,
                   help="interpreter the environment is made from (default: this venv's base; "
                        "it must sit at the same path on the executors)")
    p.add_argument("--cache", default=None, help="cache folder (default .cache/etl-env)")
    args = p.parse_args(argv)
    paths = pack(Path(args.out), args.python, Path(args.cache) if args.cache else None)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
