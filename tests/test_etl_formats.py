"""Published formats and category names on real Spark (local[2]), tiny hand-written files only.

MovieLens (GroupLens's terms forbid redistributing it): a few rows in each published layout
(ml-100k through the CLI, end to end; ml-1m and ml-latest at the validation level, as the
KuaiRec test does), the rating -> feedback map, category names -> dense ids, the one-line
error of an items table without a valid item, the timestamp defaults (1997 kept, milliseconds
quarantined) and ``bench/movielens.py``'s RecBole -> GroupLens conversion.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from higr_dist.config import ConfigError, load
from higr_dist.data.loader import iterate_samples
from higr_dist.data.shardio import list_shards
from higr_dist.etl.build import main as build_main
from higr_dist.etl.catalog import build_catalog
from higr_dist.etl.config import EtlConfig, SourceConfig
from higr_dist.etl.sources import (
    ML100K_GENRES,
    movielens_layout,
    rating_feedback,
    read_interactions,
    read_items,
)
from higr_dist.etl.validate import classify_interactions
from higr_dist.schema import FOLDERS

ROOT = Path(__file__).resolve().parents[1]

#: a split protocol for a handful of rows: 3 valid rows per user (val, test, 1 history)
FMT = ["slate_size=1", "holdout=1", "min_history=1", "history_len=3", "stride=1",
       "pref_window=2", "max_negatives=1", "pairs_per_item=2", "cooc_window=2", "content_dim=8",
       "collab_dim=8", "samples_per_shard=50", "min_shards=1", "records_per_block=4",
       "shuffle_partitions=2"]

T97 = 874724710  # 1997-09-20: MovieLens-100k's first month


def _cfg(*overrides: str) -> EtlConfig:
    return load(EtlConfig, None, [*FMT, *overrides])


def _write(path: Path, lines: list[str], encoding: str = "utf-8") -> str:
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return str(path)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _validate(spark, cfg: EtlConfig, log: str, items: str) -> dict:
    """The ETL's validation of ``log`` against ``items``, collected: rows in, every input row's
    reason (None = kept), the kept rows' feedback by (user, item_id) and the item index."""
    catalog = build_catalog(read_items(spark, items, cfg.source), cfg)
    index = {r["item_id"]: r for r in catalog.index.collect()}
    item_id = {r["item_idx"]: k for k, r in index.items()}
    src = read_interactions(spark, log, cfg.source)
    rows = classify_interactions(src, catalog.index, catalog.num_items, cfg).select(
        "_user", "_idx", "_wr", "reason", "_dups", "_dup_reason").collect()
    reasons = Counter()
    for r in rows:  # a distinct row stands for 1 + _dups input rows
        reasons[r["reason"]] += 1
        if r["_dups"]:
            reasons[r["_dup_reason"]] += r["_dups"]
    kept = {(r["_user"], item_id[r["_idx"]]): r["_wr"] for r in rows if r["reason"] is None}
    return {"rows_in": src.df.count(), "reasons": dict(reasons), "kept": kept,
            "index": index, "items": catalog}


def _categories(index: dict) -> dict[str, list[int]]:
    return {k: list(r["categories"]) for k, r in index.items()}


# --------------------------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------------------------


def _u_item_row(movie: str, title: str, date: str, genres: list[str], bad_flag: bool = False):
    flags = ["1" if g in genres else "0" for g in ML100K_GENRES]
    if bad_flag:
        flags[5] = "2"
    url = f"http://us.imdb.com/M/title-exact?{title.replace(' ', '%20')}" if date else ""
    return "|".join([movie, title, date, "", url, *flags])


def _ml100k(d: Path) -> tuple[str, str]:
    """u.data + u.item as GroupLens writes them: 14 ratings, 6 movies (1 with a bad flag)."""
    items = [_u_item_row("1", "Toy Story (1995)", "01-Jan-1995",
                         ["Animation", "Children's", "Comedy"]),
             _u_item_row("2", "GoldenEye (1995)", "01-Jan-1995",
                         ["Action", "Adventure", "Thriller"]),
             _u_item_row("3", "Misérables, Les (1995)", "01-Jan-1995", ["Drama", "Musical"]),
             _u_item_row("4", '"Blade Runner" (1982)', "01-Jan-1982", ["Film-Noir", "Sci-Fi"]),
             _u_item_row("5", "Broken Flags (1990)", "01-Jan-1990", ["Western"], bad_flag=True),
             _u_item_row("6", "unknown", "", ["unknown"])]
    item = _write(d / "u.item", items, "latin-1")
    ratings = [("1", "1", "5"), ("1", "2", "4"), ("1", "3", "3"), ("1", "4", "1"),
               ("2", "2", "2"), ("2", "3", "5"), ("2", "6", "4"),
               ("3", "1", "3")]  # user 3: one valid rating -> short_user
    lines = [f"{u}\t{i}\t{r}\t{T97 + 60 * k}" for k, (u, i, r) in enumerate(ratings)]
    lines += [lines[0],  # duplicate
              f"1\t6\t6\t{T97}",  # bad_feedback: above the map's 5 stars
              f"2\t1\t0\t{T97}",  # bad_feedback: below its 0.5
              f"2\t4\t3\t{T97 * 1000}",  # bad_timestamp: milliseconds
              f"1\t5\t4\t{T97}",  # unknown_item: movie 5 is quarantined
              f"1\t99\t4\t{T97}"]  # unknown_item
    return _write(d / "u.data", lines), item


