"""Item id -> semantic ID mapping, read from the tokenizer's export (memory-mapped).

Shards carry dense ``item_idx``; every consumer maps them to SIDs here at load time, so
re-tokenizing never re-runs the ETL. The table is ``int64 [num_items, L]`` and is opened with
``mmap_mode="r"``: dataloader workers share the page cache instead of each holding a copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SidMeta:
    K: int
    """codebook size per layer"""
    L: int
    """codes per item"""
    num_items: int


def load_sid_meta(sid_dir: str | Path) -> SidMeta:
    meta = json.loads((Path(sid_dir) / "sid_meta.json").read_text())
    return SidMeta(K=int(meta["K"]), L=int(meta["L"]), num_items=int(meta["num_items"]))


def load_sid_table(sid_dir: str | Path) -> np.ndarray:
    """``sid_table.npy`` as a read-only memory map, int64 [num_items, L]."""
    path = Path(sid_dir) / "sid_table.npy"
    if not path.is_file():
        raise FileNotFoundError(f"SID table not found: {path} (run the tokenizer stage first)")
    return np.load(path, mmap_mode="r")


def map_items(table: np.ndarray, items: np.ndarray) -> np.ndarray:
    """item_idx array of any shape [...] -> SID codes [..., L] (int64); raises on bad ids."""
    items = np.asarray(items, dtype=np.int64)
    if items.size and (items.min() < 0 or items.max() >= table.shape[0]):
        raise IndexError(f"item_idx out of range [0, {table.shape[0]}): min {items.min()}, max {items.max()}")
    return np.asarray(table[items.reshape(-1)], dtype=np.int64).reshape(*items.shape, table.shape[1])
