"""``load_trunk`` / ``load_classifier``: any supported checkpoint -> a ``RegNetTrunk`` (or a classifier, trunk +
head), strictly, with the weights held once in memory.

Loading works in three steps:

1. read the tensors without copying them (``seer.weights.read``);
2. rename the keys to ours (timm's regnety names) and infer the architecture from the tensor shapes (cross-checked
   with HF's ``config.json``), or take it from ``preset=`` / our metadata (``seer.weights.formats``);
3. build the trunk on the meta device and *assign* the checkpoint tensors to it: the weights exist once in memory
   (the file's pages), whatever the model size.

Loading is strict: a missing or unexpected tensor, or a shape mismatch, raises ``CheckpointError`` naming the keys;
so does a tensor holding a NaN or an infinity (its features would be NaN, or all zeros through a fused conv + ReLU).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seer.data.images import IMAGENET_MEAN, IMAGENET_STD
from seer.hardware import resolve_device
from seer.models.classifier import RegNetClassifier
from seer.models.regnet import RegNetCfg, RegNetTrunk, build_trunk, resolve_cfg
from seer.weights.formats import (
    DEFAULT_PREPROCESS,
    Checkpoint,
    CheckpointError,
    check_hf_config,
    classifier_head,
    head_labels,
    infer_cfg,
)
from seer.weights.read import read_checkpoint

__all__ = ["load_trunk", "load_classifier", "open_trunk"]


def _strict_check(trunk: nn.Module, ckpt: Checkpoint) -> None:
    expected = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
    got = ckpt.state_dict

    def name(k: str) -> str:
        theirs = ckpt.renamed.get(k, k)
        return k if theirs == k else f"{k} (checkpoint: {theirs})"

    missing = [k for k in expected if k not in got and not k.endswith("num_batches_tracked")]
    unexpected = [name(k) for k in got if k not in expected]
    mismatched = [
        f"{name(k)}: checkpoint {tuple(got[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in got and tuple(got[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {show(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {show(mismatched)}")
        raise CheckpointError(f"{ckpt.origin} ({ckpt.format} layout) does not match the trunk: " + "; ".join(parts))


_FINITE_CHUNK = 1 << 24  # elements checked at a time: bounds the temporary mask of a huge (memory-mapped) tensor


def _all_finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return True
    if not t.is_contiguous():
        return bool(torch.isfinite(t).all())
    flat = t.view(-1)
    return all(bool(torch.isfinite(flat[i : i + _FINITE_CHUNK]).all()) for i in range(0, flat.numel(), _FINITE_CHUNK))


def _check_finite(origin: str, tensors: dict[str, torch.Tensor], name: Callable[[str], str] = str) -> None:
    """CheckpointError naming the file and the first tensor holding a NaN or an infinity."""
    for key, value in tensors.items():
        if not _all_finite(value):
            raise CheckpointError(
                f"{origin}: tensor {name(key)} holds NaN or infinite values; refusing to load weights that compute "
                f"NaN (or, through a fused conv + ReLU, all-zero) features (a training run that diverged saves "
                f"such weights: use an earlier checkpoint)."
            )


def _read(source: Any, format: str | None) -> Checkpoint:
    """``read_checkpoint``; a pretraining run is pinned to one checkpoint (trunk, head and metadata from the same
    step), read again from the run's newest when a job still training rotates it away meanwhile."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
            from seer.train.checkpoint import read_newest

            return read_newest(path, lambda ckpt: read_checkpoint(ckpt, format=format))
    return read_checkpoint(source, format=format)


def load_trunk(source: Any, *, preset: str | RegNetCfg | dict | None = None, device: torch.device | str | None = None,
               format: str | None = None, dtype: torch.dtype | None = None) -> RegNetTrunk:  # fmt: skip
    """Load a RegNetY trunk from any supported checkpoint, the architecture inferred from it.

    Args:
        source: our ``.safetensors`` export or a pretraining run directory; an HF RegNet directory
            (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, ``RegNetForImageClassification``
            included) or hub id (``facebook/regnet-y-10b-seer``); the name of released SEER weights
            (``seer-rg32``, ``seer-rg32-in1k``: ``seer models`` lists them; an existing local path of that name
            wins); a timm or torchvision state dict file; a VISSL / ClassyVision ``.torch`` checkpoint (FSDP
            ``block{s}-part{p}`` level included); a state dict; a module.
        preset: build this architecture instead of inferring it (the checkpoint must match it exactly).
        device: move the loaded trunk there (default: CPU): "cpu", "cuda", "cuda:N", "auto" or a torch.device,
            checked before the checkpoint is read (``seer.hardware.resolve_device``).
        format: force a layout instead of detecting it ("seer", "timm", "torchvision", "hf", "vissl").
        dtype: floating-point dtype of the parameters (default float32).

    Returns:
        The trunk in eval mode, with ``trunk.pretrained_cfg`` holding the preprocessing its checkpoint expects and
        ``trunk.checkpoint_format`` the layout it came from. Heads (classifier, SwAV projection / prototypes) are
        not loaded: ``read_checkpoint(source).heads`` has them.

    Raises:
        FileNotFoundError: no such path, hub id or name (a name close to a released one gets a did-you-mean).
        CheckpointError: unreadable file, unknown layout, pickled code, any missing / unexpected tensor or shape
            mismatch, or a tensor holding NaN or infinite values (the message names the file and the keys); a hub
            id or name neither cached nor downloadable (offline: at once, without retrying).
    """
    device = None if device is None else resolve_device(device, what="device")  # before reading gigabytes
    trunk = _build(_read(source, format), preset, dtype)
    if device is not None:
        trunk.to(device)
    return trunk


