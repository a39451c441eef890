"""MovieLens-100k in GroupLens's own layout (``u.data`` + ``u.item``) from RecBole's copy.

    python bench/movielens.py --out /tmp/ml100k                    # pip-downloads RecBole's wheel
    python bench/movielens.py --source recbole-1.2.1-py3-none-any.whl --out /tmp/ml100k
    python etl/build_shards.py --format movielens --interactions /tmp/ml100k/u.data \\
        --items /tmp/ml100k/u.item --output /tmp/ml_etl

Why
---
GroupLens's terms forbid redistributing MovieLens, so nothing of it is in this repository (tests
use tiny hand-written files). On machines without access to grouplens.org the one copy at hand
may be the one RecBole ships inside its wheel (``recbole==1.2.1`` on PyPI):
``recbole/dataset_example/ml-100k/ml-100k.inter`` and ``ml-100k.item``, RecBole's "atomic
files" (tab-separated, a ``name:type`` header). :func:`ml100k_files` turns them back into
GroupLens's layout, so the ETL's ``movielens`` adapter reads them exactly as it reads the
published release:

- ``u.data``: ``user id \\t item id \\t rating \\t timestamp``, no header (RecBole's
  ``user_id``, ``item_id``, ``rating``, ``timestamp`` columns, numbers written as integers);
- ``u.item``: ``movie id | title | release date | video release date | IMDb URL | 19 genre
  flags``, latin-1, no header. RecBole keeps the title without its year, the year alone and
  the genres as space-separated names (``Children's``, ``Film-Noir``, ``Sci-Fi`` are single
  tokens): the title becomes ``"<title> (<year>)"`` as GroupLens writes it, the genres the
  flags; the release date, video release date and URL, which RecBole dropped, stay empty
  (the ETL reads only the id, the title and the flags).

``source`` may be GroupLens's own folder (returned as is), a folder with RecBole's two files,
the wheel itself (read with zipfile, nothing extracted) or None (``pip download --no-deps
recbole==1.2.1`` into ``<out_dir>/recbole-wheel/``, reused on the next call).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

#: the wheel that carries MovieLens-100k
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
#: where the wheel keeps the two atomic files
WHEEL_DIR = "recbole/dataset_example/ml-100k"

#: u.item's 19 genre flags, in GroupLens's order (u.genre)
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")


def _atomic_rows(text: str, what: str, needed: tuple[str, ...]) -> tuple[dict[str, int], list]:
    """A RecBole atomic file -> (column index by bare name, rows as lists of fields)."""
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{what}: empty file")
    header = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    col = {name: k for k, name in enumerate(header)}
    missing = [n for n in needed if n not in col]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; header has {header}")
    return col, [line.split("\t") for line in lines[1:] if line.strip()]


def _integer(text: str, what: str) -> str:
    """"3", "3.0" -> "3" (RecBole types ratings and timestamps as float)."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"{what}: {text!r} is not a whole number")
    return str(int(value))


def convert(inter: str, item: str, out_dir: Path) -> tuple[Path, Path]:
    """RecBole's ``ml-100k.inter`` and ``ml-100k.item`` texts -> ``out_dir/u.data``,
    ``out_dir/u.item`` (GroupLens's layout, see the module docstring)."""
    col, rows = _atomic_rows(inter, "ml-100k.inter", ("user_id", "item_id", "rating",
                                                      "timestamp"))
    data = []
    for r in rows:
        where = f"ml-100k.inter user {r[col['user_id']]} item {r[col['item_id']]}"
        data.append("\t".join((r[col["user_id"]], r[col["item_id"]],
                               _integer(r[col["rating"]], where),
                               _integer(r[col["timestamp"]], where))))
    col, rows = _atomic_rows(item, "ml-100k.item", ("item_id", "movie_title", "release_year",
                                                    "class"))
    flags = {g: k for k, g in enumerate(GENRES)}
    movies = []
    for r in rows:
        r = r + [""] * (len(col) - len(r))
        movie, title, year = r[col["item_id"]], r[col["movie_title"]], r[col["release_year"]]
        bits = ["0"] * len(GENRES)
        for genre in r[col["class"]].split():
            if genre not in flags:
                raise ValueError(f"ml-100k.item movie {movie}: unknown genre {genre!r}; "
                                 f"GroupLens's are {', '.join(GENRES)}")
            bits[flags[genre]] = "1"
        title = f"{title} ({year})" if year.strip() else title
        if "|" in title:
            raise ValueError(f"ml-100k.item movie {movie}: title {title!r} holds '|'")
        movies.append("|".join((movie, title, "", "", "", *bits)))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "u.data", out_dir / "u.item"
    for path, lines, encoding in ((paths[0], data, "ascii"), (paths[1], movies, "latin-1")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(("\n".join(lines) + "\n").encode(encoding))
        os.replace(tmp, path)
    return paths


def _from_wheel(wheel: Path) -> tuple[str, str]:
    """The two atomic files' texts, read from the wheel (nothing extracted)."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        found = []
        for suffix in ("ml-100k/ml-100k.inter", "ml-100k/ml-100k.item"):
            hits = [n for n in names if n.endswith(suffix)]
            if not hits:
                raise FileNotFoundError(f"{wheel} holds no {suffix}")
            found.append(io.TextIOWrapper(zf.open(sorted(hits)[0]), encoding="utf-8").read())
    return found[0], found[1]


def _download(cache: Path) -> Path:
    """RecBole's wheel in ``cache``: pip-downloaded (no dependencies) unless already there."""
    wheel = cache / RECBOLE_WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        RECBOLE_REQUIREMENT, "-d", str(cache)], check=True)
    if not wheel.is_file():
        raise FileNotFoundError(f"pip download {RECBOLE_REQUIREMENT} left no {wheel}")
    return wheel


def ml100k_files(source: str | None, out_dir: Path) -> tuple[Path, Path]:
    """``(u.data, u.item)`` of MovieLens-100k in GroupLens's layout (module docstring).

    ``source``: a folder with GroupLens's ``u.data``/``u.item`` (returned as is), a folder with
    RecBole's ``ml-100k.inter``/``ml-100k.item`` (also found under ``ml-100k/`` or
    ``recbole/dataset_example/ml-100k/``), RecBole's wheel, or None (download the wheel).
    Converted files are written into ``out_dir``.
    """
    out_dir = Path(out_dir)
    if source is None:
        return convert(*_from_wheel(_download(out_dir / "recbole-wheel")), out_dir)
    src = Path(source)
    if src.is_dir():
        if (src / "u.data").is_file() and (src / "u.item").is_file():
            return src / "u.data", src / "u.item"
        for d in (src, src / "ml-100k", src / WHEEL_DIR):
            inter, item = d / "ml-100k.inter", d / "ml-100k.item"
            if inter.is_file() and item.is_file():
                return convert(inter.read_text(encoding="utf-8"),
                               item.read_text(encoding="utf-8"), out_dir)
        raise FileNotFoundError(f"{src} holds neither u.data + u.item nor RecBole's "
                                "ml-100k.inter + ml-100k.item")
    if src.is_file() and zipfile.is_zipfile(src):
        return convert(*_from_wheel(src), out_dir)
    raise FileNotFoundError(f"{src}: not a folder with MovieLens-100k nor RecBole's wheel")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=None,
                   help="GroupLens folder, RecBole folder or wheel (default: pip download)")
    p.add_argument("--out", required=True, help="folder for u.data and u.item")
    args = p.parse_args(argv)
    try:
        data, item = ml100k_files(args.source, Path(args.out))
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"movielens.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{data}\n{item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
