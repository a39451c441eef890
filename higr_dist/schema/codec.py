"""Sample codec shared by the Spark writer and the streaming reader.

Design
------
A sample is one tar member ``<key>.<ext>`` whose payload is one zstd-compressed blob (a tar
member costs >= 512 bytes of header, so we never split a sample into several members). The
blob is compact JSON with sorted keys: readable with ``zstd -dc | jq`` when debugging, stable
byte-for-byte (deterministic shards), and versioned. Float vectors (``f32vec``) are stored as
base64 of little-endian float32 bytes: exact, ~4x smaller than decimal text, and fast to decode
into numpy.

Blocks (:func:`block_of`): a tar member costs a 512-byte header and pads its payload to 512
bytes, and writing one (tarfile's header code) costs more Python time than encoding the
record. So the ETL's per-user kinds store *blocks*: one member, one zstd frame, holding up to
``records_per_block`` consecutive records of the shard, each with its own key. Blocks cut both
the write time and the bytes on disk per record to a fraction of one member per record's
(``bench/shard_write.py``; figures in docs/BENCHMARKS.md, "Shard writing" and "Figures behind
design choices"). A block kind is a grouped kind, so readers shuffle, skip and count its
records' samples, never blocks.

Trade-off: JSON costs some CPU against a pure binary layout, but one schema definition drives
both writer and reader (no drift). The JSON is written and read with ``orjson`` (much faster
than the standard library's encoder and decoder on these records: docs/BENCHMARKS.md, "Figures
behind design choices"; ``bench/shard_write.py`` times the encode both ways): at 10M
interactions the ETL writes ~400k records from Python, and the standard encoder was the largest
single cost per record. orjson writes non-finite floats as ``null`` where the standard encoder
raised, so the encoder checks float fields itself: NaN and infinities are refused, as before.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
import zstandard

FieldKind = Literal["int", "float", "str", "ints", "floats", "f32vec", "strs", "records"]

#: zstd level for sample blobs (3 = zstd's default: fast, good ratio on small JSON).
ZSTD_LEVEL = 3


class SchemaError(ValueError):
    """A sample does not match its schema (writer side) or a blob cannot be decoded."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: FieldKind
    doc: str


#: orjson options of every sample body: compact, sorted keys, numpy arrays as lists
_JSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY

_cctx_cache: dict[int, zstandard.ZstdCompressor] = {}
_dctx = None


def _cctx() -> zstandard.ZstdCompressor:
    c = _cctx_cache.get(ZSTD_LEVEL)
    if c is None:
        # write_content_size keeps the frame self-describing; no checksum-less surprises
        c = _cctx_cache[ZSTD_LEVEL] = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    return c


def _dctx_get() -> zstandard.ZstdDecompressor:
    global _dctx
    if _dctx is None:
        _dctx = zstandard.ZstdDecompressor()
    return _dctx


def _enc_value(kind: FieldKind, v: Any, name: str) -> Any:
    if kind == "int":
        return int(v)
    if kind == "float":
        f = float(v)
        if not math.isfinite(f):
            raise SchemaError(f"field {name!r}: {f} (floats must be finite)")
        return f
    if kind == "str":
        return str(v)
    if kind == "ints":
        if isinstance(v, np.ndarray) and v.ndim == 1 and (
                v.dtype.kind == "i" or (v.dtype.kind == "u" and v.dtype.itemsize < 8)):
            return np.ascontiguousarray(v, dtype=np.int64)  # orjson writes it natively
        return [int(x) for x in v]
    if kind == "floats":
        if isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind == "f":
            arr = np.ascontiguousarray(v, dtype=np.float64)
            if not np.isfinite(arr).all():
                raise SchemaError(f"field {name!r}: holds NaN or an infinity "
                                  "(floats must be finite)")
            return arr
        out = [float(x) for x in v]
        if not math.isfinite(sum(out)) and not all(map(math.isfinite, out)):  # sum: one C pass
            raise SchemaError(f"field {name!r}: holds NaN or an infinity (floats must be finite)")
        return out
    if kind == "f32vec":
        arr = np.ascontiguousarray(np.asarray(v, dtype="<f4"))
        return base64.b64encode(arr.tobytes()).decode("ascii")
    raise SchemaError(f"unknown field kind {kind!r}")  # pragma: no cover


def _dec_value(kind: FieldKind, v: Any) -> Any:
    if kind == "f32vec":
        return np.frombuffer(base64.b64decode(v), dtype="<f4")
    return v


