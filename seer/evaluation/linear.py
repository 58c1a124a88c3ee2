"""Linear probes on frozen features: a whole grid of heads trained in ONE pass, selected on held-out train data.

Every (feature layer x head type x learning rate x weight decay) configuration is a slice of one big weight matrix
per (layer, head type): one batch of cached features feeds one GEMM ``x @ W[D, H*C]`` for all H heads of that
group, their cross-entropies are summed (so each head gets exactly its own gradient), and SGD with momentum 0.9 and
a cosine schedule updates every head with its own learning rate and weight decay. The data is read once per epoch
for the whole grid, as VISSL does with its multiple eval heads.

Head types: ``"linear"`` (a linear layer on the features) and ``"bn"`` (a non-affine BatchNorm1d then a linear
layer, VISSL's "BN + linear" / MAE's linear-probe head: batch statistics while training, running statistics at
test time).

Selection: the grid is trained on a seeded, stratified split of the TRAIN set (``val_fraction`` held out), the best
head on that held-out part is selected (ties -> earlier grid entry), then by default retrained on the full train
set, and only then are the test features read. Classes with a single train sample cannot be split: they stay in
the fit part (with a warning). A grid of one configuration needs no selection and trains on the full train set.

``method="logreg"`` swaps SGD heads for scikit-learn ``LogisticRegression`` over a C grid (low-shot settings),
with the same selection. ``eval_linear_online`` trains the same heads on features computed on the fly through a
frozen trunk (augmented images from a loader).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from seer.evaluation.knn import _as_labels, load_features, write_json
from seer.hardware import resolve_device
from seer.logs import configure_logging

__all__ = ["eval_linear", "eval_linear_online", "HeadConfig", "LinearHeads", "stratified_split", "cli_main"]

log = logging.getLogger(__name__)

HEAD_TYPES = ("linear", "bn")
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# progress=None shows a grid's progress from this much work on (multiply-adds of the forward GEMMs, about a third of
# a step's: ~2 s on 2 CPU cores): the small suite's probes stay quiet, an ImageNet probe shows its rate and ETA
PROGRESS_MIN_WORK = 10**10


@dataclass(frozen=True)
class HeadConfig:
    """One head of the grid."""

    layer: str
    head: str
    lr: float
    weight_decay: float


# ----------------------------------------------------------------------------------------------------------------
# The heads: one weight matrix per (layer, head type), H heads stacked along the output columns
# ----------------------------------------------------------------------------------------------------------------
class _Group:
    def __init__(
        self,
        layer: str,
        head: str,
        dim: int,
        n_classes: int,
        configs: list[HeadConfig],
        device: torch.device,
        generator: torch.Generator,
        bn_eps: float,
        bn_momentum: float,
    ) -> None:
        self.layer, self.head, self.configs = layer, head, configs
        h, c = len(configs), n_classes
        self.h, self.c = h, c
        # Same init for every head (trunc-normal std 0.01 like MAE's probe) so heads differ only by hyper-params.
        w0 = torch.randn(dim, c, generator=generator).clamp_(-2, 2).mul_(0.01).to(device)
        self.weight = w0.repeat(1, h).contiguous()
        self.bias = torch.zeros(h * c, device=device)
        self.buf_w = torch.zeros_like(self.weight)
        self.buf_b = torch.zeros_like(self.bias)
        # float32 explicitly: numpy float64 hyper-parameters would otherwise promote every update to float64
        self.lr = torch.tensor([float(cfg.lr) for cfg in configs], dtype=torch.float32, device=device)
        self.lr = self.lr.repeat_interleave(c)
        self.wd = torch.tensor([float(cfg.weight_decay) for cfg in configs], dtype=torch.float32, device=device)
        self.wd = self.wd.repeat_interleave(c)
        self.has_wd = any(cfg.weight_decay != 0 for cfg in configs)
        self.bn = head == "bn"
        self.eps, self.bn_momentum = bn_eps, bn_momentum
        self.running_mean = torch.zeros(dim, device=device)
        self.running_var = torch.ones(dim, device=device)

    def _input(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if not self.bn:
            return x
        if train and x.shape[0] > 1:
            mean = x.mean(0)
            xc = x - mean
            var = xc.square().mean(0)  # (x.var(0) is a slow strided reduction on CPU)
            n = x.shape[0]
            self.running_mean.lerp_(mean, self.bn_momentum)
            self.running_var.lerp_(var * (n / (n - 1)), self.bn_momentum)
            return xc.mul_(torch.rsqrt(var + self.eps))
        return (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps)

    def logits(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """[B, D] -> [B, H, C]."""
        return torch.addmm(self.bias, self._input(x, train), self.weight).view(x.shape[0], self.h, self.c)

    def step(
        self, x: torch.Tensor, y: torch.Tensor, lr_factor: float, momentum: float, return_loss: bool = False
    ) -> torch.Tensor | None:
        """One SGD step of every head on a batch; optionally returns the per-head mean cross-entropy [H]."""
        xin = self._input(x, train=True)
        z = torch.addmm(self.bias, xin, self.weight).view(x.shape[0], self.h, self.c)
        # d(sum_h mean_b CE_h)/dz = (softmax - onehot) / B, independent per head.
        if self.c < 64:  # torch's softmax is slow on short rows (measured 7x at 10 classes); same math by hand
            g = (z - z.amax(-1, keepdim=True)).exp_()
            g = g.div_(g.sum(-1, keepdim=True))
        else:
            g = torch.softmax(z, dim=-1)
        # No subnormal probabilities: a diverging head (a too-large learning rate in the grid) fills its softmax
        # with them, and the weight-gradient GEMM then runs ~200x slower. FTZ (torch.set_flush_denormal) is no
        # cure: it covers only the calling thread, not torch's intra-op workers (measured: no effect with 2
        # threads), and it is process state. So they are raised to 1e-30 here; a gradient change of 1e-30 per
        # logit is far below fp32 rounding of the rest (and log() below stays finite).
        g = g.clamp_min_(1e-30)
        yy = y[:, None, None].expand(-1, self.h, 1)
        loss = -g.gather(2, yy).log().mean(0).flatten() if return_loss else None
        g.scatter_add_(2, yy, torch.full_like(yy, -1.0, dtype=g.dtype))
        g = g.div_(x.shape[0]).view(x.shape[0], self.h * self.c)
        # SGD with momentum (PyTorch semantics: buf = m * buf + grad + wd * w; w -= lr * buf), fused where possible:
        # one addmm accumulates the weight gradient straight into the momentum buffer.
        torch.addmm(self.buf_w, xin.t(), g, beta=momentum, out=self.buf_w)
        if self.has_wd:  # weight decay on weights, not biases
            self.buf_w.addcmul_(self.weight, self.wd)
        self.buf_b.mul_(momentum).add_(g.sum(0))
        self.weight.addcmul_(self.buf_w, self.lr, value=-lr_factor)
        self.bias.addcmul_(self.buf_b, self.lr, value=-lr_factor)
        return loss


class LinearHeads:
    """A grid of linear heads over several feature layers, trained together (see the module docstring)."""

    def __init__(
        self,
        dims: Mapping[str, int],
        n_classes: int,
        configs: Sequence[HeadConfig],
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        bn_eps: float = 1e-6,
        bn_momentum: float = 0.1,
    ) -> None:
        self.configs = list(configs)
        self.n_classes = n_classes
        device = torch.device(device)
        self.groups: list[_Group] = []
        for (layer, head), cfgs in itertools.groupby(self.configs, key=lambda c: (c.layer, c.head)):
            cfgs = list(cfgs)
            if head not in HEAD_TYPES:
                raise ValueError(f"unknown head type {head!r}; expected one of {HEAD_TYPES}")
            if layer not in dims:
                raise KeyError(f"layer {layer!r} not among the features {sorted(dims)}")
            # One generator per group: a head's init does not depend on which other heads share the run.
            gen = torch.Generator().manual_seed(seed)
            self.groups.append(_Group(layer, head, dims[layer], n_classes, cfgs, device, gen, bn_eps, bn_momentum))
        seen = [(g.layer, g.head) for g in self.groups]
        if len(seen) != len(set(seen)):
            raise ValueError("configs must be ordered so that each (layer, head) group is contiguous")

    def step(self, feats: Mapping[str, torch.Tensor], y: torch.Tensor, lr_factor: float, momentum: float) -> None:
        for g in self.groups:
            g.step(feats[g.layer], y, lr_factor, momentum)

    @torch.no_grad()
    def logits(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, n_heads, C] in config order."""
        return torch.cat([g.logits(feats[g.layer]) for g in self.groups], 1)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * t))


