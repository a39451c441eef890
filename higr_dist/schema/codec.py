"""Sample codec shared by the Spark writer and the streaming reader.

Design
------
A sample is one tar member ``<key>.<ext>`` whose payload is one zstd-compressed blob (a tar
member costs >= 512 bytes of header, so we never split a sample into several members). The
blob is compact JSON with sorted keys: readable with ``zstd -dc | jq`` when debugging, stable
byte-for-byte (deterministic shards), and versioned. Float vectors (``f32vec``) are stored as
base64 of little-endian float32 bytes: exact, ~4x smaller than decimal text, and fast to decode
into numpy.

Trade-off: JSON costs some CPU against a pure binary layout, but one schema definition drives
both writer and reader (no drift). The JSON is written and read with ``orjson`` (10x faster
than the standard library's encoder, 2.4x its decoder, on these records): at 10M interactions
the ETL writes ~400k records from Python, and the standard encoder was the largest single cost
per record. orjson writes non-finite floats as ``null`` where the standard encoder raised, so
the encoder checks float fields itself: NaN and infinities are refused, as before.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
import zstandard

FieldKind = Literal["int", "float", "str", "ints", "floats", "f32vec"]

#: zstd level for sample blobs (3 = zstd's default: fast, good ratio on small JSON).
ZSTD_LEVEL = 3


class SchemaError(ValueError):
    """A sample does not match its schema (writer side) or a blob cannot be decoded."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: FieldKind
    doc: str


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

    def encode(self, sample: dict) -> bytes:
        """dict with exactly the schema's fields -> zstd(JSON) bytes. Deterministic."""
        names = self._name_set
        if len(sample) != len(names) or not names.issuperset(sample):  # lists only on a mismatch
            missing = [f.name for f in self.fields if f.name not in sample]
            extra = [k for k in sample if k not in names and not k.startswith("__")]
            if missing or extra:
                raise SchemaError(f"{self.kind} v{self.version}: missing {missing}, "
                                  f"unexpected {extra}")
        body = {f.name: _enc_value(f.kind, sample[f.name], f.name) for f in self.fields}
        body["_v"] = self.version
        # compact, sorted keys; 1-D int64/float64 arrays are written as the lists they hold
        # (the same bytes as their .tolist(), without building Python objects per element)
        raw = orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
        return _cctx().compress(raw)

    def decode(self, blob: bytes) -> dict:
        """zstd(JSON) bytes -> dict (f32vec fields as float32 numpy arrays)."""
        try:
            body = orjson.loads(_dctx_get().decompress(blob))
        except (zstandard.ZstdError, ValueError) as e:
            raise SchemaError(f"{self.kind}: cannot decode sample blob: {e}") from e
        if body.get("_v") != self.version:
            raise SchemaError(f"{self.kind}: schema version {body.get('_v')} != expected {self.version}")
        try:
            return {f.name: _dec_value(f.kind, body[f.name]) for f in self.fields}
        except KeyError as e:
            raise SchemaError(f"{self.kind}: sample lacks field {e}") from e

    def describe(self) -> str:
        lines = [f"{self.kind} (v{self.version}, member *.{self.ext}): {self.doc}"]
        lines += [f"  {f.name:14s} {f.kind:7s} {f.doc}" for f in self.fields]
        return "\n".join(lines)
