"""Features of evaluation splits, cached on disk: what every protocol of a suite reads.

One split (an image folder with class subfolders, a directory of webdataset shards or a shard pattern) of one
checkpoint is extracted once by ``seer.features.extract_dataset`` (chunked, resumable, atomic) into
``<cache>/<layer>/`` per layer, and read back as ``({layer: [N, D] float32}, labels [N])`` in dataset order. The
raw-pixel baseline is a module like any trunk (``PixelBaseline``), so it goes through the same extractor and the
same cache layout (one layer, ``pixels``).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["PixelBaseline", "build_model", "split_features", "cached_split_features", "compute_features"]

PIXELS = "pixels"  # the layer name of the raw-pixel baseline


class PixelBaseline(nn.Module):
    """The raw-pixel baseline: the normalized image, average-pooled to ``size`` x ``size``, flattened."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, self.size).flatten(1)


def build_model(ckpt: Mapping[str, Any], device: torch.device | str) -> nn.Module:
    """The frozen model of a suite checkpoint entry: ``source`` (anything ``seer.load_trunk`` reads), ``preset``
    (+ ``init_seed``: a randomly initialised trunk) or ``kind: pixels`` (+ ``size``: ``PixelBaseline``)."""
    if ckpt.get("kind") == "pixels":
        model: nn.Module = PixelBaseline(int(ckpt.get("size", 16)))
    elif "source" in ckpt:
        from seer.weights import load_trunk

        model = load_trunk(ckpt["source"], preset=ckpt.get("preset"))
    else:
        from seer.models.regnet import build_trunk

        torch.manual_seed(int(ckpt.get("init_seed", 0)))
        model = build_trunk(ckpt["preset"])
    return model.to(device).eval()


def _layers(model: nn.Module | None, layers: Sequence[str]) -> list[str]:
    return [PIXELS] if model is None or isinstance(model, PixelBaseline) else list(layers)


def _load(cache: Path, layers: Sequence[str], what: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from seer.features import load_feature_file

    feats, labels = {}, None
    for layer in layers:
        data = load_feature_file(cache / layer, mmap=False)
        if data["skipped"]:
            warnings.warn(f"{what}: {len(data['skipped'])} unreadable inputs were skipped", stacklevel=3)
        feats[layer] = np.asarray(data["features"], dtype=np.float32)
        if labels is not None and not np.array_equal(labels, data["labels"]):
            raise RuntimeError(f"{cache}: layers {list(layers)} disagree on the samples (re-extract them)")
        labels = np.asarray(data["labels"], dtype=np.int64)
    if labels is not None and (labels < 0).any():
        raise ValueError(f"{what}: {(labels < 0).sum()} samples have no label (class subfolders needed)")
    return feats, labels


def _is_complete(out: Path) -> bool:
    import json

    meta = out / "meta.json"
    return meta.is_file() and "merged" in json.loads(meta.read_text())


def split_features(
    model: nn.Module | None,
    split_path: str,
    cache: str | Path,
    *,
    layers: Sequence[str],
    resolution: int,
    crop_pct: float | None,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    pixel_size: int = 16,
    progress: bool | None = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features of one split, extracted into ``cache`` unless already there: ``({layer: [N, D]}, labels)``.

    ``model=None`` (or a ``PixelBaseline``) is the raw-pixel baseline: one layer, ``"pixels"``. ``progress``: the
    extraction's (``seer.progress``; ``None``: for 512 images or more).
    """
    from seer.features import extract_dataset

    cache = Path(cache)
    if model is None:
        model = PixelBaseline(pixel_size).to(device).eval()
    p = Path(split_path)
    shards = p.is_dir() and any(p.glob("*.tar"))
    source: Any = sorted(str(t) for t in p.glob("*.tar")) if shards else split_path
    preprocess = {"resolution": int(resolution)} | ({"crop_pct": float(crop_pct)} if crop_pct is not None else {})
    todo = _layers(model, layers)
    for layer in todo:
        out = cache / layer
        if not _is_complete(out):
            extract_dataset(source, out, model, layer="avgpool" if layer == PIXELS else layer, batch_size=batch_size,
                            device=device, dtype="float32", num_workers=num_workers, progress=progress, merge=True,
                            **preprocess)  # fmt: skip
    return _load(cache, todo, split_path)


def cached_split_features(cache: str | Path, layers: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read the features ``split_features`` cached under ``cache`` (the pixel baseline's too); never extracts.

    Raises:
        FileNotFoundError: the extraction of this split did not finish (names the missing layers).
    """
    cache = Path(cache)
    todo = [PIXELS] if _is_complete(cache / PIXELS) else list(layers)
    missing = [layer for layer in todo if not _is_complete(cache / layer)]
    if missing:
        raise FileNotFoundError(f"{cache}: features of {missing} are not cached (did the extraction finish?)")
    return _load(cache, todo, str(cache))


def compute_features(
    model: nn.Module | None, split_path: str, **kwargs: Any
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``split_features`` without a lasting cache (a temporary directory): features of one split, in memory."""
    with tempfile.TemporaryDirectory(prefix="seer-features-") as tmp:
        return split_features(model, split_path, Path(tmp), **kwargs)
