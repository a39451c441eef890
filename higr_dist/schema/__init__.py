"""Sample layouts, one module per kind, shared by the Spark writer and the loader."""

from higr_dist.schema.codec import Field, SampleSchema, SchemaError
from higr_dist.schema.items import ITEM
from higr_dist.schema.pairs import PAIR
from higr_dist.schema.prefs import PREF
from higr_dist.schema.slates import SLATE

#: kind -> schema; the ETL writes one folder per kind, the loader picks the schema by kind.
SCHEMAS: dict[str, SampleSchema] = {s.kind: s for s in (ITEM, PAIR, SLATE, PREF)}

#: bump when any schema changes incompatibly; recorded in every manifest.
SCHEMA_VERSION = "items1-pair1-slate1-pref1"

__all__ = ["Field", "SampleSchema", "SchemaError", "ITEM", "PAIR", "SLATE", "PREF", "SCHEMAS",
           "SCHEMA_VERSION"]
