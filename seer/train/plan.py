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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence

from seer.config import PretrainConfig, batch_per_gpu, crop_shapes, load_config, trunk_cfg
from seer.models.regnet import checkpoint_segments
from seer.train.methods import method_config

__all__ = ["plan", "format_plan", "block_stats", "measure_cpu", "cli_main"]

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
    if gpu_memory_gb is not None:
        result["gpu_memory_gb"] = gpu_memory_gb
        result["fits"] = bool(total_b <= gpu_memory_gb * GiB)
    return result


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
