"""Sharded gradients across processes (gloo, CPU): the global norm, one verdict on every rank."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available"
)

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
SIZES = [(10, 3), (7,), (1, 5), (64, 2)]  # 1 row: some ranks get an empty shard


def _full_gradients():
    generator = torch.Generator().manual_seed(7)
    return [
        torch.randn(size, generator=generator, dtype=torch.float64).float() * 3 for size in SIZES
    ]


def _shard(tensor, rank, world):
    return tensor.tensor_split(world, dim=0)[rank].clone()


def _reference_norm(tensors, norm_type):
    from fusedclip import reference

    return reference.reduce(tensors, norm_type, False)[0].item()


def _close(actual, expected, what, rtol=1e-6):
    actual, expected = float(actual), float(expected)
    if math.isnan(expected):
        assert math.isnan(actual), f"{what}: {actual} is not NaN"
    elif math.isinf(expected):
        assert actual == expected, f"{what}: {actual} != {expected}"
    else:
        assert abs(actual - expected) <= rtol * abs(expected), f"{what}: {actual} != {expected}"


def _check_process_group(rank, world):
    import fusedclip

    full = _full_gradients()
    for norm_type in NORM_TYPES:
        shards = [_shard(t, rank, world) for t in full]
        expected_norm = _reference_norm(full, norm_type)
        max_norm = expected_norm / 3
        norm = fusedclip.clip_grad_norm_(
            [_parameter(s) for s in shards], max_norm, norm_type, process_group=dist.group.WORLD
        )
        _close(norm, expected_norm, f"rank {rank} p={norm_type} norm")
        coef = min(1.0, max_norm / (expected_norm + 1e-6))
        for shard, original in zip(shards, full, strict=True):
            expected = (_shard(original, rank, world).double() * coef).float()
            assert torch.allclose(shard, expected, rtol=2e-7, atol=0), (
                f"rank {rank} p={norm_type} shard"
            )
        total = fusedclip.get_total_norm(
            [_shard(t, rank, world) for t in full], norm_type, process_group=dist.group.WORLD
        )
        gathered = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(gathered, total.float())
        assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks disagree on the norm"


def _check_overflow_on_one_rank(rank, world):
    import fusedclip

    for bad in (math.inf, math.nan):
        for norm_type in (2.0, math.inf):
            shards = [_shard(t, rank, world) for t in _full_gradients()]
            if rank == world - 1:
                shards[0].view(-1)[0] = bad
            result = fusedclip.fused_clip_(
                shards, max_norm=1.0, norm_type=norm_type, process_group=dist.group.WORLD
            )
            assert result.found_inf.item() == 1.0, (
                f"rank {rank} missed the overflow on another rank"
            )
            norm = result.total_norm.item()
            assert math.isnan(norm) if math.isnan(bad) else norm == math.inf, (
                f"rank {rank}: norm {norm}"
            )


def _check_rank_without_gradients_gets_the_global_result(rank, world):
    import fusedclip

    full = _full_gradients()
    empty_rank = world - 1
    held = [_shard(t, r, world) for r in range(world) if r != empty_rank for t in full]
    for norm_type in (2.0, math.inf):
        for bad in (None, math.inf):
            shards = [_shard(t, rank, world) for t in full] if rank != empty_rank else []
            if bad is not None and rank == 0:
                shards[0].view(-1)[0] = bad
            result = fusedclip.fused_clip_(
                shards, max_norm=1.0, norm_type=norm_type, process_group=dist.group.WORLD
            )
            state = torch.stack(
                [result.total_norm.double(), result.clip_coef.double(), result.found_inf.double()]
            )
            gathered = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
            dist.all_gather(gathered, state)
            assert all(torch.equal(g, gathered[0]) for g in gathered), (
                f"rank {rank} p={norm_type} bad={bad}: {gathered}"
            )
            if bad is None:
                _close(result.total_norm, _reference_norm(held, norm_type), f"rank {rank} norm")
            assert result.found_inf.item() == (bad is not None)
        # error_if_nonfinite: every rank raises, the one without gradients too
        parameters = (
            [_parameter(_shard(t, rank, world)) for t in full] if rank != empty_rank else []
        )
        if rank == 0:
            parameters[0].grad.view(-1)[0] = math.nan
        with pytest.raises(RuntimeError, match="non-finite"):
            fusedclip.clip_grad_norm_(
                parameters, 1.0, norm_type, error_if_nonfinite=True, process_group=dist.group.WORLD
            )


def _check_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import fusedclip

    mesh = init_device_mesh("cpu", (world,))
    mesh_2d = init_device_mesh("cpu", (1, world), mesh_dim_names=("replica", "shard"))
    full = _full_gradients()
    placements = [
        (mesh, [Shard(0)]),
        (mesh, [Replicate()]),
        (mesh_2d, [Replicate(), Shard(0)]),
        (mesh_2d, [Replicate(), Replicate()]),
    ]
    for norm_type in NORM_TYPES:
        grads = [
            distribute_tensor(t.clone(), m, p) for t, (m, p) in zip(full, placements, strict=True)
        ]
        expected_norm = _reference_norm(full, norm_type)
        result = fusedclip.fused_clip_(grads, max_norm=expected_norm / 2, norm_type=norm_type)
        assert type(result.total_norm) is torch.Tensor, "the norm must be a plain tensor"
        _close(result.total_norm, expected_norm, f"rank {rank} p={norm_type} DTensor norm")
        coef = min(1.0, (expected_norm / 2) / (expected_norm + 1e-6))
        for grad, original in zip(grads, full, strict=True):
            expected = (original.double() * coef).float()
            assert torch.allclose(grad.full_tensor(), expected, rtol=2e-7), (
                f"rank {rank} DTensor grad"
            )
    partial = DTensor.from_local(full[0].clone(), mesh, [Partial()])
    try:
        fusedclip.fused_clip_([partial], max_norm=1.0)
    except ValueError as error:
        assert "Partial" in str(error)
    else:
        raise AssertionError("a Partial DTensor gradient must be refused")


def _check_dtensor_parameters_without_gradients_on_one_rank(rank, world):
    """That rank cannot see a gradient's mesh, but its parameters are DTensors: it joins the
    default group the others combine over (instead of returning at once and leaving them
    waiting) and returns their norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fusedclip
    from fusedclip import amp
    from fusedclip.stability import ZClip

    mesh = init_device_mesh("cpu", (world,))
    full = _full_gradients()
    calls = {
        "clip_grad_norm_": lambda ps: fusedclip.clip_grad_norm_(ps, 1.0),
        # These take the gradients from the optimizer or the list: the rank holding none must
        # still join through the parameters.
        "clip_step": lambda ps: amp.clip_step(torch.optim.AdamW(ps), 1.0).total_norm,
        "fused clip_step": lambda ps: (
            amp.clip_step(torch.optim.AdamW(ps, fused=True), 1.0).total_norm
        ),
        "fused clip_step, scaler": lambda ps: _clip_step_with_scaler(ps),
        "ZClip.step": lambda ps: ZClip().step(ps).total_norm,
    }
    for name, call in calls.items():
        parameters = [
            torch.nn.Parameter(distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]))
            for t in full
        ]
        for parameter, grad in zip(parameters, full, strict=True):
            parameter.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])  # a collective
            if rank == world - 1:  # this rank's backward produced no gradient
                parameter.grad = None
        norm = call(parameters)
        gathered = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(gathered, norm.float())
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{name} rank {rank}: {gathered}"
        assert gathered[0].item() > 0, name


