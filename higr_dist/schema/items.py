"""Item samples for the tokenizer: one per catalogue item (kind ``item``).

Written by the ETL under ``<out>/items/``; read by the tokenizer stage (k-means init, export of
the SID table) and by evaluation (item features for ILD, categories for SID metrics).
"""

from higr_dist.schema.codec import Field, SampleSchema

ITEM = SampleSchema(
    kind="item",
    version=1,
    doc="one catalogue item with its content + collaborative feature vector",
    fields=(
        Field("item_idx", "int", "dense item index in [0, num_items); the id every shard carries"),
        Field("item_id", "str", "the source system's item id (as a string)"),
        Field("categories", "ints", "category ids (>= 1 entry; first = primary category)"),
        Field("x", "f32vec", "tokenizer input: [content (L2-normed) | collaborative (L2-normed)]"),
    ),
)
