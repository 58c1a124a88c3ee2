"""Whether the features are learning, while training runs: a periodic kNN on a held-out labeled image folder.

``train.monitor_images=DIR`` (class subfolders) is split once into a bank (4 of every 5 images per class) and
queries (the 5th); every ``train.monitor_every`` steps the trunk embeds both in eval mode at ``resolution`` px
(``seer.data.images.eval_transform``: resize, center crop, ImageNet normalization) and the queries are classified
by cosine kNN (k=20, T=0.07) against the bank. The line reads::

    monitor step 400: kNN top-1 0.532 (k=20; 800 bank / 200 query images of 10 classes), loss 3.214

The model is put back in training mode afterwards. Under FSDP every rank embeds the same images (the forward is
collective), rank 0 scores them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["KNNMonitor", "format_line"]


def format_line(step: int, result: dict, loss: float) -> str:
    """The monitor's log line."""
    return (
        f"monitor step {step}: kNN top-1 {result['top1']:.3f} (k={result['k']}; {result['bank']} bank / "
        f"{result['queries']} query images of {result['classes']} classes), loss {loss:.3f}"
    )


class KNNMonitor:
    """kNN top-1 of the trunk's pooled features on a fixed labeled split (see the module docstring)."""

    def __init__(self, images: str, resolution: int, max_images: int = 1000, batch_size: int = 128) -> None:
        from seer.data.sources import folder_source

        source = folder_source(images)
        if source.class_names is None:
            raise ValueError(f"train.monitor_images={images!r}: needs class subfolders (the labels of the kNN)")
        items = source.items
        if len(items) > max_images:  # an even subsample, the same every run
            items = [items[i] for i in np.linspace(0, len(items) - 1, max_images).round().astype(int)]
        per_class: dict[int, int] = {}
        self.bank, self.queries = [], []
        for path, label in items:
            n = per_class.get(label, 0)
            per_class[label] = n + 1
            (self.queries if n % 5 == 4 else self.bank).append((path, label))
        if not self.queries or len(per_class) < 2:
            raise ValueError(f"train.monitor_images={images!r}: needs at least 2 classes and 5 images per class")
        self.classes, self.resolution, self.batch_size = len(per_class), resolution, batch_size
        self._tensors = {name: self._load(part) for name, part in (("bank", self.bank), ("queries", self.queries))}

    def _load(self, part: list) -> tuple[torch.Tensor, np.ndarray]:
        from seer.data.images import eval_transform

        transform = eval_transform(self.resolution, crop_pct=1.0)  # the features' own eval preprocessing
        images = []
        for path, _ in part:
            with open(path, "rb") as f:
                images.append(transform(f.read()))
        return torch.stack(images), np.array([y for _, y in part])

    @torch.no_grad()
    def __call__(self, model: nn.Module, score: bool = True) -> dict | None:
        """Embed bank and queries with ``model.trunk`` (eval mode) and score them (``score=False``: embed only)."""
        from seer.evaluation import eval_knn

        trunk = model.trunk
        was_training = model.training
        device = next(model.parameters()).device
        unshard = getattr(model, "unshard", None)  # FSDP2's root keeps the stem: gather it for a bare trunk call
        if unshard is not None:
            unshard()
        model.eval()
        try:
            feats = {}
            for name, (x, _) in self._tensors.items():
                chunks = [trunk(x[i : i + self.batch_size].to(device)).float().cpu()
                          for i in range(0, len(x), self.batch_size)]  # fmt: skip
                feats[name] = torch.cat(chunks).numpy()
        finally:
            model.train(was_training)
            if unshard is not None:
                model.reshard()
        if not score:
            return None
        k = min(20, len(self.bank))
        yb, yq = self._tensors["bank"][1], self._tensors["queries"][1]
        top1 = eval_knn(feats["bank"], yb, feats["queries"], yq, ks=(k,))["top1"][k]
        return {"top1": float(top1), "k": k, "bank": len(yb), "queries": len(yq), "classes": self.classes}
