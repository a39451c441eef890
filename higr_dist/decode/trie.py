"""Prefix trie over the SID table for constrained decoding (vectorised, CPU or CUDA).

Design
------
Nodes at depth d (0..L) are the distinct d-code prefixes of the catalogue's SIDs, numbered in
lexicographic order (depth 0: the root; depth L: one leaf per item). For each depth d < L the
trie stores the children of every depth-d node either as

- a **dense** table ``[n_d, K]`` of child ids (int32, -1 = no such child), when
  ``n_d * K <= max_dense_entries`` (one gather per query), or
- a **sparse** sorted key array: child ``c`` of node ``p`` has key ``p * K + c``; because nodes
  are numbered in prefix order these keys are already sorted and the child's id is its index,
  so a query is one ``searchsorted`` (memory O(n_{d+1}) instead of O(n_d * K)).

With K = 256, L = 3 the depth-2 table has at most 256^2 rows (64 MiB int32 at most), so
catalogues up to ~1e6 items stay dense by default; deeper or wider SIDs switch to sparse.

Queries never loop over rows in Python (only over the <= L depths): ``walk`` maps prefixes
``[M, l]`` to node ids, ``child_counts`` gives the number of items below each of the K
possible next codes, ``allowed`` subtracts items to exclude (already placed in a slate), so a
decoder that picks only allowed codes can never reach a dead end: every allowed prefix still
has an unplaced completion. ``lookup`` maps full SIDs to item_idx (-1 when not a real SID).

Incremental decoding (what the decoders use): a beam keeps the trie node of its prefix
(``root`` -> ``child`` once per chosen code, one gather) and asks ``allowed_at(depth, node,
exclude)``, so no step re-walks the prefix; excluded items are matched to the node through
their precomputed ancestor ids (``ancestors[d][item]``: the depth-d node above each item), a
gather and a compare instead of comparing SID prefixes. ``leaf_items(node)`` turns finished
beams into item_idx without a lookup.

The SID table must be unique (the tokenizer export resolves collisions); a table with
duplicates raises instead of silently dropping items.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def _pack(codes: Tensor, K: int) -> Tensor:
    """codes [..., d] long -> packed int64 key [...] (base K, first code most significant)."""
    key = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
    for i in range(codes.shape[-1]):
        key = key * K + codes[..., i]
    return key


class SidTrie:
    """Prefix structure of a unique SID table ``[num_items, L]`` with codes in ``[0, K)``."""

    def __init__(self, K: int, table: Tensor, dense: list[Tensor | None],
                 sparse_keys: list[Tensor | None], counts: list[Tensor], leaf_item: Tensor,
                 ancestors: Tensor):
        self.K = int(K)
        self.table = table
        """[num_items, L] long: the SID of each item."""
        self.dense = dense
        """Per depth d < L: [n_d, K] int32 child ids (-1 none), or None when sparse."""
        self.sparse_keys = sparse_keys
        """Per depth d < L: [n_{d+1}] sorted child keys ``parent * K + code``, or None."""
        self.counts = counts
        """Per depth d <= L: [n_d] long, items below each node (depth 0: [num_items])."""
        self.leaf_item = leaf_item
        """[num_items] long: item_idx of each leaf (depth-L node)."""
        self.ancestors = ancestors
        """[L+1, num_items] long: ``ancestors[d, i]`` is the depth-d node above item i."""

    @property
    def L(self) -> int:
        return int(self.table.shape[1])

    @property
    def num_items(self) -> int:
        return int(self.table.shape[0])

    @property
    def device(self) -> torch.device:
        return self.table.device

    @classmethod
    def from_table(cls, sid_table: np.ndarray | Tensor, K: int,
                   max_dense_entries: int = 1 << 25) -> SidTrie:
        """Build from ``sid_table [num_items, L]`` int (numpy or torch; on its device)."""
        table = (sid_table if isinstance(sid_table, Tensor)  # copy: tables are often read-only
                 else torch.from_numpy(np.array(sid_table, dtype=np.int64))).long()
        if table.dim() != 2 or table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError(f"sid_table must be [num_items >= 1, L >= 1], got {tuple(table.shape)}")
        num, L = table.shape
        if int(table.min()) < 0 or int(table.max()) >= K:
            raise ValueError(f"sid_table codes must be in [0, {K}), got [{int(table.min())}, "
                             f"{int(table.max())}]")
        if L * np.log2(max(K, 2)) > 62:
            raise ValueError(f"K^L = {K}^{L} does not fit a packed int64 key")
        full = _pack(table, K)  # [I]
        order = torch.argsort(full)
        if torch.unique(full).numel() != num:
            raise ValueError(f"sid_table has duplicate SIDs ({num - torch.unique(full).numel()} "
                             "items share another's SID); resolve collisions first")
        rows = table[order]  # [I, L] sorted lexicographically
        keys = [torch.zeros(1, dtype=torch.long, device=table.device)]  # depth 0: root
        counts = [torch.full((1,), num, dtype=torch.long, device=table.device)]
        dense: list[Tensor | None] = []
        sparse: list[Tensor | None] = []
        ancestors = torch.zeros(L + 1, num, dtype=torch.long, device=table.device)  # [L+1, I]
        for d in range(1, L + 1):
            kd, inv, cnt = torch.unique_consecutive(_pack(rows[:, :d], K), return_inverse=True,
                                                    return_counts=True)  # [n_d], [I], [n_d]
            ancestors[d, order] = inv
            parent = torch.searchsorted(keys[-1], kd // K)  # [n_d] ids at depth d-1
            child_key = parent * K + kd % K  # [n_d] sorted
            if keys[-1].numel() * K <= max_dense_entries:
                tbl = torch.full((keys[-1].numel(), K), -1, dtype=torch.int32, device=table.device)
                tbl[parent, kd % K] = torch.arange(kd.numel(), dtype=torch.int32,
                                                   device=table.device)
                dense.append(tbl)
                sparse.append(None)
            else:
                dense.append(None)
                sparse.append(child_key)
            keys.append(kd)
            counts.append(cnt)
        return cls(K, table, dense, sparse, counts, order, ancestors)

    @classmethod
    def from_export(cls, sid_dir: str | Path) -> SidTrie:
        """The trie of a tokenizer export folder (``sid_table.npy`` + ``sid_meta.json``)."""
        from higr_dist.data.sids import load_sid_meta, load_sid_table

        return cls.from_table(load_sid_table(sid_dir), load_sid_meta(sid_dir).K)

    def to(self, device: torch.device | str) -> SidTrie:
        """This trie on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.device == device or (device.type == self.device.type and device.index is None):
            return self

        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return SidTrie(self.K, self.table.to(device), [mv(t) for t in self.dense],
                       [mv(t) for t in self.sparse_keys], [t.to(device) for t in self.counts],
                       self.leaf_item.to(device), self.ancestors.to(device))

    # ---------------------------------------------------------------- queries

    def _children(self, depth: int, node: Tensor) -> Tensor:
        """Child ids of depth-``depth`` nodes: node [M] long (-1 = none) -> [M, K] long."""
        if not 0 <= depth < self.L:
            raise ValueError(f"prefix of length {depth}: SIDs have L={self.L} codes")
        ok = node >= 0
        tbl = self.dense[depth]
        if tbl is not None:
            ch = tbl[node.clamp(min=0)].long()  # [M, K]
        else:
            keys = self.sparse_keys[depth]
            want = node.clamp(min=0)[:, None] * self.K + torch.arange(self.K, device=node.device)
            idx = torch.searchsorted(keys, want).clamp(max=keys.numel() - 1)  # [M, K]
            ch = torch.where(keys[idx] == want, idx, -1)
        return torch.where(ok[:, None], ch, -1)

    def root(self, M: int) -> Tensor:
        """The root node for M prefixes: [M] long zeros (on the trie's device)."""
        return torch.zeros(M, dtype=torch.long, device=self.device)

    def child(self, depth: int, node: Tensor, code: Tensor) -> Tensor:
        """One child per row: depth-``depth`` node [M], code [M] -> depth+1 node [M] long (-1
        when absent or invalid; -1 stays -1)."""
        ok = (node >= 0) & (code >= 0) & (code < self.K)
        n, c = node.clamp(min=0), code.clamp(0, self.K - 1)
        tbl = self.dense[depth]
        if tbl is not None:
            ch = tbl[n, c].long()
        else:
            keys = self.sparse_keys[depth]
            want = n * self.K + c
            idx = torch.searchsorted(keys, want).clamp(max=keys.numel() - 1)
            ch = torch.where(keys[idx] == want, idx, -1)
        return torch.where(ok, ch, -1)

    def walk(self, prefix: Tensor) -> Tensor:
        """prefix [M, l] (0 <= l <= L) -> node id [M] at depth l (-1 = not a prefix of any SID)."""
        if prefix.dim() != 2 or prefix.shape[1] > self.L:
            raise ValueError(f"prefix must be [M, l <= {self.L}], got {tuple(prefix.shape)}")
        prefix = prefix.long()
        node = torch.zeros(prefix.shape[0], dtype=torch.long, device=prefix.device)
        for d in range(prefix.shape[1]):
            node = self.child(d, node, prefix[:, d])
        return node

    def child_counts(self, prefix: Tensor) -> Tensor:
        """prefix [M, l] (l < L) -> [M, K] long: items whose SID starts with prefix + code."""
        depth = prefix.shape[1]
        ch = self._children(depth, self.walk(prefix))  # [M, K]
        return torch.where(ch >= 0, self.counts[depth + 1][ch.clamp(min=0)], 0)

    def next_mask(self, prefix: Tensor) -> Tensor:
        """prefix [M, l] (l = 0..L-1) -> bool [M, K]: codes that extend it towards a real SID."""
        return self._children(prefix.shape[1], self.walk(prefix)) >= 0

    def allowed(self, prefix: Tensor, exclude: Tensor | None = None) -> Tensor:
        """Like :meth:`next_mask`, but a code is allowed only if some item below prefix + code
        is not in ``exclude [M, P]`` (item_idx, -1 = empty slot; duplicates count once).
        Returns bool [M, K]; a row is all False only when every completion is excluded."""
        return self.allowed_at(prefix.shape[1], self.walk(prefix), exclude)

    def allowed_at(self, depth: int, node: Tensor, exclude: Tensor | None = None) -> Tensor:
        """:meth:`allowed` for prefixes given as their depth-``depth`` trie nodes ``node [M]``
        (-1 = not a prefix: nothing allowed), the incremental form the decoders use."""
        ch = self._children(depth, node)  # [M, K]
        cnt = torch.where(ch >= 0, self.counts[depth + 1][ch.clamp(min=0)], 0)  # [M, K]
        if exclude is None or exclude.shape[1] == 0:
            return cnt > 0
        exclude = exclude.long()
        P = exclude.shape[1]
        real = exclude >= 0  # [M, P]
        if P > 1:
            earlier = torch.ones(P, P, dtype=torch.bool, device=exclude.device).tril(-1)
            real = real & ~((exclude[:, :, None] == exclude[:, None, :]) & earlier).any(-1)
        ex = exclude.clamp(min=0)
        below = real & (self.ancestors[depth][ex] == node[:, None])  # [M, P]
        sub = torch.zeros_like(cnt).scatter_add_(1, self.table[ex, depth], below.long())  # [M, K]
        return (cnt - sub) > 0

    def leaf_items(self, node: Tensor) -> Tensor:
        """Depth-L nodes [*] -> item_idx [*] long (-1 stays -1)."""
        return torch.where(node >= 0, self.leaf_item[node.clamp(min=0)], -1)

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [*, L] -> item_idx [*] long (-1 when not a real SID)."""
        if codes.shape[-1] != self.L:
            raise ValueError(f"codes must end in L={self.L}, got {tuple(codes.shape)}")
        flat = codes.reshape(-1, self.L)
        return self.leaf_items(self.walk(flat)).reshape(codes.shape[:-1])

    def item_codes(self, items: Tensor) -> Tensor:
        """item_idx [*] -> SIDs [*, L] (raises on ids outside the catalogue)."""
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise IndexError(f"item_idx outside [0, {self.num_items})")
        return self.table[items.long()]
