"""Resume on a different world size: a checkpoint's model and optimizer, per parameter, into
an engine of any world size and ZeRO stage.

Design
------
DeepSpeed's checkpoints shard the optimizer per rank (ZeRO-1/2 flat partitions, ZeRO-3
parameter partitions) and its loader refuses another data-parallel world size. So when the
world size changed, rank 0 first rewrites the tag, once, as one folder per parameter,
``<tag>.portable/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``, DeepSpeed's *universal checkpoint*
layout:

- ZeRO-1/2/3 checkpoints (``*optim_states.pt`` files) go through DeepSpeed's own converter,
  ``deepspeed.checkpoint.ds_to_universal`` (run as a child process, which also keeps its
  worker pool out of the rank);
- ZeRO-0 checkpoints (one rank, or stage 0 at any world size) hold the whole optimizer in the
  model-states file: a torch AdamW state dict (fp32), or DeepSpeed's bf16/fp16 optimizer with
  its fp32 master groups; their entries follow the order of ``ds_config.param_groups``, which
  maps them back to parameter names.

The folder appears under its final name only when complete (written as ``.tmp``, renamed),
and a later conversion of the same tag reuses it. Every rank then, with its engine built for
the new world, sets parameter by parameter the fp32 master weight and the two Adam moments
(DeepSpeed's ``safe_set_full_*`` under ZeRO and the bf16 optimizer, the fp32 masters of the
ZeRO-0 fp16/bf16 optimizer, the torch optimizer's own state at fp32 ZeRO-0), copies the master
into the module's (low-precision) weight, and sets Adam's step, the LR scheduler (and the
learning rate of every parameter group), and the engine's step counters. Memory: one
parameter's three tensors at a time. Then it reads everything back through the getters
(``safe_get_full_*``, a different code path from the setters) and raises unless every value
equals the file's: the resumed state is exact, not approximately right.

The data position is the loader's business (``higr_dist.data.loader.reshard_states``), the
per-rank client state (RNG, buffers) the trainer's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from higr_dist.engine.checkpoint import _lowp_master_map
from higr_dist.engine.ds_config import param_groups

MOMENTS = ("exp_avg", "exp_avg_sq")
PORTABLE_SUFFIX = ".portable"


def written_by(tag_dir: Path) -> dict:
    """What wrote checkpoint ``tag_dir``: ``{"world_size", "zero_stage"}``, from DeepSpeed's
    model-states file (memory-mapped: only the small entries are read)."""
    if not list(tag_dir.glob("*model_states.pt")):
        raise FileNotFoundError(f"{tag_dir} has no model-states file")
    state = model_states(tag_dir)
    optim = list(tag_dir.glob("*optim_states.pt"))
    zero = int(state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    return {"world_size": int(state["dp_world_size"]), "zero_stage": zero if optim else 0}


def model_states(tag_dir: Path) -> dict:
    """DeepSpeed's model-states file of ``tag_dir`` (rank 0's under ZeRO-3), memory-mapped:
    the engine counters, the LR scheduler and the trainer's client state."""
    return torch.load(sorted(tag_dir.glob("*model_states.pt"))[0], map_location="cpu",
                      weights_only=False, mmap=True)


def portable_dir(tag_dir: Path) -> Path:
    return tag_dir.with_name(tag_dir.name + PORTABLE_SUFFIX)


def convert(tag_dir: Path, build_model: Callable[[], nn.Module], weight_decay: float) -> Path:
    """Rank 0: write (or reuse) ``<tag>.portable`` for ``tag_dir``; returns its path.
    ``build_model`` builds the run's model (its parameter names and order map a ZeRO-0
    optimizer state back to names; not called for ZeRO-1/2/3 checkpoints)."""
    out = portable_dir(tag_dir)
    if (out / "meta.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if list(tag_dir.glob("*optim_states.pt")):
        proc = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
             "--num_extract_workers", "1", "--num_merge_workers", "1",
             "--input_folder", str(tag_dir), "--output_folder", str(tmp)],
            capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"converting {tag_dir} for another world size failed: {last}")
    else:
        _write_from_zero0(tag_dir, build_model(), weight_decay, tmp)
    meta = {"source": tag_dir.name, **written_by(tag_dir)}
    (tmp / "meta.json").write_text(json.dumps(meta))
    os.replace(tmp, out)
    return out


