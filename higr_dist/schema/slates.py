"""Slate samples for HSD pretraining and evaluation (kind ``slate``).

One sample = one user context and the N items that followed it. Splits (leave-five-out, see
METHOD.md): ``train`` windows slide over the early part of each sequence; ``val`` targets are
the 5 before the last 5; ``test`` targets are the last 5. Each split lives in its own folder
(``<out>/slates/{train,val,test}/``). Items are dense ``item_idx``; the loader maps them to SIDs.
"""

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
