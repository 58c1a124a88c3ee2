"""Optimizer and schedules for SwAV pretraining: LARS (timm's ``Lars``) or SGD, precomputed per-iteration LR.

SwAV/SEER use SGD + LARC with trust coefficient 0.001 and no clipping: timm's ``Lars(trust_clip=False,
always_adapt=True)`` computes the same update (``lr * trust * |w| / (|g| + wd |w|) * (g + wd w)`` then momentum),
and it works unchanged on FSDP2-sharded (DTensor) parameters.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "cosine_schedule", "scaled_lr", "set_lr", "clip_grad_norm"]


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool = False) -> list[dict]:
    """Parameter groups; with ``exclude_bn_bias`` BatchNorm and bias parameters (every 1-D parameter) get no weight
    decay and no LARS adaptation (``always_adapt=False`` with ``weight_decay=0`` skips the trust ratio in timm)."""
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
        {"params": no_decay, "weight_decay": 0.0, "always_adapt": False, "lars_exclude": True},
    ]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """LARS or SGD over ``model``'s parameters from an ``OptimConfig`` (the LR is set every step by ``set_lr``)."""
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.exclude_bn_bias)
    if optim_cfg.name == "lars":
        from timm.optim import Lars

        for g in groups:
            g.pop("lars_exclude", None)
        return Lars(
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
            g.pop("lars_exclude", None)
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
