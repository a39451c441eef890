"""KuaiRec caption adapter (plain + Spark) and text features / positive pairs (issue #6).

Hand-made files in KuaiRec's format carry the quirks of the real one: a bare carriage return
inside an unquoted caption (as in the real file) and inside a quoted one, CRLF line endings on
some rows, a quoted caption with a newline and commas, ``UNKNOWN`` cover texts, ``-124``
unknown category levels, and topic-tag lists.
"""

from __future__ import annotations

import io
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench-only code

from kuairec_items import (  # noqa: E402
    CAPTION_COLUMNS,
    ITEM_COLUMNS,
    UNKNOWN_CATEGORY,
    KuaiRecCaptionConfig,
    read_caption_table,
    read_items,
    read_items_spark,
)
from text_features import (  # noqa: E402
    Pairs,
    TextEmbedder,
    TextFeatureConfig,
    char_ngrams,
    complete_pairs,
    cowatch_pairs,
    hash_ngrams,
    merge_pairs,
    randomized_svd,
    semantic_neighbours,
)

HEADER = ",".join(CAPTION_COLUMNS)
CAPTION_ROWS = [
    # bare \r inside an unquoted caption (how the real file has it), LF ending
    "0,UNKNOWN,张凯教练：我希望开启一段王朝\r！,[],6,明星娱乐,-124,UNKNOWN,-124,UNKNOWN\n",
    # quoted caption with a bare \r, CRLF ending
    '1,封面,"这才是豪车\r ","[豪车,汽车]",-124,UNKNOWN,-124,UNKNOWN,-124,UNKNOWN\r\n',
    # quoted caption with a newline and commas; quoted tag list; all three levels known
    '2,UNKNOWN,"第一行,逗号\n第二行","[五爱市场,搞笑]",5,时尚,737,营销售卖,2596,女装\r\n',
    # empty caption, CRLF
    "3,UNKNOWN,,[],27,高新数码,-124,UNKNOWN,-124,UNKNOWN\r\n",
    # bare \r right before a comma (as in the real file), LF
    "10,最高级动物.,说不会就是不会\r,[灵魂属性大揭秘],8,颜值,673,颜值随拍,-124,UNKNOWN\n",
]
EXPECTED = {
    # item_id: (caption, cat1, cat2, cat3, tags, category(levels))
    "0": ("张凯教练：我希望开启一段王朝 ！", 6, 0, 0, [6], [6]),
    "1": ("封面 这才是豪车 豪车 汽车", 0, 0, 0, [18, 28], [UNKNOWN_CATEGORY]),
    "2": ("第一行,逗号 第二行 五爱市场 搞笑", 5, 737, 2596, [5], [5, 737, 2596]),
    "3": ("", 27, 0, 0, [27, 9], [27]),
    "10": ("最高级动物. 说不会就是不会 灵魂属性大揭秘", 8, 673, 0, [8], [8, 673]),
}
CATEGORIES = 'video_id,feat\r\n0,[6]\r\n1,"[18, 28]"\r\n2,[5]\r\n3,"[27, 9]"\r\n10,[8]\r\n'


def write(path, text: str, zst: bool) -> str:
    data = text.encode("utf-8")
    if zst:
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return str(path)


@pytest.fixture(params=[False, True], ids=["plain", "zst"])
def files(tmp_path, request):
    zst = request.param
    ext = ".csv.zst" if zst else ".csv"
    caps = write(tmp_path / f"kuairec_caption_category{ext}", HEADER + "\n" + "".join(CAPTION_ROWS),
                 zst)
    cats = write(tmp_path / f"item_categories{ext}", CATEGORIES, zst)
    return caps, cats


def check_items(df: pd.DataFrame) -> None:
    assert list(df.columns) == list(ITEM_COLUMNS)
    assert sorted(df["item_id"]) == sorted(EXPECTED)
    for row in df.itertuples(index=False):
        caption, c1, c2, c3, tags, category = EXPECTED[row.item_id]
        assert row.caption == caption
        assert (row.cat1, row.cat2, row.cat3) == (c1, c2, c3)
        assert list(row.tags) == tags
        assert list(row.category) == category


# ---------------------------------------------------------------------------------------------
# caption reader
# ---------------------------------------------------------------------------------------------


def test_default_reader_breaks_on_bare_cr(files):
    caps, _ = files
    raw = open(caps, "rb").read()
    if caps.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompress(raw)
    try:  # the quirk: a default reader splits at the bare \r (wrong rows or a parse error)
        assert len(pd.read_csv(io.BytesIO(raw), dtype=str)) != len(CAPTION_ROWS)
    except pd.errors.ParserError:
        pass


