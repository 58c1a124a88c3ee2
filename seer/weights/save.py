"""``save_trunk``: a trunk written atomically as our safetensors export, an HF directory, or a timm / torchvision
state dict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from seer.io import atomic_dir, atomic_path
from seer.models.regnet import RegNetCfg, RegNetTrunk
from seer.weights.formats import LAYOUTS, hf_processor

__all__ = ["save_trunk"]


def save_trunk(trunk: RegNetTrunk, path: str | os.PathLike, *, format: str = "seer",
               preprocess: dict | None = None) -> Path:  # fmt: skip
    """Save a trunk atomically (a temporary name, renamed when complete).

    Args:
        trunk: a ``RegNetTrunk``.
        path: output file ("seer", "timm", "torchvision": ``.safetensors``, or ``.pth`` for a ``torch.save`` state
            dict) or directory ("hf").
        format: "seer" (safetensors + RegNetCfg metadata, what ``load_trunk`` reads back exactly), "hf" (a
            directory ``transformers.RegNetModel.from_pretrained`` loads, with a ``preprocessor_config.json``),
            "timm" (a state dict timm's ``regnety_*`` with ``num_classes=0`` loads) or "torchvision".
        preprocess: preprocessing to record (default: the trunk's ``pretrained_cfg``).

    Returns:
        The written path.
    """
    if not isinstance(trunk, RegNetTrunk):
        raise TypeError(f"save_trunk expects a RegNetTrunk, got {type(trunk).__name__}")
    path = Path(path).expanduser()
    cfg: RegNetCfg = trunk.cfg
    if cfg.image_norm and format != "seer":
        # timm / torchvision / HF trunks have no per-image standardization: the file would load as a different model
        raise ValueError(f"save_trunk: format={format!r} cannot record image_norm=True (per-image standardization "
                         "before the stem); save it with format='seer'")  # fmt: skip
    pre = dict(preprocess or getattr(trunk, "pretrained_cfg", None) or {})
    tensors = _trunk_tensors(trunk)
    if any(t.is_meta for t in tensors.values()):
        raise ValueError("save_trunk: the trunk has meta (unmaterialized) tensors")
    if format in ("seer", "timm", "torchvision"):
        layout = LAYOUTS["timm" if format == "seer" else format]
        out = {layout.their_key(k): v for k, v in tensors.items()}
        metadata = {"format": "pt"}
        if format == "seer":
            metadata = {"format": "seer", "regnet_cfg": json.dumps(cfg.to_dict())}
            if pre:
                metadata["preprocess"] = json.dumps(pre)
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
        return _save_hf(tensors, cfg, path, pre)
    raise ValueError(f"unknown format {format!r}; choose 'seer', 'hf', 'timm' or 'torchvision'")


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


def _save_hf(tensors: dict[str, torch.Tensor], cfg: RegNetCfg, path: Path, pre: dict) -> Path:
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
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(hf_processor(pre), indent=2))
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return path
