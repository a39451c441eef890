"""Parameters that may be partitioned: whole-tensor edits that work with and without ZeRO-3.

Design
------
The models are plain ``nn.Module``s. Under ZeRO-3 the trainer builds them inside DeepSpeed's
``zero.Init``, which partitions each submodule's parameters over the ranks as soon as that
submodule is constructed, so a rank never holds the whole fp32 model. A parent module that
then edits its children's parameters as whole tensors (``init_weights``'s GPT-2
initialisation, loading a state dict) must first gather each one: :func:`whole` does that for
one parameter at a time (peak: one full parameter), with rank 0's result kept, and is a no-op
for an ordinary parameter. DeepSpeed is imported only when a parameter is partitioned, i.e.
only when the trainer built the model that way. Every rank runs the same edits (drawing the
same random numbers), so the RNG streams stay aligned and the values equal an unpartitioned
build's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


def partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 partitioned parameter (``ds_id`` set by ``zero.Init``)."""
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def whole(p: nn.Parameter) -> Iterator[nn.Parameter]:
    """``p`` as a whole tensor inside the block; edits made on rank 0 are kept (partitioned
    again on exit). A no-op for an ordinary parameter."""
    if not partitioned(p):
        yield p
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        yield p


@torch.no_grad()
def load_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``module.load_state_dict(state, strict=True)`` that also works on partitioned
    parameters (one gathered at a time)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = set(module.state_dict()) - set(params)  # persistent buffers only
    if not any(partitioned(p) for p in params.values()):
        module.load_state_dict(state, strict=True)
        return
    missing = sorted((set(params) | buffers) - set(state))
    unexpected = sorted(set(state) - set(params) - buffers)
    if missing or unexpected:
        raise RuntimeError(f"state dict does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    done: set[int] = set()
    for name, p in params.items():
        if id(p) in done:
            continue
        done.add(id(p))
        with whole(p):
            if tuple(state[name].shape) != tuple(p.shape):
                raise RuntimeError(f"{name}: state has shape {tuple(state[name].shape)}, the "
                                   f"model {tuple(p.shape)}")
            p.data.copy_(state[name].to(p.dtype))
    module.load_state_dict({n: state[n] for n in buffers}, strict=False)
