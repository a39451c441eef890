"""The streaming loader on real shards: partitioning, determinism, exact resume, corruption."""

from __future__ import annotations

import json
import logging
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from higr_dist.config import ConfigError, from_dict
from higr_dist.data.loader import (
    LoaderConfig,
    ShardError,
    StreamingLoader,
    iterate_samples,
    reshard_states,
)
from higr_dist.data.shardio import list_shards, write_listing, write_shard
from higr_dist.schema import ITEM, PAIR, SLATE, SLATE_GROUP, SLATE_GROUP_BLOCK, blocks

TAR_BLOCK = 512

#: samples per shard: uneven, so workers run out at different times
SHARD_SIZES = (9, 16, 23, 12, 30, 7)
BATCH = 5


def item(idx: int) -> dict:
    return {"item_idx": idx, "item_id": f"id{idx}", "categories": [idx % 3, 7],
            "x": np.arange(4, dtype=np.float32) + idx}


def write_items(directory: Path, sizes=SHARD_SIZES, listing: bool = False) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    entries, idx = [], 0
    for s, n in enumerate(sizes):
        samples = [(f"i{i:05d}", item(i)) for i in range(idx, idx + n)]
        entries.append(write_shard(directory / f"shard-{s:06d}.tar", ITEM, samples))
        idx += n
    if listing:
        write_listing(directory, entries)
    return list_shards(directory)


def all_keys(sizes=SHARD_SIZES) -> set[str]:
    return {f"i{i:05d}" for i in range(sum(sizes))}


def keys_collate(samples: list[dict]) -> tuple[str, ...]:
    return tuple(s["__key__"] for s in samples)


def noisy_collate(samples: list[dict]) -> tuple:
    """Keys plus one draw from each global RNG (must replay identically on resume)."""
    return (keys_collate(samples), random.random(), float(np.random.rand()),
            float(torch.rand(1)))


class EpochCollate:
    """A collate with set_epoch: the loader must call it inside the workers."""

    def __init__(self):
        self.epoch = -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, samples: list[dict]) -> tuple[int, int]:
        return self.epoch, len(samples)


def make(shards, collate=keys_collate, *, workers=2, rank=0, world=1, seed=0, buffer=20,
         on_corrupt="raise", schema=ITEM) -> StreamingLoader:
    cfg = LoaderConfig(num_workers=workers, shuffle_buffer=buffer, on_corrupt=on_corrupt)
    return StreamingLoader(shards, schema, collate, BATCH, cfg, rank=rank, world_size=world,
                           seed=seed)


def flat(batches) -> list[str]:
    return [k for b in batches for k in b]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_items(tmp_path_factory.mktemp("items"))


def test_exactly_once_across_two_ranks_two_workers(shards):
    per_rank = []
    for rank in (0, 1):
        loader = make(shards, rank=rank, world=2)
        batches = list(loader)
        assert all(1 <= len(b) <= BATCH for b in batches)
        assert loader.epoch == 1 and loader.samples_consumed == 0  # epoch advanced, reset
        per_rank.append(flat(batches))
    union = per_rank[0] + per_rank[1]
    assert len(union) == len(set(union)) == sum(SHARD_SIZES)
    assert set(union) == all_keys()
    assert not set(per_rank[0]) & set(per_rank[1])


def write_slate_groups(directory: Path, block: int | None = None
                       ) -> tuple[list[str], set[str]]:
    """6 shards of SLATE_GROUP records (users with 1-6 windows) -> (shards, window keys);
    with ``block``, stored as SLATE_GROUP_BLOCK members of ``block`` records (as the ETL)."""
    directory.mkdir(parents=True, exist_ok=True)
    entries, keys, u = [], set(), 0
    for s, n_users in enumerate((3, 5, 2, 4, 6, 1)):
        records = []
        for _ in range(n_users):
            starts = [2 + 3 * w for w in range(1 + u % 6)]  # windows at 2, 5, 8, ...
            n = starts[-1] + 2
            record = {"user_id": f"u{u}", "offset": 10, "items": list(range(n)),
                      "fb": [1.0] * n, "starts": starts, "start_ts": starts,
                      "history_len": 4, "slate_size": 2}
            records.append((f"g{u:04d}", record))
            keys |= {f"g{u:04d}_{10 + st:07d}" for st in starts}
            u += 1
        entries.append(write_shard(directory / f"shard-{s:06d}.tar", SLATE_GROUP, records)
                       if block is None else
                       write_shard(directory / f"shard-{s:06d}.tar", SLATE_GROUP_BLOCK,
                                   blocks(records, block)))
    write_listing(directory, entries)
    return list_shards(directory), keys


