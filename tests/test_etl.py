"""The ETL end to end on real Spark (local[2]), real CSV/Parquet inputs and real shards on disk.

Three ETL runs in all (the JVM is shared through the session ``spark`` fixture): a hand-made log
with known bad rows of every reason, built twice (byte-identical rerun), and a small synthetic
log (learnability). KuaiRec's format is checked at the validation level (no shards needed).
"""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
from collections import Counter
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from higr_dist.config import config_hash, load
from higr_dist.data.loader import iterate_samples
from higr_dist.data.shardio import list_shards
from higr_dist.etl.build import run_etl
from higr_dist.etl.catalog import build_catalog
from higr_dist.etl.config import INTERACTION_REASONS, EtlConfig
from higr_dist.etl.sources import read_interactions, read_items
from higr_dist.etl.spark import session_conf
from higr_dist.etl.synthetic import SyntheticConfig, generate
from higr_dist.etl.validate import by_user, classify_interactions, quarantined
from higr_dist.etl.writer import USER_KINDS
from higr_dist.schema import FOLDERS, SCHEMA_VERSION

pytestmark = pytest.mark.spark

KIND_DIRS = {folder: schema.kind for folder, schema in FOLDERS.items()}
T0 = 1_600_000_000

#: the hand-made log's split protocol: N = H = 5, 6 history items, training windows every 3
HAND = ["slate_size=5", "holdout=5", "history_len=6", "stride=3", "min_history=2",
        "pref_window=10", "max_negatives=2", "pairs_per_item=2", "cooc_window=2",
        "content_dim=8", "collab_dim=8", "samples_per_shard=8", "min_shards=2",
        "records_per_block=3", "shuffle_partitions=2"]

#: alice's watch ratios at positions 10..19 (her one preference window)
ALICE_FB = {10: 2.5, 11: 0.1, 12: 1.2, 13: 3.0, 14: 0.05, 15: 1.0, 16: 1.8, 17: 0.15, 18: 1.1,
            19: 2.5}

EXPECTED_REASONS = {"null_user": 2, "null_item": 1, "unknown_item": 2, "bad_timestamp": 4,
                    "bad_feedback": 4, "duplicate": 3, "short_user": 5}


def _row_reasons(classified, columns) -> Counter:
    """Every input row's reason (None: kept) from :func:`classify_interactions`' distinct rows,
    the quarantined ones expanded to one row per copy as the ETL writes them."""
    kept = classified.where(F.col("reason").isNull()).count()
    bad = Counter(r["reason"] for r in quarantined(by_user(classified, columns)).collect())
    return bad + Counter({None: kept})


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _hand_items(d: Path) -> str:
    rows = [[f"i{k:02d}", f"{k % 4}|{10 + k % 8}", f"item {k} topic {k % 4}"] for k in range(40)]
    rows += [["bad1", "1.5|1", "broken category"],  # bad_category: a number, not an integer
             ["i05", "1|15", "item 5 topic 1"],  # exact duplicate of i05
             ["i06", "9", "other"]]  # conflicting_item (i06 already has "2|16")
    return _write_csv(d / "items.csv", ["item_id", "category", "caption"], rows)