def _clip_step_with_scaler(parameters):
    from fusedclip import amp

    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))
    return amp.clip_step(torch.optim.AdamW(parameters, fused=True), 1.0, scaler=scaler).total_norm


def _check_tensor_parallel_submesh_with_data_parallel_replicas(rank, world):
    """DTensors on the "tp" submesh of a (dp, tp) mesh, the same on every dp replica (tensor
    parallelism under DDP): each element counts once, as torch's norm over the DTensor's mesh,
    not once per replica (the other submeshes are the mesh's other dp rows)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fusedclip

    tp = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))["tp"]
    full = _full_gradients()
    placements = [[Shard(0)], [Replicate()], [Shard(0)], [Shard(1)]]
    for norm_type in NORM_TYPES:
        grads = [distribute_tensor(t.clone(), tp, p) for t, p in zip(full, placements, strict=True)]
        expected_norm = _reference_norm(full, norm_type)
        result = fusedclip.fused_clip_(grads, max_norm=expected_norm / 2, norm_type=norm_type)
        _close(result.total_norm, expected_norm, f"rank {rank} p={norm_type} submesh norm")


def _check_group_narrower_than_mesh(rank, world):
    """An explicit group counts a replicated shard once per copy it holds, not per mesh copy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fusedclip

    full = _full_gradients()
    replicated_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replica", "shard"))
    for group in (replicated_mesh["shard"].get_group(), dist.group.WORLD):
        for norm_type in NORM_TYPES:
            grads = [
                distribute_tensor(full[0].clone(), replicated_mesh, [Replicate(), Shard(0)]),
                distribute_tensor(full[1].clone(), replicated_mesh, [Replicate(), Replicate()]),
            ]
            norm = fusedclip.get_total_norm(grads, norm_type, process_group=group)
            _close(norm, _reference_norm(full[:2], norm_type), f"rank {rank} p={norm_type}")
    sharded_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replica", "shard"))
    grad = distribute_tensor(full[0].clone(), sharded_mesh, [Replicate(), Shard(0)])
    before = grad.to_local().clone()
    try:
        fusedclip.fused_clip_(
            [grad], max_norm=0.0, process_group=sharded_mesh["replica"].get_group()
        )
    except ValueError as error:
        assert f"holds 1 of its {world} shards" in str(error), str(error)
        assert str(error).startswith("tensors[0] is a DTensor on a mesh"), str(error)
    else:
        raise AssertionError("a group missing some shards of a DTensor must be refused")
    assert torch.equal(grad.to_local(), before), "a refused call must not touch the gradient"


