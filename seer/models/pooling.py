"""Pooled features of a trunk: the one pooling of extraction, shared by ``extract_features``, its backends and the
ONNX export (``seer.features`` re-exports both names)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from seer.models.regnet import RegNetTrunk

__all__ = ["pool", "pooled_features"]


def pool(maps: torch.Tensor) -> torch.Tensor:
    """The one pooling of extraction: feature maps ``[B, C, H, W]`` -> ``[B, C]`` (global average); any other
    output ``[B, ...]`` -> ``[B, D]``."""
    return maps.mean((2, 3)) if maps.ndim == 4 else maps.flatten(1)


def pooled_features(model: nn.Module, x: torch.Tensor, layers: Sequence[str] = ("avgpool",)) -> dict[str, torch.Tensor]:
    """Pooled features of ``x`` at each of ``layers``, in one forward.

    Args:
        model: a ``RegNetTrunk``: "avgpool" (its last stage pooled, what ``trunk(x)`` returns) and stage names
            "res2".."res5" (computed only up to the deepest one asked for). Any other module: "avgpool" only, its
            output (``pooler_output`` for HF models) pooled.
        x: model-ready images ``[B, 3, H, W]``.
        layers: the layers wanted.

    Raises:
        ValueError: a layer the model does not have.
    """
    if not isinstance(model, RegNetTrunk):
        if any(layer != "avgpool" for layer in layers):
            bad = next(layer for layer in layers if layer != "avgpool")
            raise ValueError(f"layer={bad!r} needs a RegNetTrunk; other modules give their output (layer='avgpool')")
        out = model(x)
        out = getattr(out, "pooler_output", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return {"avgpool": pool(out)}
    last = model.stage_names[-1]
    names = {layer: last if layer == "avgpool" else layer for layer in layers}
    unknown = [layer for layer in names.values() if layer not in model.stage_names]
    if unknown:
        raise ValueError(f"layer {unknown[0]!r}: this trunk has stages {model.stage_names}")
    if set(names.values()) == {last}:
        maps = {last: model.forward_features(x)}  # no earlier stage output is kept alive
    else:
        maps = model.forward_stages(x, until=max(names.values(), key=model.stage_names.index))
    return {layer: pool(maps[name]) for layer, name in names.items()}
