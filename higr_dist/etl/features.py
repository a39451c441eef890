"""Item feature vectors ``x`` and positive pairs: Spark for the data flow, numpy for the maths.

Design
------
``x = [content (L2-normed, content_dim) | collaborative (L2-normed, collab_dim)]``.

Both parts are *signed random projections of sparse count vectors* (the hashing trick and a
fixed random projection in one step): feature ``f`` with count ``w`` contributes ``w * r_f``,
where ``r_f in {-1, +1}^d`` are the bits of ``h_f = xxhash64(seed, part, f)`` (dimensions
0..63) and of ``splitmix64(h_f + k * golden)`` for the k-th further block of 64 dimensions. This
is an Achlioptas/JL projection: inner products of the sparse vectors are preserved in
expectation and no projection matrix is stored anywhere. The sums are integer sums (exact in
float64 below 2^53), so ``x`` is bit-identical whatever the partitioning or summation order.

Work split: Spark builds one row per (item, part, feature) with its 64-bit hash and count
(``_feature_rows``: category ids, caption n-grams), shuffles them by item and sorts them;
:class:`ProjectTask` (``mapInArrow``) then sums them per (item, part) as one sparse
(groups x distinct hashes) matrix times the signs of each distinct hash (:func:`signed_sums`,
scipy's sparse kernel): the signs are drawn once per distinct feature, not per row, and the
~d multiply-adds per row run in compiled code instead of the ~d aggregate expressions per
row a pure-SQL projection costs. Trade-off: one Python pass over the feature rows
(vectorised per Arrow batch, never per row). (Drawing the signs per row with
``np.add.reduceat`` cost several times more CPU in the 10M-row ETL's co-occurrence merge,
where ~16M (a, b) rows share ~20k partners b; the sparse product gives bit-identical sums:
docs/BENCHMARKS.md, "Figures behind design choices".)

The collaborative part and the pairs come from one pass over the co-occurrence
(:func:`collab`): each Arrow batch of user sequences gives its distinct (a, b, count) partial
counts, travelling as *one row per item a* whose partners and counts are packed into two
binary columns (:data:`COOC_SCHEMA`). Those rows are shuffled by ``a`` and sorted by ``a``,
and :class:`CollabTask` merges an item's packed runs, sums each (a, b), projects item a's row
and picks its top partners in the same numpy pass. The hash of ``b`` is Spark's ``xxhash64``
recomputed in numpy (:func:`xxhash64_long`, checked against Spark in the tests), so it does
not ride the shuffle.

Trade-off of the packing: at 10M interactions there are ~32M partial (a, b) rows. As rows of
longs, moving them through the shuffle, the sort and both Arrow crossings was a large share of
the ETL, much of it in the per-value JVM <-> Arrow conversion alone
(``bench/spark_floor.py``-style probes; docs/BENCHMARKS.md, "Figures behind design choices");
packed, ~0.3M rows of byte buffers move instead (memory copies) and the per-pair work is
numpy's. The price is that an item's partial runs are decoded and re-sorted in Python, and that
a packed row holds one item's partners of one batch (bounded by the catalogue size).

Why Spark does not aggregate the pairs: at 10M interactions the ~32M partial rows hold ~16M
distinct (a, b); Spark aggregating them, persisting them, shuffling them again as feature rows
and sorting them a third time for the top-P window was a large share of the ETL
(docs/BENCHMARKS.md, "Figures behind design choices"), and the hash aggregate's memory ran short
in a 2 GiB heap. The output is one row per item with co-occurrence plus ``pairs_per_item`` pair
rows per item: small.

- content: an item's category ids (``c:<id>``, the primary one counted
  ``primary_category_weight`` times) and the character n-grams of its caption (``g<n>:<text>``,
  lower-cased, whitespace collapsed; characters, so Chinese captions work). The category block
  and the caption block are L2-normalised separately, the caption block weighted by
  ``caption_weight``, summed and normalised again.
- collaborative: co-occurrence of items within ``cooc_window`` positions in a user's *training*
  region (val/test blocks excluded, so nothing about held-out targets leaks into the tokenizer),
  negative-feedback interactions left out. The projection of an item's co-occurrence row is
  ``sum_j count_ij * r_j``. Items without co-occurrence get zeros.
- co-occurrence counts (:class:`CoocTask`): per Arrow batch of user sequences, the pairs at
  distance 1..W are formed with vectorised numpy and pre-aggregated (``np.unique`` on packed
  keys), so the shuffle carries distinct (a, b) counts, not every pair occurrence.
- pairs: the top ``pairs_per_item`` partners per item by count (ties: smaller item_idx), and
  ``(i, i, weight 0)`` for an item without partner, so every item is an anchor at least once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from higr_dist.etl.config import EtlConfig

_CONTENT, _CAPTION, _COLLAB = 0, 1, 2  # hash streams of the three projections
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: item_idx must fit 31 bits: partners travel as int32, and a pair packs into one int64 key
_MAX_ITEMS = 1 << 31
#: distinct feature hashes signed at once (bounds the [hashes, dim] float64 signs: 8 MiB)
_CHUNK = 8192

#: one row per (item a, sequence batch): ``b`` = its partners (little-endian int32, ascending),
#: ``w`` = their counts in that batch (little-endian int64), both ``m`` values long
COOC_SCHEMA = "a long, b binary, w binary"
#: :class:`CollabTask` output: a vector row (``x`` set, ``positive`` null) per item with
#: co-occurrence, and pair rows (``positive``, ``weight``, ``rank`` set, ``x`` null)
COLLAB_SCHEMA = "item_idx long, x binary, positive long, weight double, rank int"
#: ``x`` travels as little-endian float32 bytes: one buffer per row through joins and Arrow,
#: where an array<float> costs an element-wise copy at every JVM <-> Arrow crossing
VECTOR_SCHEMA = "item_idx long, x binary"


# --------------------------------------------------------------------------------------------
# numpy kernels
# --------------------------------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_P1, _P2, _P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P4, _P5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
_M64 = (1 << 64) - 1
#: Spark's xxhash64 seed (``XxHash64``'s default)
_SPARK_XXHASH_SEED = 42


def _xxhash64_int(value: int, seed: int) -> int:
    """Spark's ``XXH64.hashInt`` (a 4-byte input), on Python ints (unsigned 64-bit)."""
    h = (seed + _P5 + 4) & _M64
    h ^= ((value & 0xFFFFFFFF) * _P1) & _M64
    h = ((((h << 23) | (h >> 41)) & _M64) * _P2 + _P3) & _M64  # rotl 23
    h = ((h ^ (h >> 33)) * _P2) & _M64  # fmix
    h = ((h ^ (h >> 29)) * _P3) & _M64
    return h ^ (h >> 32)


