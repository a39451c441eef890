"""Preference material for listwise alignment (kind ``pref``).

One sample = one user context and a feedback window after it: the engaged items ordered by
feedback (descending) form the chosen slate y+, and the items the user gave negative feedback
to in the same window feed objective O2. O1 (permutation) and O3 (similar items) negatives are
built in the streaming path from y+ and the SID table, not stored here.
"""

from higr_dist.schema.codec import Field, SampleSchema

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