def open_trunk(source: Any, *, format: str | None = None) -> tuple[Checkpoint, RegNetCfg]:
    """The checkpoint ``load_trunk(source)`` would load and its architecture, without reading any tensor's values.

    The tensors stay memory-mapped (safetensors, zip ``torch.save`` files), so a caller that copies only a slice of
    each (a rank filling its FSDP shard: ``seer.train.loop``'s sharded start) reads only those bytes. Keys and shapes
    are checked as strictly as ``load_trunk`` checks them; values (NaN / infinity) are the caller's to check.
    Pretraining run directories are read whole here (``read_trunk_state``): load those per shard with DCP.

    Raises:
        CheckpointError: as ``load_trunk``, except for non-finite values.
    """
    ckpt = _read(source, format)
    cfg = _cfg_of(ckpt, None)
    _strict_check(build_trunk(cfg, device="meta", channels_last=False), ckpt)
    return ckpt, cfg


def _cfg_of(ckpt: Checkpoint, preset: str | RegNetCfg | dict | None) -> RegNetCfg:
    """The architecture of a read checkpoint: ``preset``, the file's metadata or the tensor shapes."""
    if preset is not None:
        cfg = resolve_cfg(preset)
    elif ckpt.cfg is not None:
        cfg = ckpt.cfg
    else:
        cfg = infer_cfg(ckpt.state_dict, ckpt.origin)
    if ckpt.hf_config is not None:
        check_hf_config(ckpt.hf_config, cfg, ckpt.origin)
    return cfg


def _build(ckpt: Checkpoint, preset: str | RegNetCfg | dict | None, dtype: torch.dtype | None) -> RegNetTrunk:
    """The trunk of a read checkpoint: architecture from ``preset``, the file's metadata or the tensor shapes."""
    cfg = _cfg_of(ckpt, preset)
    # Meta device: no memory is allocated; `assign=True` then makes the checkpoint's (memory-mapped) tensors the
    # parameters, so a large trunk never exists twice. Weights stay in their stored (contiguous) layout: the
    # forward converts them to channels_last on the fly, which costs a weight-sized copy, not a second model.
    trunk = build_trunk(cfg, device="meta", channels_last=False)
    trunk.channels_last = True  # inputs still go channels_last
    _check_and_assign(trunk, ckpt, dtype or torch.float32)
    trunk.eval()
    trunk.checkpoint_format = ckpt.format
    pre = dict(DEFAULT_PREPROCESS.get(ckpt.format, DEFAULT_PREPROCESS["seer"]))
    pre.update({"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    pre.update(ckpt.preprocess or {})
    trunk.pretrained_cfg = pre
    return trunk


def load_classifier(source: Any, *, device: torch.device | str | None = None, format: str | None = None,
                    preset: str | RegNetCfg | dict | None = None, dtype: torch.dtype | None = None
                    ) -> RegNetClassifier:  # fmt: skip
    """Load a classifier (trunk + linear head) from any checkpoint ``load_trunk`` reads, with its head kept.

    Heads: HF ``RegNetForImageClassification`` (``classifier.1``, labels from ``config.json``'s ``id2label``), timm
    ``head.fc``, torchvision ``fc``, VISSL / ClassyVision fine-tune (``heads.0.clf.0``) and linear-eval heads
    (``channel_bn`` + ``clf``, the BatchNorm folded into the linear layer), and seer's own exports and fine-tune
    runs. A 1000-way head without label names gets ImageNet-1k's.

    Args:
        source: as for ``load_trunk``; by name, the fine-tuned SEER weights (``seer-rg32-in1k`` ...: ``seer models``).
        device: move the model there (default: CPU).
        format: force a layout instead of detecting it.
        preset: build this trunk architecture instead of inferring it.
        dtype: floating-point dtype of the parameters (default float32).

    Returns:
        A ``RegNetClassifier`` in eval mode: ``model(x)`` gives logits, ``model.trunk`` is the trunk (with its
        ``pretrained_cfg`` preprocessing), ``model.id2label`` the class names.

    Raises:
        CheckpointError: as ``load_trunk``; and a checkpoint without a classifier head (use ``load_trunk``), a
            head whose shape does not fit the trunk, or labels that disagree with the head.
    """
    device = None if device is None else resolve_device(device, what="device")
    ckpt = _read(source, format)
    trunk = _build(ckpt, preset, dtype)
    weight, bias = classifier_head(ckpt, trunk.num_features)
    _check_finite(ckpt.origin, {"weight": weight, "bias": bias}, lambda k: f"{k} of the classifier head")
    labels = head_labels(ckpt, weight.shape[0])
    model = RegNetClassifier(trunk, weight.shape[0], id2label=labels)
    float_dtype = dtype or torch.float32
    model.head.load_state_dict({"weight": weight.to(float_dtype), "bias": bias.to(float_dtype)}, assign=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _check_and_assign(trunk: RegNetTrunk, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    _strict_check(trunk, ckpt)
    # the stored values, before any dtype conversion: the message names the checkpoint's own key
    _check_finite(
        ckpt.origin, ckpt.state_dict, lambda k: k if ckpt.renamed.get(k, k) == k else f"{k} ({ckpt.renamed[k]})"
    )
    state = {}
    for key, ref in trunk.state_dict().items():
        value = ckpt.state_dict.get(key)
        if value is None:  # num_batches_tracked: absent from some formats, unused in eval and by momentum BN
            value = torch.zeros((), dtype=torch.long)
        elif value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        elif not value.is_floating_point():
            value = value.to(ref.dtype)
        state[key] = value
    trunk.load_state_dict(state, strict=True, assign=True)