def _check_plain_tensors_among_dtensors(rank, world):
    """Without a group a plain tensor is ambiguous (replica or shard?); with one it is a shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fusedclip

    mesh = init_device_mesh("cpu", (world,))
    full = _full_gradients()
    sharded = distribute_tensor(full[0].clone(), mesh, [Shard(0)])
    plain = _shard(full[1], rank, world)
    try:
        fusedclip.get_total_norm([sharded, plain])
    except ValueError as error:
        assert "tensors[1] is a plain tensor among DTensor" in str(error), str(error)
    else:
        raise AssertionError("a plain tensor among DTensors without a group must be refused")
    frozen = torch.nn.Parameter(torch.zeros(3))  # no gradient: the names count it all the same
    try:
        fusedclip.clip_grad_norm_([frozen, _parameter(sharded), _parameter(plain)], 1.0)
    except ValueError as error:
        assert "parameters[2].grad is a plain tensor among DTensor" in str(error), str(error)
    else:
        raise AssertionError("a plain tensor among DTensors without a group must be refused")
    for norm_type in NORM_TYPES:
        norm = fusedclip.get_total_norm([sharded, plain], norm_type, process_group=dist.group.WORLD)
        _close(norm, _reference_norm(full[:2], norm_type), f"rank {rank} p={norm_type} mixed")
    fusedclip.clip_grad_value_([_parameter(sharded), _parameter(plain)], 0.5)  # no norm: no count
    assert sharded.to_local().abs().max() <= 0.5 and plain.abs().max() <= 0.5


def _check_dtensor_total_norm_and_a_dtensor_listed_with_its_local_tensor(rank, world):
    """torch's get_total_norm of DTensors is a Replicate DTensor: clip_grads_with_norm_ takes
    it (and a Partial one) as its value. A replicated DTensor listed beside its own local tensor
    has no one count in the global norm: refused, whichever comes first; a sharded one is the
    same memory listed twice, with one count: counted once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    import fusedclip

    mesh = init_device_mesh("cpu", (world,))
    full = _full_gradients()[:2]
    for total_kind in ("torch", "partial"):
        mine = [_parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        theirs = [_parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        total = torch.nn.utils.get_total_norm([p.grad for p in theirs])
        assert isinstance(total, DTensor), type(total)
        torch.nn.utils.clip_grads_with_norm_(theirs, 0.5, total)
        if total_kind == "partial":  # a pending sum whose value is the same norm
            total = DTensor.from_local(total.to_local() / world, mesh, [Partial()])
        fusedclip.clip_grads_with_norm_(mine, 0.5, total)
        for got, want in zip(mine, theirs, strict=True):
            assert torch.allclose(got.grad.full_tensor(), want.grad.full_tensor(), rtol=1e-6), (
                f"rank {rank} {total_kind} total_norm"
            )
    replicated = distribute_tensor(full[0].clone(), mesh, [Replicate()])
    for listed in ([replicated.to_local(), replicated], [replicated, replicated.to_local()]):
        try:
            fusedclip.get_total_norm(listed, process_group=dist.group.WORLD)
        except ValueError as error:
            assert "held by more ranks than the other" in str(error), str(error)
        else:
            raise AssertionError("a DTensor beside its own local tensor must be refused")
    sharded = distribute_tensor(full[0].clone(), mesh, [Shard(0)])
    alone = fusedclip.get_total_norm([sharded])
    for listed in ([sharded.to_local(), sharded], [sharded, sharded.to_local()]):
        norm = fusedclip.get_total_norm(listed, process_group=dist.group.WORLD)
        assert torch.equal(norm, alone), (rank, norm, alone)


def _check_amp_overflow_on_one_rank_skips_everywhere(rank, world):
    from fusedclip import amp

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    if rank == 0:
        model.weight.grad[0, 0] = math.inf
    before = [p.detach().clone() for p in model.parameters()]
    result = amp.unscale_clip_(scaler, optimizer, 1.0, process_group=dist.group.WORLD)
    scaler.step(optimizer)
    scaler.update()
    assert result.found_inf.item() == 1.0, f"rank {rank} missed the overflow on rank 0"
    for parameter, original in zip(model.parameters(), before, strict=True):
        assert torch.equal(parameter, original), f"rank {rank} stepped despite the overflow"
    assert scaler.get_scale() == 8.0, f"rank {rank} did not back off: {scaler.get_scale()}"


def _check_sharded_grad_scaler_skips_on_every_rank(rank, world):
    """FSDP's ShardedGradScaler all-reduces the overflow its unscale_ finds, so that every rank
    skips alike; what fusedclip records in it is all-reduced too, and the steps that fusedclip
    takes itself (clip_step) skip on it. No process_group given: the norm stays this rank's, as
    with torch's clip_grad_norm_ under FSDP1. Its group may be None (the default group): torch's
    default argument is bound at import, often before init_process_group."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from fusedclip import amp

    cases = [
        (path, group, fused, empty)
        for path in ("unscale_clip_", "clip_step")
        for group in (dist.group.WORLD, None)
        for fused in (False, True)
        for empty in (False, True)
        if not (path == "unscale_clip_" and fused)
    ]
    for path, group, fused, empty in cases:
        what = f"rank {rank} {path} group={group} fused={fused} empty={empty}"
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused)
        scaler = ShardedGradScaler("cpu", init_scale=16.0, process_group=group)
        loss = scaler.scale(model(torch.randn(3, 4)).sum())
        if empty and rank == world - 1:  # this rank's backward produced no gradient
            model.zero_grad(set_to_none=True)
        else:
            loss.backward()
        if rank == 0:
            model.weight.grad[0, 0] = math.inf
        before = [p.detach().clone() for p in model.parameters()]
        if path == "unscale_clip_":
            amp.unscale_clip_(scaler, optimizer, 1.0)
            scaler.step(optimizer)
        else:
            amp.clip_step(optimizer, 1.0, scaler=scaler)
        scaler.update()
        for parameter, original in zip(model.parameters(), before, strict=True):
            assert torch.equal(parameter, original), f"{what}: stepped despite rank 0's overflow"
        assert scaler.get_scale() == 8.0, f"{what}: did not back off: {scaler.get_scale()}"


def _check_sharded_grad_scaler_takes_float16_and_its_own_flags_shape(rank, world):
    """ShardedGradScaler.unscale_ unscales float16 gradients, so fusedclip does too; and its
    update() sums the recorded flags in place into the first, so fusedclip records them in its
    shape (1,), mixed with its own unscale_'s and with a rank that has no gradient."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from fusedclip import amp

    grads = []
    for path in ("torch", "unscale_clip_", "clip_step"):
        parameter = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
        optimizer = torch.optim.SGD([parameter], lr=1.0)
        scaler = ShardedGradScaler("cpu", init_scale=8.0)
        scaler.scale(torch.tensor(1.0))
        parameter.grad = torch.tensor([8.0, 16.0, 24.0 + rank], dtype=torch.float16)
        if path == "torch":
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([parameter], 1.0)
        elif path == "unscale_clip_":
            amp.unscale_clip_(scaler, optimizer, 1.0)
        else:
            amp.clip_step(optimizer, 1.0, scaler=scaler)
            parameter.grad = -parameter.detach()  # what the lr=1 step applied
        grads.append(parameter.grad.clone())
    for path, grad in zip(("unscale_clip_", "clip_step"), grads[1:], strict=True):
        assert torch.allclose(grad.float(), grads[0].float(), rtol=1e-3), f"rank {rank} {path}"
    for order in ("fusedclip first", "scaler's own first", "both fusedclip"):
        first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (first, second)]
        scaler = ShardedGradScaler("cpu", init_scale=8.0)
        scaler.scale(first(torch.ones(1, 2)).sum()).backward()  # `second` has no gradient
        if order == "fusedclip first":
            amp.unscale_clip_(scaler, optimizers[0], 1.0)
            scaler.step(optimizers[0])
            scaler.step(optimizers[1])  # the scaler's own unscale_: a (1,) flag
        elif order == "scaler's own first":
            scaler.unscale_(optimizers[0])
            scaler.step(optimizers[0])
            amp.clip_step(optimizers[1], 1.0, scaler=scaler)
        else:
            amp.clip_step(optimizers[0], 1.0, scaler=scaler)
            amp.clip_step(optimizers[1], 1.0, scaler=scaler)
        scaler.update()
        assert scaler.get_scale() == 8.0, f"rank {rank} {order}: {scaler.get_scale()}"


def _check_zclip_on_shards_decides_as_unsharded(rank, world):
    from fusedclip.stability import ZClip

    def rule(process_group=None):
        return ZClip(warmup_steps=3, max_norm=None, skip_on_spike=True, process_group=process_group)

    sharded_rule, unsharded_rule = rule(dist.group.WORLD), rule()
    skips = []
    for step, factor in enumerate([1.0, 1.1, 0.9, 1.05, 8.0, 1.0]):
        grads = [t * factor for t in _full_gradients()]
        shards = [_shard(g, rank, world) for g in grads]
        mine, theirs = sharded_rule.step(shards), unsharded_rule.step(grads)
        _close(mine.threshold, theirs.threshold, f"rank {rank} step {step} ZClip threshold")
        assert bool(mine.skip) == bool(theirs.skip), f"rank {rank} step {step} skip"
        for shard, grad in zip(shards, grads, strict=True):
            assert torch.allclose(shard, _shard(grad, rank, world), rtol=1e-5), "clipped shard"
        skips.append(bool(theirs.skip))
    assert skips == [False] * 4 + [True, False], skips


def _check_zclip_state_is_the_same_on_a_rank_without_gradients(rank, world):
    """ZClip keeps the float64 norm: a rank without gradients got it rounded to float32, so
    its EMAs, thresholds and then its skips drifted from the other ranks'."""
    from fusedclip.stability import ZClip

    zclip = ZClip(warmup_steps=2, process_group=dist.group.WORLD)
    for factor in (1.0, 1.3, 0.7):
        grads = [torch.tensor([0.1, 0.2, 0.3]) * factor] if rank == 0 else []
        zclip.step(grads)
    state = torch.stack([zclip.state_dict()[key] for key in ("mean", "var")])
    states = [torch.empty_like(state) for _ in range(world)]
    dist.all_gather(states, state)
    assert all(torch.equal(other, states[0]) for other in states), f"rank {rank}: {states}"


def _check_fsdp2_training_matches_unsharded(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fusedclip

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    sharded, unsharded = model(), model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in sharded:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded_optimizer = torch.optim.SGD(sharded.parameters(), lr=0.1)
    unsharded_optimizer = torch.optim.SGD(unsharded.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(3)
    for step in range(4):
        inputs = torch.randn(6, 8, generator=generator)  # the same batch on every rank
        for network in (sharded, unsharded):
            network.zero_grad()
            network(inputs).square().sum().backward()
        norm = fusedclip.clip_grad_norm_(sharded.parameters(), 0.5)
        expected = torch.nn.utils.clip_grad_norm_(unsharded.parameters(), 0.5)
        _close(norm, expected, f"rank {rank} step {step} FSDP2 norm", rtol=1e-5)
        sharded_optimizer.step()
        unsharded_optimizer.step()
    for mine, theirs in zip(sharded.parameters(), unsharded.parameters(), strict=True):
        assert torch.allclose(mine.full_tensor(), theirs, rtol=1e-5, atol=1e-6), (
            f"rank {rank} FSDP2 parameter"
        )


def _parameter(grad):
    parameter = torch.nn.Parameter(torch.zeros_like(grad))
    parameter.grad = grad
    return parameter


def _worker(rank, world, init_file, checks):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for check in checks:
            globals()[check](rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_gradients(world):
    checks = [
        "_check_process_group",
        "_check_overflow_on_one_rank",
        "_check_rank_without_gradients_gets_the_global_result",
        "_check_dtensor",
        "_check_dtensor_parameters_without_gradients_on_one_rank",
        "_check_tensor_parallel_submesh_with_data_parallel_replicas",
        "_check_group_narrower_than_mesh",
        "_check_plain_tensors_among_dtensors",
        "_check_dtensor_total_norm_and_a_dtensor_listed_with_its_local_tensor",
        "_check_amp_overflow_on_one_rank_skips_everywhere",
        "_check_sharded_grad_scaler_skips_on_every_rank",
        "_check_sharded_grad_scaler_takes_float16_and_its_own_flags_shape",
        "_check_zclip_on_shards_decides_as_unsharded",
        "_check_zclip_state_is_the_same_on_a_rank_without_gradients",
        "_check_fsdp2_training_matches_unsharded",
    ]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(
            _worker, args=(world, os.path.join(folder, "init"), checks), nprocs=world, join=True
        )
