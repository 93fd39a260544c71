"""Sharded gradients: every rank reaches the same global norm, clip coefficient and inf verdict.

Each rank reduces its local gradients in the fused read (Σ|g|^p, or max |g| for p = inf, and
found_inf); one all-reduce per call combines them; the finalize (root, 1e-6, clip coefficient)
runs after it, once, on the global value. DTensor gradients need no group: they are replaced by
their local shards, a shard held by several ranks (replicated placements) counts once, and the
all-reduce runs over the default group, so gradients on several meshes combine in one collective.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _dtensor_type():
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def has_dtensor(tensors: list[torch.Tensor]) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def localize(tensors: list[torch.Tensor], process_group):
    """(local tensors, copies per tensor, group): DTensors become their local shards.

    `copies[i]` is how many ranks hold the same elements as tensor i (the product of the mesh
    sizes along its Replicate placements), so each element counts once in the global sum.
    """
    dtensor = _dtensor_type()
    local, copies = [], []
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, dtensor):
            local.append(tensor)
            copies.append(1)
            continue
        count = 1
        for mesh_dim, placement in enumerate(tensor.placements):
            if placement.is_partial():
                raise ValueError(
                    f"gradient {index} is a DTensor with a Partial placement (a pending sum): its "
                    "local values are not a shard of the gradient; redistribute it to Shard or "
                    "Replicate before clipping"
                )
            if placement.is_replicate():
                count *= tensor.device_mesh.size(mesh_dim)
        local.append(tensor.to_local())
        copies.append(count)
    group = process_group if process_group is not None else dist.group.WORLD
    return local, copies, group


def all_reduce_norm_state(
    power_sum: torch.Tensor, found_inf: torch.Tensor, norm_type: float, process_group
) -> tuple[torch.Tensor, torch.Tensor]:
    """One all-reduce of (power, found_inf, NaN flag): SUM for a p-norm, MAX for the inf-norm.

    The NaN flag travels separately because collectives' MAX need not propagate NaN; the
    returned tensors are equal on every rank.
    """
    inf_norm = math.isinf(norm_type)
    is_nan = torch.isnan(power_sum)
    power = (
        torch.where(is_nan, torch.full_like(power_sum, math.inf), power_sum)
        if inf_norm
        else power_sum
    )
    packed = torch.stack([power, found_inf.to(torch.float64), is_nan.to(torch.float64)])
    dist.all_reduce(
        packed, op=dist.ReduceOp.MAX if inf_norm else dist.ReduceOp.SUM, group=process_group
    )
    power_sum = torch.where(packed[2] > 0, torch.full_like(packed[0], math.nan), packed[0])
    return power_sum, (packed[1] > 0).to(torch.float32)