@pytest.mark.spark
def test_movielens_100k_through_the_cli(spark, tmp_path, capsys):
    """``build_shards.py --format movielens`` on u.data + u.item: exact counts, genres as
    categories, titles as captions, 1997 timestamps kept, ratings mapped onto feedback."""
    data, item = _ml100k(tmp_path)
    out = tmp_path / "out"
    rc = build_main(["--format", "movielens", "--interactions", data, "--items", item,
                     "--output", str(out), *FMT])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"]) == (14, 7, 7)
    assert {r: n for r, n in m["quarantine_by_reason"].items() if n} == {
        "duplicate": 1, "bad_feedback": 2, "bad_timestamp": 1, "unknown_item": 2,
        "short_user": 1}
    it = m["items_table"]
    assert (it["rows_in"], it["rows_out"]) == (6, 5)
    assert {r: n for r, n in it["quarantine_by_reason"].items() if n} == {"bad_category": 1}
    q = pq.read_table(out / "quarantine_items").to_pylist()
    assert [(r["movie_id"], r["genre_comedy"], r["reason"]) for r in q] == [
        ("5", "2", "bad_category")]  # kept as read, GroupLens's columns
    index = pq.read_table(out / "item_index").to_pandas().set_index("item_id")
    # names numbered in sorted order over the valid rows (Western, only in the bad row, is not)
    names = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Drama", "Film-Noir",
             "Musical", "Sci-Fi", "Thriller", "unknown"]
    gid = {g: k + 1 for k, g in enumerate(names)}
    want = {"1": ["Animation", "Children's", "Comedy"], "2": ["Action", "Adventure", "Thriller"],
            "3": ["Drama", "Musical"], "4": ["Film-Noir", "Sci-Fi"], "6": ["unknown"]}
    assert sorted(index.index) == sorted(want)
    for movie, genres in want.items():
        assert list(index.loc[movie, "categories"]) == [gid[g] for g in genres], movie
        assert list(index.loc[movie, "category_tokens"]) == genres
    assert index.loc["3", "caption"] == "Misérables, Les (1995)"  # latin-1 read as such
    assert index.loc["4", "caption"] == '"Blade Runner" (1982)'  # no quoting in u.item
    # feedback: 5 -> 3.0, 4 -> 2.0, 3 -> 1.0, 2 -> 0.5, 1 -> 0.1 (val/test: the last two)
    idx = index["item_idx"].to_dict()
    got = {}
    for kind in ("slates/val", "slates/test"):
        for s in iterate_samples(list_shards(out / kind), FOLDERS[kind]):
            got[(kind, s["user_id"])] = (s["target_items"], s["target_fb"])
    assert got == {("slates/val", "1"): ([idx["3"]], [1.0]),
                   ("slates/test", "1"): ([idx["4"]], [0.1]),
                   ("slates/val", "2"): ([idx["3"]], [3.0]),
                   ("slates/test", "2"): ([idx["6"]], [2.0])}


