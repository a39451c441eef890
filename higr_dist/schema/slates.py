"""Slate samples for HSD pretraining and evaluation (kinds ``slate`` and ``slate_group``).

One sample = one user context and the N items that followed it. Splits (leave-five-out, see
METHOD.md): ``train`` windows slide over the early part of each sequence; ``val`` targets are
the 5 before the last 5; ``test`` targets are the last 5. Each split lives in its own folder
(``<out>/slates/{train,val,test}/``). Items are dense ``item_idx``; the loader maps them to SIDs.

Storage: ``val`` and ``test`` hold one ``slate`` record per user. ``train`` holds one
``slate_group`` record per user: the stretch of the user's sequence its training windows
read (histories and targets, never the val/test blocks) and where each window's targets
start. Readers unpack a group into exactly the ``slate`` samples a per-window layout would
store (same fields, same keys). Trade-off: a window's history overlaps the previous
window's, so storing windows repeats each interaction up to history_len / stride times (10x
at the defaults) and costs one tar member and one zstd frame per window; groups store each
interaction once, and cutting windows is list slicing in the loader's workers. The loader
shuffles after unpacking, so batches still mix users (see ``higr_dist.data.loader``).
"""

from collections.abc import Iterator

from higr_dist.schema.codec import Field, SampleSchema

SLATE = SampleSchema(
    kind="slate",
    version=1,
    doc="user history (oldest first) + the next N items with their feedback",
    fields=(
        Field("user_id", "str", "source user id"),
        Field("split", "str", "train | val | test"),
        Field("ts", "int", "epoch seconds of the first target item"),
        Field("hist_items", "ints", "history item_idx, oldest first, at most history_len"),
        Field("hist_fb", "floats", "history watch ratios, aligned with hist_items"),
        Field("target_items", "ints", "the N target item_idx in time order"),
        Field("target_fb", "floats", "target watch ratios, aligned with target_items"),
    ),
)


def window_key(group_key: str, position: int) -> str:
    """Key of the window whose targets start at ``position`` of the user's sequence."""
    return f"{group_key}_{position:07d}"


def unpack_slates(group: dict, key: str) -> Iterator[dict]:
    """A ``slate_group`` record -> its ``slate`` samples (train split), oldest first."""
    items, fb = group["items"], group["fb"]
    hl, n, offset = group["history_len"], group["slate_size"], group["offset"]
    for s, ts in zip(group["starts"], group["start_ts"]):
        h0 = max(0, s - hl)
        yield {"user_id": group["user_id"], "split": "train", "ts": ts,
               "hist_items": items[h0:s], "hist_fb": fb[h0:s],
               "target_items": items[s:s + n], "target_fb": fb[s:s + n],
               "__key__": window_key(key, offset + s)}


def _count_starts(group: dict) -> int:
    return len(group["starts"])


SLATE_GROUP = SampleSchema(
    kind="slate_group",
    version=1,
    doc="one user's training stretch + the start of every training target window",
    fields=(
        Field("user_id", "str", "source user id"),
        Field("offset", "int", "position of items[0] in the user's chronological sequence"),
        Field("items", "ints", "item_idx, oldest first: every window's history and targets"),
        Field("fb", "floats", "watch ratios, aligned with items"),
        Field("starts", "ints", "index into items of each window's first target, ascending"),
        Field("start_ts", "ints", "epoch seconds of each window's first target"),
        Field("history_len", "int", "a window's history is items[max(0, s - history_len):s]"),
        Field("slate_size", "int", "a window's targets are items[s:s + slate_size]"),
    ),
    unpack=unpack_slates,
    unpacked_count=_count_starts,
)


def slate_group_of(window: dict) -> dict:
    """One ``slate`` sample as a one-window ``slate_group`` record (tests, hand-made shards):
    it unpacks to the same fields, under the key ``<record key>_<len(history):07d>``."""
    h = len(window["hist_items"])
    return {"user_id": window["user_id"], "offset": 0,
            "items": [*window["hist_items"], *window["target_items"]],
            "fb": [*window["hist_fb"], *window["target_fb"]],
            "starts": [h], "start_ts": [window["ts"]], "history_len": h,
            "slate_size": len(window["target_items"])}
