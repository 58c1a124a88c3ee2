"""Optimizer and schedules: LR scaling, warmup + cosine, BN/bias exclusion, LARS update, clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from seer.config import OptimConfig
from seer.train.optim import build_optimizer, clip_grad_norm, cosine_schedule, param_groups, scaled_lr


def test_scaled_lr_and_schedule_shape():
    peak = scaled_lr(0.3, 8192, 256)
    assert peak == pytest.approx(9.6)
    lrs = cosine_schedule(peak, 100, warmup_iters=10, start_warmup=0.0, final_ratio=0.001)
    assert len(lrs) == 100
    np.testing.assert_allclose(lrs[:10], np.linspace(0, peak, 10, endpoint=False))  # linear warmup
    assert lrs[10] == pytest.approx(peak) and lrs[-1] == pytest.approx(peak * 0.001)
    assert np.all(np.diff(lrs[10:]) <= 0)  # cosine decays monotonically
    mid = 10 + 45  # halfway through the cosine part
    assert lrs[mid] == pytest.approx(peak * 0.001 + 0.5 * (peak - peak * 0.001) * (1 + math.cos(math.pi * 45 / 89)))
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 10, warmup_iters=10)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def test_bn_and_bias_exclusion_groups():
    net = _net()
    groups = param_groups(net, 1e-5, exclude_bn_bias=True)
    decay, no_decay = groups
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert no_decay["weight_decay"] == 0 and no_decay["always_adapt"] is False
    assert len(param_groups(net, 1e-5)) == 1


def test_lars_matches_the_larc_formula_and_skips_excluded_params():
    net = _net()
    cfg = OptimConfig(name="lars", base_lr=0.5, momentum=0.0, weight_decay=1e-4, exclude_bn_bias=True)
    opt = build_optimizer(net, cfg)
    x = torch.randn(2, 3, 6, 6)
    net(x).square().sum().backward()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    w, g = before["0.weight"], grads["0.weight"]
    trust = 0.001 * w.norm() / (g.norm() + 1e-4 * w.norm() + 1e-8)  # apex LARC, no clipping
    torch.testing.assert_close(net[0].weight.detach(), w - 0.5 * trust * (g + 1e-4 * w))
    # excluded (BN / bias): plain SGD step, no trust ratio, no weight decay
    torch.testing.assert_close(net[1].weight.detach(), before["1.weight"] - 0.5 * grads["1.weight"])
    torch.testing.assert_close(net[3].bias.detach(), before["3.bias"] - 0.5 * grads["3.bias"])


def test_sgd_and_unknown_name():
    net = _net()
    assert isinstance(build_optimizer(net, OptimConfig(name="sgd")), torch.optim.SGD)
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(net, OptimConfig(name="adam"))


def test_clip_grad_norm():
    net = _net()
    net(torch.randn(2, 3, 6, 6)).square().sum().mul(100).backward()
    total = clip_grad_norm(net.parameters(), 1.0)
    assert total > 1.0
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    assert after == pytest.approx(1.0, rel=1e-4)
