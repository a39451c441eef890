"""Positive item pairs for the tokenizer's prefix-contrastive loss (kind ``pair``).

Co-occurrence pairs (or semantic neighbours) with both feature vectors denormalised into the
sample, so the tokenizer streams pairs without a catalogue-sized lookup table. Every item
appears as an anchor at least once: an item with no partner gets one sample with
``positive == anchor`` and ``weight == 0`` (reconstruction/quantisation only, no contrastive term).
"""

from higr_dist.schema.codec import Field, SampleSchema

PAIR = SampleSchema(
    kind="pair",
    version=1,
    doc="anchor item + one positive item (co-engaged or semantic neighbour)",
    fields=(
        Field("anchor", "int", "anchor item_idx"),
        Field("positive", "int", "positive item_idx (== anchor when the item has no partner)"),
        Field("weight", "float", "pair strength (co-occurrence count); 0 = no contrastive term"),
        Field("x_anchor", "f32vec", "anchor feature vector (same as its item sample's x)"),
        Field("x_positive", "f32vec", "positive feature vector"),
    ),
)