def _lit_hash(value: int, seed: int) -> int:
    """Fold a Python int literal into the running hash the way ``F.lit`` types it: int32 ->
    ``hashInt``, else ``hashLong`` (:func:`xxhash64_long`)."""
    if -(1 << 31) <= value < (1 << 31):
        return _xxhash64_int(value, seed)
    return int(xxhash64_long(np.array([value], dtype=np.int64), seed).view(np.uint64)[0])


def xxhash64_long(values: np.ndarray, seed: int) -> np.ndarray:
    """Spark's xxhash64 of a long column given the running hash ``seed`` of the columns before
    it: ``[n]`` int64 -> ``[n]`` int64, bit-identical to ``F.xxhash64(..., col)``."""
    v = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        x = v * np.uint64(_P2)
        x = (x << np.uint64(31)) | (x >> np.uint64(33))
        h = np.uint64((seed + _P5 + 8) & _M64) ^ (x * np.uint64(_P1))
        h = ((h << np.uint64(27)) | (h >> np.uint64(37))) * np.uint64(_P1) + np.uint64(_P4)
        h = (h ^ (h >> np.uint64(33))) * np.uint64(_P2)
        h = (h ^ (h >> np.uint64(29))) * np.uint64(_P3)
        h ^= h >> np.uint64(32)
    return h.view(np.int64)


def part_seed(seed: int, part: int) -> int:
    """The running hash after ``F.xxhash64(F.lit(seed), F.lit(part), ...)``'s first two
    columns (:func:`_hashed`), to finish with :func:`xxhash64_long`."""
    return _lit_hash(part, _lit_hash(seed, _SPARK_XXHASH_SEED))


