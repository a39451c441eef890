"""Preference material for listwise alignment (kinds ``pref`` and ``pref_group``).

One sample = one user context and a feedback window after it: the engaged items ordered by
feedback (descending) form the chosen slate y+, and the items the user gave negative feedback
to in the same window feed objective O2. O1 (permutation) and O3 (similar items) negatives are
built in the streaming path from y+ and the SID table, not stored here.

Storage: ``prefs/`` holds one ``pref_group`` record per user (the stretch of the sequence its
windows read, and per window the positions the ETL picked for y+ and the negatives); readers
unpack it into ``pref`` samples. The choice of y+ and negatives stays in the ETL
(``higr_dist.etl.sequences``); unpacking only slices. Same trade-off as ``slate_group``
(``higr_dist.schema.slates``).
"""

from collections.abc import Iterator

from higr_dist.schema.codec import Field, SampleSchema
from higr_dist.schema.slates import _count_starts, window_key

PREF = SampleSchema(
    kind="pref",
    version=1,
    doc="user history + engaged items (desc. feedback) + negative-feedback items of one window",
    fields=(
        Field("user_id", "str", "source user id"),
        Field("ts", "int", "epoch seconds of the window's first item"),
        Field("hist_items", "ints", "history item_idx, oldest first"),
        Field("hist_fb", "floats", "history watch ratios"),
        Field("pos_items", "ints", "N engaged item_idx ordered by feedback, descending (y+)"),
        Field("pos_fb", "floats", "their watch ratios (descending)"),
        Field("neg_items", "ints", "negative-feedback item_idx in the same window (0..M)"),
        Field("neg_fb", "floats", "their watch ratios"),
    ),
)


def unpack_prefs(group: dict, key: str) -> Iterator[dict]:
    """A ``pref_group`` record -> its ``pref`` samples, oldest window first. Each also gets
    ``pos_when`` (derived, not stored): every y+ item's place in time among them (0 = the
    earliest), so a collate can put y+ in consumption order (``PairConfig.chosen_order``)."""
    items, fb = group["items"], group["fb"]
    hl, n, offset = group["history_len"], group["slate_size"], group["offset"]
    pos, neg, neg_at = group["pos"], group["neg"], group["neg_offsets"]
    for w, (s, ts) in enumerate(zip(group["starts"], group["start_ts"])):
        h0 = max(0, s - hl)
        top = pos[w * n:(w + 1) * n]
        bad = neg[neg_at[w]:neg_at[w + 1]]
        when = sorted(range(len(top)), key=top.__getitem__)  # y+ indices in time order
        yield {"user_id": group["user_id"], "ts": ts,
               "hist_items": items[h0:s], "hist_fb": fb[h0:s],
               "pos_items": [items[i] for i in top], "pos_fb": [fb[i] for i in top],
               "pos_when": [when.index(k) for k in range(len(top))],
               "neg_items": [items[i] for i in bad], "neg_fb": [fb[i] for i in bad],
               "__key__": window_key(key, offset + s)}


PREF_GROUP = SampleSchema(
    kind="pref_group",
    version=1,
    doc="one user's preference windows: the stretch they read + y+ and negatives per window",
    fields=(
        Field("user_id", "str", "source user id"),
        Field("offset", "int", "position of items[0] in the user's chronological sequence"),
        Field("items", "ints", "item_idx, oldest first: every window's history and items"),
        Field("fb", "floats", "watch ratios, aligned with items"),
        Field("starts", "ints", "index into items of each window's first item, ascending"),
        Field("start_ts", "ints", "epoch seconds of each window's first item"),
        Field("history_len", "int", "a window's history is items[max(0, s - history_len):s]"),
        Field("slate_size", "int", "N: y+ of window w is items[pos[w*N:(w+1)*N]]"),
        Field("pos", "ints", "index into items of each window's y+, feedback descending"),
        Field("neg", "ints", "index into items of the windows' negatives, concatenated"),
        Field("neg_offsets", "ints", "window w's negatives are neg[neg_offsets[w]:"
              "neg_offsets[w+1]] (len(starts) + 1 entries)"),
    ),
    unpack=unpack_prefs,
    unpacked_count=_count_starts,
)


def pref_group_of(window: dict) -> dict:
    """One ``pref`` sample as a one-window ``pref_group`` record (tests, hand-made shards)."""
    h, n, m = len(window["hist_items"]), len(window["pos_items"]), len(window["neg_items"])
    return {"user_id": window["user_id"], "offset": 0,
            "items": [*window["hist_items"], *window["pos_items"], *window["neg_items"]],
            "fb": [*window["hist_fb"], *window["pos_fb"], *window["neg_fb"]],
            "starts": [h], "start_ts": [window["ts"]], "history_len": h, "slate_size": n,
            "pos": list(range(h, h + n)), "neg": list(range(h + n, h + n + m)),
            "neg_offsets": [0, m]}