class _Counts:
    """Accumulates top-1 / top-5 hits per head."""

    def __init__(self, n_heads: int, n_classes: int) -> None:
        self.k5 = min(5, n_classes)
        self.c1 = torch.zeros(n_heads, dtype=torch.long)
        self.c5 = torch.zeros(n_heads, dtype=torch.long)
        self.n = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits = torch.nan_to_num(logits, nan=-math.inf)  # a diverged head scores nothing, others are unaffected
        top = logits.topk(self.k5, dim=-1).indices  # [B, H, k5]
        hit = top == y[:, None, None]
        self.c1 += hit[..., 0].sum(0).cpu()
        self.c5 += hit.any(-1).sum(0).cpu()
        self.n += y.shape[0]

    def result(self) -> tuple[list[float], list[float]]:
        n = max(self.n, 1)
        return (self.c1.double() / n).tolist(), (self.c5.double() / n).tolist()


def _evaluate(heads: LinearHeads, feats: Mapping[str, torch.Tensor], y: torch.Tensor, batch_size: int):
    counts = _Counts(len(heads.configs), heads.n_classes)
    n = y.shape[0]
    for a in range(0, n, batch_size):
        counts.add(heads.logits({k: v[a : a + batch_size].float() for k, v in feats.items()}), y[a : a + batch_size])
    return counts.result()