def sign_matrix(h: np.ndarray, dim: int) -> np.ndarray:
    """64-bit hashes ``[n]`` -> random signs ``[n, dim]`` (int8, -1/+1), a pure function of h."""
    h = np.ascontiguousarray(h).view(np.uint64) if h.dtype == np.int64 else h.astype(np.uint64)
    blocks = (dim + 63) // 64
    with np.errstate(over="ignore"):
        words = np.stack([h if k == 0 else _mix64(h + np.uint64(k) * _GOLDEN)
                          for k in range(blocks)], axis=1)  # [n, blocks]
    raw = np.ascontiguousarray(words.astype("<u8")).view(np.uint8)  # [n, blocks * 8]
    bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :dim]  # [n, dim] in {0, 1}
    return bits.astype(np.int8) * 2 - 1


def _normalise(v: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Rows of ``v`` [G, d] scaled to norm ``scale``; zero rows stay zero."""
    norm = np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]  # [G, 1]
    return np.divide(v * scale, norm, out=np.zeros_like(v), where=norm > 0)


def signed_sums(group: np.ndarray, groups: int, h: np.ndarray, w: np.ndarray,
                dim: int) -> np.ndarray:
    """``sums[g] = sum of w[r] * sign_matrix(h[r]) over the rows r of group g``: [groups, dim].

    A sparse (groups x distinct hashes) count matrix times the signs of each *distinct* hash,
    so the signs are drawn once per feature, not once per row: the co-occurrence rows of a
    10M-interaction log hold ~16M (a, b) pairs but only the catalogue's ~20k partners b. The
    product runs in scipy's sparse kernel; its float64 sums of integers stay exact (below
    2^53), so the result equals the int64 sum, whatever the order. ``_CHUNK`` distinct hashes
    are signed at a time (bounds the [hashes, dim] sign block: caption n-grams are many).
    """
    import scipy.sparse as sp

    uniq, col = np.unique(h, return_inverse=True)  # [H] distinct hashes, [n] column of a row
    counts = sp.csc_matrix((np.asarray(w, dtype=np.float64), (group, col.ravel())),
                           shape=(groups, len(uniq)))  # [groups, H], duplicates summed
    return _times_signs(counts, uniq, dim)


def _times_signs(counts, h: np.ndarray, dim: int) -> np.ndarray:
    """A sparse [G, H] count matrix times the signs of its H column hashes ``h``: [G, dim]
    float64, exact for integer counts. ``_CHUNK`` columns are signed at a time."""
    counts = counts.tocsc()  # column slices are cheap (no copy when already CSC)
    sums = np.zeros((counts.shape[0], dim))
    for lo in range(0, len(h), _CHUNK):
        hi = min(lo + _CHUNK, len(h))
        sums += counts[:, lo:hi] @ sign_matrix(h[lo:hi], dim).astype(np.float64)
    return sums


def project(item: np.ndarray, part: np.ndarray, h: np.ndarray, w: np.ndarray, content_dim: int,
            collab_dim: int, caption_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows sorted by (item, part) -> (items [U], x [U, content_dim + collab_dim]).

    Every item's rows must be present (callers never split an item between calls).
    """
    dim = max(content_dim, collab_dim)
    new = np.ones(len(item), dtype=bool)
    new[1:] = (item[1:] != item[:-1]) | (part[1:] != part[:-1])
    starts = np.flatnonzero(new)  # [G] first row of each (item, part) group
    group = np.cumsum(new) - 1  # [n] group of each row
    sums = signed_sums(group, len(starts), h, w, dim)  # [G, dim]
    g_item, g_part = item[starts], part[starts]
    items = np.unique(g_item)  # [U]
    row = np.searchsorted(items, g_item)  # [G] item row of each group
    content = np.zeros((len(items), content_dim))
    collab = np.zeros((len(items), collab_dim))
    for p, out, d, scale in ((_CONTENT, content, content_dim, 1.0),
                             (_CAPTION, content, content_dim, caption_weight),
                             (_COLLAB, collab, collab_dim, 1.0)):
        sel = g_part == p
        out[row[sel]] += _normalise(sums[sel, :d], scale)  # one group per (item, part)
    x = np.concatenate([_normalise(content), collab], axis=1).astype(np.float32)
    return items, x  # [U], [U, content_dim + collab_dim]


