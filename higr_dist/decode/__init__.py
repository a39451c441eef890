"""higr_dist.decode: trie-constrained slate decoding.

- ``trie``: :class:`SidTrie`, the prefix structure of the SID table (allowed next codes, item
  lookup, exclusion of items already in a slate), vectorised on CPU or CUDA;
- ``hier``: :func:`coarse_to_fine_decode`, HiGR's decoding (greedy KV-cached planner, per-item
  beam search in the item generator);
- ``flat``: :func:`flat_beam_decode`, beam search over all N*L tokens (OneRec/TIGER baseline).

Both decoders return a :class:`DecodeResult` whose items are real, distinct within a slate, and
are pure constrained beam search (no sampling settings exist).
"""

from higr_dist.decode.flat import flat_beam_decode
from higr_dist.decode.hier import DecodeResult, coarse_to_fine_decode
from higr_dist.decode.trie import SidTrie

__all__ = ["DecodeResult", "SidTrie", "coarse_to_fine_decode", "flat_beam_decode"]
