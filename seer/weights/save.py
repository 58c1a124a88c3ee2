"""``save_trunk``: a trunk (or a classifier, trunk + head) written atomically as our safetensors export, an HF
directory, or a timm / torchvision state dict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from seer.io import atomic_dir, atomic_path
from seer.models.classifier import RegNetClassifier
from seer.models.regnet import RegNetCfg, RegNetTrunk
from seer.weights.formats import LAYOUTS, hf_processor

__all__ = ["save_trunk"]


def save_trunk(trunk: RegNetTrunk | RegNetClassifier, path: str | os.PathLike, *, format: str = "seer",
               preprocess: dict | None = None) -> Path:  # fmt: skip
    """Save a trunk, or a classifier with its head, atomically (a temporary name, renamed when complete).

    Args:
        trunk: a ``RegNetTrunk``, or a ``RegNetClassifier`` (``load_classifier``, a ``seer finetune`` run): its head
            is written as the format's classifier (HF ``RegNetForImageClassification`` with ``id2label``, timm
            ``head.fc``, torchvision ``fc``, ours ``head.fc`` with the labels in the metadata).
        path: output file ("seer", "timm", "torchvision": ``.safetensors``, or ``.pth`` for a ``torch.save`` state
            dict) or directory ("hf").
        format: "seer" (safetensors + RegNetCfg metadata, what ``load_trunk`` reads back exactly), "hf" (a
            directory ``transformers.RegNetModel.from_pretrained`` loads, with a ``preprocessor_config.json``),
            "timm" (a state dict timm's ``regnety_*`` with ``num_classes=0`` loads) or "torchvision".
        preprocess: preprocessing to record (default: the trunk's ``pretrained_cfg``).

    Returns:
        The written path.
    """
    classifier = trunk if isinstance(trunk, RegNetClassifier) else None
    if classifier is not None:
        trunk = classifier.trunk
    if not isinstance(trunk, RegNetTrunk):
        raise TypeError(f"save_trunk expects a RegNetTrunk or RegNetClassifier, got {type(trunk).__name__}")
    path = Path(path).expanduser()
    cfg: RegNetCfg = trunk.cfg
    if format == "onnx":  # the graph computes image_norm itself, so every trunk exports
        from seer.weights.onnx import export_onnx

        return export_onnx(classifier or trunk, path, preprocess=preprocess)
    if cfg.image_norm and format != "seer":
        # timm / torchvision / HF trunks have no per-image standardization: the file would load as a different model
        raise ValueError(f"save_trunk: format={format!r} cannot record image_norm=True (per-image standardization "
                         "before the stem); save it with format='seer'")  # fmt: skip
    pre = dict(preprocess or getattr(trunk, "pretrained_cfg", None) or {})
    tensors = _trunk_tensors(trunk)
    head = _head_tensors(classifier) if classifier is not None else {}
    if any(t.is_meta for t in (*tensors.values(), *head.values())):
        raise ValueError("save_trunk: the trunk has meta (unmaterialized) tensors")
    if format in ("seer", "timm", "torchvision"):
        layout = LAYOUTS["timm" if format == "seer" else format]
        out = {layout.their_key(k): v for k, v in tensors.items()}
        fc = "fc" if format == "torchvision" else "head.fc"  # timm's and ours: head.fc; torchvision: fc
        out.update({f"{fc}.{k}": v for k, v in head.items()})
        metadata = {"format": "pt"}
        if format == "seer":
            metadata = {"format": "seer", "regnet_cfg": json.dumps(cfg.to_dict())}
            if pre:
                metadata["preprocess"] = json.dumps(pre)
            if classifier is not None:
                metadata["id2label"] = json.dumps({str(k): v for k, v in classifier.id2label.items()})
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            with atomic_path(path) as tmp:
                save_file(out, str(tmp), metadata=metadata)
        elif format == "seer":
            raise ValueError(f"format='seer' writes a .safetensors file, got {path.name!r}")
        else:
            with atomic_path(path) as tmp:
                torch.save(out, tmp)
        return path
    if format == "hf":
        return _save_hf(tensors, cfg, path, pre, head, classifier.id2label if classifier is not None else None)
    raise ValueError(f"unknown format {format!r}; choose 'seer', 'hf', 'timm', 'torchvision' or 'onnx'")


def _head_tensors(classifier: RegNetClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in classifier.head.state_dict().items()}


def _trunk_tensors(trunk: nn.Module) -> dict[str, torch.Tensor]:
    # Contiguous CPU copies: channels_last weights and FSDP-gathered tensors serialize as plain row-major arrays.
    return {k: v.detach().to("cpu").contiguous() for k, v in trunk.state_dict().items()}


def _hf_groups_width(cfg: RegNetCfg) -> int:
    widths, _, group_ws = cfg.stages()
    for g in sorted(set(group_ws), reverse=True):
        if all(max(1, w // g) == w // gw for w, gw in zip(widths, group_ws)):
            return g
    raise ValueError(
        f"HF's RegNetConfig has one groups_width for all stages; this trunk's group widths {group_ws} (widths "
        f"{widths}) cannot be written as one"
    )


def _save_hf(tensors: dict[str, torch.Tensor], cfg: RegNetCfg, path: Path, pre: dict,
             head: dict[str, torch.Tensor] | None = None, id2label: dict[int, str] | None = None) -> Path:  # fmt: skip
    from safetensors.torch import save_file

    if cfg.bottleneck != 1.0 or cfg.se_ratio not in (0.0, 0.25):
        raise ValueError(f"HF's RegNet has bottleneck 1 and SE ratio 0.25 (or none); this trunk has {cfg}")
    widths, depths, _ = cfg.stages()
    layer_type = "y" if cfg.se_ratio else "x"
    layout = LAYOUTS["hf"]
    out = {}
    for k, v in tensors.items():
        key = layout.their_key(k)
        if layer_type == "x":
            key = key.replace(".layer.3.", ".layer.2.")
        out[key] = v
    config = {
        "architectures": ["RegNetModel"],
        "model_type": "regnet",
        "num_channels": 3,
        "embedding_size": cfg.stem_width,
        "hidden_sizes": widths,
        "depths": depths,
        "groups_width": _hf_groups_width(cfg),
        "layer_type": layer_type,
        "hidden_act": "relu",
        "downsample_in_first_stage": True,
    }
    if head:
        # RegNetForImageClassification: the trunk under "regnet.", classifier = Sequential(Flatten, Linear)
        out = {f"regnet.{k}": v for k, v in out.items()}
        out.update({f"classifier.1.{k}": v for k, v in head.items()})
        labels = id2label or {i: str(i) for i in range(head["weight"].shape[0])}
        config["architectures"] = ["RegNetForImageClassification"]
        config["id2label"] = {str(k): v for k, v in labels.items()}
        config["label2id"] = {v: int(k) for k, v in labels.items()}
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(hf_processor(pre), indent=2))
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return path