@pytest.mark.spark
def test_movielens_1m_layout(spark, tmp_path):
    data = _write(tmp_path / "ratings.dat", [
        "1::1193::5::978300760", "1::661::3::978302109", "1::914::3::978301968",
        "2::1193::4::978298413", "2::661::2::978299026", "2::3408::1::978299000",
        "2::3408::1::978299000",  # duplicate
        "3::1193::7::978300000",  # bad_feedback: 7 stars
        "3::xx::3::978300000",  # unknown_item
        "::661::3::978300000"])  # null_user
    movies = _write(tmp_path / "movies.dat", [
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical",
        "914::My Fair Lady (1964)::Musical|Romance",
        "3408::Erin Brockovich (2000)::Drama",
        "3409::Café au lait (1993)::Comedy"], "latin-1")
    got = _validate(spark, _cfg("source.format=movielens"), data, movies)
    assert got["rows_in"] == 10
    assert got["reasons"] == {None: 6, "duplicate": 1, "bad_feedback": 1, "unknown_item": 1,
                              "null_user": 1}
    assert got["kept"] == {("1", "1193"): 3.0, ("1", "661"): 1.0, ("1", "914"): 1.0,
                           ("2", "1193"): 2.0, ("2", "661"): 0.5, ("2", "3408"): 0.1}
    # Animation 1, Children's 2, Comedy 3, Drama 4, Musical 5, Romance 6
    assert _categories(got["index"]) == {"1193": [4], "661": [1, 2, 5], "914": [5, 6],
                                         "3408": [4], "3409": [3]}
    assert got["index"]["3409"]["caption"] == "Café au lait (1993)"


@pytest.mark.spark
def test_movielens_latest_layout_and_half_stars(spark, tmp_path):
    """ratings.csv/movies.csv (ml-latest, -small, -25m): header, quoted titles with commas and
    quotes, "(no genres listed)", half-star ratings interpolated."""
    movies = _write_csv(tmp_path / "movies.csv", ["movieId", "title", "genres"], [
        ["1", "Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy"],
        ["11", "American President, The (1995)", "Comedy|Drama|Romance"],
        ["131260", "Rentun Ruusu (2001)", "(no genres listed)"],
        ["26", 'Othello "Moor" (1995)', "Drama"]])
    ratings = _write_csv(tmp_path / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], [
        ["1", "1", "4.0", "964982703"], ["1", "11", "3.5", "964981247"],
        ["1", "131260", "0.5", "964982224"], ["1", "26", "5.0", "964983815"],
        ["2", "1", "4.5", "1445714835"], ["2", "11", "1.0", "1445714952"],
        ["2", "26", "2.5", "1445715000"],
        ["2", "131260", "0.0", "1445715100"],  # bad_feedback: below the map
        ["2", "1", "abc", "1445715200"],  # bad_feedback: unparseable
        ["3", "1", "3.0", "1445715300"]])  # short_user
    got = _validate(spark, _cfg("source.format=movielens"), ratings, movies)
    assert got["rows_in"] == 10
    assert got["reasons"] == {None: 7, "bad_feedback": 2, "short_user": 1}
    assert got["kept"] == {("1", "1"): 2.0, ("1", "11"): 1.5, ("1", "131260"): 0.05,
                           ("1", "26"): 3.0, ("2", "1"): 2.5, ("2", "11"): 0.1,
                           ("2", "26"): 0.75}
    # Adventure 1, Animation 2, Children 3, Comedy 4, Drama 5, Fantasy 6, Romance 7
    assert _categories(got["index"]) == {"1": [1, 2, 3, 4, 6], "11": [4, 5, 7],
                                         "131260": [-1], "26": [5]}
    assert got["index"]["131260"]["category_tokens"] is None
    assert got["index"]["11"]["caption"] == "American President, The (1995)"
    assert got["index"]["26"]["caption"] == 'Othello "Moor" (1995)'


@pytest.mark.spark
def test_rating_feedback_is_configurable(spark):
    cfg = _cfg("source.format=movielens", "source.rating_feedback={1: 0.0, 3: 1.0, 5: 4.0}")
    assert cfg.source.rating_feedback == {"1": 0.0, "3": 1.0, "5": 4.0}
    df = spark.createDataFrame([(x,) for x in [1.0, 2.0, 3.0, 4.5, 5.0, 0.5, 5.5,
                                               float("nan"), None]], "r double")
    got = [r[0] for r in df.select(rating_feedback(df["r"], cfg.source)).collect()]
    assert got == [0.0, 0.5, 1.0, 3.25, 4.0, None, None, None, None]


def test_rating_feedback_problems_are_reported():
    for value, message in [("{1: 2.0, 5: 1.0}", "must not decrease"),
                           ("{one: 1.0}", "'one' is not a number"),
                           ("{1: -0.5, 5: 1.0}", ">= 0"),
                           ("{}", "at least one")]:
        with pytest.raises(ConfigError, match=message):
            _cfg(f"source.rating_feedback={value}")


