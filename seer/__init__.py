"""seer: SEER-style self-supervised pretraining (RegNetY + SwAV) and frozen-feature evaluation.

The public API (see README): presets and trunks, checkpoint loading/saving, feature extraction.
Heavy submodules are imported lazily so `import seer` stays fast.
"""

from __future__ import annotations

from seer.models.regnet import PRESETS, RegNetCfg, RegNetTrunk, build_trunk, complexity

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "RegNetCfg",
    "RegNetTrunk",
    "build_trunk",
    "complexity",
    "load_trunk",
    "load_classifier",
    "save_trunk",
    "extract_features",
    "extract_dataset",
    "load_feature_file",
]

# name -> module that defines it; resolved on first access (PEP 562).
_LAZY = {
    "load_trunk": "seer.weights",
    "load_classifier": "seer.weights",
    "save_trunk": "seer.weights",
    "extract_features": "seer.features",
    "extract_dataset": "seer.features",
    "load_feature_file": "seer.features",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("ssl", "evaluation", "data", "train", "distributed"):
        import importlib

        return importlib.import_module(f"seer.{name}")
    raise AttributeError(f"module 'seer' has no attribute {name!r}")
