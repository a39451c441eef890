"""Streaming, resumable WebDataset loader: shards on disk -> typed batches for one rank.

Design
------
One epoch of one rank is a set of independent, deterministic *streams*, one per logical reader
(``num_workers`` DataLoader workers, or one in-process reader when ``num_workers == 0``). Each
stream is a ``webdataset.DataPipeline`` built inside its worker::

    SimpleShardList (order shuffled from (seed, epoch), the same on every rank)
      -> split: shards[slot :: world_size * num_workers], slot = rank * num_workers + worker
      -> tarfile_samples, one shard at a time (raw bytes; errors name the shard)
      -> shuffle buffer seeded from (seed, epoch, rank, worker)
      -> skip the raw samples this stream already delivered (resume), *before* decode
      -> decode (``schema.decode`` of member ``<key>.<kind>.zst``)
      -> batched(batch_size, partial last batch) -> stage collate -> tagged batch

A *grouped* kind (``schema.unpack`` set: one record per user holding all of that user's
training windows, ``higr_dist.schema.slates``) decodes and unpacks right after reading, so
the shuffle buffer, the resume skip and the exactly-once accounting all work on unpacked
samples (windows), and batches mix the windows of many users. Its resume skip therefore
decodes and unpacks the consumed records again (cheap next to collating them).

Every shard belongs to exactly one (rank, worker) slot, so each sample is read exactly once per
epoch across ranks x workers. Batches travel to the main process tagged with their logical
worker, per-worker batch index, raw stream position and sample count; the main process strips
the tag and keeps the per-worker counts. That is the whole resume state: ``state_dict()``
describes exactly the batches yielded so far, and the next iteration makes each worker replay
its deterministic stream and drop its first ``position`` raw samples undecoded.

Order is exact, not just the set: torch's DataLoader hands out batches round-robin over workers
(skipping exhausted ones), so on resume we rotate which physical worker plays which logical
worker, making the first worker asked the one after the last batch yielded. The resumed
sequence is then identical to the uninterrupted one (tests compare them).

Trade-offs
----------
- Resume cost = re-reading (not decoding, not collating) the consumed part of the epoch's raw
  bytes: shard shuffling and the shuffle buffer mix shards, so there is no byte offset to seek
  to. Tar parsing is most of the read cost, so skipping is only moderately faster than reading
  (docs/BENCHMARKS.md, "Figures behind design choices").
- Workers start per ``__iter__`` (per epoch or resume), not persistent: this is what lets the
  per-epoch plan (offsets, skips, epoch seed) reach the workers without a side channel.
- Workers are spawned (``start_method``), not forked from the training process: a rank holds
  threads (gloo, the TensorBoard writer, the progress bar), and a fork taken while one of them
  holds a lock can leave the child waiting on it forever, and the rank with it (seen once in
  a 600-step demo: rank 0 stopped at an epoch boundary, rank 1 timed out in its next
  collective). Not ``forkserver`` either: its workers are children of the server, so when a
  rank is killed they outlive it, holding the launcher's output pipes open (a killed job then
  never exits). A spawned worker watches its parent rank and exits within seconds of its
  death. Cost: each worker imports torch and this package when an epoch (or a resume)
  starts (docs/BENCHMARKS.md, "Engine overhead"); collates drop their memory-mapped tables
  when pickled and reopen them.
- Ranks may get unequal shard counts (and so batch counts); a trainer should count steps, not
  epochs, and simply keep iterating (the next epoch starts where this one ends) so no rank waits
  on a collective the others never enter.
- In ``on_corrupt="skip"`` mode a shard failing the cheap file checks below is skipped whole;
  one the tar reader fails on mid-way keeps the samples read before the damage (each blob is
  zstd with a checksum, so they are sound) and drops the rest: buffering a whole shard to
  validate it first would cost a shard of memory per worker.
- A tar reader takes a file cut at a header boundary, or a damaged header past the first, for
  the end of a valid archive. So before streaming a shard we check its size is whole tar blocks
  ending in the end-of-archive zero blocks and, where the kind's folder has ``shards.json`` (the
  ETL writes it), that size and the sample count match the listing. Payload damage is caught by
  the zstd frame checksum at decode. Without a listing, a damaged mid-archive header still
  ends that shard early and silently.

The collate runs in the workers. Global RNGs (``random``, ``numpy.random``, torch CPU) are
seeded per batch from (seed, epoch, rank, worker, batch index) around the call and restored
afterwards, so a collate that draws from them is reproducible across resume and never perturbs
the caller's RNG. A collate with a ``set_epoch(int)`` method gets the epoch in each worker
before the first batch. Samples reach the collate as ``schema.decode``'s dict plus ``__key__``
(sample key) and ``__url__`` (shard path).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import multiprocessing.context
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from higr_dist.layout import SHARD_LISTING
from higr_dist.schema.codec import SampleSchema, SchemaError

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class LoaderConfig:
    """How a stage streams its samples (the ``data:`` config section)."""

    shards: str = ""
    """Shard folder override; empty = ``<inputs.etl_dir>/<stage.sample_kind>``."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = read in the training process). Each worker
    reads whole shards, so the shard count must be >= world_size x max(1, num_workers)."""
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer (raw, undecoded; for a grouped kind, its
    unpacked windows, decoded: a few KiB each); 0 or 1 = no shuffling."""
    shuffle_shards: bool = True
    """Shuffle the shard order every epoch (from seed and epoch; identical on all ranks)."""
    on_corrupt: Literal["raise", "skip"] = "raise"
    """A corrupt or truncated shard: ``raise`` a ShardError naming it, or ``skip`` it, log a
    warning and count it (``StreamingLoader.corrupt_shards_skipped``). Skipped: the whole shard
    when its size/end check fails, the rest of it when the tar reader fails, only the sample
    when one blob does not decode."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (ignored when num_workers == 0)."""
    start_method: Literal["spawn", "forkserver", "fork"] = "spawn"
    """How worker processes start (module docstring): ``spawn`` (safe; each worker imports
    torch at every epoch start: docs/BENCHMARKS.md, "Engine overhead"), ``forkserver``
    (cheap, but workers outlive a killed rank) or ``fork`` (fastest; can hang a rank that runs
    threads)."""

    def validate(self) -> list[str]:
        """One message per invalid field (collected by ``higr_dist.config``)."""
        problems = []
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            problems.append(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.start_method not in ("forkserver", "spawn", "fork"):
            problems.append(f"start_method must be spawn, forkserver or fork, "
                            f"got {self.start_method!r}")
        if self.prefetch_factor < 1:
            problems.append(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.on_corrupt not in ("raise", "skip"):
            problems.append(f"on_corrupt must be 'raise' or 'skip', got {self.on_corrupt!r}")
        return problems


class ShardError(RuntimeError):
    """A shard is corrupt, truncated or of the wrong kind. The message names the shard path."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


# --------------------------------------------------------------------------------------------
# Reading shards (shared by the loader's workers and iterate_samples)
# --------------------------------------------------------------------------------------------


class _Expected(NamedTuple):
    bytes: int
    samples: int


def _load_listings(shards: list[str]) -> dict[str, _Expected]:
    """``shards.json`` entries (size, sample count) for the given shards, where a listing exists."""
    out: dict[str, _Expected] = {}
    for directory in sorted({str(Path(s).parent) for s in shards}):
        listing = Path(directory) / SHARD_LISTING
        if not listing.is_file():
            continue
        for entry in json.loads(listing.read_text())["shards"]:
            out[str(Path(directory) / entry["name"])] = _Expected(int(entry["bytes"]),
                                                                  int(entry["samples"]))
    return out


def _reason(exn: BaseException) -> str:
    # webdataset appends (stream, url) to exception args; the first arg is the message
    first = exn.args[0] if exn.args else ""
    return f"{type(exn).__name__}: {first}"


Report = Callable[[str, str], None]
"""``report(shard_path, reason)``: record a corrupt shard (skip mode)."""


def _raise_report(path: str, reason: str) -> None:
    raise ShardError(f"corrupt or truncated shard {path}: {reason}", path)


TAR_BLOCK = 512


def _check_shard_file(path: str, want: _Expected | None) -> str | None:
    """Cheap checks before streaming a shard (one stat, one 1 KiB read); the problem or None.

    A tar reader treats a file cut at a header boundary as a short, valid archive, so we check
    what it cannot: the size recorded in shards.json, whole 512-byte blocks, and the two zero
    blocks that end every tar archive.
    """
    size = Path(path).stat().st_size
    if want is not None and size != want.bytes:
        return f"size {size} bytes != {want.bytes} in shards.json (truncated?)"
    if size < 2 * TAR_BLOCK or size % TAR_BLOCK:
        return f"size {size} bytes is not a whole number of tar blocks (truncated?)"
    with open(path, "rb") as fh:
        fh.seek(size - 2 * TAR_BLOCK)
        tail = fh.read(2 * TAR_BLOCK)
    if tail.count(0) != len(tail):
        return "no end-of-archive marker (truncated or not a tar file)"
    return None


def _read_shards(src: Iterable[dict], expected: dict[str, _Expected],
                 report: Report) -> Iterator[dict]:
    """Shard dicts ``{"url"}`` -> raw samples ``{"__key__", "__url__", "<kind>.zst": bytes}``.

    Each shard is streamed by ``webdataset.tarfile_samples`` on its own, so any tar error is
    attributed to the right path and ``report`` decides whether to raise or skip the rest.
    """
    for shard in src:
        url = shard["url"]
        want = expected.get(url)
        problem = _check_shard_file(url, want)
        if problem is not None:
            report(url, problem)
            continue
        n = 0
        try:
            for sample in wds.tarfile_samples([dict(shard)]):
                n += 1
                yield sample
        except Exception as exn:  # every read error becomes a report naming the shard
            report(url, _reason(exn))
            continue
        if want is not None and n != want.samples:
            report(url, f"{n} samples != {want.samples} in shards.json (truncated?)")


def _decode(sample: dict, schema: SampleSchema, report: Report) -> dict | None:
    """Raw sample -> decoded dict (+ ``__key__``, ``__url__``); None when skipped as corrupt."""
    key, url = sample["__key__"], sample["__url__"]
    blob = sample.get(schema.ext)
    if blob is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"shard {url}: sample {key!r} has no member '{key}.{schema.ext}' "
                         f"(has {members}); wrong sample kind for this stage?", url)
    try:
        out = schema.decode(blob)
    except SchemaError as exn:
        report(url, f"sample {key!r}: {exn}")
        return None
    out["__key__"] = key
    out["__url__"] = url
    return out


def iterate_samples(shards: list[str], schema: SampleSchema) -> Iterator[dict]:
    """Decoded samples of ``shards`` in order, one shard at a time, in this process.

    For sequential passes (SID export, evaluation). Memory is one sample; a corrupt or truncated
    shard raises :class:`ShardError` naming it.
    """
    expected = _load_listings(shards)
    raw = _read_shards(({"url": s} for s in shards), expected, _raise_report)
    yield from _decode_unpack(raw, schema, _raise_report)


def _decode_unpack(src: Iterable[dict], schema: SampleSchema, report: Report) -> Iterator[dict]:
    """Raw records -> decoded samples; a grouped kind's records are unpacked (each sample keeps
    its own ``__key__`` and the record's ``__url__``); records skipped as corrupt vanish."""
    for raw in src:
        record = _decode(raw, schema, report)
        if record is None:
            continue
        if schema.unpack is None:
            yield record
            continue
        for sample in schema.unpack(record, record["__key__"]):
            sample["__url__"] = record["__url__"]
            yield sample


# --------------------------------------------------------------------------------------------
# One epoch of one rank: the per-worker pipeline
# --------------------------------------------------------------------------------------------


class _Tagged(NamedTuple):
    """What a worker sends to the main process: a batch (or a report) and its position."""

    worker: int
    """logical worker id"""
    index: int
    """this worker's batch index in the epoch (0-based); -1 for a report-only item"""
    position: int
    """raw samples of this worker's stream consumed through this batch"""
    num_samples: int
    batch: Any
    corrupt: list[tuple[str, str]]
    """(shard path, reason) found by the worker since its previous item (skip mode)"""
    error: tuple[str, str | None] | None = None
    """(message, shard path) of a ShardError, re-raised cleanly by the main process"""


def _seed_of(*parts: object) -> int:
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed the global python/numpy/torch-CPU RNGs; restore the caller's states afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _split(src: Iterable[dict], slot: int, num_slots: int) -> Iterator[dict]:
    """This (rank, worker) slot's shards: every ``num_slots``-th from ``slot``."""
    return itertools.islice(src, slot, None, num_slots)


def _decode_positioned(sample: dict, schema: SampleSchema, report: Report) -> dict | None:
    """:func:`_decode` keeping the raw stream position ``__pos__`` for the batch tag."""
    out = _decode(sample, schema, report)
    if out is not None:
        out["__pos__"] = sample["__pos__"]
    return out


def _skip_consumed(src: Iterable[dict], done: int) -> Iterator[dict]:
    """Drop the first ``done`` raw samples (already delivered); number the rest 1-based."""
    for pos, sample in enumerate(src, start=1):
        if pos > done:
            sample["__pos__"] = pos
            yield sample


@dataclass
class _EpochPlan:
    """Everything a worker needs to rebuild its stream for one epoch (picklable)."""

    shards: list[str]
    expected: dict[str, _Expected]
    schema: SampleSchema
    collate: Callable[[list[dict]], Any]
    batch_size: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int
    """logical workers (max(1, num_workers))"""
    offset: int
    """physical worker i plays logical worker (i + offset) % workers"""
    shuffle_shards: bool
    shuffle_buffer: int
    on_corrupt: str
    positions: list[int]
    """raw samples already consumed, per logical worker"""
    batches: list[int]
    """batches already delivered, per logical worker"""
    streams: list[list[list[int]]] | None = None
    """per logical worker, the streams it reads one after the other, each ``[slot, num_slots,
    shuffle_rank, shuffle_worker, done]``; None: its own slot (the rest of an epoch begun on
    another world size has other ranks' streams, see :func:`reshard_states`)"""


class _WorkerReports:
    """Corrupt shards found in one worker, drained into the next item sent to the main process."""

    def __init__(self, on_corrupt: str):
        self.on_corrupt = on_corrupt
        self.pending: list[tuple[str, str]] = []

    def __call__(self, path: str, reason: str) -> None:
        if self.on_corrupt == "raise":
            _raise_report(path, reason)
        self.pending.append((path, reason))

    def drain(self) -> list[tuple[str, str]]:
        out, self.pending = self.pending, []
        return out


class _Collator:
    """``list[decoded sample]`` -> tagged batch, calling the stage's collate under seeded RNGs."""

    def __init__(self, plan: _EpochPlan, worker: int, reports: _WorkerReports):
        self.plan, self.worker, self.reports = plan, worker, reports
        self.index = plan.batches[worker]

    def __call__(self, samples: list[dict]) -> _Tagged:
        position = samples[-1].pop("__pos__")
        for s in samples[:-1]:
            del s["__pos__"]
        p = self.plan
        with _seeded_rngs(_seed_of("collate", p.seed, p.epoch, p.rank, self.worker, self.index)):
            batch = p.collate(samples)
        tagged = _Tagged(self.worker, self.index, position, len(samples), batch,
                         self.reports.drain())
        self.index += 1
        return tagged


class _EpochStream(IterableDataset):
    """The rest of one epoch for one rank; each DataLoader worker streams its own slot."""

    def __init__(self, plan: _EpochPlan):
        super().__init__()
        self.plan = plan

    def _stream(self, spec: list[int], reports: _WorkerReports) -> Iterator[dict]:
        """One slot's samples of the epoch, shuffled, minus its first ``done``: the shards
        ``slot :: num_slots`` of the epoch's shard order, read one at a time (a grouped kind
        decoded and unpacked, so everything after counts unpacked samples), through a shuffle
        buffer seeded from the slot's own (rank, worker)."""
        p = self.plan
        slot, num_slots, shuffle_rank, shuffle_worker, done = spec
        stages: list[Any] = [
            wds.SimpleShardList(p.shards, seed=f"shards:{p.seed}:{p.epoch}"
                                if p.shuffle_shards else None),
            _Stage(_split, slot=slot, num_slots=num_slots),
            _Stage(_read_shards, expected=p.expected, report=reports)]
        if p.schema.unpack is not None:
            stages.append(_Stage(_decode_unpack, schema=p.schema, report=reports))
        if p.shuffle_buffer > 1:
            stages.append(wds.shuffle(
                p.shuffle_buffer, initial=p.shuffle_buffer,
                seed=f"samples:{p.seed}:{p.epoch}:{shuffle_rank}:{shuffle_worker}"))
        return itertools.islice(wds.DataPipeline(*stages), done, None)

    def _logical_worker(self) -> int:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        return (physical + self.plan.offset) % self.plan.workers

    def __iter__(self) -> Iterator[_Tagged]:
        p = self.plan
        worker = self._logical_worker()
        reports = _WorkerReports(p.on_corrupt)
        if hasattr(p.collate, "set_epoch"):
            p.collate.set_epoch(p.epoch)
        streams = p.streams[worker] if p.streams is not None else \
            [[p.rank * p.workers + worker, p.world_size * p.workers, p.rank, worker, 0]]
        samples: Iterator[dict] = _skip_consumed(
            itertools.chain.from_iterable(self._stream(spec, reports) for spec in streams),
            p.positions[worker])
        if p.schema.unpack is None:  # raw bytes were shuffled and skipped: decode the rest
            samples = (d for x in samples
                       if (d := _decode_positioned(x, p.schema, reports)) is not None)
        batches = wds.batched(p.batch_size, collation_fn=None, partial=True)(samples)
        pipeline = map(_Collator(p, worker, reports), batches)
        try:
            yield from pipeline
        except ShardError as exn:
            # sent as data, so the main process raises a clean ShardError (message, .path)
            # instead of torch's re-wrapped worker traceback
            yield _Tagged(worker, -1, 0, 0, None, reports.drain(), (str(exn), exn.path))
            return
        leftover = reports.drain()
        if leftover:  # corrupt shards found after this worker's last batch
            yield _Tagged(worker, -1, 0, 0, None, leftover)


class _Stage:
    """A picklable pipeline stage ``src -> fn(src, **kw)``."""

    def __init__(self, fn: Callable[..., Iterator[Any]], **kw: Any):
        self.fn, self.kw = fn, kw

    def __call__(self, src: Iterable[Any]) -> Iterator[Any]:
        return self.fn(src, **self.kw)


class _Bound:
    """A picklable per-sample function ``x -> fn(x, **kw)``."""

    def __init__(self, fn: Callable[..., Any], **kw: Any):
        self.fn, self.kw = fn, kw

    def __call__(self, x: Any) -> Any:
        return self.fn(x, **self.kw)


def _identity(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


def _worker_context(method: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context DataLoader workers start from (LoaderConfig.start_method)."""
    if method == "forkserver":
        # imported once in the server, inherited by every worker it forks
        multiprocessing.set_forkserver_preload(["torch", "webdataset", __name__])
    return multiprocessing.get_context(method)


class StreamingLoader:
    """Batches of one rank, epoch after epoch, resumable mid-epoch (see the module docstring).

    ``rank``/``world_size`` are arguments (never read from torch.distributed), so one process
    can play several ranks in tests. Iterating yields the rest of the current epoch, then the
    epoch advances; breaking out keeps the position, and the next iteration continues after
    the last batch yielded.
    """

    def __init__(self, shards: list[str], schema: SampleSchema,
                 collate: Callable[[list[dict]], Any], batch_size: int, cfg: LoaderConfig,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        problems = cfg.validate()
        if batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            problems.append(f"rank {rank} not in [0, world_size={world_size})")
        if problems:
            raise ValueError("invalid loader settings: " + "; ".join(problems))
        self.shards = [str(s) for s in shards]
        self.schema, self.collate, self.batch_size, self.cfg = schema, collate, batch_size, cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.workers = max(1, cfg.num_workers)
        readers = world_size * self.workers
        if len(self.shards) < readers:
            raise ValueError(
                f"{len(self.shards)} shard(s) cannot feed {world_size} rank(s) x {self.workers} "
                f"worker(s) = {readers} readers: every reader streams whole shards and a worker "
                f"with no shard fails. Write more shards (ETL) or lower data.num_workers.")
        self._expected = _load_listings(self.shards)
        self._corrupt: set[str] = set()
        self._generation = 0
        self._start_epoch(0)

    # -- position ---------------------------------------------------------------------------

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._positions = [0] * self.workers
        self._batches = [0] * self.workers
        self._samples = 0
        self._last_worker = -1
        self._streams: list[list[list[int]]] | None = None  # None: this world's own slots

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def samples_consumed(self) -> int:
        """Samples in the batches yielded so far in the current epoch (this rank)."""
        return self._samples

    @property
    def corrupt_shards_skipped(self) -> int:
        """Distinct shards this rank found corrupt and skipped (all workers, all epochs)."""
        return len(self._corrupt)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (invalidates a running iteration)."""
        self._generation += 1
        self._start_epoch(int(epoch))

    # -- iteration --------------------------------------------------------------------------

    def _plan(self) -> _EpochPlan:
        offset = (self._last_worker + 1) % self.workers if self._last_worker >= 0 else 0
        return _EpochPlan(
            shards=self.shards, expected=self._expected, schema=self.schema,
            collate=self.collate, batch_size=self.batch_size, seed=self.seed, epoch=self._epoch,
            rank=self.rank, world_size=self.world_size, workers=self.workers, offset=offset,
            shuffle_shards=self.cfg.shuffle_shards, shuffle_buffer=self.cfg.shuffle_buffer,
            on_corrupt=self.cfg.on_corrupt, positions=list(self._positions),
            batches=list(self._batches), streams=self._streams)

    def _source(self, stream: _EpochStream) -> Iterator[_Tagged]:
        if self.cfg.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, collate_fn=_identity,
                               num_workers=self.cfg.num_workers,
                               prefetch_factor=self.cfg.prefetch_factor,
                               multiprocessing_context=_worker_context(self.cfg.start_method)))

    def _record_corrupt(self, found: list[tuple[str, str]]) -> None:
        for path, reason in found:
            if path not in self._corrupt:
                self._corrupt.add(path)
                log.warning("skipping corrupt shard %s (rank %d): %s", path, self.rank, reason)

    def _accept(self, item: _Tagged) -> None:
        """Advance the position past ``item`` (a batch about to be yielded)."""
        if item.index != self._batches[item.worker]:
            raise RuntimeError(f"loader out of sync: worker {item.worker} sent batch {item.index}, "
                               f"expected {self._batches[item.worker]}")
        self._batches[item.worker] += 1
        self._positions[item.worker] = item.position
        self._samples += item.num_samples
        self._last_worker = item.worker

    def __iter__(self) -> Iterator[Any]:
        self._generation += 1
        generation = self._generation
        source = self._source(_EpochStream(self._plan()))
        try:
            for item in source:
                if generation != self._generation:
                    raise RuntimeError("StreamingLoader was re-iterated, re-positioned or "
                                       "re-loaded while this iteration was running")
                self._record_corrupt(item.corrupt)
                if item.error is not None:
                    raise ShardError(*item.error)
                if item.index < 0:
                    continue
                self._accept(item)
                yield item.batch
            if generation == self._generation:
                self._start_epoch(self._epoch + 1)
        finally:
            # stop the workers now (early break, error), not whenever the iterator is collected:
            # a lingering iterator would be inherited by the next epoch's forked workers
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # -- state ------------------------------------------------------------------------------

    def _stream_id(self) -> dict:
        """What fixes the sample streams; a mid-epoch state only applies to an equal one."""
        names = hashlib.sha256("\n".join(Path(s).name for s in self.shards).encode()).hexdigest()
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "workers": self.workers, "batch_size": self.batch_size,
                "shuffle_buffer": self.cfg.shuffle_buffer,
                "shuffle_shards": self.cfg.shuffle_shards, "shards": names[:16]}

    def state_dict(self) -> dict:
        """The position after the last batch yielded (JSON-able)."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "samples_consumed": self._samples,
                "batches": list(self._batches), "positions": list(self._positions),
                "last_worker": self._last_worker, "corrupt_shards": sorted(self._corrupt),
                "streams": self._streams, "stream": self._stream_id()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch described by ``state`` on the next iteration.

        A state taken at an epoch boundary (no batch yielded yet) loads into any configuration;
        a mid-epoch state needs the same shards, seed, rank, world size, workers, batch size and
        shuffle settings, and raises ValueError listing every difference otherwise (a state of
        another world size is first rewritten for this rank by :func:`reshard_states`).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        self._generation += 1
        self._corrupt = set(state["corrupt_shards"])
        self._start_epoch(int(state["epoch"]))
        streams = state.get("streams")
        if not any(state["batches"]) and streams is None:
            return
        mine = self._stream_id()
        if streams is not None:  # positions count samples: any batch size continues them
            mine.pop("batch_size")
        diffs = [f"{k}: saved {state['stream'].get(k)!r}, now {v!r}" for k, v in mine.items()
                 if state["stream"].get(k) != v]
        if diffs:
            raise ValueError("cannot resume mid-epoch with a different data stream: "
                             + "; ".join(diffs))
        if streams is not None and len(streams) != self.workers:
            raise ValueError(f"loader state has streams for {len(streams)} workers, this "
                             f"loader has {self.workers}")
        self._streams = streams
        self._positions = [int(x) for x in state["positions"]]
        self._batches = [int(x) for x in state["batches"]]
        self._samples = int(state["samples_consumed"])
        self._last_worker = int(state["last_worker"])


def reshard_states(states: list[dict], finished: list[bool], rank: int, world_size: int,
                   workers: int) -> dict:
    """The loader state for ``rank`` of a world of ``world_size`` x ``workers`` readers that
    continues the epoch the loaders of ``states`` (one per old rank, ``finished``: that rank
    had delivered its whole share) were in.

    Exactly once across the change: each old reader's stream is a deterministic sequence
    (its shards, its shuffle seed) of which the state says how many samples were delivered;
    its rest is handed whole to one new reader, old readers dealt round-robin over the new
    ones, and a new reader with several reads them one after the other. Order within the
    epoch therefore differs from an uninterrupted run on either world size; the set of
    samples of the epoch is the same, each once. The next epoch is this world's own.
    Limitation: a state that is itself the rest of a resharded epoch, with a reader part-way
    through its second stream, cannot be resharded again (the lengths of the streams it
    already finished are not recorded): ValueError.
    """
    if not states:
        raise ValueError("no loader state to reshard")
    epochs = {int(s["epoch"]) - int(f and not any(s["batches"])) for s, f in zip(states, finished)}
    if len(epochs) != 1:
        raise ValueError(f"the saved loader states are in different epochs: {sorted(epochs)}")
    epoch = epochs.pop()
    stream = states[0]["stream"]
    rest: list[list[int]] = []
    for old_rank, (state, done) in enumerate(zip(states, finished)):
        if done:
            continue
        old = state["stream"]
        n_old = int(old["workers"])
        specs = state.get("streams") or [
            [[old_rank * n_old + w, int(old["world_size"]) * n_old, old_rank, w, 0]]
            for w in range(n_old)]
        for w, chain in enumerate(specs):
            position = int(state["positions"][w])
            if position and len(chain) > 1:
                raise ValueError(
                    f"old rank {old_rank} is part-way through the rest of an epoch that was "
                    "itself resharded: resume on the world size that wrote the checkpoint "
                    "until the epoch ends")
            rest += [[*spec[:4], int(spec[4]) + position] for spec in chain]
    readers = world_size * workers
    streams = [[spec for i, spec in enumerate(rest) if i % readers == rank * workers + w]
               for w in range(workers)]
    corrupt = sorted(set().union(*(s["corrupt_shards"] for s in states)))
    return {"version": STATE_VERSION, "epoch": epoch, "samples_consumed": 0,
            "batches": [0] * workers, "positions": [0] * workers, "last_worker": -1,
            "corrupt_shards": corrupt, "streams": streams,
            "stream": {**stream, "rank": rank, "world_size": world_size, "workers": workers}}