def test_movielens_layout_is_told_by_the_published_names():
    src = SourceConfig(format="movielens")
    for path, role, name in [("data/ml-100k/u.data", "ratings", "ml-100k"),
                             ("u1.base", "ratings", "ml-100k"),
                             ("hdfs://nn/ml-100k/u.item", "movies", "ml-100k"),
                             ("ml-1m/ratings.dat", "ratings", "ml-1m"),
                             ("ml-1m/movies.dat", "movies", "ml-1m"),
                             ("ml-25m/ratings.csv.gz", "ratings", "ml-latest"),
                             ("ml-latest-small/movies.csv", "movies", "ml-latest")]:
        assert movielens_layout(src, path, role).name == name, path
    with pytest.raises(ValueError, match="cannot tell the layout of /x/log.tsv"):
        movielens_layout(src, "/x/log.tsv", "ratings")
    renamed = SourceConfig(format="movielens", movielens_layout="ml-1m")
    assert movielens_layout(renamed, "/x/log.tsv", "ratings").name == "ml-1m"


# --------------------------------------------------------------------------------------------
# timestamps: defaults keep 1997, reject milliseconds
# --------------------------------------------------------------------------------------------


@pytest.mark.spark
def test_default_timestamps_keep_1997_and_quarantine_milliseconds(spark, tmp_path):
    cfg = _cfg()
    assert (cfg.timestamp_min, cfg.timestamp_max) == (0, 4102444800)
    items = _write_csv(tmp_path / "items.csv", ["item_id", "category"],
                       [[f"i{k}", str(k)] for k in range(5)])
    log = _write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "watch_ratio"], [
        ["u", "i0", str(T97), "1.0"], ["u", "i1", str(T97 + 1), "1.0"],
        ["u", "i2", str(T97 + 2), "1.0"],
        ["u", "i3", "1700000000000", "1.0"],  # milliseconds (2023): past timestamp_max
        ["u", "i4", str(T97 * 1000), "1.0"],  # milliseconds (1997)
        ["u", "i4", "-1", "1.0"]])  # before 1970
    got = _validate(spark, cfg, log, items)
    assert got["reasons"] == {None: 3, "bad_timestamp": 3}


# --------------------------------------------------------------------------------------------
# category names
# --------------------------------------------------------------------------------------------


@pytest.mark.spark
def test_category_names_get_dense_ids_whatever_the_partitioning(spark, tmp_path):
    """Names only: ids 1..K in sorted order, the same for any row order and partitioning."""
    genres = ["Action", "Comedy", "Drama", "Science Fiction", "horror", "Zombie"]
    rows = [[f"m{k:02d}", "|".join(genres[k % 6:k % 6 + 1 + k % 2]), f"movie {k}"]
            for k in range(30)]
    rows += [["a", "Comedy|Action", "a"], ["b", "", "no category"],
             ["c", " Science Fiction | Comedy ", "spaces"]]  # trimmed, inner space kept
    indexes = []
    for parts, seed in ((1, 0), (5, 1)):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        items = _write_csv(tmp_path / f"items{parts}.csv", ["item_id", "category", "caption"],
                           shuffled)
        cfg = _cfg(f"shuffle_partitions={parts}")
        catalog = build_catalog(read_items(spark, items, cfg.source), cfg)
        assert catalog.quarantine_by_reason["bad_category"] == 0
        indexes.append({r["item_id"]: (r["item_idx"], list(r["categories"]),
                                       r["category_tokens"])
                        for r in catalog.index.collect()})
    assert indexes[0] == indexes[1]
    index = indexes[0]
    gid = {g: k + 1 for k, g in enumerate(sorted(genres))}  # binary order: Zombie < horror
    assert gid == {"Action": 1, "Comedy": 2, "Drama": 3, "Science Fiction": 4, "Zombie": 5,
                   "horror": 6}
    assert index["a"][1:] == ([2, 1], ["Comedy", "Action"])
    assert index["b"][1:] == ([-1], None)
    assert index["c"][1:] == ([4, 2], ["Science Fiction", "Comedy"])
    assert {c for _, cats, _ in index.values() for c in cats} == {-1, *gid.values()}


@pytest.mark.spark
def test_mixed_names_and_ids(spark, tmp_path):
    """Integer ids keep their value, names come after the largest; a number that is no
    integer is bad_category (and its row's names take no id)."""
    items = _write_csv(tmp_path / "items.csv", ["item_id", "category"], [
        ["e", "3|Action"], ["f", "17"], ["g", "Drama|3"], ["h", "[40, 2]"],
        ["x", "1.5|Zebra"], ["y", "NaN"], ["z", "99999999999999999999"]])
    cfg = _cfg()
    catalog = build_catalog(read_items(spark, items, cfg.source), cfg)
    assert (catalog.rows_in, catalog.num_items) == (7, 4)
    assert catalog.quarantine_by_reason == {"null_item": 0, "bad_category": 3, "duplicate": 0,
                                            "conflicting_item": 0}
    assert _categories({r["item_id"]: r for r in catalog.index.collect()}) == {
        "e": [3, 41], "f": [17], "g": [42, 3], "h": [40, 2]}