def _train(
    heads: LinearHeads,
    feats: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    momentum: float,
    warmup_epochs: int,
    seed: int,
    progress: bool | None,
    desc: str,
) -> None:
    n = y.shape[0]
    bs = min(batch_size, n)
    steps_per_epoch = n // bs  # drop the last partial batch (BN statistics of tiny batches are noise)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    bar = _progress_bar(progress, total, desc, total * bs * sum(g.weight.numel() for g in heads.groups))
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(y.device)
        for s in range(steps_per_epoch):
            idx = perm[s * bs : (s + 1) * bs]
            heads.step(
                {k: v.index_select(0, idx).float() for k, v in feats.items()},  # (faster than v[idx] on CPU)
                y.index_select(0, idx),
                _lr_factor(step, total, warmup_epochs * steps_per_epoch),
                momentum,
            )
            step += 1
            bar.update(1)
    bar.close()


def _progress_bar(progress: bool | None, total: int, desc: str, work: int):
    """The grid's progress in optimizer steps (``seer.progress``: rate, ETA). ``progress=None`` shows it when the
    work (multiply-adds of the forward GEMMs: steps x batch x weights of every head) is ``PROGRESS_MIN_WORK`` or
    more, a few seconds and up: a bar for each small probe of a suite would be noise."""
    from seer.progress import progress as _progress

    show = progress if progress is not None else work >= PROGRESS_MIN_WORK
    return _progress(total, desc, "step", enabled=bool(show))


# ----------------------------------------------------------------------------------------------------------------
# Inputs and the split
# ----------------------------------------------------------------------------------------------------------------
def _as_layers(x: Any, name: str, default_layer: str) -> dict[str, Any]:
    if isinstance(x, Mapping):
        if not x:
            raise ValueError(f"{name} is an empty mapping")
        out = dict(x)
    else:
        out = {default_layer: x}
    for layer, v in out.items():
        if isinstance(v, str):
            out[layer] = v = load_features(v)["features"]
        shape = tuple(getattr(v, "shape", ()))
        if len(shape) != 2:
            raise ValueError(f"{name}[{layer!r}] must be 2-D [N, D], got shape {shape}")
    return out