def test_read_caption_table_exact_rows(files):
    caps, _ = files
    df = read_caption_table(caps)
    assert list(df.columns) == list(CAPTION_COLUMNS)
    assert df["video_id"].tolist() == ["0", "1", "2", "3", "10"]
    assert df.loc[0, "caption"] == "张凯教练：我希望开启一段王朝\r！"  # \r kept as content
    assert df.loc[1, "caption"] == "这才是豪车\r "
    assert df.loc[2, "caption"] == "第一行,逗号\n第二行"
    assert df.loc[4, "caption"] == "说不会就是不会\r"
    assert df.loc[3, "third_level_category_name"] == "UNKNOWN"  # no trailing \r from CRLF
    assert df.loc[2, "third_level_category_name"] == "女装"


def test_read_items_plain(files):
    caps, cats = files
    check_items(read_items(caps, cats))


def test_read_items_without_tags_and_tag_categories(files):
    caps, cats = files
    no_tags = read_items(caps)
    assert all(len(t) == 0 for t in no_tags["tags"])
    assert no_tags.set_index("item_id").loc["2", "category"] == [5, 737, 2596]
    by_tags = read_items(caps, cats, KuaiRecCaptionConfig(category_source="tags"))
    assert by_tags.set_index("item_id").loc["3", "category"] == [27, 9]
    with pytest.raises(ValueError, match="no tag ids"):
        read_items(caps, None, KuaiRecCaptionConfig(category_source="tags"))
    bare = read_items(caps, cats, KuaiRecCaptionConfig(include_cover_text=False,
                                                       include_topic_tags=False))
    assert bare.set_index("item_id").loc["1", "caption"] == "这才是豪车"


def test_reader_errors(tmp_path):
    bad_header = write(tmp_path / "a.csv", "video_id,caption\n0,x\n", False)
    with pytest.raises(ValueError, match="missing columns"):
        read_caption_table(bad_header)
    bad_id = write(tmp_path / "b.csv",
                   HEADER + "\n0,UNKNOWN,x,[],six,a,-124,UNKNOWN,-124,UNKNOWN\n", False)
    with pytest.raises(ValueError, match="video_id=0.*not an integer"):
        read_items(bad_id)
    dup = write(tmp_path / "c.csv", HEADER + "\n" + CAPTION_ROWS[3] + CAPTION_ROWS[3], False)
    with pytest.raises(ValueError, match="duplicate video_id"):
        read_items(dup)
    with pytest.raises(FileNotFoundError):
        read_items(tmp_path / "missing.csv")


@pytest.mark.spark
def test_read_items_spark_matches_plain(spark, tmp_path):
    caps = write(tmp_path / "caps.csv.zst", HEADER + "\n" + "".join(CAPTION_ROWS), True)
    cats = write(tmp_path / "cats.csv", CATEGORIES, False)
    sdf = read_items_spark(spark, caps, cats)
    assert sdf.columns == list(ITEM_COLUMNS)
    assert dict(sdf.dtypes)["category"] == "array<int>"
    rows = [r.asDict() for r in sdf.collect()]  # 5 rows: a test may collect
    check_items(pd.DataFrame(rows, columns=list(ITEM_COLUMNS)))


# ---------------------------------------------------------------------------------------------
# text features
# ---------------------------------------------------------------------------------------------


def test_char_ngrams_and_hashing():
    assert char_ngrams("晚饭后，运动!", 1, 2) == ["晚", "饭", "后", "晚饭", "饭后", "运", "动", "运动"]
    assert char_ngrams("ＡＢ c", 1, 3) == ["a", "b", "ab", "c"]  # NFKC + lowercase, no straddling
    assert char_ngrams("", 1, 3) == [] and char_ngrams("!!", 1, 3) == []
    b = hash_ngrams(["运动", "ab"], 1 << 20)
    assert b.tolist() == [zlib.crc32("运动".encode()) % (1 << 20), zlib.crc32(b"ab") % (1 << 20)]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_randomized_svd_matches_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 6, generator=g) @ torch.randn(6, 40, generator=g)  # rank 6
    a = a + 1e-3 * torch.randn(60, 40, generator=g)
    u, s, v = randomized_svd(a.to_sparse_csr(), 4, oversample=8, power_iters=3, seed=1)
    exact = torch.linalg.svdvals(a)[:4]
    assert torch.allclose(s, exact, rtol=1e-4)
    assert torch.allclose((u * s) @ v.T, (a @ v) @ v.T, atol=1e-3)
    assert torch.allclose(v.T @ v, torch.eye(4), atol=1e-4)