def _hand_log(d: Path) -> str:
    """63 rows: alice 30 valid, bob 12 valid + 13 bad, 2 without user, carol 5 (short) + 1 dup."""
    rows = []
    for k in range(30):  # alice: item i<k> at position k
        ts = str(T0 + 60 * k)
        if k == 8:
            ts = str(T0 + 60 * 7)  # same second as position 7: ties go by item_idx (i07 first)
        if k == 3:
            ts = f"{T0 + 180}.9"  # float epoch seconds, floored
        user = " alice" if k == 4 else "alice"  # ids are trimmed
        rows.append([user, f"i{k:02d}", ts, str(ALICE_FB.get(k, 0.5)), "10"])
    rows[7], rows[8] = rows[8], rows[7]  # file order disagrees with the tie rule
    rows = rows[15:] + rows[:15]  # file order is not time order
    bob = [["bob", f"i{30 + k:02d}" if k < 10 else f"i{k - 10:02d}", str(T0 + 10 * k), "1.5", "7"]
           for k in range(12)]
    rows += bob
    rows += [bob[0], bob[0]]  # 2 exact duplicates
    rows += [["bob", "", str(T0), "1.0", "1"],  # null_item
             ["bob", "zzz", str(T0), "1.0", "1"],  # unknown_item
             ["bob", "bad1", str(T0), "1.0", "1"],  # unknown_item (quarantined in the items table)
             ["bob", "i02", "notatime", "1.0", "1"],  # bad_timestamp (x2: bad duplicates stay bad)
             ["bob", "i02", "notatime", "1.0", "1"],
             ["bob", "i02", "-100", "1.0", "1"],  # bad_timestamp: before timestamp_min
             ["bob", "i03", "", "1.0", "1"],  # bad_timestamp: missing
             ["bob", "i02", str(T0), "-1", "1"],  # bad_feedback: negative
             ["bob", "i02", str(T0), "NaN", "1"],  # bad_feedback: NaN
             ["bob", "i02", str(T0), "abc", "1"],  # bad_feedback: unparseable
             ["bob", "i03", str(T0), "1.0", "-3"],  # bad_feedback: optional column negative
             ["", "i00", str(T0), "1.0", "1"],  # null_user
             ["   ", "i01", str(T0), "1.0", "1"]]  # null_user (blank)
    carol = [["carol", f"i{k:02d}", str(T0 + k), "1.0", "1"] for k in range(5)]
    rows += carol + [carol[2]]  # 5 short_user + 1 duplicate (duplicate wins)
    return _write_csv(d / "log.csv", ["user_id", "item_id", "timestamp", "watch_ratio",
                                      "play_duration"], rows)


def _hand_cfg() -> EtlConfig:
    return load(EtlConfig, None, HAND)


@pytest.fixture(scope="module")
def hand(spark, tmp_path_factory):
    """The hand-made log built twice into two folders."""
    d = tmp_path_factory.mktemp("hand")
    log, items = _hand_log(d), _hand_items(d)
    cfg = _hand_cfg()
    m1 = run_etl(spark, cfg, log, items, d / "out1")
    m2 = run_etl(spark, cfg, log, items, d / "out2")
    print("hand-made ETL timings", m1["timings_s"], m2["timings_s"])
    return {"dir": d, "cfg": cfg, "out": [d / "out1", d / "out2"], "manifest": [m1, m2],
            "log": log, "items": items}


def _samples(out: Path, kind_dir: str) -> list[dict]:
    return list(iterate_samples(list_shards(out / kind_dir), FOLDERS[kind_dir]))


def _members(shard: str) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# hand-made log
# --------------------------------------------------------------------------------------------


def test_quarantine_counts_are_exact(hand):
    m, out = hand["manifest"][0], hand["out"][0]
    assert set(EXPECTED_REASONS) == set(INTERACTION_REASONS)  # every reason is exercised
    assert m["quarantine_by_reason"] == EXPECTED_REASONS
    assert (m["rows_in"], m["rows_out"], m["rows_quarantined"]) == (63, 42, 21)
    assert m["rows_in"] == m["rows_out"] + m["rows_quarantined"]
    table = pq.read_table(out / "quarantine")
    assert table.schema.names == ["user_id", "item_id", "timestamp", "watch_ratio",
                                  "play_duration", "reason"]
    assert all(pa.types.is_string(f.type) for f in table.schema)  # source columns as read
    q = table.to_pandas()
    assert dict(Counter(q["reason"])) == {r: n for r, n in EXPECTED_REASONS.items() if n}
    assert sorted(q.loc[q["reason"] == "short_user", "item_id"]) == [f"i0{k}" for k in range(5)]
    # rows are kept as read: the unparseable feedback survives verbatim
    assert "abc" in set(q.loc[q["reason"] == "bad_feedback", "watch_ratio"])
    it = m["items_table"]
    assert (it["rows_in"], it["rows_out"], m["num_items"]) == (43, 40, 40)
    assert it["quarantine_by_reason"] == {"null_item": 0, "bad_category": 1, "duplicate": 1,
                                          "conflicting_item": 1}
    assert len(pq.read_table(out / "quarantine_items")) == 3
    index = pq.read_table(out / "item_index").to_pandas().sort_values("item_idx")
    assert list(index["item_idx"]) == list(range(40))
    assert list(index["item_id"]) == [f"i{k:02d}" for k in range(40)]  # string order
    assert list(index.loc[index["item_id"] == "i06", "categories"].iloc[0]) == [2, 16]


