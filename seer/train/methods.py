"""Pretraining methods by name: the one seam between the generic loop / planner and a method's own module.

A method lives in one module (dinov2's habit: ``seer.ssl.swav`` holds all of SwAV) and gives the loop two things:

* ``build(trunk, method_cfg, *, bn_splits) -> nn.Module``: a model with a ``trunk`` (the unit checkpoints and
  evaluation keep) and optionally a ``head`` (its own FSDP unit), whose ``forward(batch)`` returns
  ``{"loss": scalar, ...}``. Two optional hooks, called by ``seer.train.loop`` when the model defines them:
  ``before_forward(step)`` and ``before_optimizer_step(step)`` (after backward, before clipping and the update).
* ``config``: its config dataclass, assembled by ``seer.config.PretrainConfig`` as the section named like the
  method (``cfg.swav``), or None for a method without options. The config validates itself
  (``validate(n_crops)``: ValueError naming its dotted keys) and tells ``seer plan`` what its head costs
  (``head_params(trunk_width)``, ``head_activations()`` elements per crop image).

``cfg.method`` (``method: swav`` in a recipe) picks the entry; another method is one more line in ``METHODS``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from seer.ssl import swav
from seer.train import supervised

__all__ = ["Method", "METHODS", "get_method", "method_config"]


@dataclass(frozen=True)
class Method:
    """A pretraining method: how to build its model on a trunk, and its config section's type."""

    build: Callable[..., nn.Module]
    config: type | None = None
    # True: the model is called ``model(crops, labels)`` and every sample must carry a label
    labels: bool = False


METHODS: dict[str, Method] = {
    "swav": Method(build=swav.build_model, config=swav.SwAVConfig),
    "supervised": Method(build=supervised.build_model, config=supervised.SupervisedConfig, labels=True),
}


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError with the known names (and a close match) otherwise."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}{hint}")
    return METHODS[name]


def method_config(cfg: Any) -> Any:
    """The config section of ``cfg.method`` (``cfg.swav`` for SwAV), or None for a method without one."""
    if get_method(cfg.method).config is None:
        return None
    return getattr(cfg, cfg.method)
