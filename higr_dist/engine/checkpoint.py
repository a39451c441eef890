"""Checkpoints: DeepSpeed's sharded save/load plus the trainer's client state; fp32 export.

Layout (``<out_dir>/checkpoints/``)::

    global_step<N>/        one DeepSpeed tag (model states, ZeRO optimizer shards per rank)
    latest                 tag of the newest *complete* checkpoint (DeepSpeed's pointer file)

Design
------
- Model, optimizer (sharded under ZeRO), LR scheduler and the engine's step counters are saved by
  ``engine.save_checkpoint``; we never write tensors ourselves.
- Client state (rank 0 writes it into the model-states file, every rank reads it back):
  ``step``, ``epoch``, the resolved config, and **per rank** the loader position, the RNG
  states (python, numpy, torch CPU, CUDA) and the module's persistent buffers (DeepSpeed saves
  rank 0's module state only; models may keep deliberate per-rank buffer state). Ranks gather theirs with ``all_gather_object``
  before saving; on load each rank picks entry ``[rank]``. A checkpoint of another world size
  is resumed through :mod:`higr_dist.engine.reshard` (model and optimizer per parameter) and
  ``loader.reshard_states`` (the rest of the epoch dealt over the new ranks).
- Atomicity: DeepSpeed's own ``latest`` file is written by rank 0 before the final barrier,
  while other ranks may still be writing their shards, so a kill in between could leave it
  pointing at an incomplete tag. We save with ``save_latest=False`` and write ``latest``
  ourselves (temp file + ``os.replace``) after every rank reported its files written, then
  prune: rank 0 deletes all but the newest ``keep_last`` tags. A crash mid-save therefore
  leaves the previous pointer intact, and a tag newer than ``latest`` is the remains of an
  unfinished save: :func:`remove_incomplete` deletes it when the run restarts.
- Failed writes (disk full, quota, a vanished mount): inside ``engine.save_checkpoint`` every
  file write of a rank is guarded, and a failure is recorded instead of raised, so the failing
  rank still joins DeepSpeed's remaining collectives; then the ranks exchange their failures
  (one ``all_gather_object``, which is also the barrier before the pointer moves) and, if any
  rank failed, rank 0 deletes the partial tag and every rank raises the same one-line
  :class:`~higr_dist.engine.errors.CheckpointFailed` naming the rank, the file and the intact
  previous checkpoint. Without this, the failing rank would leave the collective sequence and
  the others would wait in the next barrier until the collective timeout.
- Resume decision: one rank decides. :func:`agreed_latest_tag` reads ``latest`` on rank 0 and
  broadcasts the tag (or rank 0's error), then checks that every rank sees that tag's folder;
  every rank then loads exactly that tag. Were each rank to read ``latest`` itself, a stale
  shared-filesystem view (attribute caching, a node that mounted another export) could have one
  rank resume and another start over, and the job would hang in its first mismatched
  collective; now it fails on every rank with one line naming the ranks that cannot see it.
- Export: :func:`consolidated_fp32_state_dict` assembles the full fp32 master weights with
  ``deepspeed.utils.safe_get_full_fp32_param`` (ZeRO 1/2/3 and the bf16 optimizer; a
  collective under ZeRO, so every rank calls it), ``GatheredParameters`` for frozen ZeRO-3
  params, and the fp32 groups of DeepSpeed's fp16/bf16 optimizer at ZeRO-0. Only the
  destination rank (rank 0, the one that writes) keeps the host copy: every rank holding the
  whole fp32 model in host memory would cost ranks-per-node x 4 bytes x parameters per node
  (~64 GB per 8-GPU node at 2B parameters). Tensors are gathered one at a time, so the
  device-side peak is one full parameter.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from higr_dist.engine.errors import CheckpointFailed
from higr_dist.layout import LATEST

_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    """DeepSpeed-style tag for an optimizer step."""
    return f"global_step{step}"


def list_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every tag folder in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p.name) for p in ckpt_dir.iterdir()
           if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(out)


def latest_tag(ckpt_dir: Path) -> str | None:
    """Tag named by ``latest`` (None when no complete checkpoint exists)."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names tag {tag!r} but {ckpt_dir / tag} is missing; "
                                "delete the pointer to start over or restore the folder")
    return tag


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU, CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def buffer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's persistent buffers (CPU copies), i.e. ``state_dict()`` minus parameters."""
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    return {n: t.detach().cpu().clone() for n, t in module.state_dict().items() if n not in params}