def test_leave_five_out_split_is_exact(hand):
    out, cfg = hand["out"][0], hand["cfg"]
    item_id = {s["item_idx"]: s["item_id"] for s in _samples(out, "items")}

    def ids(xs):
        return [item_id[i] for i in xs]

    def alice(kind_dir):
        got = [s for s in _samples(out, kind_dir) if s["user_id"] == "alice"]
        return sorted(got, key=lambda s: s["ts"])

    name = [f"i{k:02d}" for k in range(30)]  # alice's items in time order (ties by item_idx)
    (test,) = alice("slates/test")
    assert ids(test["target_items"]) == name[25:30] and ids(test["hist_items"]) == name[19:25]
    assert test["ts"] == T0 + 60 * 25
    (val,) = alice("slates/val")
    assert ids(val["target_items"]) == name[20:25] and ids(val["hist_items"]) == name[14:20]
    train = alice("slates/train")
    starts = [3, 6, 9, 12, 15]  # windows end at 20, 17, ..., 8; stride 3, >= min_history 2
    assert [ids(s["target_items"]) for s in train] == [name[s:s + 5] for s in starts]
    assert [ids(s["hist_items"]) for s in train] == [name[max(0, s - 6):s] for s in starts]
    assert train[0]["ts"] == T0 + 180  # the float timestamp, floored
    assert [s["target_fb"] for s in train][2] == [0.5, 2.5, 0.1, 1.2, 3.0]
    held_out = set(name[20:30])
    for s in train:  # no leakage of val/test items into training samples
        assert not held_out & set(ids(s["hist_items"]) + ids(s["target_items"]))
        assert len(s["hist_items"]) <= cfg.history_len
    (pref,) = [s for s in _samples(out, "prefs") if s["user_id"] == "alice"]
    assert ids(pref["pos_items"]) == ["i13", "i10", "i19", "i16", "i12"]
    assert pref["pos_fb"] == [3.0, 2.5, 2.5, 1.8, 1.2]
    assert ids(pref["neg_items"]) == ["i11", "i14"] and ids(pref["hist_items"]) == name[4:10]
    # bob has exactly 2H + min_history valid rows: val and test, no training window
    bob = {k: [s for s in _samples(out, k) if s["user_id"] == "bob"]
           for k in ("slates/train", "slates/val", "slates/test")}
    assert {k: len(v) for k, v in bob.items()} == {"slates/train": 0, "slates/val": 1,
                                                   "slates/test": 1}
    assert ids(bob["slates/test"][0]["target_items"]) == ["i37", "i38", "i39", "i00", "i01"]
    m = hand["manifest"][0]
    assert m["num_users"] == 2
    assert {k: v["samples"] for k, v in m["kinds"].items() if k != "pairs"} == {
        "items": 40, "slates/train": 5, "slates/val": 2, "slates/test": 2, "prefs": 1}


