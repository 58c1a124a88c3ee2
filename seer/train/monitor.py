"""Whether the features are learning, while training runs: a periodic kNN on a held-out labeled image folder, and
for methods with a classifier, its top-1 / top-5 on a validation split.

``train.monitor_images=DIR`` (class subfolders) is split once into a bank (4 of every 5 images per class) and
queries (the 5th); every ``train.monitor_every`` steps the trunk embeds both in eval mode at ``resolution`` px
(``seer.data.images.eval_transform``: resize, center crop, ImageNet normalization) and the queries are classified
by cosine kNN (k=20, T=0.07) against the bank. The line reads::

    monitor step 400: kNN top-1 0.532 (k=20; 800 bank / 200 query images of 10 classes), loss 3.214

``train.val_images=DIR`` (or a file list) is scored by ``ClassifierValidator`` with the model's own ``logits``::

    val step 120 (epoch 4.0): top-1 0.874 top-5 0.991 (500 images of 10 classes)

The model is put back in training mode afterwards. Under FSDP every rank embeds the same images (the forward is
collective), rank 0 scores them. Loading and embedding ``PROGRESS_MIN_IMAGES`` images or more shows progress on rank 0
(``seer.progress``: 50,000 validation images take minutes).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from seer.progress import progress

__all__ = ["KNNMonitor", "ClassifierValidator", "format_line", "format_val_line", "PROGRESS_MIN_IMAGES"]

# Fewer images load and embed in seconds: no progress lines for them (two lines per validation would be noise).
PROGRESS_MIN_IMAGES = 1000


def format_line(step: int, result: dict, loss: float) -> str:
    """The monitor's log line."""
    return (
        f"monitor step {step}: kNN top-1 {result['top1']:.3f} (k={result['k']}; {result['bank']} bank / "
        f"{result['queries']} query images of {result['classes']} classes), loss {loss:.3f}"
    )


def format_val_line(step: int, result: dict, epoch: float | None = None) -> str:
    """The validation's log line."""
    where = f" (epoch {epoch:.1f})" if epoch is not None else ""
    return (
        f"val step {step}{where}: top-1 {result['top1']:.3f} top-5 {result['top5']:.3f} "
        f"({result['images']} images of {result['classes']} classes)"
    )


def _load_images(part: list, resolution: int, desc: str = "loading images",
                 report: bool = True) -> tuple[torch.Tensor, np.ndarray]:  # fmt: skip
    """``[(path, label), ...]`` -> (model-ready images at ``resolution`` px, labels); progress when ``report``."""
    from seer.data.images import eval_transform, read_image_file

    transform = eval_transform(resolution, crop_pct=1.0)  # the features' own eval preprocessing
    images = []
    bar = progress(len(part), desc, unit="img", enabled=report and len(part) >= PROGRESS_MIN_IMAGES)
    for path, _ in part:  # regular files only, capped: a FIFO named .jpg among the user's images would hang training
        images.append(transform(read_image_file(path)))
        bar.update(1)
    bar.close()
    return torch.stack(images), np.array([y for _, y in part])


@torch.no_grad()
def _forward_eval(model: nn.Module, fn, x: torch.Tensor, batch_size: int, desc: str = "embedding",
                  report: bool = True) -> np.ndarray:  # fmt: skip
    """``fn(batch)`` over ``x`` with ``model`` in eval mode (FSDP2 root unsharded), float32 numpy."""
    was_training = model.training
    device = next(model.parameters()).device
    unshard = getattr(model, "unshard", None)  # FSDP2's root keeps the stem: gather it for a bare trunk call
    if unshard is not None:
        unshard()
    model.eval()
    bar = progress(len(x), desc, unit="img", enabled=report and len(x) >= PROGRESS_MIN_IMAGES)
    try:
        chunks = []
        for i in range(0, len(x), batch_size):
            chunks.append(fn(x[i : i + batch_size].to(device)).float().cpu())
            bar.update(len(chunks[-1]))
        bar.close()
    finally:
        model.train(was_training)
        if unshard is not None:
            model.reshard()
    return torch.cat(chunks).numpy()


class ClassifierValidator:
    """Top-1 / top-5 of ``model.logits`` on a labeled validation folder or file list (see the module docstring).

    ``class_names``: the training data's classes; the validation split must have the same ones (by name).
    ``report``: show progress (rank 0) when there are ``PROGRESS_MIN_IMAGES`` images or more.
    """

    def __init__(self, images: str, resolution: int, class_names: list[str] | None = None,
                 batch_size: int = 128, report: bool = True) -> None:  # fmt: skip
        from seer.data.sources import resolve_source

        source = resolve_source(images)
        if source.class_names is None or any(y < 0 for _, y in source.items):
            raise ValueError(f"train.val_images={images!r}: needs labels (class subfolders or a label column)")
        if class_names is not None and list(source.class_names) != list(class_names):
            raise ValueError(
                f"train.val_images={images!r}: classes {source.class_names[:5]}... differ from the training data's "
                f"{list(class_names)[:5]}... (the labels would not match)"
            )
        self.classes, self.batch_size, self.report = len(source.class_names), batch_size, report
        self.x, self.y = _load_images(source.items, resolution, "loading the validation images", report)

    def __call__(self, model: nn.Module, score: bool = True) -> dict | None:
        logits = _forward_eval(model, model.logits, self.x, self.batch_size, "validating", self.report and score)
        if not score:
            return None
        k = min(5, logits.shape[1])
        top = np.argsort(-logits, axis=1)[:, :k]
        return {
            "top1": float((top[:, 0] == self.y).mean()),
            "top5": float((top == self.y[:, None]).any(axis=1).mean()),
            "images": len(self.y),
            "classes": self.classes,
        }


class KNNMonitor:
    """kNN top-1 of the trunk's pooled features on a fixed labeled split (see the module docstring)."""

    def __init__(self, images: str, resolution: int, max_images: int = 1000, batch_size: int = 128,
                 report: bool = True) -> None:  # fmt: skip
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
        self.report = report
        parts = {"bank": self.bank, "queries": self.queries}
        self._tensors = {name: _load_images(part, resolution, f"loading the kNN monitor's {name}", report)
                         for name, part in parts.items()}  # fmt: skip

    def __call__(self, model: nn.Module, score: bool = True) -> dict | None:
        """Embed bank and queries with ``model.trunk`` (eval mode) and score them (``score=False``: embed only)."""
        from seer.evaluation import eval_knn

        feats = {name: _forward_eval(model, model.trunk, x, self.batch_size, f"kNN monitor: embedding the {name}",
                                     self.report and score)
                 for name, (x, _) in self._tensors.items()}  # fmt: skip
        if not score:
            return None
        k = min(20, len(self.bank))
        yb, yq = self._tensors["bank"][1], self._tensors["queries"][1]
        top1 = eval_knn(feats["bank"], yb, feats["queries"], yq, ks=(k,))["top1"][k]
        return {"top1": float(top1), "k": k, "bank": len(yb), "queries": len(yq), "classes": self.classes}