@torch.no_grad()
def load_buffer_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy :func:`buffer_state` back into ``module``'s buffers (names must match)."""
    buffers = dict(module.named_buffers(remove_duplicate=False))
    missing = sorted(set(state) - set(buffers))
    if missing:
        raise KeyError(f"checkpoint has buffers the model lacks: {missing}")
    for name, value in state.items():
        buffers[name].copy_(value.to(buffers[name].device))


def gather_objects(obj: Any) -> list[Any]:
    """``all_gather_object`` over the default group (a one-element list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write_pointer(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / LATEST)


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` tags; returns the deleted tags."""
    tags = list_tags(ckpt_dir)
    doomed = [tag for _, tag in tags[:-keep_last]] if keep_last > 0 else []
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag)
    remove_orphan_conversions(ckpt_dir)
    return doomed


def remove_orphan_conversions(ckpt_dir: Path) -> None:
    """Delete ``<tag>.portable`` folders (``higr_dist.engine.reshard``) whose tag is gone, and
    unfinished ones (``.tmp``)."""
    for p in ckpt_dir.glob("*.portable*"):
        base = p.name.split(".portable")[0]
        if p.name.endswith(".tmp") or not (ckpt_dir / base).is_dir():
            shutil.rmtree(p, ignore_errors=True)


def remove_incomplete(ckpt_dir: Path, latest: str | None) -> list[str]:
    """Delete the tags newer than ``latest`` (every tag when there is none): the remains of a
    save that never completed (the pointer moves only after every rank wrote its files).
    Returns the deleted tags. Called by rank 0 when a run (re)starts."""
    keep = -1
    if latest is not None and (m := _TAG.match(latest)):
        keep = int(m.group(1))
    doomed = [tag for step, tag in list_tags(ckpt_dir) if step > keep]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag)
    remove_orphan_conversions(ckpt_dir)
    return doomed


def _torn_write(state_dict: Any, path: str) -> None:
    """Debug (``train.kill_in_save_at_step``): write the first half of ``path``'s bytes, then
    SIGKILL this process, as a crash in the middle of the write would."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    data = buf.getvalue()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _guarded_writes(engine: Any, errors: list[str], torn: bool):
    """Inside ``engine.save_checkpoint``: a failing file write (or folder creation) is
    appended to ``errors`` instead of raised, so this rank goes on through DeepSpeed's
    remaining collectives (module docstring). ``torn``: the first file is written half, then
    the process kills itself."""
    ce = engine.checkpoint_engine

    def record(what: str, e: BaseException) -> None:
        lines = str(e).strip().splitlines()
        first = lines[0] if lines else ""
        hint = "" if "No space left" in first else _space_left(what)
        errors.append(f"{what}: {type(e).__name__}: {first}{hint}")

    def save(state_dict: Any, path: str) -> None:
        if torn:
            _torn_write(state_dict, path)
        if errors:  # the first failure says it; the rest would repeat it
            return
        try:
            type(ce).save(ce, state_dict, path)
        except Exception as e:  # recorded; raised on every rank after the exchange
            record(path, e)

    def makedirs(path: str, exist_ok: bool = False) -> None:
        try:
            type(ce).makedirs(ce, path, exist_ok=exist_ok)
        except Exception as e:
            record(path, e)

    def copy_scripts(save_path: str) -> None:
        try:
            type(engine)._copy_recovery_script(engine, save_path)
        except Exception as e:
            record(save_path, e)

    ce.save, ce.makedirs = save, makedirs
    engine._copy_recovery_script = copy_scripts
    try:
        yield
    finally:
        del ce.save, ce.makedirs, engine._copy_recovery_script


def _space_left(path: str) -> str:
    """`` (No space left on device: N bytes free)`` when the file system of ``path`` is
    (nearly) full, else ``""``: torch's zip writer reports a full disk as an opaque
    ``RuntimeError`` (``unexpected pos ...``)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f" (No space left on device: {free} bytes free)" if free < 1 << 20 else ""


