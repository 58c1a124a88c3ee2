"""Supervised training of the trunk: a linear classifier on the pooled features, cross-entropy on the labels.

The second method of ``seer.train.methods`` (``method: supervised``). It trains through the same loop, data
pipeline and augmentations as SwAV, so "the same trunk, the same images, the same budget" is one config change:
the supervised ceiling of ``seer demo`` is this method on the demo's own recipe. Every crop of the multi-crop
batch (or the ``supervised.crops`` subset) is classified with its image's label; the loss is their mean.

``n_classes`` must match the labels of the data (``data.images`` class subfolders, or the shards' ``cls``); a
label outside ``[0, n_classes)`` is an error that names it, never a silent wrap-around.

Fine-tuning (`seer finetune`, ``configs/finetune/``) is this method started from ``model.init_from``: with a new
head or the checkpoint's own (``supervised.head: existing``), training the whole network or only the head on the
frozen trunk (``supervised.freeze_trunk: true``, the linear protocol: BatchNorm statistics frozen too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from seer.ssl.swav import multicrop_forward
from seer.validation import check_numbers

__all__ = ["SupervisedConfig", "SupervisedModel", "build_model"]


@dataclass
class SupervisedConfig:
    """The classifier and its loss (see ``SupervisedModel``)."""

    n_classes: int = 0  # the number of classes of the data; required
    label_smoothing: float = 0.0  # cross-entropy label smoothing: this fraction of the target spread over all classes
    crops: list = field(default_factory=list)  # crop indices to classify; [] = every crop
    head: str = "new"  # new | existing: model.init_from's classifier head (its classes must be the data's)
    freeze_trunk: bool = False  # train the head alone on the frozen trunk (eval-mode BatchNorm)

    def validate(self, n_crops: int, section: str = "supervised") -> None:
        """ValueError naming the dotted key of an impossible value, for a run of ``n_crops`` crops per image."""
        check_numbers(self, section)  # a NaN or infinite float, as in every section
        if self.n_classes < 2:
            raise ValueError(
                f"{section}.n_classes: must be >= 2 (the number of classes of the data), got {self.n_classes}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"{section}.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        bad = [c for c in self.crops if not isinstance(c, int) or not 0 <= c < n_crops]
        if bad:
            raise ValueError(
                f"{section}.crops: indices must be in [0, {n_crops}), got {self.crops}; set {section}.crops=[] (every "
                "crop) or indices below the crop count, or more crops per image (data.multicrop / data.crops)"
            )
        if self.head not in ("new", "existing"):
            raise ValueError(f"{section}.head: must be 'new' or 'existing', got {self.head!r}")

    def head_params(self, trunk_width: int) -> int:
        return trunk_width * self.n_classes + self.n_classes

    def head_activations(self) -> int:
        return self.n_classes


class SupervisedModel(nn.Module):
    """``forward(crops, labels) -> {"loss", "top1"}`` with ``trunk`` and ``head`` (an ``nn.Linear``) submodules."""

    def __init__(self, trunk: nn.Module, n_classes: int, *, label_smoothing: float = 0.0,
                 crops: Sequence[int] = (), bn_splits: int = 1, head: str = "new",
                 freeze_trunk: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.num_features, n_classes)
        # timm's / torchvision's classifier init: small weights, zero bias (logits start near uniform)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.n_classes, self.label_smoothing, self.bn_splits = n_classes, label_smoothing, bn_splits
        self.crops = list(crops)
        self.head_source, self.freeze_trunk = head, freeze_trunk
        if freeze_trunk:
            self.trunk.requires_grad_(False)

    def train(self, mode: bool = True) -> SupervisedModel:
        super().train(mode)
        if self.freeze_trunk:  # a frozen trunk keeps its BatchNorm statistics
            self.trunk.eval()
        return self

    def init_from_checkpoint(self, source: str) -> None:
        """Loop hook, when ``model.init_from`` initialized the trunk: ``head: existing`` takes that checkpoint's
        classifier head (ValueError when it has none, or other classes than ``n_classes``)."""
        if self.head_source != "existing":
            return
        from seer.weights import read_checkpoint
        from seer.weights.formats import classifier_head

        weight, bias = classifier_head(read_checkpoint(source), self.trunk.num_features)
        if weight.shape[0] != self.n_classes:
            raise ValueError(
                f"supervised.head=existing: {source}'s classifier has {weight.shape[0]} classes, the data "
                f"(supervised.n_classes) {self.n_classes}; use supervised.head=new for other classes"
            )
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores of model-ready images (what the validation and the exported classifier compute)."""
        return self.head(self.trunk(x).to(self.head.weight.dtype))

    def forward(self, crops: Sequence[torch.Tensor], labels: torch.Tensor) -> dict:
        labels = torch.as_tensor(labels, device=crops[0].device).long()
        if labels.dim() != 1 or labels.shape[0] != crops[0].shape[0]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} for a batch of {crops[0].shape[0]} images")
        outside = labels[(labels < 0) | (labels >= self.n_classes)]
        if outside.numel():
            raise ValueError(
                f"label {int(outside[0])} is outside [0, {self.n_classes}): set supervised.n_classes to the number "
                "of classes of the data"
            )
        chosen = [crops[i] for i in self.crops] if self.crops else list(crops)
        feats = multicrop_forward(self.trunk, chosen, self.bn_splits)
        logits = self.head(feats.to(self.head.weight.dtype))
        target = labels.repeat(len(chosen))  # crop-major, as multicrop_forward concatenates
        loss = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            top1 = float((logits.argmax(-1) == target).float().mean())
        return {"loss": loss, "top1": top1}


def build_model(trunk: nn.Module, cfg: SupervisedConfig, *, bn_splits: int = 1) -> SupervisedModel:
    """The supervised model a config describes on ``trunk`` (its classifier freshly initialized, CPU, fp32)."""
    return SupervisedModel(trunk, cfg.n_classes, label_smoothing=cfg.label_smoothing, crops=cfg.crops,
                           bn_splits=bn_splits, head=cfg.head, freeze_trunk=cfg.freeze_trunk)  # fmt: skip