def test_rerun_is_byte_identical(hand):
    (a, b), (ma, mb) = hand["out"], hand["manifest"]
    for kind_dir in KIND_DIRS:
        sa = sorted(p.name for p in (a / kind_dir).glob("*.tar"))
        assert sa == sorted(p.name for p in (b / kind_dir).glob("*.tar")) and sa
        for name in sa:
            assert _sha256(a / kind_dir / name) == _sha256(b / kind_dir / name), (kind_dir, name)
        assert (a / kind_dir / "shards.json").read_bytes() == \
            (b / kind_dir / "shards.json").read_bytes()

    def stable(m):
        return {k: v for k, v in m.items() if k not in ("timings_s",)}

    assert stable(ma) == stable(mb)
    on_disk = [json.loads((o / "manifest.json").read_text()) for o in (a, b)]
    assert stable(on_disk[0]) == stable(on_disk[1]) == json.loads(json.dumps(stable(ma)))


def test_manifest_matches_shards(hand):
    out, m, cfg = hand["out"][0], hand["manifest"][0], hand["cfg"]
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["config_hash"] == config_hash(cfg)
    assert m["feature_dim"] == cfg.content_dim + cfg.collab_dim
    assert set(m["kinds"]) == set(KIND_DIRS)
    for kind_dir, kind in KIND_DIRS.items():
        entry = m["kinds"][kind_dir]
        listing = json.loads((out / kind_dir / "shards.json").read_text())
        assert listing["shards"] == entry["shards"]
        # shards.json "samples" = tar members; a block kind's member holds up to
        # records_per_block records, and a grouped record unpacks to several samples
        schema = FOLDERS[kind_dir]
        assert entry["members"] == sum(s["samples"] for s in entry["shards"])
        if schema.inner is not None:
            assert (-(-entry["records"] // cfg.records_per_block) <= entry["members"]
                    <= entry["records"])
        else:
            assert entry["members"] == entry["records"]
        grouped = schema.unpack is not None
        unpacked = sum(s["unpacked"] if grouped else s["samples"] for s in entry["shards"])
        assert entry["samples"] == unpacked == len(_samples(out, kind_dir))
        assert listing.get("unpacked", listing["samples"]) == entry["samples"]
        stored = schema.inner or schema  # the kind of one record
        assert (entry["records"] <= entry["samples"]) if stored.unpack is not None else (
            entry["records"] == entry["samples"])
        assert len(entry["shards"]) >= cfg.min_shards
        # the four user folders are written by one stage, sized for a record per user
        sized_for = m["num_users"] if kind_dir in USER_KINDS else entry["records"]
        assert len(entry["shards"]) == max(cfg.min_shards, -(-sized_for //
                                                             cfg.samples_per_shard))
        for s in entry["shards"]:
            path = out / kind_dir / s["name"]
            assert _sha256(path) == s["sha256"] and path.stat().st_size == s["bytes"]
            members = _members(str(path))
            assert len(members) == s["samples"]
            assert all(name.endswith(f".{kind}.zst") for name, _ in members)


def test_unbroadcast_catalogue_gives_the_same_output(hand, spark, tmp_path):
    """A catalogue over ``broadcast_items_max`` is joined by a shuffle (then the rows go by
    user): same counts, byte-identical shards."""
    cfg = load(EtlConfig, None, [*HAND, "broadcast_items_max=0"])
    # -1: else Spark broadcasts the 40-item catalogue by itself
    with session_conf(spark, "spark.sql.autoBroadcastJoinThreshold", -1):
        m = run_etl(spark, cfg, hand["log"], hand["items"], tmp_path / "out")
        index = spark.read.parquet(str(tmp_path / "out" / "item_index"))
        src = read_interactions(spark, hand["log"], cfg.source)
        plan = (classify_interactions(src, index, m["num_items"], cfg)
                ._jdf.queryExecution().executedPlan().toString())
    assert "SortMergeJoin" in plan and "BroadcastHashJoin" not in plan
    want = hand["manifest"][0]
    assert m["quarantine_by_reason"] == want["quarantine_by_reason"]
    assert (m["rows_in"], m["rows_out"]) == (want["rows_in"], want["rows_out"])
    for kind_dir in FOLDERS:
        assert ([s["sha256"] for s in m["kinds"][kind_dir]["shards"]]
                == [s["sha256"] for s in want["kinds"][kind_dir]["shards"]]), kind_dir


def test_no_temporary_or_partial_files(hand):
    for out in hand["out"]:
        for path in out.rglob("*"):
            assert not any(t in path.name for t in ("_tmp", ".tmp", "_temporary")), path
            if path.is_file() and path.suffix == ".tar":
                assert path.parent.name in ("items", "pairs", "train", "val", "test", "prefs")
        listed = {p.name for p in out.iterdir()}
        assert listed == {"manifest.json", "quarantine", "quarantine_items", "item_index",
                          "items", "pairs", "slates", "prefs"}


def test_every_kind_round_trips_through_real_shards(hand):
    """decode(blob) re-encodes to the very bytes the ETL wrote, for every kind."""
    out, cfg = hand["out"][0], hand["cfg"]
    seen = Counter()
    for kind_dir in KIND_DIRS:
        schema = FOLDERS[kind_dir]
        for shard in list_shards(out / kind_dir):
            for name, blob in _members(shard):
                sample = schema.decode(blob)
                assert schema.encode(sample) == blob, (kind_dir, name)
                seen[kind_dir] += 1
    assert all(seen[k] > 0 for k in KIND_DIRS)
    # item vectors: content part unit norm, collaborative part unit norm or zero
    for s in _samples(out, "items"):
        x = s["x"]
        assert x.shape == (cfg.content_dim + cfg.collab_dim,)
        assert abs(np.linalg.norm(x[:cfg.content_dim]) - 1) < 1e-5
        collab = np.linalg.norm(x[cfg.content_dim:])
        assert collab < 1e-6 or abs(collab - 1) < 1e-5
    pairs = _samples(out, "pairs")
    items = {s["item_idx"]: s["x"] for s in _samples(out, "items")}
    assert {p["anchor"] for p in pairs} == set(items)  # every item is an anchor
    for p in pairs:
        np.testing.assert_array_equal(p["x_anchor"], items[p["anchor"]])
        np.testing.assert_array_equal(p["x_positive"], items[p["positive"]])
        assert (p["weight"] == 0) == (p["positive"] == p["anchor"])


def test_existing_output_needs_overwrite(hand, spark):
    with pytest.raises(FileExistsError, match="overwrite"):
        run_etl(spark, hand["cfg"], hand["log"], hand["items"], hand["out"][0])


# --------------------------------------------------------------------------------------------
# KuaiRec format (validation level)
# --------------------------------------------------------------------------------------------


def test_typed_parquet_log_gives_the_csv_shards_and_keeps_its_types(spark, tmp_path):
    """A Parquet log keeps its column types (no string round trip) yet validates, dedups and
    splits exactly like the same log as CSV text: identical counts, byte-identical shards;
    its quarantine keeps the Parquet types."""
    rows = []  # (user, item, timestamp, watch_ratio, play_duration)
    for u in (7, 8, 9):
        rows += [(u, f"i{(u * 3 + k) % 40:02d}", T0 + 60 * k, [0.5, 1.5, 2.5, 0.1][k % 4], 10.0)
                 for k in range(20)]
    rows += [rows[3], rows[3],  # 2 exact duplicates
             (None, "i01", T0, 1.0, 1.0),  # null_user
             (7, "zzz", T0, 1.0, 1.0),  # unknown_item
             (7, "i02", -100, 1.0, 1.0),  # bad_timestamp: before timestamp_min
             (8, "i02", T0, float("nan"), 1.0),  # bad_feedback: NaN
             (8, "i03", T0, -1.0, 1.0),  # bad_feedback: negative
             (9, "i04", T0, 1.0, -3.0),  # bad_feedback: optional column negative
             (10, "i05", T0, 1.0, 1.0)]  # short_user
    names = ["user_id", "item_id", "timestamp", "watch_ratio", "play_duration"]
    table = pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)},
                     schema=pa.schema([("user_id", pa.int64()), ("item_id", pa.string()),
                                       ("timestamp", pa.int64()), ("watch_ratio", pa.float64()),
                                       ("play_duration", pa.float64())]))
    (tmp_path / "log.parquet").mkdir()
    pq.write_table(table, tmp_path / "log.parquet" / "part-0.parquet")

    def text(v):
        return "" if v is None else "NaN" if v != v else str(v)

    csv_log = _write_csv(tmp_path / "log.csv", names, [[text(v) for v in r] for r in rows])
    items, cfg = _hand_items(tmp_path), _hand_cfg()
    m_pq = run_etl(spark, cfg, str(tmp_path / "log.parquet"), items, tmp_path / "out_pq")
    m_csv = run_etl(spark, cfg, csv_log, items, tmp_path / "out_csv")
    want = {r: 0 for r in INTERACTION_REASONS}
    want.update(null_user=1, unknown_item=1, bad_timestamp=1, bad_feedback=3, duplicate=2,
                short_user=1)
    assert m_pq["quarantine_by_reason"] == m_csv["quarantine_by_reason"] == want
    assert (m_pq["rows_in"], m_pq["rows_out"]) == (len(rows), 60)
    for kind_dir in FOLDERS:
        assert ([s["sha256"] for s in m_pq["kinds"][kind_dir]["shards"]]
                == [s["sha256"] for s in m_csv["kinds"][kind_dir]["shards"]]), kind_dir
    q = pq.read_table(tmp_path / "out_pq" / "quarantine")
    assert q.schema.field("user_id").type == pa.int64()
    assert q.schema.field("watch_ratio").type == pa.float64()
    assert sorted(q.column("reason").to_pylist()) == sorted(
        r for r, n in want.items() for _ in range(n))