def _save_param(root: Path, name: str, **tensors: torch.Tensor) -> None:
    folder = root / "zero" / name
    folder.mkdir(parents=True, exist_ok=True)
    for key, t in tensors.items():
        torch.save(t.detach().float().cpu().clone(), folder / f"{key}.pt")


def _write_from_zero0(tag_dir: Path, model: nn.Module, weight_decay: float, out: Path) -> None:
    """The per-parameter layout from a ZeRO-0 checkpoint (see the module docstring)."""
    state = model_states(tag_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for g in param_groups(model, weight_decay) for p in g["params"]]
    opt = state["optimizer"]
    if "fp32_groups" in opt:  # DeepSpeed's ZeRO-0 fp16/bf16 optimizer: fp32 masters
        masters = [t for group in opt["fp32_groups"] for t in group]
        inner = opt["optimizer_state_dict"]
    elif "fp32_groups_flat" in opt:
        raise RuntimeError(f"{tag_dir}: a fused fp16 ZeRO-0 optimizer state cannot be resharded")
    else:  # the torch optimizer on the module's own fp32 weights
        masters = [state["module"][n] for n in ordered]
        inner = opt
    index = [i for g in inner["param_groups"] for i in g["params"]]
    if len(index) != len(ordered) or len(masters) != len(ordered):
        raise RuntimeError(f"{tag_dir}: its optimizer holds {len(index)} parameters, the model "
                           f"has {len(ordered)}")
    for name, i, master in zip(ordered, index, masters):
        st = inner["state"].get(i, {})
        zeros = torch.zeros_like(master, dtype=torch.float32)
        _save_param(out, name, fp32=master.reshape(model.get_parameter(name).shape),
                    **{k: st.get(k, zeros).reshape(model.get_parameter(name).shape)
                       for k in MOMENTS})


def _load_tensor(path: Path, shape: torch.Size) -> torch.Tensor:
    t = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(t, dict):  # ZeRO-1/2 universal files: {"param": tensor, "cat_dim": ...}
        t = t["param"]
    return t.float().reshape(shape)


def _base_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizer under DeepSpeed's wrappers (an empty list when there is none)."""
    o = optimizer
    while o is not None and not isinstance(o, torch.optim.Optimizer):
        o = getattr(o, "optimizer", None)
    return [] if o is None else [o]


def _kind(p: nn.Parameter, masters: dict[int, torch.Tensor]) -> str:
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # None: no fragment on this rank
        return "deepspeed"
    return "lowp" if id(p) in masters else "torch"