def cooc_counts(offsets: np.ndarray, items: np.ndarray, fb: np.ndarray, holdout: int,
                min_user: int, negative_threshold: float, window: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """User sequences (list-column offsets/values) -> distinct (a, b, count), both directions.

    Only each user's training region (all but the last ``2 * holdout``) of users with at least
    ``min_user`` interactions counts, negative-feedback interactions removed first; a and b
    co-occur when at most ``window`` positions apart in what remains.
    """
    n = np.diff(offsets)  # [users]
    user = np.repeat(np.arange(len(n)), n)  # [rows]
    pos = np.arange(len(items)) - np.repeat(offsets[:-1], n)
    keep = ((pos < np.repeat(n - 2 * holdout, n)) & np.repeat(n >= min_user, n)
            & (fb >= negative_threshold))
    s, u = items[keep].astype(np.uint64), user[keep]
    keys = []
    for d in range(1, window + 1):
        same = (u[:-d] == u[d:]) & (s[:-d] != s[d:])
        a, b = s[:-d][same], s[d:][same]
        keys += [(a << np.uint64(32)) | b, (b << np.uint64(32)) | a]
    if not keys:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    uniq, count = np.unique(np.concatenate(keys), return_counts=True)
    return ((uniq >> np.uint64(32)).astype(np.int64),
            (uniq & np.uint64(0xFFFFFFFF)).astype(np.int64), count.astype(np.int64))


# --------------------------------------------------------------------------------------------
# mapInArrow tasks
# --------------------------------------------------------------------------------------------


def _values(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(batch.schema.get_field_index(name)).to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class CoocTask:
    """``mapInArrow``: sequence rows (``items``, ``fb``) -> each batch's distinct (a, b) counts,
    one packed row per item a (:func:`pack_partners`, :data:`COOC_SCHEMA`)."""

    holdout: int
    """val/test block size (excluded at the end of each sequence)"""
    min_user: int
    """fewest interactions of a user that has samples"""
    negative_threshold: float
    """feedback below this is left out"""
    window: int
    """co-occurrence distance"""

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            items = batch.column(batch.schema.get_field_index("items"))
            fb = batch.column(batch.schema.get_field_index("fb"))
            a, b, w = cooc_counts(items.offsets.to_numpy(), items.values.to_numpy(),
                                  fb.values.to_numpy(), self.holdout, self.min_user,
                                  self.negative_threshold, self.window)
            yield pack_partners(a, b, w)


@dataclass(frozen=True)
class ProjectTask:
    """``mapInArrow``: feature rows sorted by (item_idx, part) -> (item_idx, x) per item.

    An item's rows may straddle two Arrow batches: the rows of a batch's last item are held
    back and prepended to the next batch, so :func:`project` always sees whole items.
    """

    content_dim: int
    """content part size"""
    collab_dim: int
    """collaborative part size"""
    caption_weight: float
    """weight of the caption block against the category block"""

    def _emit(self, cols: list[np.ndarray]) -> pa.RecordBatch:
        items, x = project(*cols, self.content_dim, self.collab_dim, self.caption_weight)
        return pa.RecordBatch.from_arrays([pa.array(items, pa.int64()), _binary_rows(x)],
                                          names=["item_idx", "x"])

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        names = ("item_idx", "part", "h", "w")
        for cols in _whole_keys([_values(b, c) for c in names] for b in batches):
            yield self._emit(cols)


def _binary_runs(values: np.ndarray, starts: np.ndarray) -> pa.BinaryArray:
    """Runs ``values[starts[i]:starts[i + 1]]`` (the last to the end) as one binary value each:
    the values' little-endian bytes, zero-copy offsets into one buffer."""
    data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))  # no copy if so
    ends = np.append(starts, len(values)) * data.itemsize
    if ends[-1] >= 1 << 31:
        raise ValueError(f"a packed partner batch of {ends[-1]} bytes needs 64-bit offsets")
    offsets = pa.py_buffer(np.ascontiguousarray(ends, dtype="<i4"))
    return pa.BinaryArray.from_buffers(pa.binary(), len(starts),
                                       [None, offsets, pa.py_buffer(data)])


