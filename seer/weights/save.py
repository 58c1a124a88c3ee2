"""``save_trunk``: a trunk (or a classifier, trunk + head) written atomically as our safetensors export, an HF
directory, or a timm / torchvision state dict."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from seer.io import (
    atomic_dir,
    atomic_path,
    claim_output_files,
    clear_output_dir,
    honour_umask,
    mark_output_dir,
)
from seer.models.classifier import RegNetClassifier
from seer.models.regnet import RegNetCfg, RegNetTrunk
from seer.weights.formats import LAYOUTS, hf_processor
from seer.weights.targets import HF_EXPORT_FILES, HF_EXPORT_KIND, check_export_target

__all__ = ["save_trunk", "check_export_target", "HF_EXPORT_KIND", "HF_EXPORT_FILES"]

# Weight files of the HF layout that seer does not write but would read instead of (or with) model.safetensors: an
# index is preferred by seer.load_trunk (and lists shards), so a stale one beside a new export would load old weights.
_HF_STALE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5}\.(safetensors|bin)|\.(safetensors|bin)\.index\.json)")


def save_trunk(trunk: RegNetTrunk | RegNetClassifier, path: str | os.PathLike, *, format: str = "seer",
               preprocess: dict | None = None, overwrite: bool = False) -> Path:  # fmt: skip
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
        overwrite: "hf" only: write into a non-empty directory that is not a previous seer HF export (its other
            files are left alone). Without it such a directory is refused (``OutputDirError``) and nothing changes;
            a previous seer HF export (marked by ``.seer-output.json``) is replaced. A file output replaces an
            existing file of that name, never a directory.

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
    if format not in ("seer", "hf", "timm", "torchvision", "onnx"):
        raise ValueError(f"unknown format {format!r}; choose 'seer', 'hf', 'timm', 'torchvision' or 'onnx'")
    state = check_export_target(path, format, overwrite=overwrite)
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
    return _save_hf(tensors, cfg, path, pre, head, classifier.id2label if classifier is not None else None, state)


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
             head: dict[str, torch.Tensor] | None = None, id2label: dict[int, str] | None = None,
             state: str = "new") -> Path:  # fmt: skip
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
    texts = {"config.json": json.dumps(config, indent=2), "preprocessor_config.json": json.dumps(hf_processor(pre),
             indent=2)}  # fmt: skip
    if state in ("new", "own"):
        # All of it seer's: the directory is built beside and replaces the old one whole, atomically.
        with atomic_dir(path) as tmp:
            for name, text in texts.items():
                (tmp / name).write_text(text)
            save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            honour_umask(tmp / "model.safetensors", directory=False)  # safetensors writes 0600
            mark_output_dir(tmp, HF_EXPORT_KIND, HF_EXPORT_FILES)
        return path
    # An empty directory (kept: it may be a mount point or hold ACLs), or the user's files beside ours (overwrite):
    # each file replaced atomically, weights first, config.json last. Only seer's own earlier files and stale HF
    # weight indexes / shards (which would be loaded instead of the new weights) are removed; nothing else.
    clear_output_dir(path, HF_EXPORT_KIND)
    for p in path.iterdir():
        if _HF_STALE.fullmatch(p.name) and not p.is_dir():
            p.unlink()
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(out, str(tmp), metadata={"format": "pt"})
    for name in ("preprocessor_config.json", "config.json"):
        with atomic_path(path / name) as tmp:
            tmp.write_text(texts[name])
    if state == "empty":
        mark_output_dir(path, HF_EXPORT_KIND, HF_EXPORT_FILES)
    else:
        claim_output_files(path, HF_EXPORT_KIND, HF_EXPORT_FILES)
    return path
