"""Parallelism applied to a built model, in one function (torchtitan's ``parallelize`` habit).

Order: SyncBatchNorm in groups of ranks (CUDA, several ranks; ``convert_sync_bn``) -> activation checkpointing ->
torch.compile per block -> FSDP2 ``fully_shard`` per BatchNorm and per module asking for fp32 (``fp32_unit = True``,
e.g. SwAV's prototypes: fp32 units on bf16 runs) -> per block or group -> the head -> the root.
On CUDA it also turns on ``cudnn.benchmark`` (as SwAV's ``main_swav.py`` does): each trunk call sees one of a few
fixed crop shapes, so cuDNN's autotuning runs once per shape and is then reused.
The model files never import any of this.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from seer.models.regnet import checkpoint_segments

__all__ = [
    "parallelize",
    "block_groups",
    "SHARD_UNITS",
    "REDUCE_DTYPES",
    "SYNC_BN_GROUP",
    "sync_bn_group_size",
    "convert_sync_bn",
    "sync_bn_stats",
    "is_fsdp",
]

log = logging.getLogger("seer.distributed")

# FSDP unit choices (``train.fsdp.shard_unit``); seer.config checks a run's value against them once, at load.
SHARD_UNITS = ("block", "group")
# Gradient reduction dtypes (``train.fsdp.reduce_dtype``), checked by seer.config the same way.
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Ranks per SyncBatchNorm group (``train.sync_bn_group``): SEER's models are named ``syncBN64``.
SYNC_BN_GROUP = 64


def sync_bn_group_size(world_size: int, setting: int, *, log_change: bool = False) -> int:
    """Ranks per SyncBatchNorm group for ``train.sync_bn_group = setting`` on ``world_size`` ranks.

    0 means all ranks, 1 no synchronization. Groups must tile the world, so a setting that does not divide it gives
    way to the largest divisor of ``world_size`` not above it (496 ranks with 64 -> groups of 62); a setting of at
    least the world size is one group of all ranks. ``log_change`` logs (warning) when the divisor rule changed it.
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if setting < 0:
        raise ValueError(f"train.sync_bn_group must be >= 0 (0: all ranks, 1: no sync), got {setting}")
    if setting == 0 or setting >= world_size:
        return world_size
    size = max(d for d in range(1, setting + 1) if world_size % d == 0)
    if size != setting and log_change:
        what = "no BatchNorm sync (plain BatchNorm per rank)" if size == 1 else f"BatchNorm syncs in groups of {size}"
        log.warning(
            "train.sync_bn_group=%d does not divide the world size %d: %s, the largest divisor not above %d",
            setting, world_size, what, setting,
        )  # fmt: skip
    return size


def convert_sync_bn(model: nn.Module, group: int | dist.ProcessGroup = SYNC_BN_GROUP) -> nn.Module:
    """Convert ``model``'s BatchNorm layers to SyncBatchNorm over groups of consecutive ranks; return the model.

    ``group``: ranks per group (``sync_bn_group_size`` resolves it against the world: 0 all ranks, 1 or a
    single process leaves plain BatchNorm), or a process group to use as it is. Every rank must call this (building
    subgroups is collective). Consecutive ranks share a node, so groups of 8 (or 64) keep most traffic on NVLink.
    The conversion itself runs on any device; torch's SyncBatchNorm forward needs CUDA (``parallelize`` calls this
    on CUDA only).
    """
    if isinstance(group, int):
        if not (dist.is_available() and dist.is_initialized()):
            return model
        world = dist.get_world_size()
        size = sync_bn_group_size(world, group, log_change=dist.get_rank() == 0)
        if size == 1:
            return model
        # All ranks: the default group (no new communicator). Smaller groups: one communicator each, so a group's
        # statistics all-gathers only wait for its own members.
        group = dist.group.WORLD if size == world else dist.new_subgroups(group_size=size)[0]
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)


