"""``RegNetClassifier``: a trunk with a linear classifier on its pooled features, as every SEER fine-tune is.

HF's ``RegNetForImageClassification``, timm's ``regnety_*`` with ``head.fc``, torchvision's ``fc``, VISSL's fine-tune
(``mlp``) and linear-eval (``eval_mlp``: BatchNorm then linear, folded into one linear layer) heads and seer's own
fine-tunes are all this module: ``model(x)`` gives logits, ``model.trunk`` is the usual trunk.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["RegNetClassifier", "default_labels"]


def default_labels(n_classes: int) -> dict[int, str]:
    """Label names for a head that has none: ImageNet-1k's class names for 1000 classes (torchvision ships them),
    else the class indices."""
    if n_classes == 1000:
        try:
            from torchvision.models._meta import _IMAGENET_CATEGORIES

            return dict(enumerate(_IMAGENET_CATEGORIES))
        except ImportError:  # a torchvision that moved them: indices are still right
            pass
    return {i: str(i) for i in range(n_classes)}


class RegNetClassifier(nn.Module):
    """``trunk`` + ``head`` (an ``nn.Linear`` on the pooled features): ``forward(x) -> logits [B, n_classes]``.

    Attributes:
        trunk: the ``RegNetTrunk``; ``model.trunk(x)`` gives the features ``extract_features`` does.
        head: ``nn.Linear(trunk.num_features, n_classes)``.
        id2label: class index -> name.
        pretrained_cfg: the preprocessing the checkpoint expects (the trunk's).
    """

    def __init__(self, trunk: nn.Module, n_classes: int, *, id2label: Mapping[int, str] | None = None) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"RegNetClassifier: n_classes must be >= 1, got {n_classes}")
        self.trunk = trunk
        self.head = nn.Linear(trunk.num_features, n_classes)
        labels = dict(id2label) if id2label is not None else default_labels(n_classes)
        labels = {int(k): str(v) for k, v in labels.items()}
        if sorted(labels) != list(range(n_classes)):
            raise ValueError(
                f"RegNetClassifier: id2label must name classes 0..{n_classes - 1}, got {len(labels)} entries "
                f"(keys {sorted(labels)[:5]}...)"
            )
        self.id2label = labels

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    @property
    def num_features(self) -> int:
        return self.trunk.num_features

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.trunk, "pretrained_cfg", {})

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in self.id2label.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.trunk(x)
        return self.head(feats.to(self.head.weight.dtype))