SPORT = ["篮球比赛 投篮", "篮球 比赛精彩", "足球比赛 进球", "比赛 篮球 扣篮", "足球 进球 比赛"]
FOOD = ["红烧肉 做法", "红烧 排骨 做法", "家常菜 红烧肉", "排骨 家常菜 做法", "红烧 家常菜"]


def test_text_embedder_groups_topics_and_is_deterministic():
    texts = SPORT + FOOD + ["", "!!!"]
    cfg = TextFeatureConfig(dim=4, min_df=2, max_df_ratio=0.9)
    emb = TextEmbedder.fit(texts, cfg)
    e = emb.transform(texts)
    assert e.shape == (12, 4) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e[:10], axis=1), 1.0, atol=1e-5)
    assert np.all(e[10:] == 0.0)  # no n-gram -> zero row
    pairs = semantic_neighbours(e, top_p=2)
    topic = np.array([0] * 5 + [1] * 5)
    assert len(pairs) == 20  # the two empty texts are neither anchors nor positives
    assert np.all(topic[pairs.anchor] == topic[pairs.positive])
    again = TextEmbedder.fit(texts, cfg).transform(texts)
    assert np.array_equal(e, again)
    new = emb.transform(["篮球 比赛"])  # unseen text projects near its topic
    assert int(np.argmax(e[:10] @ new[0])) in range(5)


def test_text_embedder_rejects_corpus_without_shared_ngrams():
    with pytest.raises(ValueError, match="document frequency"):
        TextEmbedder.fit(["甲", "乙"], TextFeatureConfig(dim=2, min_df=2))


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------


def test_semantic_neighbours_exact_and_blocked():
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0, 0], [0.8, 0.2]], np.float32)
    want = semantic_neighbours(emb, top_p=2, block=1024)
    got = semantic_neighbours(emb, top_p=2, block=2)
    for a, b in zip((want.anchor, want.positive, want.weight), (got.anchor, got.positive,
                                                               got.weight)):
        assert np.allclose(a, b)
    assert want.anchor.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 5, 5]
    assert want.positive.tolist() == [1, 5, 0, 5, 3, 5, 2, 5, 1, 0]
    assert np.all(want.anchor != want.positive) and 4 not in want.positive
    assert np.allclose(want.weight[:2], [0.9939, 0.9701], atol=1e-4)  # cosines
    high = semantic_neighbours(emb, top_p=2, min_similarity=0.98)
    assert set(zip(high.anchor.tolist(), high.positive.tolist())) == {
        (0, 1), (1, 0), (1, 5), (5, 1), (2, 3), (3, 2)}


def test_cowatch_pairs_counts_and_top_p():
    users = np.array(["u1", "u1", "u1", "u2", "u2", "u2", "u3", "u3", "u1"])
    items = np.array([0, 1, 2, 0, 1, 3, 1, 2, 0])
    ratio = np.array([2.5, 3.0, 2.0, 2.1, 4.0, 0.5, 2.0, 2.2, 9.0])  # item 3 below threshold
    got = cowatch_pairs(users, items, ratio, threshold=2.0, top_p=10)
    pairs = {(a, p): w for a, p, w in zip(got.anchor.tolist(), got.positive.tolist(),
                                          got.weight.tolist())}
    assert pairs == {(0, 1): 2, (1, 0): 2, (0, 2): 1, (2, 0): 1, (1, 2): 2, (2, 1): 2}
    top1 = cowatch_pairs(users, items, ratio, threshold=2.0, top_p=1)
    assert list(zip(top1.anchor.tolist(), top1.positive.tolist())) == [(0, 1), (1, 0), (2, 1)]
    none = cowatch_pairs(users, items, ratio, threshold=10.0)
    assert len(none) == 0


def test_merge_and_complete_pairs():
    a = Pairs(np.array([0, 2]), np.array([1, 0]), np.array([0.5, 0.4], np.float32))
    b = Pairs(np.array([0, 0]), np.array([1, 2]), np.array([3.0, 1.0], np.float32))
    m = merge_pairs(a, b)
    assert list(zip(m.anchor.tolist(), m.positive.tolist(), m.weight.tolist())) == [
        (0, 1, 0.5), (2, 0, pytest.approx(0.4)), (0, 2, 1.0)]
    c = complete_pairs(4, m)
    assert c.anchor.tolist() == [0, 0, 1, 2, 3]
    assert c.positive.tolist() == [1, 2, 1, 0, 3]
    assert c.weight.tolist()[2] == 0.0 and c.weight.tolist()[4] == 0.0
