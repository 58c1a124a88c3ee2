"""seer: SEER-style self-supervised pretraining (RegNetY + SwAV) and frozen-feature evaluation.

The public API (see README): presets and trunks, checkpoint loading/saving, feature extraction, training
(``seer.pretrain`` / ``seer.finetune``). Heavy submodules are imported lazily so `import seer` stays fast; ``dir(seer)``
lists the lazy names too, so tab completion finds them.
"""

from seer.models.regnet import PRESETS, RegNetCfg, RegNetTrunk, build_trunk, complexity


def _installed_version() -> str:
    """The version has one home, pyproject.toml; the installed distribution's metadata carries it here."""
    from importlib.metadata import PackageNotFoundError, version

    from seer.extras import DISTRIBUTION

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree on sys.path that was never installed (not even `pip install -e .`)
        return "0+unknown"


__version__ = _installed_version()

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
    "pretrain",
    "finetune",
]

# name -> module that defines it; resolved on first access (PEP 562).
_LAZY = {
    "load_trunk": "seer.weights",
    "load_classifier": "seer.weights",
    "save_trunk": "seer.weights",
    "extract_features": "seer.features",
    "extract_dataset": "seer.features",
    "load_feature_file": "seer.features",
    "pretrain": "seer.train.api",
    "finetune": "seer.train.api",
}
# submodules reachable as attributes (`seer.evaluation.eval_knn`, `seer.config.load_config`) without importing them
_SUBMODULES = ("ssl", "evaluation", "data", "train", "distributed", "config")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"seer.{name}")
    raise AttributeError(f"module 'seer' has no attribute {name!r}")


def __dir__() -> list[str]:
    # PEP 562: without this, dir(seer) (and so tab completion) shows only what is already imported.
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