def apply(engine: Any, scheduler: Any, folder: Path, model_states: dict) -> dict:
    """Collective: load ``folder`` (a ``.portable`` tag) and the engine counters and LR
    schedule of ``model_states`` into ``engine``; verify; return figures for the log."""
    import deepspeed
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    module: nn.Module = engine.module
    optimizer = engine.optimizer
    masters = _lowp_master_map(optimizer)
    bases = _base_optimizers(optimizer)
    step = int(model_states["global_steps"])
    torch_state = bases[0].state if bases else {}
    n_params = n_elements = 0
    with torch.no_grad():
        # Adam creates its state at the first step: create it now (DeepSpeed links each
        # parameter's view of it lazily, then), so the moments have somewhere to go
        for base in bases:
            # ZeRO-3 puts its flat fp32 partitions into the groups only while it steps
            held = [q for group in base.param_groups for q in group["params"]]
            for q in [*held, *getattr(optimizer, "fp32_partitioned_groups_flat", [])]:
                if not base.state[q]:
                    base.state[q].update(step=torch.zeros((), dtype=torch.float32),
                                         exp_avg=torch.zeros_like(q),
                                         exp_avg_sq=torch.zeros_like(q))
        link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            src = folder / "zero" / name
            fp32 = _load_tensor(src / "fp32.pt", shape)
            moments = {k: _load_tensor(src / f"{k}.pt", shape) for k in MOMENTS}
            kind = _kind(p, masters)
            if kind == "deepspeed":
                safe_set_full_fp32_param(p, fp32)
                for k, v in moments.items():
                    safe_set_full_optimizer_state(p, v, k)
                if hasattr(p, "ds_id"):  # ZeRO-3: the module's partition of the weight
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        if dist.get_rank() == 0:
                            p.data.copy_(fp32.to(p.dtype))
            elif kind == "lowp":
                hp = masters[id(p)]
                hp.copy_(fp32)
                st = bases[0].state[hp]
                st.update({k: v.to(hp.device) for k, v in moments.items()})
                p.data.copy_(fp32.to(p.dtype))
            else:
                p.data.copy_(fp32)
                torch_state[p].update({k: v.to(p.device) for k, v in moments.items()})
            n_params += 1
            n_elements += fp32.numel()
        if hasattr(optimizer, "update_lp_params"):  # ZeRO-1/2, bf16: masters -> weights
            optimizer.update_lp_params()
        for base in bases:
            for st in base.state.values():
                old = st.get("step")
                st["step"] = (torch.full_like(old, float(step)) if isinstance(old, torch.Tensor)
                              else torch.tensor(float(step)))
        scheduler.load_state_dict(model_states["lr_scheduler"])
        lrs = scheduler.get_last_lr()
        for groups in [optimizer.param_groups, *(b.param_groups for b in bases)]:
            for g, lr in zip(groups, lrs):
                g["lr"] = lr
        engine.global_steps = step
        engine.global_samples = int(model_states.get("global_samples", 0))
        engine.skipped_steps = int(model_states.get("skipped_steps", 0))
    mismatched = _verify(engine, folder, masters, bases, step, safe_get_full_fp32_param,
                         safe_get_full_optimizer_state)
    if mismatched:
        raise RuntimeError(f"resuming from {folder} on another world size: {len(mismatched)} "
                           f"tensor(s) differ from the checkpoint after loading, e.g. "
                           f"{', '.join(mismatched[:3])}")
    return {"params": n_params, "elements": n_elements, "step": step, "lr": lrs[0]}


def _verify(engine: Any, folder: Path, masters: dict, bases: list, step: int,
            get_fp32: Any, get_state: Any) -> list[str]:
    """Collective: the names of the tensors whose loaded value differs from the folder's."""
    import deepspeed

    bad: list[str] = []
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        src = folder / "zero" / name
        want = {"fp32": _load_tensor(src / "fp32.pt", shape)}
        want.update({k: _load_tensor(src / f"{k}.pt", shape) for k in MOMENTS})
        kind = _kind(p, masters)
        if kind == "deepspeed":
            got = {"fp32": get_fp32(p)}
            got.update({k: get_state(p, k) for k in MOMENTS})
            with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") \
                    else contextlib.nullcontext():
                weight = p.detach().clone()
        elif kind == "lowp":
            hp = masters[id(p)]
            got = {"fp32": hp, **{k: bases[0].state[hp][k] for k in MOMENTS}}
            weight = p.detach()
        else:
            got = {"fp32": p.detach(), **{k: bases[0].state[p][k] for k in MOMENTS}}
            weight = p.detach()
        for key, value in want.items():
            if not torch.equal(got[key].detach().float().cpu().reshape(shape), value):
                bad.append(f"{name}/{key}")
        if not torch.equal(weight.cpu().reshape(shape), want["fp32"].to(weight.dtype)):
            bad.append(f"{name}/weight")
    for base in bases:
        for st in base.state.values():
            if "step" in st and float(st["step"]) != float(step):
                bad.append(f"optimizer step {float(st['step'])} != {step}")
                break
    return bad