def _failures(errors: list[str]) -> list[tuple[int, str]]:
    """Collective: (rank, first error) of every rank that recorded one."""
    return [(r, e[0]) for r, e in enumerate(gather_objects(errors[:1])) if e]


def save(engine: Any, ckpt_dir: Path, step: int, rank_state: dict, shared_state: dict,
         keep_last: int, kill_in_write: bool = False) -> str:
    """Collective: save tag ``global_step<step>`` with client state, move ``latest``, prune.

    ``rank_state`` is this rank's (loader position, RNG ...); ``shared_state`` is identical on
    all ranks (step, epoch, config). Returns the tag. A failed write on any rank raises
    :class:`~higr_dist.engine.errors.CheckpointFailed` on every rank, with the partial tag
    deleted and ``latest`` unchanged (module docstring). ``kill_in_write``: debug, SIGKILL in
    the middle of this rank's first file.
    """
    tag = tag_for(step)
    client = dict(shared_state)
    client["ranks"] = gather_objects(rank_state)
    errors: list[str] = []
    with _guarded_writes(engine, errors, kill_in_write):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    failed = _failures(errors)  # also the barrier: every rank's files are on disk
    if not failed and dist.get_rank() == 0:
        try:
            _write_pointer(ckpt_dir, tag)
            prune(ckpt_dir, keep_last)
        except OSError as e:
            errors.append(f"{ckpt_dir / LATEST}: {type(e).__name__}: {e}")
        failed = _failures(errors)
    elif not failed:
        failed = _failures(errors)
    if failed:
        previous = None
        if dist.get_rank() == 0:
            previous = _previous_tag(ckpt_dir, tag)
            if previous != tag:
                shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # best effort: disk is full
        box = [previous]
        dist.broadcast_object_list(box, src=0)
        rank, error = failed[0]
        kept = f"{ckpt_dir / box[0]} is intact and a rerun resumes from it" if box[0] \
            else "there is no earlier checkpoint"
        raise CheckpointFailed(
            f"checkpoint {ckpt_dir / tag} could not be written ({len(failed)} rank(s) failed; "
            f"rank {rank}: {error}); {kept}")
    return tag


def _previous_tag(ckpt_dir: Path, tag: str) -> str | None:
    """The tag ``latest`` names after a failed save of ``tag`` (None: none or unreadable)."""
    try:
        return latest_tag(ckpt_dir)
    except (OSError, ValueError):
        return None