@dataclass(frozen=True)
class SampleSchema:
    """One sample kind: its tar-member extension, version and fields."""

    kind: str  # e.g. "slate"; the member extension is f"{kind}.zst"
    version: int
    fields: tuple[Field, ...]
    doc: str = ""
    unpack: Callable[[dict, str], Iterator[dict]] | None = None
    """For a *grouped* kind (one stored record holds several training samples, e.g. all the
    windows of one user): ``(decoded record, record key) -> the samples``, each a dict of the
    unpacked kind's fields plus its own ``__key__``. Readers (the loader, ``iterate_samples``)
    unpack; writers store records. None = one record is one sample."""
    unpacked_count: Callable[[dict], int] | None = None
    """Samples a record unpacks to, without unpacking (shard listings, manifest counts)."""
    inner: SampleSchema | None = None
    """For a *block* kind (:func:`block_of`): the kind of the records a block holds."""

    def count(self, record: dict) -> int:
        """Training samples in one stored record (1 for a plain kind)."""
        return 1 if self.unpacked_count is None else self.unpacked_count(record)

    @property
    def ext(self) -> str:
        return f"{self.kind}.zst"

    @functools.cached_property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @functools.cached_property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self.field_names)

    def body(self, sample: dict) -> dict:
        """dict with exactly the schema's fields -> the JSON-ready body (``_v`` added)."""
        names = self._name_set
        if len(sample) != len(names) or not names.issuperset(sample):  # lists only on a mismatch
            missing = [f.name for f in self.fields if f.name not in sample]
            extra = [k for k in sample if k not in names and not k.startswith("__")]
            if missing or extra:
                raise SchemaError(f"{self.kind} v{self.version}: missing {missing}, "
                                  f"unexpected {extra}")
        if self.inner is not None:
            keys, records = sample["keys"], sample["records"]
            if len(keys) != len(records) or not records:
                raise SchemaError(f"{self.kind}: {len(keys)} keys for {len(records)} records "
                                  "(a block holds >= 1 record, one key each)")
            body = {"keys": [str(k) for k in keys],
                    "records": [self.inner.body(r) for r in records]}
        else:
            body = {f.name: _enc_value(f.kind, sample[f.name], f.name) for f in self.fields}
        body["_v"] = self.version
        return body

    def dumps(self, sample: dict) -> bytes:
        """The sample's JSON (compact, sorted keys), before compression. 1-D int64/float64
        arrays are written as the lists they hold (the same bytes as their .tolist(), without
        building Python objects per element)."""
        return orjson.dumps(self.body(sample), option=_JSON_OPTIONS)

    def encode(self, sample: dict) -> bytes:
        """dict with exactly the schema's fields -> zstd(JSON) bytes. Deterministic."""
        return _cctx().compress(self.dumps(sample))

    def encode_block(self, keys: list[str], dumped: list[bytes]) -> bytes:
        """A block kind's record from its records already dumped by ``inner.dumps``: the same
        bytes as ``encode({"keys": keys, "records": records})``, without re-serialising."""
        if self.inner is None:
            raise SchemaError(f"{self.kind} is not a block kind")
        if len(keys) != len(dumped) or not dumped:
            raise SchemaError(f"{self.kind}: {len(keys)} keys for {len(dumped)} records")
        body = {"_v": self.version, "keys": [str(k) for k in keys],
                "records": [orjson.Fragment(d) for d in dumped]}
        return _cctx().compress(orjson.dumps(body, option=_JSON_OPTIONS))

    def from_body(self, body: Any) -> dict:
        """A decoded JSON body -> the sample dict (f32vec fields as float32 numpy arrays)."""
        if not isinstance(body, dict) or body.get("_v") != self.version:
            version = body.get("_v") if isinstance(body, dict) else type(body).__name__
            raise SchemaError(f"{self.kind}: schema version {version} != expected "
                              f"{self.version}")
        try:
            if self.inner is not None:
                return {"keys": body["keys"],
                        "records": [self.inner.from_body(b) for b in body["records"]]}
            return {f.name: _dec_value(f.kind, body[f.name]) for f in self.fields}
        except KeyError as e:
            raise SchemaError(f"{self.kind}: sample lacks field {e}") from e

    def decode(self, blob: bytes) -> dict:
        """zstd(JSON) bytes -> dict (f32vec fields as float32 numpy arrays)."""
        try:
            body = orjson.loads(_dctx_get().decompress(blob))
        except (zstandard.ZstdError, ValueError) as e:
            raise SchemaError(f"{self.kind}: cannot decode sample blob: {e}") from e
        return self.from_body(body)

    def describe(self) -> str:
        lines = [f"{self.kind} (v{self.version}, member *.{self.ext}): {self.doc}"]
        lines += [f"  {f.name:14s} {f.kind:7s} {f.doc}" for f in self.fields]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# blocks: several records in one tar member
# --------------------------------------------------------------------------------------------


def _unpack_block(inner: SampleSchema, block: dict, key: str) -> Iterator[dict]:
    """A block -> its records' samples, each under its own key (the block's key is unused)."""
    for record_key, record in zip(block["keys"], block["records"]):
        if inner.unpack is None:
            yield {**record, "__key__": record_key}
        else:
            yield from inner.unpack(record, record_key)


def _count_block(inner: SampleSchema, block: dict) -> int:
    return sum(inner.count(r) for r in block["records"])


def block_of(inner: SampleSchema, version: int = 1) -> SampleSchema:
    """The block kind of ``inner``: one tar member holds several ``inner`` records (in order,
    each with its own key) and unpacks to their samples. A block is a *grouped* kind
    (``unpack`` set), so readers shuffle, skip and count the samples, never the blocks."""
    return SampleSchema(
        kind=f"{inner.kind}_block", version=version,
        doc=f"consecutive {inner.kind} records of one shard, one zstd frame for all",
        fields=(Field("keys", "strs", "the key of each record (unique in the shard)"),
                Field("records", "records", f"the {inner.kind} records, in shard order")),
        unpack=functools.partial(_unpack_block, inner),
        unpacked_count=functools.partial(_count_block, inner),
        inner=inner,
    )


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in consecutive lists of ``size`` (the last may hold fewer): the records of
    each block, in order."""
    if size < 1:
        raise ValueError(f"block size must be >= 1, got {size}")
    held: list[Any] = []
    for item in items:
        held.append(item)
        if len(held) == size:
            yield held
            held = []
    if held:
        yield held


def blocks(records: Iterable[tuple[str, dict]], size: int) -> Iterator[tuple[str, dict]]:
    """``(key, record)`` pairs -> ``(block key, block)`` pairs of ``size`` records each (the
    last may hold fewer); a block's key is its first record's. For :func:`block_of` kinds."""
    for chunk in chunks(records, size):
        yield chunk[0][0], {"keys": [k for k, _ in chunk], "records": [r for _, r in chunk]}