def test_duplicates_follow_sparks_value_equality(spark, tmp_path):
    """Typed columns: -0.0 duplicates 0.0, NaN duplicates NaN (both stay bad_feedback), and a
    null duplicates a null; every copy still comes out once."""
    rows = [("u", "i01", T0, 0.0), ("u", "i01", T0, -0.0),  # kept + duplicate
            ("u", "i02", T0, float("nan")), ("u", "i02", T0, float("nan")),  # bad_feedback x2
            ("u", "i03", None, 1.0), ("u", "i03", None, 1.0)]  # bad_timestamp x2
    table = pa.table({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                      "timestamp": pa.array([r[2] for r in rows], pa.int64()),
                      "watch_ratio": [r[3] for r in rows]})
    pq.write_table(table, tmp_path / "log.parquet")
    cfg = _hand_cfg()
    catalog = build_catalog(read_items(spark, _hand_items(tmp_path), cfg.source), cfg)
    src = read_interactions(spark, str(tmp_path / "log.parquet"), cfg.source)
    got = classify_interactions(src, catalog.index, catalog.num_items, cfg)
    assert _row_reasons(got, src.columns) == {
        "short_user": 1, "duplicate": 1, "bad_feedback": 2, "bad_timestamp": 2}


@pytest.mark.parametrize("kind", ["timestamp", "date"])
def test_parquet_timestamp_and_date_columns_become_epoch_seconds(spark, tmp_path, kind):
    """A data-lake log with a real TIMESTAMP (or DATE) column needs no conversion first."""
    when = [datetime(2020, 9, 13, 12, 26, 40, tzinfo=ZoneInfo("UTC")),
            datetime(2021, 1, 2, 0, 0, 0, tzinfo=ZoneInfo("UTC")), None]
    values = (pa.array(when, pa.timestamp("us", tz="UTC")) if kind == "timestamp"
              else pa.array([w.date() if w else None for w in when], pa.date32()))
    table = pa.table({"user_id": ["u1", "u1", "u2"], "item_id": ["i00", "i01", "i02"],
                      "timestamp": values, "watch_ratio": [1.0, 0.5, 2.0]})
    pq.write_table(table, tmp_path / "log.parquet")
    src = read_interactions(spark, str(tmp_path / "log.parquet"), _hand_cfg().source)
    got = [r["_ts"] for r in src.df.orderBy("item_id").select("_ts").collect()]
    expect = [w.timestamp() if kind == "timestamp" else
              datetime(w.year, w.month, w.day, tzinfo=ZoneInfo("UTC")).timestamp()
              for w in when[:2]]
    assert got == [*expect, None]  # a missing time stays null -> bad_timestamp