def agreed_latest_tag(ckpt_dir: Path) -> str | None:
    """Collective: the tag every rank resumes from (None = start from scratch), as rank 0 reads
    ``latest``; raises the same one-line error on every rank when rank 0's pointer is broken or
    some rank cannot see the tag's folder (see the module docstring). Not distributed: just
    :func:`latest_tag`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return latest_tag(ckpt_dir)
    box: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            box = [latest_tag(ckpt_dir), None]
        except FileNotFoundError as e:
            box = [None, str(e)]
    dist.broadcast_object_list(box, src=0)
    tag, error = box
    if error is not None:
        raise FileNotFoundError(f"rank 0: {error}")
    if tag is None:
        return None
    blind = [r for r, seen in enumerate(gather_objects((ckpt_dir / tag).is_dir())) if not seen]
    if blind:
        raise RuntimeError(f"rank 0 resumes from {ckpt_dir / tag} but rank(s) "
                           f"{', '.join(map(str, blind))} cannot see that folder: run.out_dir must "
                           "be on a filesystem every node mounts at the same path")
    return tag


def load(engine: Any, ckpt_dir: Path, tag: str | None = None) -> tuple[str, dict] | None:
    """Load checkpoint ``tag`` (default: the one ``latest`` names, read by this rank) into
    ``engine``; (tag, client_state) or None when there is none. The trainer passes the tag of
    :func:`agreed_latest_tag` so all ranks load the same one."""
    if tag is None:
        tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    world = dist.get_world_size()
    if len(client.get("ranks", [])) != world:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} was written by "
                           f"{len(client.get('ranks', []))} ranks, this run has {world}; resume "
                           "with the same world size (data positions are per rank)")
    return tag, client


# --------------------------------------------------------------------------------------------
# consolidated fp32 export
# --------------------------------------------------------------------------------------------


def _lowp_master_map(optimizer: Any) -> dict[int, torch.Tensor]:
    """id(param) -> fp32 master copy for DeepSpeed's ZeRO-0 fp16/bf16 optimizers (else empty).

    FP16_UnfusedOptimizer keeps ``fp32_groups`` (lists parallel to ``fp16_groups``);
    FP16_Optimizer keeps one flat ``fp32_groups_flat`` tensor per group.
    """
    lowp = getattr(optimizer, "fp16_groups", None)
    if not lowp:
        return {}
    out: dict[int, torch.Tensor] = {}
    if getattr(optimizer, "fp32_groups", None):
        for lp_group, hp_group in zip(lowp, optimizer.fp32_groups):
            for lp, hp in zip(lp_group, hp_group):
                out[id(lp)] = hp
    elif getattr(optimizer, "fp32_groups_flat", None):
        for lp_group, flat in zip(lowp, optimizer.fp32_groups_flat):
            offset = 0
            for lp in lp_group:
                out[id(lp)] = flat[offset:offset + lp.numel()].view_as(lp)
                offset += lp.numel()
    return out


def consolidated_fp32_state_dict(engine: Any, dst: int | None = 0) -> dict[str, torch.Tensor]:
    """Collective: the full fp32 state dict of ``engine.module``, on CPU, on rank ``dst`` (the
    other ranks get ``{}``; ``dst=None``: every rank gets it).

    Parameters come from the optimizer's fp32 master weights whatever the ZeRO stage and
    precision; buffers (replicated, never sharded) are taken as they are, floats cast to fp32.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    keep = dst is None or not (dist.is_available() and dist.is_initialized()) \
        or dist.get_rank() == dst
    module: nn.Module = engine.module
    masters = _lowp_master_map(engine.optimizer)
    out: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor | None] = {}  # tied parameters are assembled once
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in done:
            full = safe_get_full_fp32_param(p)  # a collective under ZeRO: every rank calls it
            if full is None and hasattr(p, "ds_id"):  # frozen ZeRO-3 param: no fp32 master
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.data.detach().clone() if keep else None
            if full is None:
                full = masters.get(id(p), p.detach())
            # other ranks drop the gathered tensor right away (no host copy)
            done[id(p)] = full.detach().float().cpu().clone() if keep else None
        if keep:
            out[name] = done[id(p)]
    if not keep:
        return {}
    params = set(out)
    for name, b in module.state_dict().items():
        if name in params:
            continue
        t = b.detach()
        out[name] = (t.float() if t.is_floating_point() else t).cpu().clone()
    return out


def save_state_file(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict atomically (temp file + ``os.replace``): readers see the previous
    file or the new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict written by :func:`save_state_file` (CPU tensors)."""
    return torch.load(path, map_location="cpu", weights_only=True)

