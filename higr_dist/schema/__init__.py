"""Sample layouts, one module per kind, shared by the Spark writer and the loader."""

from higr_dist.schema.codec import Field, SampleSchema, SchemaError
from higr_dist.schema.items import ITEM
from higr_dist.schema.pairs import PAIR
from higr_dist.schema.prefs import PREF, PREF_GROUP
from higr_dist.schema.slates import SLATE, SLATE_GROUP

#: kind -> schema (the kind is the tar member's extension).
SCHEMAS: dict[str, SampleSchema] = {s.kind: s for s in (ITEM, PAIR, SLATE, SLATE_GROUP, PREF,
                                                        PREF_GROUP)}

#: ETL output folder -> the schema of its records (the one place this mapping lives).
FOLDERS: dict[str, SampleSchema] = {
    "items": ITEM, "pairs": PAIR, "slates/train": SLATE_GROUP, "slates/val": SLATE,
    "slates/test": SLATE, "prefs": PREF_GROUP}

#: bump when any schema changes incompatibly; recorded in every manifest.
SCHEMA_VERSION = "items1-pair1-slate1-slategroup1-pref1-prefgroup1"

__all__ = ["Field", "SampleSchema", "SchemaError", "ITEM", "PAIR", "SLATE", "SLATE_GROUP",
           "PREF", "PREF_GROUP", "SCHEMAS", "FOLDERS", "SCHEMA_VERSION"]
