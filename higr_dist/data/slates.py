"""Slate samples as model input: the typed batch and the collate every slate model shares.

Design
------
:class:`SlateCollate` is the one picklable ``list[SLATE sample dict] -> SlateBatch`` used by the
training stages that stream ``slates/train`` (HSD, flat, SASRec), by periodic validation and by
evaluation (``slates/val``, ``slates/test``): it keeps each history's last ``history_len``
items (oldest first, **right-padded** with item 0 / code 0 and ``hist_mask`` False, the layout
of :func:`higr_dist.data.pairs.pack_history` that ORPO uses too), takes the first N targets,
and maps item_idx to SIDs through the tokenizer's memory-mapped ``sid_table.npy`` (opened
lazily in each process, never pickled).

Feedback values stay float32 in :meth:`SlateBatch.to` even under bf16: the models only
bucketize them, and bf16 rounding would move watch ratios across bucket edges (0.2 -> 0.2002).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from higr_dist.data.pairs import pack_history
from higr_dist.data.sids import load_sid_table, map_items

__all__ = ["SlateBatch", "SlateCollate"]


# --------------------------------------------------------------------------------------------


@dataclass
class SlateBatch:
    """One micro-batch of slate samples (history right-padded, oldest first)."""

    hist_items: Tensor
    """[B, H] long history item_idx (0 on padding)."""
    hist_codes: Tensor
    """[B, H, L] long history SIDs (0 on padding)."""
    hist_mask: Tensor
    """[B, H] bool: True for real history items."""
    hist_fb: Tensor
    """[B, H] float32 history watch ratios (0 on padding)."""
    target_items: Tensor
    """[B, N] long target item_idx in time order."""
    target_codes: Tensor
    """[B, N, L] long target SIDs."""
    target_fb: Tensor
    """[B, N] float32 target watch ratios."""

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None
           ) -> SlateBatch:
        """Move to ``device``. Feedback stays float32 (bucketized, see the module docstring),
        so ``float_dtype`` changes nothing here; it is accepted for the Batch protocol."""
        return SlateBatch(*(t.to(device) for t in (
            self.hist_items, self.hist_codes, self.hist_mask, self.hist_fb, self.target_items,
            self.target_codes, self.target_fb)))

    @property
    def num_samples(self) -> int:
        return int(self.target_items.shape[0])

    @property
    def num_tokens(self) -> int:
        """Target SID tokens predicted: B * N * L."""
        return int(self.target_codes.numel())


class SlateCollate:
    """Picklable ``list[SLATE sample dict] -> SlateBatch`` for loader workers."""

    def __init__(self, sid_dir: str | Path, slate_size: int, history_len: int):
        if slate_size < 1 or history_len < 1:
            raise ValueError(f"need slate_size >= 1 and history_len >= 1, got {slate_size}, "
                             f"{history_len}")
        self.sid_dir = str(sid_dir)
        self.slate_size = int(slate_size)
        self.history_len = int(history_len)
        self._table: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_table"] = None
        return state

    @property
    def sid_table(self) -> np.ndarray:
        if self._table is None:
            self._table = load_sid_table(self.sid_dir)
        return self._table

    def __call__(self, samples: list[dict]) -> SlateBatch:
        if not samples:
            raise ValueError("SlateCollate got an empty list of samples")
        N = self.slate_size
        targets, target_fb = [], []
        for s in samples:
            if len(s["target_items"]) < N or len(s["target_fb"]) < N:
                raise ValueError(f"slate sample of user {s.get('user_id')!r} at ts {s.get('ts')} "
                                 f"has {len(s['target_items'])} targets, the slate size is {N}")
            targets.append(np.asarray(s["target_items"][:N], dtype=np.int64))
            target_fb.append(np.asarray(s["target_fb"][:N], dtype=np.float32))
        hist, mask, fb = pack_history([s["hist_items"] for s in samples],
                                      [s["hist_fb"] for s in samples], self.history_len)
        table = self.sid_table
        tgt = np.stack(targets)  # [B, N]
        return SlateBatch(
            hist_items=torch.from_numpy(hist),
            hist_codes=torch.from_numpy(map_items(table, hist) * mask[..., None]),
            hist_mask=torch.from_numpy(mask),
            hist_fb=torch.from_numpy(fb),
            target_items=torch.from_numpy(tgt),
            target_codes=torch.from_numpy(map_items(table, tgt)),
            target_fb=torch.from_numpy(np.stack(target_fb)),
        )
