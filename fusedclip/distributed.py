"""Sharded gradients: every rank reaches the same global norm, clip coefficient and inf verdict.

Each rank reduces its local gradients in the fused read (their norm and found_inf); one
all-gather per call brings every rank's pair to every rank, which combines them in rank order;
the finalize (1e-6, clip coefficient) runs after it, once, on the global value. DTensor gradients need no group: they are replaced by
their local shards, a shard held by several ranks of the group (Replicate placements, or the
other submeshes of the mesh a DTensor's submesh was cut from) counts once,
and the collective runs over the default group, so gradients on several meshes combine in one
collective. Partial placements (a pending sum) are refused, and so are plain tensors among
DTensors when no group says what they are.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from fusedclip.norms import combine_norms


def _dtensor_type():
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def check_process_group(process_group) -> None:
    """A TypeError for a process_group that is neither None nor a torch.distributed group."""
    if process_group is None:
        return
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup (dist.group.WORLD, or one "
            f"from dist.new_group) or None, got {process_group!r}"
        )


def has_dtensor(tensors: Iterable[torch.Tensor]) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def group_of_dtensors(tensors: Iterable) -> object | None:
    """The group that `localize` combines DTensors over when no group is given (the default
    group, dist.group.WORLD), where `tensors` hold one; None otherwise."""
    return dist.group.WORLD if has_dtensor(tensors) else None


def plain_value(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's value as a plain tensor: a DTensor's local tensor when it is replicated along
    every mesh dim, else its full tensor (a collective, as any DTensor op on it would be)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        return tensor
    if all(placement.is_replicate() for placement in tensor.placements):
        return tensor.to_local()
    return tensor.full_tensor()


def group_to_join(process_group, grads: list, parameters: Iterable) -> object | None:
    """The group of a call over `grads`, the gradients of `parameters`: `process_group`, or,
    where this rank has no gradient but its parameters are DTensors, the group the other ranks
    combine theirs over (which it must join, or they wait for it). `parameters` is read only
    in that case (an iterator will do)."""
    if process_group is not None or grads:
        return process_group
    return group_of_dtensors(parameters)


def localize(tensors: list[torch.Tensor], process_group, name_of: Callable[[int], str]):
    """(local tensors, copies per tensor, group): DTensors become their local shards.

    `copies[i]` is how many ranks of the group hold the same elements as tensor i (its shard's
    replicas along Replicate placements), so each element counts once in the global sum. The
    group is `process_group`, or the default group when none is given. `name_of(i)` is how
    messages name tensor i.
    """
    dtensor = _dtensor_type()
    group = process_group if process_group is not None else dist.group.WORLD
    local = local_shards(tensors, name_of)
    copies = []
    for index, tensor in enumerate(tensors):
        if isinstance(tensor, dtensor):
            copies.append(
                _copies_in_group(
                    tensor.device_mesh,
                    tuple(tensor.placements),
                    group,
                    lambda index=index: name_of(index),
                )
            )
        elif process_group is None:
            raise ValueError(
                f"{name_of(index)} is a plain tensor among DTensor gradients, and without "
                "process_group= fusedclip cannot tell whether it is replicated on every rank "
                "or this rank's own shard: make it a DTensor (Replicate or Shard), or pass "
                "process_group= to count plain tensors as this rank's disjoint share"
            )
        else:
            copies.append(1)
    return local, copies, group


def local_shards(tensors: list[torch.Tensor], name_of: Callable[[int], str]) -> list[torch.Tensor]:
    """Each DTensor's local tensor (a view: scaling it in place scales the DTensor); `name_of(i)`
    is how messages name tensor i."""
    dtensor = _dtensor_type()
    local = []
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, dtensor):
            local.append(tensor)
            continue
        for placement in tensor.placements:
            if placement.is_partial():
                raise ValueError(
                    f"{name_of(index)} is a DTensor with a Partial placement (a pending sum): its "
                    "local values are not a shard of the gradient; redistribute it to Shard or "
                    "Replicate before clipping"
                )
        local.append(tensor.to_local())
    return local


_copies_cache: dict = {}


def _on_root_mesh(mesh, placements: tuple) -> tuple[object, list[int]]:
    """(mesh, its sharded dims) with a submesh (mesh["tp"] of a (dp, tp) mesh) lifted to the
    mesh it was cut from: a DTensor on a submesh is the same on every submesh of that root, so
    along the root's other dims it is replicated. Counting it on the submesh alone would count
    each replica again (tensor parallelism with data-parallel replicas). A submesh whose dims
    the root does not name (a flattened one) is counted as it is."""
    root = _root_mesh(mesh)
    names, root_names = mesh.mesh_dim_names, getattr(root, "mesh_dim_names", None)
    if root is mesh or not names or not root_names or not set(names) <= set(root_names):
        return mesh, [
            dim for dim, placement in enumerate(placements) if not placement.is_replicate()
        ]
    sharded_names = {
        name
        for name, placement in zip(names, placements, strict=True)
        if not placement.is_replicate()
    }
    return root, [dim for dim, name in enumerate(root_names) if name in sharded_names]


def _root_mesh(mesh):
    getter = getattr(mesh, "_get_root_mesh", None)  # torch >= 2.9
    if getter is not None:
        return getter() or mesh
    from torch.distributed import device_mesh

    resources = getattr(device_mesh, "_mesh_resources", None)
    return (resources.get_root_mesh(mesh) if resources is not None else None) or mesh


def _copies_in_group(mesh, placements: tuple, group, name: Callable[[], str]) -> int:
    """Ranks of `group` holding this rank's shard; checks that the group holds every shard
    (`name()` is how the refusal names the tensor).

    Host-side only (mesh and group membership), cached per (mesh, placements, group).
    """
    key = (mesh, placements, group)
    cached = _copies_cache.get(key)
    if cached is not None:
        return cached
    mesh, sharded = _on_root_mesh(mesh, placements)
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # not on this mesh: the local tensor is empty
        return 1
    shape = tuple(mesh.mesh.shape)
    group_ranks = set(dist.get_process_group_ranks(group))
    # mesh.mesh holds the global rank at each coordinate; product() walks it in the same order.
    members = [
        position
        for position, rank in zip(
            itertools.product(*map(range, shape)), mesh.mesh.flatten().tolist(), strict=True
        )
        if rank in group_ranks
    ]
    shards_seen = len({tuple(position[dim] for dim in sharded) for position in members})
    shards_total = math.prod(shape[dim] for dim in sharded)
    count = sum(all(position[dim] == coordinate[dim] for dim in sharded) for position in members)
    if count == 0 or shards_seen != shards_total:
        raise ValueError(
            f"{name()} is a DTensor on a mesh of shape {shape} with "
            f"placements {list(placements)}, but process_group holds {shards_seen} of its "
            f"{shards_total} shards{'' if count else ' and not this rank'}: pass a group that "
            "spans its Shard dimensions, or no group (the default group)"
        )
    _copies_cache[key] = count
    return count


def combine_across_ranks(
    raw_norm: torch.Tensor, found_inf: torch.Tensor, norm_type: float, process_group
) -> tuple[torch.Tensor, torch.Tensor]:
    """One all-gather of every rank's (norm, found_inf); each rank combines them in rank order.

    Norms are gathered rather than power sums all-reduced: a sum of |g|^p can overflow where the
    norm does not, and a gathered NaN stays NaN whatever the collective does with it. The result
    is equal on every rank (same inputs, same order, same arithmetic).
    """
    state = torch.stack([raw_norm.to(torch.float64), found_inf.to(torch.float64)])
    gathered = [torch.empty_like(state) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, state, group=process_group)
    states = torch.stack(gathered)
    raw_norm = combine_norms(states[:, 0], norm_type)
    return raw_norm, (states[:, 1].amax() > 0).to(torch.float32)


def sum_across_ranks_(tensor: torch.Tensor, process_group) -> None:
    """tensor = its sum over the group's ranks, in place (one all-reduce)."""
    dist.all_reduce(tensor, group=process_group)


def join_empty(norm_type: float, process_group) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank without gradients still takes part in the collective the others wait in, and gets
    its result: (raw_norm, found_inf) of every rank's gradients, on the collective's device."""
    device = torch.device("cpu")
    if dist.get_backend(process_group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return combine_across_ranks(zero, zero, norm_type, process_group)