def block_groups(trunk: nn.Module, activation_checkpointing=False,
                 shard_unit: Literal["block", "group"] = "block") -> list[list[nn.Module]]:  # fmt: skip
    """The trunk's blocks grouped into FSDP units.

    ``shard_unit="block"``: one unit per block. ``"group"``: SEER-style groups: the activation-checkpointing
    segments when ``activation_checkpointing`` is a list of per-stage end indices, otherwise one unit per stage.
    """
    stages = [s.blocks for s in trunk.stages]
    if shard_unit == "block":
        return [[b] for blocks in stages for b in blocks]
    groups_spec = activation_checkpointing
    if not isinstance(groups_spec, Sequence) or isinstance(groups_spec, str):
        groups_spec = "stage"
    segments = checkpoint_segments(groups_spec, trunk.depths)
    return [blocks[a:b] for blocks, segs in zip(stages, segments) for a, b, _ in segs]


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def parallelize(
    model: nn.Module,
    *,
    activation_checkpointing=False,
    compile: bool = False,
    precision: str = "fp32",
    fsdp: bool | None = None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    shard_unit: Literal["block", "group"] = "block",
    sync_bn_group: int | dist.ProcessGroup = SYNC_BN_GROUP,
    reduce_dtype: str = "fp32",
    mesh=None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Apply activation checkpointing, optional compile and FSDP2 to ``model`` in place and return it.

    Args:
        model: a module with a RegNet ``trunk`` attribute (and optionally a ``head``), or a trunk itself.
        activation_checkpointing: passed to ``trunk.set_grad_checkpointing`` (False, True/"block", "stage", groups).
        compile: ``torch.compile`` each block (after checkpointing, before sharding).
        precision: "fp32" or "bf16" (FSDP MixedPrecisionPolicy: bf16 params/compute, gradient reduction in
            ``reduce_dtype``; BatchNorm layers get their own fp32 units, and so does every module with
            ``fp32_unit = True``, its floating inputs cast to fp32).
        fsdp: shard with FSDP2; default: when a process group is initialized.
        reshard_after_forward: free the gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2).
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
        shard_unit: "block" or "group" (see ``block_groups``).
        sync_bn_group: on CUDA with several ranks, BatchNorm becomes SyncBatchNorm over groups of this many ranks
            (``convert_sync_bn``: 0 all ranks, 1 no sync; default 64, SEER's ``syncBN64``) or over this process
            group. FSDP does not sync BatchNorm statistics.
        reduce_dtype: "fp32" or "bf16": the dtype FSDP2 reduce-scatters gradients in (``train.fsdp.reduce_dtype``;
            VISSL's 10B reduces in fp16). BatchNorm and ``fp32_unit`` modules always reduce in fp32.
        mesh: a 1-D DeviceMesh; default: all ranks on the model's device type.
        device: where the model will run, when that is not where its parameters are: a meta-device model (the
            sharded start, ``seer.distributed.materialize``) is sharded for ``device`` and allocated afterwards.
    """
    trunk = getattr(model, "trunk", model)
    distributed = dist.is_available() and dist.is_initialized()
    fsdp = distributed if fsdp is None else fsdp
    device_type = torch.device(device).type if device is not None else next(model.parameters()).device.type
    world_size = dist.get_world_size() if distributed else 1

    if reduce_dtype not in REDUCE_DTYPES:
        raise ValueError(f"reduce_dtype must be one of {sorted(REDUCE_DTYPES)}, got {reduce_dtype!r}")
    if device_type == "cuda":
        # Each trunk call sees one of a few fixed crop shapes: cuDNN's autotuning pays off (SwAV sets it too).
        torch.backends.cudnn.benchmark = True

    # 1. SyncBatchNorm in groups: CUDA-only in torch; on CPU every rank normalizes its own batch.
    if distributed and world_size > 1 and device_type == "cuda":
        model = convert_sync_bn(model, sync_bn_group)
        trunk = getattr(model, "trunk", model)

    # 2. Activation checkpointing (the trunk's own segments: per block, per stage or SEER groups).
    trunk.set_grad_checkpointing(activation_checkpointing or False)

    # 3. torch.compile per block (keeps graph breaks at block boundaries, where FSDP hooks live).
    if compile:
        for block in trunk.blocks():
            block.compile()

    if not fsdp:
        return model

    # 4. FSDP2.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mesh is None:
        mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    reduce = REDUCE_DTYPES[reduce_dtype]
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
    elif precision == "fp32":
        mp = MixedPrecisionPolicy(reduce_dtype=None if reduce == torch.float32 else reduce)
    else:
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if cpu_offload and device_type != "cuda":
        raise ValueError("train.fsdp.cpu_offload moves CUDA parameters to host memory; this model is on the CPU")
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    common = dict(mesh=mesh, offload_policy=offload)
    # FSDP2 shards only contiguous parameters; the trunk keeps 3x3 weights channels_last for speed, and its forward
    # converts each gathered weight back (a weight-sized copy).
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()

    bn_units: list[nn.Module] = []
    if precision == "bf16":
        # BatchNorm statistics and affine parameters stay fp32: each BN is its own unit. Inputs are not cast
        # (BN takes bf16 activations with fp32 parameters and returns bf16). Their parameters are tiny, so they
        # stay gathered through forward and backward: activation-checkpoint recomputation reads a BN's parameters
        # without calling the module (no FSDP hook runs), and with several trunk calls per step (multi-crop) the
        # later call's backward would otherwise reshard them before the earlier call is recomputed. They are
        # resharded at the start of every root forward, so each step gathers the updated values once.
        bn_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                fully_shard(module, mp_policy=bn_mp, reshard_after_forward=False, **common)
                module.set_reshard_after_backward(False)
                bn_units.append(module)

        # Modules that ask for it (SwAV's prototypes: L2 normalization + scores feeding Sinkhorn and the loss) run
        # entirely in fp32: fp32 parameters and reduction, floating inputs cast to fp32 on the way in. A method's
        # module says so with ``fp32_unit = True``; nothing here names a method.
        fp32_mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True)
        for module in [m for m in model.modules() if getattr(m, "fp32_unit", False) is True and not is_fsdp(m)]:
            fully_shard(module, mp_policy=fp32_mp, reshard_after_forward=reshard_after_forward, **common)

    for group in block_groups(trunk, activation_checkpointing, shard_unit):
        fully_shard(group if len(group) > 1 else group[0], mp_policy=mp,
                    reshard_after_forward=reshard_after_forward, **common)  # fmt: skip
    head = getattr(model, "head", None)
    if head is not None:
        fully_shard(head, mp_policy=mp, reshard_after_forward=reshard_after_forward, **common)
    # The root keeps the stem; its parameters are needed again first in backward, so never reshard them.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False, **common)
    if bn_units:

        def _reshard_bn_units(module, args):
            for bn in bn_units:
                bn.reshard()

        model.register_forward_pre_hook(_reshard_bn_units)
    return model


@torch.no_grad()
def sync_bn_stats(model: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (FSDP2 leaves them per rank); no-op in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    tensors = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            tensors += [module.running_mean, module.running_var]
    if not tensors:
        return
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
