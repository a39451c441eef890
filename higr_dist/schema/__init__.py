"""Sample layouts, one module per kind, shared by the Spark writer and the loader."""

from higr_dist.schema.codec import Field, SampleSchema, SchemaError, block_of, blocks
from higr_dist.schema.items import ITEM
from higr_dist.schema.pairs import PAIR
from higr_dist.schema.prefs import PREF, PREF_GROUP
from higr_dist.schema.slates import SLATE, SLATE_GROUP

#: blocks of the per-user kinds: the ETL's user folders store these (``codec.block_of``)
SLATE_BLOCK = block_of(SLATE)
SLATE_GROUP_BLOCK = block_of(SLATE_GROUP)
PREF_GROUP_BLOCK = block_of(PREF_GROUP)
PAIR_BLOCK = block_of(PAIR)

#: kind -> schema (the kind is the tar member's extension).
SCHEMAS: dict[str, SampleSchema] = {s.kind: s for s in (
    ITEM, PAIR, SLATE, SLATE_GROUP, PREF, PREF_GROUP, SLATE_BLOCK, SLATE_GROUP_BLOCK,
    PREF_GROUP_BLOCK, PAIR_BLOCK)}

#: ETL output folder -> the schema of its records (the one place this mapping lives). Items:
#: one record per member (one per catalogue item, few); pairs and the per-user folders: blocks.
FOLDERS: dict[str, SampleSchema] = {
    "items": ITEM, "pairs": PAIR_BLOCK, "slates/train": SLATE_GROUP_BLOCK,
    "slates/val": SLATE_BLOCK, "slates/test": SLATE_BLOCK, "prefs": PREF_GROUP_BLOCK}

#: bump when any schema changes incompatibly; recorded in every manifest.
SCHEMA_VERSION = "items1-pair1-slate1-slategroup1-pref1-prefgroup1-blocks1"

__all__ = ["Field", "SampleSchema", "SchemaError", "ITEM", "PAIR", "SLATE", "SLATE_GROUP",
           "PREF", "PREF_GROUP", "SLATE_BLOCK", "SLATE_GROUP_BLOCK", "PREF_GROUP_BLOCK",
           "PAIR_BLOCK", "SCHEMAS", "FOLDERS", "SCHEMA_VERSION", "block_of", "blocks"]