def pack_partners(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> pa.RecordBatch:
    """Distinct (a, b, count) rows sorted by (a, b) -> one :data:`COOC_SCHEMA` row per a."""
    new = np.ones(len(a), dtype=bool)
    new[1:] = a[1:] != a[:-1]
    starts = np.flatnonzero(new)  # [A] first row of each item a
    return pa.RecordBatch.from_arrays(
        [pa.array(a[starts], pa.int64()), _binary_runs(b.astype("<i4"), starts),
         _binary_runs(w.astype("<i8"), starts)], names=["a", "b", "w"])


def unpack_partners(batch: pa.RecordBatch) -> list[np.ndarray]:
    """:data:`COOC_SCHEMA` rows -> (a, b, w) per pair ``[m]`` each, in row order."""
    cols = []
    for name, dtype in (("b", "<i4"), ("w", "<i8")):
        col = batch.column(batch.schema.get_field_index(name))
        offsets = np.frombuffer(col.buffers()[1], "<i4")[col.offset:col.offset + len(col) + 1]
        values = np.frombuffer(col.buffers()[2], dtype)
        size = np.dtype(dtype).itemsize
        cols.append((values[offsets[0] // size:offsets[-1] // size], np.diff(offsets) // size))
    (b, n), (w, _) = cols
    a = np.repeat(_values(batch, "a"), n)
    return [a, b.astype(np.int64), w.astype(np.int64)]


def _binary_rows(x: np.ndarray) -> pa.BinaryArray:
    """[U, d] floats -> U binary values of little-endian float32 bytes."""
    row_bytes = 4 * x.shape[1]
    offsets = pa.array(np.arange(len(x) + 1, dtype=np.int32) * row_bytes, pa.int32())
    data = pa.py_buffer(np.ascontiguousarray(x.astype("<f4")).tobytes())
    return pa.BinaryArray.from_buffers(pa.binary(), len(x), [None, offsets.buffers()[1], data])


def _whole_keys(chunks: Iterable[list[np.ndarray]]) -> Iterator[list[np.ndarray]]:
    """Column chunks sorted by their first column, re-cut so that no key straddles two chunks:
    the rows of a chunk's last key are held back and prepended to the next one."""
    held: list[np.ndarray] | None = None
    for cols in chunks:
        if held is not None:
            cols = [np.concatenate([x, y]) for x, y in zip(held, cols)]
        if len(cols[0]) == 0:
            continue
        cut = int(np.searchsorted(cols[0], cols[0][-1], side="left"))
        held = [c[cut:] for c in cols]
        if cut:
            yield [c[:cut] for c in cols]
    if held is not None and len(held[0]):
        yield held


@dataclass(frozen=True)
class CollabTask:
    """``mapInArrow``: packed partial co-occurrence rows (:data:`COOC_SCHEMA`) sorted by a,
    every row of an ``a`` in one partition -> per a: its collaborative vector and its top
    partners.

    ``h_b = xxhash64(seed, collab part, b)``, the hash Spark gives every other feature
    (:func:`xxhash64_long` from ``hash_seed`` = :func:`part_seed`). The vector is the
    L2-normalised ``sum_b count_ab * r(h_b)`` (:func:`project`, so bit-identical to projecting
    the aggregated counts); the partners are the ``pairs_per_item`` largest counts, ties to the
    smaller b, ranks from 1.
    """

    collab_dim: int
    """collaborative part size"""
    pairs_per_item: int
    """partners kept per item"""
    hash_seed: int
    """running xxhash64 state before ``b`` (:func:`part_seed` of the ETL seed, collab part)"""

    def _emit(self, a: np.ndarray, b: np.ndarray, w: np.ndarray) -> pa.RecordBatch:
        """Partial (a, b, count) rows, sorted by a (b in any order) -> the rows of those a."""
        import scipy.sparse as sp

        new = np.ones(len(a), dtype=bool)
        new[1:] = a[1:] != a[:-1]
        items = a[new]  # [U] the distinct a, ascending
        partners, col = _small_unique(b)  # [P] distinct b, [m] column of each row
        # [U, P] total count of each (a, b): duplicates summed, columns sorted within a row
        counts = sp.csr_matrix((w.astype(np.float64), (np.cumsum(new) - 1, col)),
                               shape=(len(items), len(partners)))
        counts.sum_duplicates()
        H = xxhash64_long(partners, self.hash_seed)  # [P] the hash of each partner
        x = _normalise(_times_signs(counts, H, self.collab_dim)).astype(np.float32)  # [U, d]
        # top partners: by count desc, then b asc, inside each a
        per_a = np.diff(counts.indptr)  # [U] partners of each a
        A = np.repeat(items, per_a)  # [G] (a, b) pairs in (a, b) order
        B, W = partners[counts.indices], counts.data.astype(np.int64)
        order = _by_group_then_desc(np.repeat(np.arange(len(items)), per_a), W)
        first = np.repeat(counts.indptr[:-1], per_a)[order]  # [G] first pair of the same a
        rank = np.arange(len(order)) - first + 1
        top = order[rank <= self.pairs_per_item]
        rank = rank[rank <= self.pairs_per_item]
        n_vec, n_pair = len(items), len(top)
        vec_row = np.arange(n_vec + n_pair) < n_vec  # vector rows first: their pair fields null
        return pa.RecordBatch.from_arrays([
            pa.array(np.concatenate([items, A[top]]), pa.int64()),
            pa.concat_arrays([_binary_rows(x), pa.nulls(n_pair, pa.binary())]),  # x: [U, dim]
            pa.array(np.concatenate([np.zeros(n_vec, np.int64), B[top]]), pa.int64(),
                     mask=vec_row),
            pa.array(np.concatenate([np.zeros(n_vec), W[top].astype(np.float64)]),
                     pa.float64(), mask=vec_row),
            pa.array(np.concatenate([np.zeros(n_vec, np.int32), rank.astype(np.int32)]),
                     pa.int32(), mask=vec_row),
        ], names=["item_idx", "x", "positive", "weight", "rank"])

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        # an item's runs come from several sequence batches: the sparse matrix sums them
        for a, b, w in _whole_keys(unpack_partners(batch) for batch in batches):
            yield self._emit(a, b, w)


def _small_unique(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(v, return_inverse=True)`` for non-negative ints (item_idx): a presence map
    over ``[0, max]`` instead of a sort when that range is no bigger than a few times ``v``."""
    top = int(v.max(initial=-1))
    if top >= 4 * len(v) + (1 << 16):
        uniq, inverse = np.unique(v, return_inverse=True)
        return uniq, inverse.ravel()
    present = np.zeros(top + 1, dtype=bool)
    present[v] = True
    column = np.cumsum(present) - 1  # [max + 1] rank of each present value
    return np.flatnonzero(present), column[v]


def _by_group_then_desc(group: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The stable order of rows by ``group`` ascending, then ``value`` descending ([n] each,
    ``group`` ascending already, ``value`` >= 0): ties keep their row order."""
    top = int(value.max(initial=0))
    if len(group) and int(group[-1]) < (1 << 62) // (top + 1):  # one int64 key fits
        return np.argsort(group * (top + 1) + (top - value), kind="stable")
    return np.lexsort((-value, group))


# --------------------------------------------------------------------------------------------
# Spark plans
# --------------------------------------------------------------------------------------------


def _ngram_at(text, n: int):
    """The lambda ``i -> "g<n>:" + text[i : i + n]`` (1-based) for ``F.transform``."""
    return lambda i: F.concat(F.lit(f"g{n}:"), F.substring(text, i, n))


def _hashed(cfg: EtlConfig, part: int, feature) -> F.Column:
    """The 64-bit hash ``h`` of a feature of one part (its random signs: :func:`sign_matrix`)."""
    return F.xxhash64(F.lit(cfg.seed), F.lit(part), feature).alias("h")


def _feature_rows(index: DataFrame, cfg: EtlConfig) -> DataFrame:
    """(item_idx, part, h, w): hashed category ids and caption n-grams (content features)."""
    cats = index.select("item_idx", F.posexplode("categories").alias("p", "c")).select(
        "item_idx", F.lit(_CONTENT).alias("part"),
        _hashed(cfg, _CONTENT, F.concat(F.lit("c:"), F.col("c").cast("string"))),
        F.when(F.col("p") == 0, cfg.primary_category_weight).otherwise(1).cast("long").alias("w"))
    clean = F.trim(F.regexp_replace(F.lower(F.coalesce("caption", F.lit(""))), r"\s+", " "))
    # evaluated once per item (a column, not an expression re-evaluated inside the n-gram
    # lambda for every position), and bounded (EtlConfig.caption_max_chars)
    items = index.select("item_idx", F.substring(clean, 1, cfg.caption_max_chars).alias("t"))
    text = F.col("t")
    grams = []
    for n in cfg.ngram_sizes:
        g = F.when(F.length(text) >= n, F.transform(
            F.sequence(F.lit(1), F.length(text) - n + 1), _ngram_at(text, n)))
        grams.append(F.coalesce(g, F.array().cast("array<string>")))
    caps = items.select("item_idx", F.explode(F.concat(*grams)).alias("f")).select(
        "item_idx", F.lit(_CAPTION).alias("part"), _hashed(cfg, _CAPTION, F.col("f")),
        F.lit(1).cast("long").alias("w"))
    return cats.unionByName(caps)


def item_features(index: DataFrame, collab_rows: DataFrame, cfg: EtlConfig) -> DataFrame:
    """(item_idx, item_id, categories, x) for every catalogue item; ``x`` is binary:
    little-endian float32 bytes (``np.frombuffer(x, "<f4")``), content part then
    collaborative part (zeros where an item has none). ``collab_rows``: :func:`collab`."""
    task = ProjectTask(cfg.content_dim, 0, cfg.caption_weight)
    content = (_feature_rows(index, cfg).repartition(cfg.shuffle_partitions, "item_idx")
               .sortWithinPartitions("item_idx", "part").mapInArrow(task, VECTOR_SCHEMA))
    vectors = collab_rows.where(F.col("positive").isNull()).select(
        "item_idx", F.col("x").alias("xk"))
    zeros_c, zeros_k = F.lit(bytes(4 * cfg.content_dim)), F.lit(bytes(4 * cfg.collab_dim))
    return (index.join(content, "item_idx", "left").join(vectors, "item_idx", "left")
            .select("item_idx", "item_id", "categories",
                    F.concat(F.coalesce("x", zeros_c), F.coalesce("xk", zeros_k)).alias("x")))


def collab(seq: DataFrame, cfg: EtlConfig, num_items: int | None = None) -> DataFrame:
    """User sequences -> :data:`COLLAB_SCHEMA` rows: each item's collaborative vector (from
    co-occurrence counts in training regions, both directions) and its top partners."""
    if num_items is not None and num_items > _MAX_ITEMS:
        raise ValueError(f"co-occurrence packs item_idx into 31 bits: {num_items} items > 2^31")
    task = CoocTask(cfg.holdout, cfg.min_user_interactions, cfg.negative_threshold,
                    cfg.cooc_window)
    partial = seq.select("items", "fb").mapInArrow(task, COOC_SCHEMA)
    return (partial.repartition(cfg.shuffle_partitions, "a").sortWithinPartitions("a")
            .mapInArrow(CollabTask(cfg.collab_dim, cfg.pairs_per_item,
                                   part_seed(cfg.seed, _COLLAB)), COLLAB_SCHEMA))


def top_pairs(collab_rows: DataFrame, index: DataFrame) -> DataFrame:
    """(anchor, positive, weight, rank): top-P partners per item (from :func:`collab`);
    ``(i, i, 0.0, 1)`` for an item without any partner."""
    pairs = collab_rows.where(F.col("positive").isNotNull()).select(
        F.col("item_idx").alias("a"), "positive", "weight", "rank")
    rows = index.select(F.col("item_idx").alias("a")).join(pairs, "a", "left")
    return rows.select(F.col("a").alias("anchor"),
                       F.coalesce("positive", "a").alias("positive"),
                       F.coalesce("weight", F.lit(0.0)).alias("weight"),
                       F.coalesce("rank", F.lit(1)).alias("rank"))


def pair_rows(pairs: DataFrame, feats: DataFrame, broadcast: bool) -> DataFrame:
    """Denormalise both feature vectors into each pair."""
    xs = feats.select("item_idx", "x")
    if broadcast:
        xs = F.broadcast(xs)
    a = xs.select(F.col("item_idx").alias("anchor"), F.col("x").alias("x_anchor"))
    p = xs.select(F.col("item_idx").alias("positive"), F.col("x").alias("x_positive"))
    return pairs.join(a, "anchor").join(p, "positive").select(
        "anchor", "positive", "weight", "rank", "x_anchor", "x_positive")