@pytest.mark.slow  # spawned loader workers, many epochs: out of make test-fast
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("block", [None, 2])
def test_grouped_kind_unpacks_exactly_once_and_resumes(tmp_path, block):
    """slates/train stores one record per user (and the ETL, blocks of such records): windows
    are the unit of exactly-once, of the shuffle (batches mix users) and of the resume
    position."""
    shards, keys = write_slate_groups(tmp_path / "groups", block)
    schema = SLATE_GROUP if block is None else SLATE_GROUP_BLOCK
    listing = json.loads((tmp_path / "groups" / "shards.json").read_text())
    members = 21 if block is None else 12  # 3, 5, 2, 4, 6, 1 users per shard, in pairs
    assert listing["samples"] == members and listing["unpacked"] == len(keys) > 21
    one = list(iterate_samples(shards, schema))
    assert {s["__key__"] for s in one} == keys and len(one) == len(keys)
    w = next(s for s in one if s["__key__"] == "g0005_0000018")  # user 5's 3rd window
    assert w["hist_items"] == [4, 5, 6, 7] and w["target_items"] == [8, 9]
    assert set(w) == {*SLATE.field_names, "__key__", "__url__"}
    per_rank = [flat(make(shards, rank=r, world=2, schema=schema)) for r in (0, 1)]
    union = per_rank[0] + per_rank[1]
    assert len(union) == len(set(union)) == len(keys) and set(union) == keys
    users = [k.split("_")[0] for k in per_rank[0]]
    assert users != sorted(users)  # windows of different users interleave
    loader = make(shards, noisy_collate, schema=schema)
    full = list(loader) + list(loader)
    for cut in (1, 4, len(full) // 2 - 1):
        first = make(shards, noisy_collate, schema=schema)
        got = []
        for batch in first:
            got.append(batch)
            if len(got) == cut:
                break
        resumed = make(shards, noisy_collate, schema=schema)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        got += list(resumed) + list(resumed)
        assert got == full, f"cut={cut}"


def test_in_process_reader_and_samples_consumed(shards):
    loader = make(shards, workers=0)
    seen = 0
    for batch in loader:
        seen += len(batch)
        assert loader.samples_consumed == seen
    assert seen == sum(SHARD_SIZES) and loader.epoch == 1


@pytest.mark.slow  # spawned loader workers, many epochs: out of make test-fast
def test_order_is_deterministic_per_seed_and_epoch(shards):
    a, b = make(shards), make(shards)
    epoch0 = list(a)
    assert list(b) == epoch0  # same seed, same epoch -> same batches, same order
    epoch1 = list(a)
    assert flat(epoch1) != flat(epoch0) and sorted(flat(epoch1)) == sorted(flat(epoch0))
    c = make(shards)
    c.set_epoch(1)
    assert list(c) == epoch1
    assert flat(list(make(shards, seed=1))) != flat(epoch0)


def run_with_resume(shards, cut: int, workers: int) -> list:
    """Take ``cut`` batches, save (through JSON), resume in a fresh loader, finish 2 epochs."""
    first = make(shards, noisy_collate, workers=workers)
    got = []
    if cut:
        for batch in first:
            got.append(batch)
            if len(got) == cut:
                break
    state = json.loads(json.dumps(first.state_dict()))
    assert state["samples_consumed"] == sum(len(b[0]) for b in got)
    resumed = make(shards, noisy_collate, workers=workers)
    resumed.load_state_dict(state)
    got += list(resumed)  # rest of epoch 0
    got += list(resumed)  # epoch 1
    return got


@pytest.mark.slow  # spawned loader workers, many epochs: out of make test-fast
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("workers", [2, 3])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(shards, workers):
    loader = make(shards, noisy_collate, workers=workers)
    full = list(loader) + list(loader)  # two uninterrupted epochs
    n0 = sum(1 for _ in make(shards, workers=workers))
    assert n0 < len(full)
    # odd and even cuts (rotation of workers), one near the end (a worker already exhausted),
    # and the end of the epoch before the epoch counter advanced
    for cut in sorted({1, 2, n0 // 2 + 1, n0 - 2, n0}):
        assert run_with_resume(shards, cut, workers) == full, f"cut={cut}"


def test_break_and_reiterate_continues_after_last_batch(shards):
    loader = make(shards)
    reference = list(make(shards))
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == 3:
            break
    assert loader.epoch == 0
    got += list(loader)
    assert got == reference and loader.epoch == 1


def test_collate_set_epoch_is_called_in_workers(shards):
    loader = make(shards, EpochCollate())
    assert {e for e, _ in loader} == {0}
    assert {e for e, _ in loader} == {1}


def test_iterate_samples_streams_in_order_with_content(shards):
    samples = list(iterate_samples(shards, ITEM))
    assert [s["item_idx"] for s in samples] == list(range(sum(SHARD_SIZES)))
    s = samples[17]
    assert s["__key__"] == "i00017" and s["__url__"] == shards[1]
    assert s["item_id"] == "id17" and s["categories"] == [2, 7]
    np.testing.assert_array_equal(s["x"], np.arange(4, dtype=np.float32) + 17)


def corrupt(path: str, how: str) -> None:
    data = bytearray(Path(path).read_bytes())
    rng = np.random.default_rng(0)
    if how == "truncated":  # mid-block: caught before streaming (not whole tar blocks)
        data = data[: len(data) // 2 + 100]
    elif how == "garbage":  # not a tar at all (no end-of-archive marker)
        data = bytearray(rng.bytes(4096))
    elif how == "header":  # right size and tail, first tar header damaged: the tar reader fails
        data[:TAR_BLOCK] = rng.bytes(TAR_BLOCK)
    elif how == "payload":  # first sample's zstd blob damaged: the frame checksum fails
        with tarfile.open(path) as tf:
            start = tf.getmembers()[0].offset_data
        data[start + 8: start + 24] = rng.bytes(16)
    Path(path).write_bytes(bytes(data))


def shard_keys(index: int, sizes=SHARD_SIZES) -> set[str]:
    start = sum(sizes[:index])
    return {f"i{i:05d}" for i in range(start, start + sizes[index])}


@pytest.mark.parametrize("how", ["truncated", "garbage", "header", "payload"])
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_is_named_in_the_error(tmp_path, how, workers):
    paths = write_items(tmp_path)
    bad = paths[2]
    corrupt(bad, how)
    with pytest.raises(ShardError) as err:
        list(make(paths, workers=workers))
    assert bad in str(err.value) and err.value.path == bad
    with pytest.raises(ShardError, match=bad):
        list(iterate_samples(paths, ITEM))


def test_skip_mode_counts_and_warns(tmp_path, caplog):
    paths = write_items(tmp_path)
    corrupt(paths[1], "truncated")
    corrupt(paths[4], "garbage")
    loader = make(paths, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="higr_dist.data.loader"):
        got = flat(loader)
    assert loader.corrupt_shards_skipped == 2
    assert paths[1] in caplog.text and paths[4] in caplog.text
    assert len(got) == len(set(got))
    assert set(got) == all_keys() - shard_keys(1) - shard_keys(4)
    list(loader)  # next epoch: same shards, still counted once
    assert loader.corrupt_shards_skipped == 2 and loader.epoch == 2
    assert make(paths).corrupt_shards_skipped == 0


@pytest.mark.slow  # spawned loader workers, many epochs: out of make test-fast
def test_skip_corrupt_sample_blob_then_resume_exactly(tmp_path):
    paths = write_items(tmp_path)
    with wds.TarWriter(str(tmp_path / "shard-000006.tar"), encoder=False) as w:
        w.write({"__key__": "zbad", "item.zst": b"not zstd at all"})
        for i in range(200, 206):
            w.write({"__key__": f"i{i:05d}", "item.zst": ITEM.encode(item(i))})
    paths = list_shards(tmp_path)
    full = list(make(paths, on_corrupt="skip"))
    assert "zbad" not in flat(full) and len(flat(full)) == sum(SHARD_SIZES) + 6
    for cut in (3, len(full) - 3):
        first = make(paths, on_corrupt="skip")
        got = []
        for batch in first:
            got.append(batch)
            if len(got) == cut:
                break
        resumed = make(paths, on_corrupt="skip")
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert got + list(resumed) == full
        assert resumed.corrupt_shards_skipped == 1


def test_truncation_at_a_member_boundary_is_caught(tmp_path):
    """A tar reader alone would take this shard for a short, valid one."""
    paths = write_items(tmp_path)
    bad = paths[3]
    with tarfile.open(bad) as tf:
        cut = tf.getmembers()[4].offset  # a clean header boundary
    Path(bad).write_bytes(Path(bad).read_bytes()[:cut])
    with pytest.raises(ShardError, match="end-of-archive") as err:
        list(make(paths))
    assert err.value.path == bad
    write_items(tmp_path, listing=True)  # same shards, now with shards.json
    Path(bad).write_bytes(Path(bad).read_bytes()[:cut])
    with pytest.raises(ShardError, match="shards.json"):
        list(iterate_samples(paths, ITEM))


def test_listing_catches_a_damaged_header_past_the_first(tmp_path):
    paths = write_items(tmp_path, listing=True)
    bad = paths[4]
    with tarfile.open(bad) as tf:
        offset = tf.getmembers()[6].offset
    data = bytearray(Path(bad).read_bytes())
    data[offset: offset + TAR_BLOCK] = np.random.default_rng(1).bytes(TAR_BLOCK)
    Path(bad).write_bytes(bytes(data))
    with pytest.raises(ShardError, match="samples != 30 in shards.json") as err:
        list(make(paths, workers=0))
    assert err.value.path == bad


def test_wrong_sample_kind_is_a_named_error(shards):
    with pytest.raises(ShardError, match="wrong sample kind") as err:
        list(make(shards, schema=PAIR, workers=0))
    assert err.value.path in shards


def test_fewer_shards_than_readers_is_a_clear_error(tmp_path):
    paths = write_items(tmp_path, sizes=(3, 3, 3))
    with pytest.raises(ValueError, match="a worker with no shard"):
        make(paths, workers=2, world=2)
    with pytest.raises(ValueError, match="3 shard"):
        make(paths, workers=0, world=4)
    make(paths, workers=1, world=3)  # exactly one shard per reader is fine


def test_state_is_json_and_mid_epoch_state_needs_the_same_stream(shards):
    loader = make(shards)
    it = iter(loader)
    next(it)
    next(it)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert sum(state["batches"]) == 2 and state["epoch"] == 0
    it.close()
    other = StreamingLoader(shards, ITEM, keys_collate, BATCH + 1, LoaderConfig(num_workers=2))
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)
    # an epoch-boundary state carries only the epoch: it loads into any configuration
    boundary = make(shards)
    boundary.set_epoch(3)
    other.load_state_dict(boundary.state_dict())
    assert other.epoch == 3 and other.samples_consumed == 0


def test_reiterating_invalidates_a_running_iteration(shards):
    loader = make(shards, workers=0)
    first = iter(loader)
    next(first)
    second = iter(loader)
    next(second)
    with pytest.raises(RuntimeError, match="re-iterated"):
        next(first)


def test_loader_config_section_and_batch_size_check(shards):
    cfg = from_dict(LoaderConfig, {"num_workers": 3, "on_corrupt": "skip"})
    assert cfg.num_workers == 3 and cfg.on_corrupt == "skip"
    with pytest.raises(ConfigError) as err:
        from_dict(LoaderConfig, {"num_workers": -1, "prefetch_factor": 0, "on_corrupt": "x"})
    assert len(err.value.problems) >= 3
    with pytest.raises(ValueError, match="batch_size"):
        StreamingLoader(shards, ITEM, keys_collate, 0, LoaderConfig())


def take(loader: StreamingLoader, n: int) -> list:
    """The first ``n`` batches of the loader's current iteration (all of them for n < 0)."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("old_workers,new_world,new_workers", [
    (0, 1, 0),
    # spawned workers (~2 s each start): in make test-faults (docs/RELIABILITY.md)
    pytest.param(1, 3, 0, marks=[pytest.mark.slow, pytest.mark.faults]),
    pytest.param(2, 1, 2, marks=[pytest.mark.slow, pytest.mark.faults]),
    pytest.param(0, 4, 1, marks=[pytest.mark.slow, pytest.mark.faults])])
def test_reshard_mid_epoch_to_another_world_size_exactly_once(shards, old_workers, new_world,
                                                              new_workers):
    """Two ranks stop mid-epoch (rank 1 after its whole share); the rest of the epoch, dealt to
    another world size, delivers every remaining sample once; the next epoch is the new
    world's own."""
    seen, states, finished = [], [], []
    for rank, cut in ((0, 2), (1, -1)):
        loader = make(shards, rank=rank, world=2, workers=old_workers)
        seen += flat(take(loader, cut))
        states.append(json.loads(json.dumps(loader.state_dict())))
        finished.append(cut < 0)
    assert 0 < len(seen) < sum(SHARD_SIZES)
    rest, next_epoch = [], []
    for rank in range(new_world):
        state = reshard_states(states, finished, rank, new_world, max(1, new_workers))
        loader = make(shards, rank=rank, world=new_world, workers=new_workers)
        loader.load_state_dict(json.loads(json.dumps(state)))
        assert loader.epoch == 0
        rest += flat(list(loader))
        assert loader.epoch == 1
        next_epoch += flat(list(loader))
    everything = seen + rest
    assert len(everything) == len(set(everything)) == sum(SHARD_SIZES)
    assert set(everything) == all_keys()
    assert sorted(next_epoch) == sorted(all_keys())


def test_resharded_rest_resumes_again_and_reshards_at_its_start(shards):
    """A checkpoint taken inside the resharded rest resumes on the same world size exactly;
    one taken before any of the rest was read reshards again; one part-way through a chain of
    streams cannot be dealt again (a clear error)."""
    seen, states = [], []
    for rank in (0, 1):
        loader = make(shards, rank=rank, world=2, workers=2)
        seen += flat(take(loader, 1))
        states.append(loader.state_dict())
    one = reshard_states(states, [False, False], 0, 1, 1)  # 4 old streams -> 1 reader
    assert len(one["streams"][0]) == 4
    again = reshard_states([one], [False], 1, 3, 1)  # nothing read yet: deal again
    assert len(again["streams"][0]) == 1
    first = make(shards, rank=0, world=1, workers=0)
    first.load_state_dict(one)
    part = flat(take(first, 3))
    mid = json.loads(json.dumps(first.state_dict()))
    second = make(shards, rank=0, world=1, workers=0)
    second.load_state_dict(mid)
    everything = seen + part + flat(list(second))
    assert len(everything) == len(set(everything)) == sum(SHARD_SIZES)
    with pytest.raises(ValueError, match="itself resharded"):
        reshard_states([mid], [False], 0, 2, 1)
    with pytest.raises(ValueError, match="different data stream"):
        make(shards, rank=0, world=2, workers=0).load_state_dict(mid)
