"""Optimizer and schedules for SwAV pretraining: LARS (``LARS``, seer's own) or SGD, precomputed per-iteration LR.

SwAV/SEER use SGD + LARC with trust coefficient 0.001 and no clipping (apex's ``LARC(optimizer,
trust_coefficient=0.001, clip=False)``). ``LARS`` computes the update of timm's ``Lars(trust_clip=False,
always_adapt=True)``, which seer used before: ``lr * trust * |w| / (|g| + wd |w| + eps) * (g + wd w)``, then momentum.
On FSDP2-sharded (DTensor) parameters it reduces the squared norms of every parameter and gradient shard in one
all-reduce per step (as VISSL's LARC for FSDP does), where timm's ``Lars`` issued five blocking all-reduces per
parameter tensor through DTensor's norms.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "LARS",
    "param_groups",
    "build_optimizer",
    "cosine_schedule",
    "scaled_lr",
    "set_lr",
    "clip_grad_norm",
    "global_norms",
]


def _dtensor_type():
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard (in-place updates reach the DTensor), else ``t`` itself."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def _sum_over(t: torch.Tensor):
    """The process group over which ``t``'s local squared norm must be summed (None: ``t`` is whole on this rank).

    A DTensor sharded on one mesh dimension (FSDP2's ``Shard(0)``; HSDP's replicate dimension needs no sum) is
    summed over that dimension's group.
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return None
    from torch.distributed.tensor import Replicate, Shard

    sharded = [d for d, pl in enumerate(t.placements) if isinstance(pl, Shard)]
    if any(not isinstance(pl, (Shard, Replicate)) for pl in t.placements) or len(sharded) > 1:
        raise ValueError(f"LARS: norms of a DTensor placed {t.placements} are not supported (one Shard dimension)")
    if not sharded or t.device_mesh.size(sharded[0]) == 1:
        return None
    return t.device_mesh.get_group(sharded[0]), t.device_mesh.device_type