def _tensor(x: Any, rows: np.ndarray | None, device: torch.device, name: str, normalize: bool) -> torch.Tensor:
    """Rows of a feature matrix as a tensor: float16 features stay float16 in memory (half the RAM of an
    ImageNet-size bank; batches are cast to float32 when used), anything else becomes float32."""
    half = str(getattr(x, "dtype", "")) in ("float16", "torch.float16")
    dtype = torch.float16 if half else torch.float32
    if isinstance(x, torch.Tensor):
        t = x.detach()
        t = t[torch.from_numpy(rows).to(t.device)] if rows is not None else t
        t = t.to(device=device, dtype=dtype)
    else:
        a = np.asarray(x) if rows is None else np.asarray(x)[rows] if not isinstance(x, np.ndarray) else x[rows]
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float16 if half else np.float32)).to(device)
    if not bool(torch.isfinite(t).all()):
        bad = torch.nonzero(~torch.isfinite(t).all(1)).flatten()[:5].tolist()
        raise ValueError(f"{name} contains NaN or Inf values (e.g. rows {bad})")
    return F.normalize(t.float(), dim=1).to(dtype) if normalize else t


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of train indices -> (fit, val), each sorted.

    Every class with >= 2 samples puts ``round(n * val_fraction)`` (at least 1, at most n - 1) samples in val;
    a class with a single sample stays in fit (a warning says how many).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    fit, val, singles = [], [], 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            singles += 1
            fit.append(idx)
            continue
        nv = min(max(1, int(round(len(idx) * val_fraction))), len(idx) - 1)
        val.append(idx[:nv])
        fit.append(idx[nv:])
    if singles:
        warnings.warn(
            f"{singles} classes have a single train sample: they stay in the fit split and are not "
            "represented in the held-out selection split",
            stacklevel=3,
        )
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    if val_idx.size == 0:
        raise ValueError(
            "cannot hold out a selection split: no class has 2 or more train samples; pass a single "
            "configuration (one layer, one head type, one lr and weight decay / one C) so no selection is needed"
        )
    return np.sort(np.concatenate(fit)), val_idx


def _select(heads: list[dict]) -> int:
    """Index of the best head by held-out top-1, then top-5; ties -> the earlier grid entry."""
    best = 0
    for i, h in enumerate(heads):
        if (h["val_top1"], h["val_top5"]) > (heads[best]["val_top1"], heads[best]["val_top5"]):
            best = i
    return best