def test_kuairec_files_map_onto_the_generic_schema(spark, tmp_path):
    header = ["user_id", "video_id", "play_duration", "video_duration", "time", "date",
              "timestamp", "watch_ratio"]
    rows = [["14", "148", "4381", "6067", "2020-07-05 05:27:48.378", "20200705",
             "1593898068.378", "0.722"],
            ["14", "183", "11635", "6100", "2020-07-05 05:28:00.057", "20200705", "",
             "1.907"],  # timestamp missing: from `time` (Asia/Shanghai)
            ["14", "183", "11635", "6100", "2020-07-05 05:28:00.057", "20200705", "",
             "1.907"],  # exact duplicate
            ["14", "3649", "22422", "10867", "", "20200705", "", "2.063"],  # no time at all
            ["19", "9", "100", "200", "2020-07-05 06:00:00.000", "20200705", "1593900000.0",
             "-0.5"],  # negative watch ratio
            ["14", "148", "100", "6067", "", "20200705", "1593898100", "0.5"]]
    log = _write_csv(tmp_path / "small_matrix.csv", header, rows)
    cats = _write_csv(tmp_path / "item_categories.csv", ["video_id", "feat"],
                      [["148", "[8]"], ["183", "[27, 9]"], ["3649", "[]"], ["9", "[1]"]])
    cfg = load(EtlConfig, None, ["source.format=kuairec", "min_history=1", "holdout=1",
                                 "slate_size=1", "pref_window=1", "shuffle_partitions=2",
                                 "timestamp_min=1577836800", "timestamp_max=1609459200"])
    catalog = build_catalog(read_items(spark, cats, cfg.source), cfg)
    index = {r["item_id"]: list(r["categories"]) for r in catalog.index.collect()}
    assert index == {"148": [8], "183": [27, 9], "3649": [-1], "9": [1]}
    src = read_interactions(spark, log, cfg.source)
    classified = classify_interactions(src, catalog.index, catalog.num_items, cfg)
    reasons = _row_reasons(classified, src.columns)
    assert reasons == {None: 3, "duplicate": 1, "bad_timestamp": 1, "bad_feedback": 1}
    got = classified.select("_ts", "_wr", "reason").collect()
    kept = sorted((r["_ts"], r["_wr"]) for r in got if r["reason"] is None)
    local = datetime(2020, 7, 5, 5, 28, 0, 57000, tzinfo=ZoneInfo("Asia/Shanghai"))
    assert kept == [(1593898068, 0.722), (int(local.timestamp()), 1.907), (1593898100, 0.5)]


