"""Writing and listing WebDataset shards: atomic, deterministic, checksummed.

Used by the Spark executors (``foreachPartition``/``mapPartitionsWithIndex``) and by tests that
need small shard sets. A shard is a plain ``.tar`` written with ``webdataset.TarWriter`` (members
``<key>.<kind>.zst``, one zstd blob per sample, see ``higr_dist.schema.codec``).

Atomicity: the tar is written to ``<dir>/_tmp/<name>.<token>`` and ``os.replace``-d into place only
after it is complete and fsynced, so a failed or killed task never leaves a partial shard under
its final name; a retried task simply overwrites. Determinism: fixed mtime, user and group, and
the caller's sample order, so equal input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from higr_dist.layout import SHARD_LISTING
from higr_dist.schema.codec import SampleSchema

SHARD_PATTERN = "shard-{:06d}.tar"
TMP_DIR = "_tmp"


def write_shard(path: str | Path, schema: SampleSchema, samples: Iterable[tuple[str, dict]]) -> dict:
    """Write ``(key, sample)`` pairs to the tar at ``path`` atomically.

    Returns ``{"name", "samples", "bytes", "sha256"}`` for the manifest (``samples`` = tar
    records), plus ``"unpacked"`` (the samples they unpack to) for a grouped kind. Keys must be
    unique within the shard and contain no '.' (WebDataset splits member names at the first
    dot).
    """
    return write_encoded(path, schema, ((key, schema.encode(sample), schema.count(sample))
                                        for key, sample in samples))


def write_encoded(path: str | Path, schema: SampleSchema,
                  records: Iterable[tuple[str, bytes, int]]) -> dict:
    """:func:`write_shard` for records already encoded: ``(key, schema.encode(sample),
    schema.count(sample))``. For writers that must hold a shard's records before writing
    them (to re-order them): an encoded record is several times smaller than its dict
    (docs/BENCHMARKS.md, "Figures behind design choices")."""
    path = Path(path)
    tmp_dir = path.parent / TMP_DIR
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.name}.{uuid.uuid4().hex}"
    n = unpacked = 0
    try:
        with open(tmp, "wb") as fh:
            buf = io.BufferedWriter(fh, buffer_size=1 << 20)
            writer = wds.TarWriter(buf, user="higr", group="higr", mode=0o444, mtime=0,
                                   encoder=False)
            for key, blob, count in records:
                if "." in key:
                    raise ValueError(f"sample key {key!r} contains '.'")
                writer.write({"__key__": key, schema.ext: blob})
                n += 1
                unpacked += count
            writer.close()
            buf.flush()
            fh.flush()
            os.fsync(fh.fileno())
        digest = hashlib.sha256()
        with open(tmp, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {"name": path.name, "samples": n, "bytes": size, "sha256": digest.hexdigest()}
    if schema.unpack is not None:
        meta["unpacked"] = unpacked
    return meta


def list_shards(directory: str | Path) -> list[str]:
    """Sorted ``*.tar`` shard paths of one kind's directory (the manifest order when present)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"shard directory not found: {d}")
    listing = d / SHARD_LISTING
    if listing.is_file():
        names = [s["name"] for s in json.loads(listing.read_text())["shards"]]
        return [str(d / n) for n in names]
    shards = sorted(str(p) for p in d.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {d}")
    return shards


def write_listing(directory: str | Path, shards: list[dict]) -> Path:
    """Write ``shards.json`` (name, samples, bytes, sha256 per shard; ``unpacked`` too for a
    grouped kind) next to a kind's shards, with the totals."""
    d = Path(directory)
    shards = sorted(shards, key=lambda s: s["name"])
    listing = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    if any("unpacked" in s for s in shards):
        listing["unpacked"] = sum(s["unpacked"] for s in shards)
    path = d / SHARD_LISTING
    path.write_text(json.dumps(listing, indent=1, sort_keys=True))
    return path
