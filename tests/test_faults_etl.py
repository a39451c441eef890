"""The ETL's bad-input zoo on real Spark (local[2]): nothing lost, nothing silent, no traceback
(docs/RELIABILITY.md, "Bad input data").

- one log and items table holding every kind of bad row at once (invalid UTF-8, wrong column
  counts, a quoted newline, huge and negative ids, timestamps negative / in year 3000 / in
  milliseconds, NaN / inf / text feedback, interactions with unknown items, duplicated item
  ids with conflicting categories, a 1 MB caption): every row is accounted for
  (rows_in = rows_out + rows_quarantined), each bad row under its reason, the quarantine
  tables hold exactly the quarantined rows, and more than ``quarantine_warn_share`` of
  quarantined rows is a warning on stderr and in the manifest, naming the top reasons;
- a 1995 log passes the default timestamp range untouched;
- empty, header-only, binary and missing inputs through the CLI: one line, exit 2, no output;
- a full disk while writing shards (a real tmpfs): one line, exit 1, no output left behind.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from higr_dist.config import load
from higr_dist.etl.build import main as build_main
from higr_dist.etl.build import run_etl
from higr_dist.etl.config import EtlConfig

pytestmark = pytest.mark.spark


@pytest.fixture(autouse=True)
def patient_broadcasts(spark):
    """Broadcast joins may take long on a crowded machine (Spark's default gives up after
    300 s): the zoo is about bad rows, not about time."""
    from higr_dist.etl.spark import session_conf

    with session_conf(spark, "spark.sql.broadcastTimeout", "3600"):
        yield

#: a split protocol for a handful of rows: 3 valid rows per user (val, test, 1 history)
FMT = ["slate_size=1", "holdout=1", "min_history=1", "history_len=3", "stride=1",
       "pref_window=2", "max_negatives=1", "pairs_per_item=2", "cooc_window=2", "content_dim=8",
       "collab_dim=8", "samples_per_shard=50", "min_shards=1", "records_per_block=4",
       "shuffle_partitions=2"]
T0 = 1_600_000_000
T95 = 800_000_000  # 1995-05-07
HEADER = b"user_id,item_id,timestamp,watch_ratio\n"
ITEMS_HEADER = b"item_id,category,caption\n"


def _items(d: Path, extra: bytes = b"") -> Path:
    lines = [ITEMS_HEADER] + [f"i{k:02d},{k % 3},item {k}\n".encode() for k in range(20)]
    path = d / "items.csv"
    path.write_bytes(b"".join(lines) + extra)
    return path


def _base_log(users: int = 6, per_user: int = 4, t0: int = T0) -> list[bytes]:
    return [f"u{u},i{(u + k) % 20:02d},{t0 + 60 * k},1.0\n".encode()
            for u in range(users) for k in range(per_user)]


#: the zoo rows of the interaction log: (line, the reason it must get)
ZOO = [
    (b"us\xffer,i01,1600000000,1.0\n", "short_user"),  # invalid UTF-8 user id: one row
    (b"u0,i\xfe\xff,1600000100,1.0\n", "unknown_item"),  # invalid UTF-8 item id
    (b"u1,i02\n", "bad_timestamp"),  # too few columns: no time
    (b"u1,i02,1600000200,1.0,extra,more\n", None),  # too many: extras dropped, a valid row
    (b"u2,\"i0\n3\",1600000300,1.0\n", "unknown_item"),  # quoted newline: 2 rows (below)
    (b"u3,i04,-5,1.0\n", "bad_timestamp"),  # negative time
    (b"u3,i04,32503680000,1.0\n", "bad_timestamp"),  # year 3000
    (b"u3,i05,1600000000000,1.0\n", "bad_timestamp"),  # milliseconds
    (b"u4,i06,1600000400,NaN\n", "bad_feedback"),
    (b"u4,i06,1600000500,inf\n", "bad_feedback"),
    (b"u4,i06,1600000600,-inf\n", "bad_feedback"),
    (b"u4,i06,1600000700,lots\n", "bad_feedback"),
    (b"u5,99999999999999999999999999999999,1600000800,1.0\n", "unknown_item"),  # huge id
    (b"u5,-1,1600000900,1.0\n", "unknown_item"),  # negative id
    (b"u5,nosuchitem,1600001000,1.0\n", "unknown_item"),
    (b"-7,i07,1600001100,1.0\n", "short_user"),  # a negative user id is just a name
    (b"9" * 300 + b",i08,1600001200,1.0\n", "short_user"),  # a huge user id too
]
#: the quoted newline splits the interaction row in two (the log is read line by line): the
#: first half names the item "i0, the second half is user 3" with item 1600000300; neither item
#: exists
ZOO_EXTRA = {"unknown_item": 1}

ITEMS_ZOO = (b"i03,1,again the same\n"  # conflicting_item: i03 was category 0 ... and "item 3"
             b"i04,1,item 4\n"  # an exact duplicate of i04
             b"i05,7,a different category\n"  # conflicting_item
             b"i21,2," + b"x" * (1 << 20) + b"\n"  # a 1 MB caption: a valid item
             b"i22,2,\"a caption\nover two lines\"\n")  # quoted newline in a caption: valid


def _expected() -> Counter:
    want = Counter(reason for _, reason in ZOO if reason is not None)
    want.update(ZOO_EXTRA)
    return want


@pytest.fixture(scope="module")
def zoo(spark, tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    log = d / "log.csv"
    log.write_bytes(HEADER + b"".join(_base_log()) + b"".join(line for line, _ in ZOO))
    items = _items(d, ITEMS_ZOO)
    cfg = load(EtlConfig, None, FMT)
    from higr_dist.etl.spark import session_conf

    with session_conf(spark, "spark.sql.broadcastTimeout", "3600"):
        manifest = run_etl(spark, cfg, str(log), str(items), d / "out")
    return {"dir": d, "manifest": manifest, "out": d / "out", "cfg": cfg}


@pytest.mark.faults(ci=True)
def test_every_bad_row_is_accounted_for_with_its_reason(zoo):
    m, out = zoo["manifest"], zoo["out"]
    assert m["rows_in"] == m["rows_out"] + m["rows_quarantined"]
    want = _expected()
    got = {r: n for r, n in m["quarantine_by_reason"].items() if n}
    assert got == dict(want), (got, want)
    # rows_in: the base log, the zoo lines, + 1 for the quoted newline's second half
    assert m["rows_in"] == len(_base_log()) + len(ZOO) + 1
    table = pq.read_table(out / "quarantine").to_pandas()
    assert len(table) == m["rows_quarantined"]
    assert Counter(table["reason"]) == want
    # the invalid UTF-8 bytes arrive as U+FFFD, quarantined with the rest of the row
    assert any("\ufffd" in str(u) for u in table["user_id"])
    assert "lots" in set(table["watch_ratio"])  # kept verbatim


@pytest.mark.faults(ci=True)
def test_items_table_zoo(zoo):
    it = zoo["manifest"]["items_table"]
    assert it["rows_in"] == 20 + 5
    assert it["rows_in"] == it["rows_out"] + it["rows_quarantined"]
    assert {r: n for r, n in it["quarantine_by_reason"].items() if n} == {
        "duplicate": 1, "conflicting_item": 2}
    index = pq.read_table(zoo["out"] / "item_index").to_pandas()
    ids = set(index["item_id"])
    assert {"i21", "i22"} <= ids  # the long caption and the two-line caption are items
    # a conflicting row is quarantined; the id keeps its first categories
    cats = {r["item_id"]: list(r["categories"]) for _, r in index.iterrows()}
    assert cats["i03"] == [0] and cats["i05"] == [2]
    assert len(pq.read_table(zoo["out"] / "quarantine_items")) == it["rows_quarantined"]


@pytest.mark.faults(ci=True)
def test_quarantine_share_warns_with_the_top_reasons(zoo, capfd):
    m = zoo["manifest"]
    share = m["rows_quarantined"] / m["rows_in"]
    assert share > zoo["cfg"].quarantine_warn_share
    assert len(m["warnings"]) == 2  # interactions and items table are both above 5%
    line = m["warnings"][0]
    assert "interaction rows" in line and "unknown_item 6" in line and "bad_timestamp 4" in line
    assert "items table lacks" in line  # what the top reason usually means
    assert line.endswith("the rows are in quarantine")  # relative: the manifest is portable


@pytest.mark.faults(ci=True)
def test_cli_prints_the_warning_and_1995_is_plausible(spark, tmp_path, capfd):
    log = tmp_path / "log95.csv"
    log.write_bytes(HEADER + b"".join(_base_log(t0=T95)))
    items = _items(tmp_path)
    out = tmp_path / "out"
    assert build_main(["--interactions", str(log), "--items", str(items), "--output", str(out),
                       *FMT]) == 0
    err = capfd.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows_quarantined"] == 0 and m["warnings"] == [] and "WARNING" not in err
    # the same log with its times in milliseconds: all quarantined, and said loudly
    log.write_bytes(HEADER + b"".join(
        f"u{u},i{(u + k) % 20:02d},{(T95 + 60 * k) * 1000},1.0\n".encode()
        for u in range(6) for k in range(4)))
    rc = build_main(["--interactions", str(log), "--items", str(items), "--output", str(out),
                     "--overwrite", *FMT, "quarantine_warn_share=0.5"])
    err = capfd.readouterr().err
    assert "WARNING: 100.0% of the interaction rows" in err and "bad_timestamp 24" in err, err
    assert "Traceback" not in err
    assert rc in (0, 2)  # no user left: the ETL may refuse to write an empty data set ...
    if rc == 2:  # ... in one line, leaving no output
        assert len([ln for ln in err.splitlines() if "error" in ln]) == 1, err
        assert not (out / "manifest.json").exists()


def _cli(tmp: Path, log: Path, items: Path, capfd) -> tuple[int, str]:
    out = tmp / "cli-out"
    rc = build_main(["--interactions", str(log), "--items", str(items), "--output", str(out),
                     *FMT])
    err = capfd.readouterr().err
    if rc != 0:
        assert not (out / "manifest.json").exists()
    return rc, err


@pytest.mark.faults(ci=True)
@pytest.mark.parametrize("case", ["empty_log", "header_only_log", "empty_items",
                                  "header_only_items", "binary_log", "log_is_a_folder"])
def test_unreadable_inputs_are_one_line(spark, tmp_path, case, capfd):
    log, items = tmp_path / "log.csv", _items(tmp_path)
    log.write_bytes(HEADER + b"".join(_base_log()))
    if case == "empty_log":
        log.write_bytes(b"")
    elif case == "header_only_log":
        log.write_bytes(HEADER)
    elif case == "empty_items":
        items.write_bytes(b"")
    elif case == "header_only_items":
        items.write_bytes(ITEMS_HEADER)
    elif case == "binary_log":
        log.write_bytes(bytes(range(256)) * 64)
    elif case == "log_is_a_folder":
        log = tmp_path / "logdir.csv"
        log.mkdir()
    rc, err = _cli(tmp_path, log, items, capfd)
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("build_shards.py: error:")]
    assert len(lines) == 1, err


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (we are root in CI's container; skipped where mounting is refused)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.faults
def test_disk_full_while_writing_shards(spark, tmp_path, tiny_disk, capfd):
    log = tmp_path / "log.csv"
    log.write_bytes(HEADER + b"".join(_base_log(users=300, per_user=8)))
    items = _items(tmp_path, b"".join(f"j{k},1,{'caption ' * 200}\n".encode()
                                      for k in range(400)))
    out = tiny_disk / "etl"
    rc = build_main(["--interactions", str(log), "--items", str(items), "--output", str(out),
                     *FMT])
    err = capfd.readouterr().err
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("build_shards.py: error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0], err
    assert "Traceback" not in err.split("build_shards.py: error:")[-1]
    # nothing of the output is left for a reader: no manifest, no shard, no staging file
    assert not list(out.rglob("*.tar")) and not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if p.is_file()], list(out.rglob("*"))