@pytest.mark.spark
def test_no_valid_item_is_one_line_with_the_reasons(spark, tmp_path, capsys):
    items = _write_csv(tmp_path / "items.csv", ["item_id", "category", "caption"],
                       [["i1", "1.5", "one\ntwo"], ["i2", "2.5", "x"], ["", "1", "y"]])
    log = _write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp", "watch_ratio"],
                     [["u", "i1", str(T97), "1.0"]])
    rc = build_main(["--interactions", log, "--items", items, "--output",
                     str(tmp_path / "out"), *FMT])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1, err
    assert err.startswith("build_shards.py: error: the items table has no valid item: 3 rows, "
                          "all quarantined (null_item 1, bad_category 2); first: null_item: "
                          "item_id=None, category='1', caption='y'"), err


# --------------------------------------------------------------------------------------------
# bench/movielens.py: RecBole's atomic files -> GroupLens's ml-100k layout
# --------------------------------------------------------------------------------------------


def _bench_movielens():
    spec = importlib.util.spec_from_file_location("bench_movielens", ROOT / "bench" / "movielens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECBOLE_INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                 "196\t242\t3\t881250949\n186\t302\t3.0\t891717742.0\n")
RECBOLE_ITEM = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                "242\tKolya\t1996\tComedy\n"
                "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
                "1\tMisérables, Les\t1995\tChildren's Sci-Fi\n")


CHILDRENS = "Children's"


def _flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in ML100K_GENRES)


def test_recbole_files_become_grouplens_ml100k(tmp_path):
    ml = _bench_movielens()
    assert ml.GENRES == ML100K_GENRES
    folder = tmp_path / "recbole" / "ml-100k"
    folder.mkdir(parents=True)
    (folder / "ml-100k.inter").write_text(RECBOLE_INTER)
    (folder / "ml-100k.item").write_text(RECBOLE_ITEM)
    data, item = ml.ml100k_files(str(tmp_path / "recbole"), tmp_path / "a")
    assert (data, item) == (tmp_path / "a" / "u.data", tmp_path / "a" / "u.item")
    assert data.read_text() == "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"
    assert item.read_bytes().decode("latin-1").splitlines() == [
        f"242|Kolya (1996)||||{_flags('Comedy')}",
        f"302|L.A. Confidential (1997)||||{_flags('Crime', 'Film-Noir', 'Mystery', 'Thriller')}",
        f"1|Misérables, Les (1995)||||{_flags(CHILDRENS, 'Sci-Fi')}"]
    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"  # the wheel, read without extracting
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", RECBOLE_INTER)
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.item", RECBOLE_ITEM)
        zf.writestr("recbole/__init__.py", "")
    data_w, item_w = ml.ml100k_files(str(wheel), tmp_path / "b")
    assert data_w.read_bytes() == data.read_bytes() and item_w.read_bytes() == item.read_bytes()
    # GroupLens's own folder is used as it is
    assert ml.ml100k_files(str(tmp_path / "a"), tmp_path / "c") == (data, item)
    assert not (tmp_path / "c").exists()
    (folder / "ml-100k.item").write_text(RECBOLE_ITEM.replace("Comedy", "Comedy Noir"))
    with pytest.raises(ValueError, match="unknown genre 'Noir'"):
        ml.ml100k_files(str(folder), tmp_path / "d")


@pytest.mark.spark
def test_converted_ml100k_reads_through_the_adapter(spark, tmp_path):
    ml = _bench_movielens()
    (tmp_path / "ml-100k.inter").write_text(RECBOLE_INTER)
    (tmp_path / "ml-100k.item").write_text(RECBOLE_ITEM)
    _, item = ml.ml100k_files(str(tmp_path), tmp_path / "out")
    cfg = _cfg("source.format=movielens")
    catalog = build_catalog(read_items(spark, str(item), cfg.source), cfg)
    got = {r["item_id"]: (r["category_tokens"], r["caption"]) for r in catalog.index.collect()}
    assert got == {"242": (["Comedy"], "Kolya (1996)"),
                   "302": (["Crime", "Film-Noir", "Mystery", "Thriller"],
                           "L.A. Confidential (1997)"),
                   "1": (["Children's", "Sci-Fi"], "Misérables, Les (1995)")}