@torch.no_grad()
def global_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of every tensor of ``tensors`` (whole tensors, DTensor shards summed over ranks), as one fp32
    vector on the first tensor's device.

    Each rank computes its shards' squared norms; they are summed over ranks in one all-reduce per process group
    (one in an FSDP2 run: every parameter lives on the same mesh), in float64 so that neither tiny nor huge norms
    under- or overflow when squared. A process with no DTensor issues no collective.
    """
    if not tensors:
        return torch.zeros(0)
    device = _local(tensors[0]).device
    local = [_local(t) for t in tensors]
    sq = torch.stack([n.to(device) for n in torch._foreach_norm(local, 2, dtype=torch.float32)]).double().square()
    by_group: dict = {}
    for i, t in enumerate(tensors):
        key = _sum_over(t)
        if key is not None:
            by_group.setdefault(key, []).append(i)
    for (group, device_type), idx in by_group.items():
        # NCCL reduces CUDA tensors only: with CPU-offloaded parameters the norms travel to the current GPU
        where = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else sq.device
        index = torch.tensor(idx, device=sq.device)
        part = sq.index_select(0, index).to(where) if len(idx) < len(tensors) else sq.to(where)
        dist.all_reduce(part, group=group)
        if len(idx) < len(tensors):
            sq.index_copy_(0, index, part.to(sq.device))
        else:
            sq = part.to(sq.device)
    return sq.sqrt().float()


class LARS(torch.optim.Optimizer):
    """SGD with momentum and LARC's layer-wise trust ratio (apex / SwAV), one collective per step on FSDP2.

    Per parameter ``w`` with gradient ``g``, when the group's ``weight_decay != 0`` or ``always_adapt``::

        trust = trust_coeff * |w| / (|g| + weight_decay * |w| + eps)   (1 when |w| or |g| is 0)
        d = trust * (g + weight_decay * w)                              (trust_clip: trust = min(trust / lr, 1))

    otherwise ``d = g`` (no decay, no adaptation: the BN / bias group of ``param_groups(exclude_bn_bias=True)``).
    Then ``buf = momentum * buf + (1 - dampening) * d`` (``buf = d`` on the first step), ``d = buf`` (or
    ``d + momentum * buf`` with ``nesterov``), and ``w -= lr * d``. This is timm's ``Lars`` update, with the same
    hyper-parameter names, so checkpoints saved with either load into the other.

    The norms ``|w|`` and ``|g|`` of every adapted parameter come from ``global_norms``: one all-reduce of all the
    local squared norms. The update itself runs on each rank's local shards; the momentum buffers are tensors of the
    parameters' own kind (DTensors under FSDP2), so sharded checkpoints save them as before.
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        always_adapt: bool = False,
    ) -> None:
        if lr < 0.0 or momentum < 0.0 or weight_decay < 0.0:
            raise ValueError(f"LARS: lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("LARS: Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; ``closure`` (optional) recomputes the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        adapted: list[torch.Tensor] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            adapt = group["weight_decay"] != 0 or group["always_adapt"]
            if params:
                work.append((group, params, adapt, len(adapted)))
                if adapt:
                    adapted += params
        if not work:
            return loss
        # every norm of the step, parameters then gradients, in one collective
        norms = global_norms(adapted + [p.grad for p in adapted]) if adapted else None
        n = len(adapted)
        for group, params, adapt, start in work:
            self._update(group, params, norms[start : start + len(params)] if adapt else None,
                         norms[n + start : n + start + len(params)] if adapt else None)  # fmt: skip
        return loss

    def _update(self, group: dict, params: list, w_norm, g_norm) -> None:
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        local_p = [_local(p) for p in params]
        d = [_local(p.grad) for p in params]
        if w_norm is not None:
            trust = group["trust_coeff"] * w_norm / (g_norm + w_norm * wd + group["eps"])
            trust = torch.where(w_norm > 0, torch.where(g_norm > 0, trust, 1.0), 1.0)
            if group["trust_clip"]:
                trust = torch.clamp(trust / lr, max=1.0)
            d = torch._foreach_add(d, local_p, alpha=wd)  # a new list: p.grad stays as it is
            torch._foreach_mul_(d, [t.to(x.device) for t, x in zip(trust.unbind(0), d)])
        if momentum != 0:
            bufs, fresh = [], []
            for p in params:
                state = self.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)  # a DTensor for a DTensor: checkpoints shard it
                    fresh.append(True)
                else:
                    fresh.append(False)
                bufs.append(_local(state["momentum_buffer"]))
            old = [i for i, f in enumerate(fresh) if not f]
            if old:
                torch._foreach_mul_([bufs[i] for i in old], momentum)
                torch._foreach_add_([bufs[i] for i in old], [d[i] for i in old], alpha=1.0 - group["dampening"])
            for i in (i for i, f in enumerate(fresh) if f):  # the first step: buf = d
                bufs[i].copy_(d[i])
            d = torch._foreach_add(d, bufs, alpha=momentum) if group["nesterov"] else bufs
        if torch.is_tensor(lr):
            torch._foreach_add_(local_p, torch._foreach_mul(d, -lr))
        else:
            torch._foreach_add_(local_p, d, alpha=-lr)


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool = False) -> list[dict]:
    """Parameter groups; with ``exclude_bn_bias`` BatchNorm and bias parameters (every 1-D parameter) get no weight
    decay and no LARS adaptation (``always_adapt=False`` with ``weight_decay=0`` skips the trust ratio)."""
    if not exclude_bn_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if is_norm or name == "bias" or p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "always_adapt": False},
    ]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """LARS or SGD over ``model``'s parameters from an ``OptimConfig`` (the LR is set every step by ``set_lr``)."""
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.exclude_bn_bias)
    if optim_cfg.name == "lars":
        return LARS(
            groups,
            lr=optim_cfg.base_lr,
            momentum=optim_cfg.momentum,
            weight_decay=optim_cfg.weight_decay,
            trust_coeff=optim_cfg.trust_coeff,
            trust_clip=False,
            always_adapt=True,
        )
    if optim_cfg.name == "sgd":
        for g in groups:
            g.pop("always_adapt", None)
        return torch.optim.SGD(groups, lr=optim_cfg.base_lr, momentum=optim_cfg.momentum,
                               nesterov=optim_cfg.nesterov)  # fmt: skip
    raise ValueError(f"optim.name must be 'lars' or 'sgd', got {optim_cfg.name!r}")


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule: ``base_lr * global_batch / reference_batch``."""
    return base_lr * global_batch / reference_batch


def cosine_schedule(
    peak: float, total_iters: int, warmup_iters: int = 0, start_warmup: float = 0.0, final_ratio: float = 0.0
) -> np.ndarray:
    """Per-iteration values: linear warmup ``start_warmup -> peak`` over ``warmup_iters``, then cosine from
    ``peak`` to ``peak * final_ratio`` at the last iteration (SwAV's schedule)."""
    if total_iters < 1 or not 0 <= warmup_iters < total_iters:
        raise ValueError(f"need 0 <= warmup_iters ({warmup_iters}) < total_iters ({total_iters})")
    warmup = np.linspace(start_warmup, peak, warmup_iters, endpoint=False) if warmup_iters else np.zeros(0)
    n = total_iters - warmup_iters
    final = peak * final_ratio
    t = np.arange(n) / max(n - 1, 1)
    cosine = final + 0.5 * (peak - final) * (1 + np.cos(math.pi * t))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clipping; works with FSDP2's DTensor gradients (the norm is reduced over ranks)."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor (partial over ranks): reduce to the global norm on every rank
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
