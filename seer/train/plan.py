"""Memory and FLOPs plan of a pretraining config before you run it: ``seer plan --config X --world-size N``.

Per GPU (FSDP2, ``world_size`` ranks):

- sharded fp32 parameters, fp32 gradients and LARS/SGD momentum: ``3 x 4 bytes x params / world_size``;
- gathered parameters of the FSDP units in flight (current + prefetched unit, in the compute dtype; everything when
  ``reshard_after_forward`` is off) and the unsharded gradients of the unit being reduced (compute dtype + fp32);
- activations of every crop of the per-GPU batch, from ``seer.complexity``-style per-block element counts (exact
  arithmetic, replicated per block here) times a calibration factor measured on CPU (``ACT_FACTOR``); with
  activation checkpointing only segment inputs are kept, plus one segment recomputed at a time;
- the method's head (its parameters and per-crop activations, as the method's config reports them: for SwAV the
  projection MLP and the prototype scores) and the input crops;
- a fixed framework overhead on GPUs (CUDA context, cuDNN / NCCL workspaces).

FLOPs per step: 2 x MACs per image per crop resolution, x3 for forward + backward (x4 with recomputation).
``measure_cpu`` runs the same config on CPU in a fresh process and reports its peak memory above the import
baseline; ``tests/test_plan.py`` checks the prediction within 25% on small configs.

Start-up peak (``startup_memory``), next to the training peak: under FSDP each rank holds only its fp32 shard of the
model on its device, and on the host the sharded start's working set (each tensor initialized whole, one at a time:
``seer.distributed.materialize``), computed from the model's construction recorded on the meta device; building the
whole model on every rank first (the path before) is printed beside it.

BatchNorm sync per step (``bn_sync_traffic``): the collectives and bytes torch's SyncBatchNorm issues on GPUs in
groups of ``train.sync_bn_group`` ranks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence

from seer.config import PretrainConfig, batch_per_gpu, crop_shapes, load_config, trunk_cfg
from seer.models.regnet import checkpoint_segments
from seer.train.methods import method_config

__all__ = ["plan", "format_plan", "block_stats", "bn_sync_traffic", "startup_memory", "measure_cpu", "cli_main"]

# Calibrated on CPU (fp32, oneDNN, glibc with a fixed 64 KiB mmap threshold so that RSS follows live tensors)
# against the peak RSS of training steps of regnety_200mf / 400mf / 800mf at 32-96 px, with and without
# checkpointing (benchmarks/memory.py prints the comparison):
# - every counted activation element (conv / BN outputs, SE-gated map, residual sum) is held once until backward;
ACT_FACTOR = 1.0
# - at the backward peak, the block being differentiated adds gradient buffers worth ~0.6x its activations;
BACKWARD_FACTOR = 0.6
# - a checkpointed segment is recomputed whole (1x its activations), then differentiated block by block, which
#   adds ~0.4x the largest block's activations (fitted on 1- and 2-block segments; longer segments, like SEER's
#   8-block groups, are extrapolated).
RECOMPUTE_FACTOR = 0.4
# CUDA context, cuDNN and NCCL workspaces, allocator slack: a fixed allowance on GPUs.
GPU_OVERHEAD_GB = 3.0
GiB = 2**30


# ----------------------------------------------------------------------------------------------------------------
# Per-block arithmetic (the same counting rules as seer.models.regnet.complexity)
# ----------------------------------------------------------------------------------------------------------------
def _out(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def block_stats(regnet_cfg, resolution: int) -> dict:
    """Per-image element counts: ``{"stem": {...}, "blocks": [{"params", "acts", "in", "out", "stage"}, ...]}``.

    ``acts`` counts conv and BN outputs, the SE-gated map and the residual sum, exactly as ``complexity`` does,
    so ``stem.acts + sum(block.acts) == complexity(cfg, resolution)["activations"]``.
    """
    widths, depths, group_ws = regnet_cfg.stages()
    size = _out(resolution, 2)
    stem = {"params": 9 * 3 * regnet_cfg.stem_width + 2 * regnet_cfg.stem_width,
            "acts": 2 * regnet_cfg.stem_width * size * size, "out": regnet_cfg.stem_width * size * size}  # fmt: skip
    blocks = []
    in_chs = regnet_cfg.stem_width
    for s, (w, d, g) in enumerate(zip(widths, depths, group_ws)):
        mid = int(round(w * regnet_cfg.bottleneck))
        for j in range(d):
            stride = 2 if j == 0 else 1
            o = _out(size, stride)
            params = in_chs * mid + 2 * mid + 9 * mid // (mid // g) * mid + 2 * mid + mid * w + 2 * w
            acts = 2 * mid * size * size + 2 * mid * o * o + 2 * w * o * o + w * o * o
            se = int(round(in_chs * regnet_cfg.se_ratio))
            if se:
                params += 2 * mid * se + se + mid
                acts += mid * o * o
            if in_chs != w or stride != 1:
                params += in_chs * w + 2 * w
                acts += 2 * w * o * o
            blocks.append({"params": params, "acts": acts, "in": in_chs * size * size, "out": w * o * o, "stage": s})
            in_chs, size = w, o
    return {"stem": stem, "blocks": blocks}


def _segments(depths: list[int], spec) -> list[tuple[int, int, bool]]:
    """Flat (start, end, checkpointed) block ranges of an activation-checkpointing spec (the trunk's own parser)."""
    out, base = [], 0
    for d, segs in zip(depths, checkpoint_segments(spec, depths)):
        out += [(base + a, base + b, ck) for a, b, ck in segs]
        base += d
    return out


def _activation_elems(stats: dict, depths: list[int], spec) -> tuple[int, float]:
    """(elements kept through the step, extra elements alive at the backward peak) per image.

    At the backward peak a block being differentiated also holds its activation gradients (``BACKWARD_FACTOR`` x
    its activations); a checkpointed segment is first recomputed whole, then differentiated block by block
    (``RECOMPUTE_FACTOR`` x its largest block on top).
    """
    blocks = stats["blocks"]
    kept, live = stats["stem"]["acts"], 0.0
    for a, b, ck in _segments(depths, spec):
        seg_acts = sum(blk["acts"] for blk in blocks[a:b])
        if ck:
            kept += blocks[a]["in"]  # the checkpoint keeps only the segment's input
            live = max(live, seg_acts + RECOMPUTE_FACTOR * max(blk["acts"] for blk in blocks[a:b]))
        else:
            kept += seg_acts
            live = max(live, BACKWARD_FACTOR * max(blk["acts"] for blk in blocks[a:b]))
    return kept, live


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
def plan(
    cfg: PretrainConfig,
    world_size: int,
    gpu_memory_gb: float | None = 40.0,
    *,
    device: str = "gpu",
    activation_checkpointing=None,
) -> dict:
    """Predicted per-rank memory (bytes) and FLOPs per step of ``cfg`` on ``world_size`` ranks.

    Args:
        device: "gpu" (FSDP2 when world_size > 1, framework overhead added) or "cpu" (what ``measure_cpu`` measures:
            memory above the import baseline of one process).
        activation_checkpointing: override ``cfg.model.activation_checkpointing`` (to compare on/off).
    """
    from seer.models.regnet import complexity

    rcfg = trunk_cfg(cfg.model)
    spec = cfg.model.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    shapes = crop_shapes(cfg.data)
    b = batch_per_gpu(cfg, world_size)
    bf16 = cfg.train.precision == "bf16"
    act_bytes = 2 if bf16 else 4
    widths, depths, _ = rcfg.stages()
    d = widths[-1]
    head = method_config(cfg)  # None: a method without a head section counts no head

    # parameters (fp32 masters), gradients, momentum: sharded over the ranks under FSDP
    stats0 = block_stats(rcfg, shapes[0][1])
    p_trunk = complexity(rcfg)["params"]
    p_head = head.head_params(d) if head is not None else 0
    p_total = p_trunk + p_head
    fsdp = world_size > 1
    shard = world_size if fsdp else 1
    params_b = 4 * p_total / shard
    grads_b = 4 * p_total / shard
    optim_b = 4 * p_total / shard if cfg.optim.momentum > 0 else 0.0

    # FSDP units gathered at once: current + prefetched (all of them without resharding after forward)
    unit_b = 0.0
    if fsdp:
        from seer.distributed.parallel import block_groups  # noqa: F401 - documents where units come from

        unit_params = [blk["params"] for blk in stats0["blocks"]]
        if cfg.train.fsdp.shard_unit == "group":
            unit_params = [sum(unit_params[a:b_]) for a, b_, _ in _groups_for(depths, spec)]
        units = sorted([*unit_params, p_head], reverse=True)
        largest = units[0]
        pbytes = 2 if bf16 else 4
        if cfg.train.fsdp.reshard_after_forward:  # the unit computing + the one prefetched, and the root (stem)
            gathered = (units[0] + (units[1] if len(units) > 1 else 0) + stats0["stem"]["params"]) * pbytes
        else:
            gathered = p_total * pbytes
        # unsharded gradients of the unit being reduce-scattered (compute dtype, then fp32 for the reduction)
        unit_b = gathered + largest * (pbytes + 4 if bf16 else 4)

    # activations of every crop (held until the loss) + the backward peak of one block / recomputed segment
    inputs = sum(c * b * 3 * r * r for c, r in shapes)
    head_elems = sum(c for c, _ in shapes) * b * (head.head_activations() if head is not None else 0)
    macs = sum(c * complexity(rcfg, r)["macs"] for c, r in shapes)
    extra_b = 4 * (inputs + head_elems)
    acts_b = _activation_bytes(rcfg, shapes, b, spec, act_bytes) + extra_b
    overhead_b = GPU_OVERHEAD_GB * GiB if device == "gpu" else 0.0
    total_b = params_b + grads_b + optim_b + unit_b + acts_b + overhead_b

    flops_fwd = 2 * macs * b * world_size  # per step, whole job (trunk; the head is negligible)
    ckpt_on = any(ck for _, _, ck in _segments(depths, spec))
    result = {
        "config": {
            "preset": cfg.model.preset if cfg.model.cfg is None else cfg.model.cfg,
            "world_size": world_size,
            "batch_per_gpu": b,
            "global_batch": b * world_size,
            "crops": shapes,
            "precision": cfg.train.precision,
            "activation_checkpointing": spec,
            "fsdp": fsdp,
            "shard_unit": cfg.train.fsdp.shard_unit,
            "device": device,
        },  # fmt: skip
        "params": {"trunk": p_trunk, "head": p_head, "total": p_total},
        "memory_bytes": {
            "params": params_b,
            "grads": grads_b,
            "optimizer": optim_b,
            "gathered_units": unit_b,
            "activations": acts_b,
            "overhead": overhead_b,
            "total": total_b,
        },
        "activation_bytes_without_checkpointing": _activation_bytes(rcfg, shapes, b, False, act_bytes) + extra_b,
        "activation_bytes_with_block_checkpointing": _activation_bytes(rcfg, shapes, b, "block", act_bytes) + extra_b,
        "flops_per_step": 3 * flops_fwd,
        "flops_per_step_with_recompute": (4 if ckpt_on else 3) * flops_fwd,
        "flops_per_image": 3 * 2 * macs,
    }
    if device == "gpu" and world_size > 1:  # SyncBatchNorm runs on CUDA only
        result["bn_sync"] = bn_sync_traffic(cfg, world_size)
    result["startup"] = startup = startup_memory(cfg, world_size)
    if gpu_memory_gb is not None:
        result["gpu_memory_gb"] = gpu_memory_gb
        result["fits"] = bool(max(total_b, startup["device_bytes"]) <= gpu_memory_gb * GiB)
    return result


def startup_memory(cfg: PretrainConfig, world_size: int) -> dict:
    """Per-rank memory from the start to the first step, from the model's construction recorded on the meta device
    (nothing is allocated; ``seer.distributed.materialize``).

    Several ranks (the sharded start): each holds its fp32 shard of every parameter and every buffer whole on its
    device (``device_bytes``), and on the host the initialization's working set (``host_bytes``: each tensor made
    whole, one at a time, ``InitProgram.replay_peak_bytes``); on CPU ranks both are host memory. One process builds
    the whole model on the host and moves it. ``whole_start_*``: building the whole model on every rank first (the
    path before the sharded start): the model on the host per rank, and on the device the model plus its shards
    while ``fully_shard`` copies them.
    """
    from seer.distributed.materialize import record_init
    from seer.train.loop import build_model

    model, program = record_init(lambda: build_model(cfg, init_trunk=False))
    params = [p for _, p in model.named_parameters()]
    buffers = [b for _, b in model.named_buffers() if b is not None]

    def size(t) -> int:
        return t.numel() * t.element_size()

    whole = sum(size(t) for t in params + buffers)
    # FSDP2 shards dim 0, padded to a multiple of the world size
    shard = sum(-(-p.shape[0] // world_size) * (p.numel() // p.shape[0]) * p.element_size() if p.dim() and p.shape[0]
                else size(p) for p in params) + sum(size(b) for b in buffers)  # fmt: skip
    sharded = world_size > 1
    return {
        "sharded": sharded,
        "device_bytes": shard if sharded else whole,
        "host_bytes": program.replay_peak_bytes() if sharded else whole,
        "model_bytes": whole,
        "largest_tensor_bytes": max(size(t) for t in params + buffers),
        "whole_start_host_bytes": whole,
        "whole_start_device_bytes": whole + shard if sharded else whole,
    }


def format_startup(s: dict) -> str:
    """``start-up peak ...`` (the sharded start against building the whole model on every rank first)."""
    if not s["sharded"]:
        return f"start-up peak: {s['device_bytes'] / GiB:.2f} GB (one process: the whole model, built on the host)"
    return (
        f"start-up peak (sharded start): {s['device_bytes'] / GiB:.2f} GB per GPU (its fp32 shard), "
        f"{s['host_bytes'] / GiB:.2f} GB host per rank (each tensor initialized whole, one at a time; the largest "
        f"is {s['largest_tensor_bytes'] / GiB:.2f} GB); building the whole model first took "
        f"{s['whole_start_device_bytes'] / GiB:.2f} GB per GPU and {s['whole_start_host_bytes'] / GiB:.2f} GB host "
        f"per rank"
    )


def _trunk_bn_layers(rcfg) -> list[tuple[int, int | None]]:
    """``(channels, flat block index)`` of every trunk BatchNorm in forward order; the stem's index is None."""
    widths, depths, _ = rcfg.stages()
    layers: list[tuple[int, int | None]] = [(rcfg.stem_width, None)]
    index = 0
    for w, d in zip(widths, depths):
        mid = int(round(w * rcfg.bottleneck))
        for j in range(d):
            layers += [(mid, index), (mid, index), (w, index)]  # conv1, conv2 (grouped 3x3), conv3
            if j == 0:  # the projection shortcut: every stage's first block has stride 2
                layers.append((w, index))
            index += 1
    return layers


def bn_sync_traffic(cfg: PretrainConfig, world_size: int, group: int | None = None) -> dict:
    """BatchNorm synchronization of one training step per GPU, as torch's SyncBatchNorm does it (CUDA).

    Each BatchNorm call of ``C`` channels all-gathers ``g x (2C + 1)`` fp32 values over its group of ``g`` ranks
    (mean, inverse std and count of every member) and then syncs the host; its backward all-reduces ``2C`` values.
    Calls per step: every trunk BatchNorm once per trunk call (one call per run of equal-resolution crops, x
    ``train.bn_splits``) plus once more for the blocks activation checkpointing recomputes; a BatchNorm in the
    method's head (SwAV's ``use_bn`` projection) once per step. ``group`` overrides ``cfg.train.sync_bn_group``
    (0: all ranks); the divisor rule of ``seer.distributed.parallel.sync_bn_group_size`` applies.

    Returns:
        ``group_size``, ``setting``, ``trunk_calls``, ``bn_calls`` (forward BatchNorm calls per step, recomputation
        included), ``all_gathers``, ``all_reduces``, ``collectives``, ``host_syncs``, ``gathered_bytes`` (the
        all-gathers' output: ``g x (2C+1) x 4`` summed, the rank's own slice included), ``received_bytes`` (from
        the other ranks: ``(g-1)/g`` of that, plus a ring all-reduce's ``2 (g-1)/g x 2C x 4`` per backward call).
    """
    from seer.distributed.parallel import sync_bn_group_size

    setting = cfg.train.sync_bn_group if group is None else group
    g = sync_bn_group_size(world_size, setting)
    rcfg = trunk_cfg(cfg.model)
    depths = rcfg.stages()[1]
    method = method_config(cfg)
    checkpointed = {i for a, b, ck in _segments(depths, cfg.model.activation_checkpointing) if ck for i in range(a, b)}

    # Trunk calls per step: multicrop_forward calls the trunk once per run of equal-resolution crops (of the crops a
    # method uses: supervised.crops), bn_splits times over. A frozen trunk (supervised.freeze_trunk) is in eval mode.
    resolutions = [r for count, r in crop_shapes(cfg.data) for _ in range(count)]
    chosen = getattr(method, "crops", None)
    if chosen:
        resolutions = [resolutions[i] for i in chosen]
    trunk_calls = sum(1 for _ in itertools.groupby(resolutions)) * cfg.train.bn_splits
    if getattr(method, "freeze_trunk", False):
        trunk_calls = 0
    forward: list[int] = []  # channels of every forward BatchNorm call in one step (recomputation included)
    backward: list[int] = []
    for channels, block in _trunk_bn_layers(rcfg):
        forward += [channels] * trunk_calls * (2 if block in checkpointed else 1)
        backward += [channels] * trunk_calls
    if getattr(method, "use_bn", False):  # SwAV's projection MLP: BatchNorm1d after each hidden layer, one call
        for channels in list(method.head_dims)[:-1]:
            forward.append(channels)
            backward.append(channels)
    if g == 1:
        forward, backward = [], []
    gathered = sum(4 * g * (2 * c + 1) for c in forward)
    received = gathered * (g - 1) / g + sum(4 * 2 * (g - 1) / g * 2 * c for c in backward)
    return {
        "world_size": world_size,
        "setting": setting,
        "group_size": g,
        "groups": world_size // g,
        "trunk_calls": trunk_calls,
        "bn_calls": len(forward),
        "all_gathers": len(forward),
        "all_reduces": len(backward),
        "collectives": len(forward) + len(backward),
        "host_syncs": len(forward),
        "gathered_bytes": gathered,
        "received_bytes": received,
    }


def format_bn_sync(t: dict) -> str:
    """``BN sync: N collectives, X GB received per GPU per step (groups of G)``, or why there is none."""
    if t["group_size"] == 1:
        return f"BN sync: none (groups of 1: each of the {t['world_size']} ranks normalizes its own batch)"
    note = ""
    if t["setting"] not in (0, t["group_size"]) and t["setting"] < t["world_size"]:
        note = f"; train.sync_bn_group={t['setting']} does not divide {t['world_size']}"
    return (
        f"BN sync: {t['collectives']} collectives, {t['received_bytes'] / 1e9:.2f} GB received per GPU per step "
        f"(groups of {t['group_size']}{' = all ranks' if t['group_size'] == t['world_size'] else ''}{note}; "
        f"{t['all_gathers']} all-gathers with a host sync each, forward and recomputation, "
        f"{t['all_reduces']} all-reduces in backward)"
    )


def _groups_for(depths: list[int], spec) -> list[tuple[int, int, bool]]:
    """FSDP "group" units: checkpointing segments for a groups spec, else stages."""
    if isinstance(spec, list):
        return _segments(depths, spec)
    return _segments(depths, "stage")


def _activation_bytes(rcfg, shapes, b: int, spec, act_bytes: int) -> float:
    """Trunk activation bytes of a per-GPU batch: everything kept + the largest backward peak (one crop group)."""
    depths = rcfg.stages()[1]
    kept, live = 0.0, 0.0
    for count, res in shapes:
        k, extra = _activation_elems(block_stats(rcfg, res), depths, spec)
        kept += count * b * k
        live = max(live, count * b * extra)
    return act_bytes * (ACT_FACTOR * kept + live)


def _gb(x: float) -> str:
    return f"{x / GiB:8.2f} GB"


def format_plan(p: dict) -> str:
    """The plan as a short human-readable table."""
    c, m = p["config"], p["memory_bytes"]
    lines = [
        f"model {c['preset']}: {p['params']['trunk'] / 1e6:.1f}M trunk + {p['params']['head'] / 1e6:.1f}M head params",
        f"world {c['world_size']} x {c['batch_per_gpu']} images = {c['global_batch']}, crops {c['crops']}, "
        f"{c['precision']}, activation checkpointing {c['activation_checkpointing']}, "
        f"{'FSDP2 per ' + c['shard_unit'] if c['fsdp'] else 'no sharding'}",
        "per-rank memory:",
        f"  parameters (fp32 shard)        {_gb(m['params'])}",
        f"  gradients (fp32 shard)         {_gb(m['grads'])}",
        f"  optimizer state (momentum)     {_gb(m['optimizer'])}",
        f"  gathered FSDP units + grads    {_gb(m['gathered_units'])}",
        f"  activations                    {_gb(m['activations'])}",
        f"    (no checkpointing: {p['activation_bytes_without_checkpointing'] / GiB:.2f} GB, "
        f"per-block checkpointing: {p['activation_bytes_with_block_checkpointing'] / GiB:.2f} GB)",
        f"  framework overhead             {_gb(m['overhead'])}",
        f"  total                          {_gb(m['total'])}",
        f"FLOPs per step: {p['flops_per_step'] / 1e15:.3f} PFLOP (model), "
        f"{p['flops_per_step_with_recompute'] / 1e15:.3f} PFLOP with recomputation; "
        f"{p['flops_per_image'] / 1e9:.1f} GFLOP per image (all crops)",
    ]
    if "bn_sync" in p:
        lines.append(format_bn_sync(p["bn_sync"]))
    if "startup" in p:
        lines.append(format_startup(p["startup"]))
    if "fits" in p:
        verdict = "FITS" if p["fits"] else "DOES NOT FIT"
        lines.append(f"{verdict} in {p['gpu_memory_gb']:g} GB per GPU ({m['total'] / GiB:.1f} GB predicted)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Measuring on CPU (validation of the plan)
# ----------------------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """Peak RSS of this process image (VmHWM). Unlike ``ru_maxrss`` it is not inherited from a forking parent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); harmless where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _measure_here(overrides: list[str], steps: int) -> dict:
    """Train ``steps`` steps of the config in this process and measure its memory.

    A one-image warm-up step first loads kernels, thread pools and allocator arenas and allocates the gradients and
    the momentum; the RSS after it is the baseline. ``activation_bytes`` is the peak RSS of the full-batch steps
    above that baseline; ``peak_bytes`` adds the exact parameter + gradient + momentum bytes.
    """
    import gc
    import time

    import torch

    from seer.distributed.parallel import parallelize
    from seer.train.loop import build_model
    from seer.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = load_config(None, overrides)
    b = batch_per_gpu(cfg, 1)
    model = parallelize(build_model(cfg), activation_checkpointing=cfg.model.activation_checkpointing, fsdp=False)
    opt = build_optimizer(model, cfg.optim)
    # The run's last step: past the method's warm-up (a queue that starts late). No before_optimizer_step: every
    # parameter keeps its gradient and momentum, as the plan counts them.
    it = max(cfg.total_steps - 1, 0)
    before_forward = getattr(model, "before_forward", None)

    def step(batch: int) -> float:
        crops = [torch.randn(batch, 3, r, r) for c, r in crop_shapes(cfg.data) for _ in range(c)]
        t0 = time.perf_counter()
        if before_forward is not None:
            before_forward(it)
        loss = model(crops)["loss"]
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    step(max(1, cfg.train.bn_splits))
    gc.collect()
    base = _rss_bytes()
    _reset_hwm()
    times = [step(b) for _ in range(steps)]
    peak = _hwm_bytes()
    static = sum(p.numel() * 4 * 3 for p in model.parameters())  # params + grads + momentum
    act = max(0, peak - base)
    return {"peak_bytes": act + static, "activation_bytes": act, "static_bytes": static,
            "step_time": sorted(times)[len(times) // 2]}  # fmt: skip


def measure_cpu(overrides: Sequence[str], steps: int = 3, threads: int | None = None) -> dict:
    """Run a config's training steps on CPU in a fresh process (a clean high-water mark) and return
    ``{"peak_bytes", "activation_bytes", "static_bytes", "step_time"}`` (see ``_measure_here``)."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # A fixed mmap threshold: every block >= 64 KiB is mmapped and returned to the OS when freed, so the RSS
    # high-water mark follows live tensors instead of glibc's heap fragmentation (whose dynamic threshold made
    # repeated measurements of one config differ by up to 1.8x).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    cmd = [sys.executable, "-m", "seer.train.plan", "--measure", json.dumps(list(overrides)), "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def cli_main(argv: list[str] | None = None) -> int:
    """`seer plan --config X --world-size N [--gpu-memory-gb M] [key=value ...]`."""
    ap = argparse.ArgumentParser(prog="seer plan", description="Per-GPU memory and FLOPs of a pretraining config.")
    ap.add_argument("--config", help="a shipped recipe's name (seer_10b, seer_rg32, ...) or a yaml file of overrides")
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--gpu-memory-gb", type=float, default=40.0)
    ap.add_argument("--json", action="store_true", help="print the plan as json")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size_per_gpu=8")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure is not None:  # internal: measure_cpu's child process
        print(json.dumps(_measure_here(json.loads(args.measure), args.steps)))
        return 0
    from seer.config import ConfigError, validate

    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, args.world_size)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"seer plan: {exc}", file=sys.stderr)
        return 2
    p = plan(cfg, args.world_size, args.gpu_memory_gb)
    print(json.dumps(p, indent=2, default=str) if args.json else format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