# --------------------------------------------------------------------------------------------
# synthetic generator
# --------------------------------------------------------------------------------------------

SYN = SyntheticConfig(users=300, items=200, interactions_per_user=40, seed=3, partitions=2)


@pytest.fixture(scope="module")
def synthetic(spark, tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    inter, items = generate(spark, SYN, str(d / "a"))
    return {"dir": d, "interactions": inter, "items": items}


def _table(path: str, keys: list[str]):
    return pq.read_table(path).to_pandas().sort_values(keys).reset_index(drop=True)


def test_synthetic_generator_is_deterministic(spark, synthetic):
    d = synthetic["dir"]
    again = generate(spark, SyntheticConfig(**{**SYN.__dict__, "partitions": 3}), str(d / "b"))
    other = generate(spark, SyntheticConfig(**{**SYN.__dict__, "seed": 4}), str(d / "c"))
    keys = ["user_id", "timestamp", "item_id"]
    first = _table(synthetic["interactions"], keys)
    assert len(first) == SYN.users * SYN.interactions_per_user
    assert first["user_id"].nunique() == SYN.users
    assert first.equals(_table(again[0], keys))  # same seed, other partitioning: same rows
    assert _table(synthetic["items"], ["item_id"]).equals(_table(again[1], ["item_id"]))
    assert not first["item_id"].equals(_table(other[0], keys)["item_id"])
    items = _table(synthetic["items"], ["item_id"])
    assert len(items) == SYN.items and items["category"].str.fullmatch(r"\d+\|\d+").all()
    assert items["caption"].str.len().min() > 0


def test_synthetic_history_beats_popularity(spark, synthetic):
    """A history heuristic beats popularity on test hit@5: the structure is learnable."""
    cfg = load(EtlConfig, None, ["history_len=20", "shuffle_partitions=2", "min_shards=2",
                                 "samples_per_shard=5000", "content_dim=16", "collab_dim=16"])
    out = synthetic["dir"] / "etl"
    m = run_etl(spark, cfg, synthetic["interactions"], synthetic["items"], out)
    print("synthetic ETL timings", m["timings_s"])
    assert m["rows_in"] == m["rows_out"] == SYN.users * SYN.interactions_per_user
    assert m["num_users"] == SYN.users
    sub = {s["item_idx"]: s["categories"][1] for s in _samples(out, "items")}
    pop = Counter(i for s in _samples(out, "slates/train") for i in s["target_items"])
    ranked = [i for i, _ in pop.most_common()]
    top = ranked[:5]
    by_sub: dict[int, list[int]] = {}
    for i in ranked:
        by_sub.setdefault(sub[i], []).append(i)
    hits_pop, hits_hist = [], []
    for s in _samples(out, "slates/test"):
        target = set(s["target_items"])
        favourite = Counter(sub[i] for i in s["hist_items"]).most_common(1)[0][0]
        rec = (by_sub.get(favourite, []) + [i for i in top if sub[i] != favourite])[:5]
        hits_pop.append(bool(target & set(top)))
        hits_hist.append(bool(target & set(rec)))
    assert len(hits_hist) == SYN.users
    assert np.mean(hits_hist) > np.mean(hits_pop) + 0.15, (np.mean(hits_hist),
                                                           np.mean(hits_pop))


def test_numpy_xxhash64_equals_sparks(spark):
    """The co-occurrence partner hash recomputed in numpy (so it stays out of the shuffle) is
    Spark's own ``xxhash64(seed, part, b)``, for int32 and int64 seeds and any long."""
    from higr_dist.etl.features import _COLLAB, _hashed, part_seed, xxhash64_long

    values = [0, 1, -1, 7, 19_999, 2**31 - 1, 2**31, 2**40 + 3, -(2**63), 2**63 - 1]
    df = spark.createDataFrame([(v,) for v in values], "b long")
    for seed in (0, 7, 2**31, -5, 2**40):
        cfg = EtlConfig(seed=seed)
        got = [r["h"] for r in df.select(_hashed(cfg, _COLLAB, F.col("b"))).collect()]
        want = xxhash64_long(np.array(values, dtype=np.int64), part_seed(seed, _COLLAB))
        assert got == want.tolist(), seed


def test_a_session_we_launch_uses_the_parallel_gc(spark):
    """get_spark's JVM runs the throughput collector (module docstring of etl.spark)."""
    beans = spark.sparkContext._jvm.java.lang.management.ManagementFactory
    args = [str(a) for a in beans.getRuntimeMXBean().getInputArguments()]
    assert "-XX:+UseParallelGC" in args
    assert any(str(g.getName()).startswith("PS ") for g in beans.getGarbageCollectorMXBeans())


def test_session_conf_restores_the_setting_even_when_the_block_raises(spark):
    key = "spark.sql.shuffle.partitions"
    before = spark.conf.get(key)
    with pytest.raises(RuntimeError), session_conf(spark, key, 3):
        assert spark.conf.get(key) == "3"
        raise RuntimeError("inside")
    assert spark.conf.get(key) == before