# ----------------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------------
def eval_linear(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    method: str = "sgd",
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = (0.0,),
    head_types: Sequence[str] = HEAD_TYPES,
    epochs: int = 30,
    batch_size: int = 256,
    momentum: float = 0.9,
    warmup_epochs: int = 0,
    Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    max_iter: int = 1000,
    normalize: bool = False,
    val_fraction: float = 0.2,
    retrain: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    layer: str = "features",
    report_heads_on_test: bool = True,
    metadata: Mapping[str, Any] | None = None,
    progress: bool | None = False,
) -> dict:
    """Linear-probe accuracy with hyper-parameters selected on a held-out split of train.

    Args:
        train_features / test_features: [N, D] arrays, tensors or feature-file paths, or a mapping
            ``{layer: array}`` to probe several layers at once (the same keys in both).
        train_labels / test_labels: integer class labels >= 0 (classes inferred); the "no label" marker -1 (or
            any negative label) raises ``ValueError``.
        method: "sgd" (the head grid in one pass) or "logreg" (scikit-learn LogisticRegression over ``Cs``).
        lrs, weight_decays, head_types: the SGD grid (x layers); head types "linear" and "bn".
        epochs, batch_size, momentum, warmup_epochs: SGD with momentum, cosine schedule (per step).
        normalize: L2-normalize features first.
        val_fraction, seed: the stratified held-out split of train used for selection.
        retrain: retrain the selected configuration on the whole train set before testing.
        layer: name given to a single (non-mapping) feature array.
        report_heads_on_test: also report every grid head's test accuracy (heads trained on the fit split;
            computed after selection, never used by it).
        metadata: caller's settings recorded in the result.
        progress: show the SGD grid's progress on stderr (``seer.progress``: steps, rate, ETA); ``None``: only when
            the grid is ``PROGRESS_MIN_WORK`` multiply-adds or more (a few seconds and up).

    Returns:
        ``{"top1", "top5", "selected": {layer, head, lr, weight_decay | C, val_top1, val_top5}, "heads": [...],
        "settings", "metadata", "timing"}``; accuracies are fractions in [0, 1].
    """
    t0 = time.perf_counter()
    if method not in ("sgd", "logreg"):
        raise ValueError(f"method must be 'sgd' or 'logreg', got {method!r}")
    xtr = _as_layers(train_features, "train_features", layer)
    xte = _as_layers(test_features, "test_features", layer)
    if set(xtr) != set(xte):
        raise ValueError(f"train and test feature layers differ: {sorted(xtr)} vs {sorted(xte)}")
    ytr = _as_labels(train_labels, "train_labels")
    yte = _as_labels(test_labels, "test_labels")
    for name, feats, y in (("train", xtr, ytr), ("test", xte, yte)):
        for lay, v in feats.items():
            if v.shape[0] != len(y):
                raise ValueError(f"{name}_features[{lay!r}] has {v.shape[0]} rows but {name}_labels has {len(y)}")
    for lay in xtr:
        if xtr[lay].shape[1] != xte[lay].shape[1]:
            raise ValueError(f"layer {lay!r}: train dim {xtr[lay].shape[1]} != test dim {xte[lay].shape[1]}")
    classes = np.unique(np.concatenate([ytr, yte]))
    n_classes = len(classes)
    ytr_c, yte_c = np.searchsorted(classes, ytr), np.searchsorted(classes, yte)
    dev = resolve_device(device, what="device")  # None / "auto": CUDA when a GPU is visible
    layers = list(xtr)
    settings: dict[str, Any] = {
        "protocol": "linear",
        "method": method,
        "layers": layers,
        "n_train": len(ytr),
        "n_test": len(yte),
        "n_classes": n_classes,
        "feature_dims": {k: int(v.shape[1]) for k, v in xtr.items()},
        "normalize": normalize,
        "val_fraction": val_fraction,
        "seed": seed,
        "retrain": retrain,
        "device": str(dev),
    }

    if method == "sgd":
        for h in head_types:
            if h not in HEAD_TYPES:
                raise ValueError(f"unknown head type {h!r}; expected one of {HEAD_TYPES}")
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        configs = [
            HeadConfig(lay, h, float(lr), float(wd))
            for lay in layers
            for h in head_types
            for lr in lrs
            for wd in weight_decays
        ]
        settings.update(
            {
                "optimizer": "SGD",
                "momentum": momentum,
                "schedule": "cosine (per step)",
                "warmup_epochs": warmup_epochs,
                "epochs": epochs,
                "batch_size": batch_size,
                "lrs": list(lrs),
                "weight_decays": list(weight_decays),
                "head_types": list(head_types),
                "n_heads": len(configs),
                "bn": "BatchNorm1d(affine=False, eps=1e-6) before the linear layer for 'bn' heads",
            }
        )
    else:
        configs = [HeadConfig(lay, "logreg", float(c), 0.0) for lay in layers for c in Cs]
        settings.update(
            {
                "Cs": list(Cs),
                "max_iter": max_iter,
                "n_heads": len(configs),
                "model": "sklearn.linear_model.LogisticRegression(lbfgs, multinomial)",
            }
        )
    if not configs:
        raise ValueError("the hyper-parameter grid is empty")

    # 1) Train the grid on the fit split and select on the held-out split (test features untouched).
    t_sel = time.perf_counter()
    select = len(configs) > 1
    if select:
        fit_idx, val_idx = stratified_split(ytr_c, val_fraction, seed)
    else:
        fit_idx, val_idx = np.arange(len(ytr_c)), None
    settings["selection"] = "held-out stratified split of train" if select else "none (single configuration)"
    settings["n_fit"], settings["n_val"] = len(fit_idx), (0 if val_idx is None else len(val_idx))
    fit = {k: _tensor(v, fit_idx, dev, f"train_features[{k!r}]", normalize) for k, v in xtr.items()}
    y_fit = torch.from_numpy(ytr_c[fit_idx]).to(dev)
    trainer = (
        _SgdGrid(dev, n_classes, epochs, batch_size, momentum, warmup_epochs, seed, progress)
        if (method == "sgd")
        else _LogregGrid(n_classes, max_iter, seed)
    )
    model = trainer.fit(fit, y_fit, configs)
    heads = [dict(asdict(c)) for c in configs]
    if method == "logreg":
        for h in heads:
            h["C"] = h.pop("lr")
            h.pop("weight_decay")
    if select:
        val = {k: _tensor(v, val_idx, dev, f"train_features[{k!r}]", normalize) for k, v in xtr.items()}
        v1, v5 = trainer.evaluate(model, val, torch.from_numpy(ytr_c[val_idx]).to(dev))
        for h, a1, a5 in zip(heads, v1, v5):
            h["val_top1"], h["val_top5"] = a1, a5
        best = _select(heads)
    else:
        best = 0
    selected = dict(heads[best])
    sel_s = time.perf_counter() - t_sel

    # 2) Retrain the selected configuration on all of train, then (only now) read the test features.
    test = None
    y_test = torch.from_numpy(yte_c).to(dev)
    if select and retrain:
        lay = configs[best].layer
        full = {lay: _tensor(xtr[lay], None, dev, f"train_features[{lay!r}]", normalize)}
        final = trainer.fit(full, torch.from_numpy(ytr_c).to(dev), [configs[best]])
        test_sel = {lay: _tensor(xte[lay], None, dev, f"test_features[{lay!r}]", normalize)}
        t1, t5 = trainer.evaluate(final, test_sel, y_test)
        top1, top5 = t1[0], t5[0]
    else:
        test = {k: _tensor(v, None, dev, f"test_features[{k!r}]", normalize) for k, v in xte.items()}
        a1, a5 = trainer.evaluate(model, test, y_test)
        top1, top5 = a1[best], a5[best]
    if report_heads_on_test:
        if test is None:
            test = {k: _tensor(v, None, dev, f"test_features[{k!r}]", normalize) for k, v in xte.items()}
        a1, a5 = trainer.evaluate(model, test, y_test)
        for h, x1, x5 in zip(heads, a1, a5):
            h["test_top1"], h["test_top5"] = x1, x5
    return {
        "protocol": "linear",
        "top1": top1,
        "top5": top5,
        "selected": selected,
        "heads": heads,
        "settings": settings,
        "metadata": dict(metadata or {}),
        "timing": {"grid_and_selection_s": sel_s, "total_s": time.perf_counter() - t0},
    }


