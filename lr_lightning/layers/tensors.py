"""Read and write parameters whole, whether they are plain tensors or FSDP2-sharded DTensors."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathers an FSDP2 shard (a collective: call it on every process)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` held by this process (the tensor itself unless it is a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def write_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param <- value`` in place, where ``value`` is the whole tensor and ``param`` may be sharded."""
    value = value.to(device=local_tensor(param).device, dtype=param.dtype)
    if isinstance(param, DTensor):
        value = distribute_tensor(value, param.device_mesh, param.placements).to_local()
    local_tensor(param).copy_(value)