class _SgdGrid:
    def __init__(self, device, n_classes, epochs, batch_size, momentum, warmup_epochs, seed, progress) -> None:
        self.device, self.n_classes, self.epochs, self.batch_size = device, n_classes, epochs, batch_size
        self.momentum, self.warmup, self.seed, self.progress = momentum, warmup_epochs, seed, progress

    def fit(self, feats, y, configs) -> LinearHeads:
        heads = LinearHeads(
            {k: v.shape[1] for k, v in feats.items()}, self.n_classes, configs, device=self.device, seed=self.seed
        )
        _train(
            heads,
            feats,
            y,
            epochs=self.epochs,
            batch_size=self.batch_size,
            momentum=self.momentum,
            warmup_epochs=self.warmup,
            seed=self.seed,
            progress=self.progress,
            desc=f"linear probe ({len(configs)} head{'s' if len(configs) > 1 else ''})",
        )
        return heads

    def evaluate(self, model: LinearHeads, feats, y):
        return _evaluate(model, feats, y, 4096)


class _LogregGrid:
    def __init__(self, n_classes: int, max_iter: int, seed: int) -> None:
        self.n_classes, self.max_iter, self.seed = n_classes, max_iter, seed

    def fit(self, feats, y, configs):
        from sklearn.linear_model import LogisticRegression

        y_np = y.cpu().numpy()
        models = []
        for cfg in configs:
            clf = LogisticRegression(C=cfg.lr, max_iter=self.max_iter, random_state=self.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence warnings on tiny C grids are expected
                clf.fit(feats[cfg.layer].cpu().numpy(), y_np)
            models.append((cfg.layer, clf))
        return {
            "models": models,
            "layers": [c.layer for c in configs],
            "dims": {k: v.shape[1] for k, v in feats.items()},
        }

    def evaluate(self, model, feats, y):
        y_np = y.cpu().numpy()
        k5 = min(5, self.n_classes)
        a1, a5 = [], []
        for layer, clf in model["models"]:
            proba = np.full((len(y_np), self.n_classes), -np.inf)
            proba[:, clf.classes_] = clf.predict_proba(feats[layer].cpu().numpy())
            top = np.argsort(-proba, axis=1, kind="stable")[:, :k5]
            a1.append(float((top[:, 0] == y_np).mean()))
            a5.append(float((top == y_np[:, None]).any(1).mean()))
        return a1, a5


# ----------------------------------------------------------------------------------------------------------------
# Augmentation mode: features computed on the fly through a frozen trunk
# ----------------------------------------------------------------------------------------------------------------
def trunk_features(trunk: torch.nn.Module, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Pooled features of a frozen RegNet trunk: "avgpool" (the trunk's output) and/or stage names "res2".."res5"."""
    out = {}
    stages = [lay for lay in layers if lay != "avgpool"]
    if stages:
        maps = trunk.forward_stages(images)
        for lay in stages:
            if lay not in maps:
                raise KeyError(f"unknown layer {lay!r}; expected 'avgpool' or one of {sorted(maps)}")
            out[lay] = maps[lay].float().mean((2, 3))
        if "avgpool" in layers:
            out["avgpool"] = list(maps.values())[-1].float().mean((2, 3))  # the last stage, as trunk(x) pools
    elif "avgpool" in layers:
        out["avgpool"] = trunk(images).float()
    return out


def eval_linear_online(
    trunk: torch.nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    test_loader: Iterable,
    *,
    num_classes: int,
    layers: Sequence[str] = ("avgpool",),
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = (0.0,),
    head_types: Sequence[str] = HEAD_TYPES,
    epochs: int = 10,
    steps_per_epoch: int | None = None,
    momentum: float = 0.9,
    warmup_epochs: int = 0,
    normalize: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    feature_fn: Callable[[torch.nn.Module, torch.Tensor, Sequence[str]], dict] = trunk_features,
    metadata: Mapping[str, Any] | None = None,
) -> dict:
    """Linear probe with augmentation: each training batch goes through the frozen trunk (eval mode, no grad).

    ``train_loader`` yields ``(images, labels)`` (augmented by its transform) and is iterated ``epochs`` times;
    the whole head grid trains on each batch (one trunk forward per batch for all heads). ``val_loader`` (a
    held-out part of the train data, plain transform) selects the head; ``test_loader`` is read only after that.
    Labels must be ``0 .. num_classes - 1``. There is no retraining pass in this mode.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device, what="device")  # None / "auto": CUDA when a GPU is visible
    configs = [
        HeadConfig(lay, h, float(lr), float(wd))
        for lay in layers
        for h in head_types
        for lr in lrs
        for wd in weight_decays
    ]
    if len(configs) > 1 and val_loader is None:
        raise ValueError("a grid of several heads needs val_loader (a held-out part of train) for selection")
    trunk = trunk.to(dev).eval()
    for p in trunk.parameters():
        p.requires_grad_(False)

    def feats_of(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            f = feature_fn(trunk, images.to(dev), layers)
        f = {k: v.clone().float() for k, v in f.items()}
        for k, v in f.items():
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"trunk produced NaN/Inf features at layer {k!r}")
        return {k: F.normalize(v, dim=1) for k, v in f.items()} if normalize else f

    if steps_per_epoch is None:
        try:
            steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError("train_loader has no len(); pass steps_per_epoch") from exc
    total = epochs * steps_per_epoch
    heads: LinearHeads | None = None
    step = 0
    for _ in range(epochs):
        for i, (images, y) in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            f = feats_of(images)
            y = _check_online_labels(y, num_classes).to(dev)
            if heads is None:
                heads = LinearHeads({k: v.shape[1] for k, v in f.items()}, num_classes, configs, device=dev, seed=seed)
            heads.step(f, y, _lr_factor(step, total, warmup_epochs * steps_per_epoch), momentum)
            step += 1
    if heads is None:
        raise ValueError("train_loader yielded no batches")

    def score(loader: Iterable) -> tuple[list[float], list[float]]:
        counts = _Counts(len(configs), num_classes)
        for images, y in loader:
            counts.add(heads.logits(feats_of(images)), _check_online_labels(y, num_classes).to(dev))
        return counts.result()

    rows = [dict(asdict(c)) for c in configs]
    if len(configs) > 1:
        v1, v5 = score(val_loader)
        for h, a, b in zip(rows, v1, v5):
            h["val_top1"], h["val_top5"] = a, b
        best = _select(rows)
    else:
        best = 0
    t1, t5 = score(test_loader)
    for h, a, b in zip(rows, t1, t5):
        h["test_top1"], h["test_top5"] = a, b
    return {
        "protocol": "linear_online",
        "top1": t1[best],
        "top5": t5[best],
        "selected": dict(rows[best]),
        "heads": rows,
        "settings": {
            "layers": list(layers),
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "momentum": momentum,
            "schedule": "cosine (per step)",
            "n_heads": len(configs),
            "num_classes": num_classes,
            "normalize": normalize,
            "device": str(dev),
            "selection": "val_loader" if len(configs) > 1 else "none (single configuration)",
        },
        "metadata": dict(metadata or {}),
        "timing": {"total_s": time.perf_counter() - t0},
    }


def _check_online_labels(y: Any, num_classes: int) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point:
        raise TypeError(f"labels must be integers, got {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return y.long()


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def cli_main(argv: list[str] | None = None) -> int:
    """`seer linear`: linear probe on feature files written by `seer extract`; writes the result as JSON."""
    from seer.evaluation.knn import _cli_inputs

    p = argparse.ArgumentParser(prog="seer linear", description=cli_main.__doc__)
    p.add_argument("--train", required=True, help="train features file (.npy, .npz, .safetensors, seer)")
    p.add_argument("--test", required=True, help="test features file")
    p.add_argument("--train-labels", default=None)
    p.add_argument("--test-labels", default=None)
    p.add_argument("--method", choices=("sgd", "logreg"), default="sgd")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS))
    p.add_argument("--weight-decays", type=float, nargs="+", default=[0.0])
    p.add_argument("--heads", nargs="+", choices=HEAD_TYPES, default=list(HEAD_TYPES))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--Cs", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0])
    p.add_argument("--normalize", action="store_true", help="L2-normalize features first")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--no-retrain", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    configure_logging()
    xtr, ytr, xte, yte, meta = _cli_inputs(p, args)
    res = eval_linear(
        xtr,
        ytr,
        xte,
        yte,
        method=args.method,
        lrs=args.lrs,
        weight_decays=args.weight_decays,
        head_types=args.heads,
        epochs=args.epochs,
        batch_size=args.batch_size,
        Cs=args.Cs,
        normalize=args.normalize,
        val_fraction=args.val_fraction,
        retrain=not args.no_retrain,
        seed=args.seed,
        device=args.device,
        metadata=meta,
        progress=True,
    )
    print(f"selected {res['selected']}\ntop1 {100 * res['top1']:.2f}  top5 {100 * res['top5']:.2f}")
    if args.out:
        write_json(res, args.out)
        print(f"wrote {args.out}")
    return 0
