"""Training from Python: ``seer.pretrain`` and ``seer.finetune``, the calls `seer pretrain` and `seer finetune` make.

    import seer

    summary = seer.pretrain("tiny_cpu", run_dir="runs/a", train={"total_steps": 50})   # a section as a dict
    summary = seer.pretrain("tiny_cpu", **{"train.total_steps": 50, "optim.base_lr": 0.1})  # dotted keys
    summary = seer.finetune("tiny_cpu", model={"init_from": "runs/a"}, data={"images": "digits/train"})

The first argument is a shipped recipe's name, a yaml file, a ``PretrainConfig`` (``seer.config.load_config``) or a
nested dict; keyword overrides go on top, checked like the command line's (an unknown key names itself and its
closest match). Both return the run's summary: ``{"step", "loss", "run_dir", "checkpoint", "world_size", ...}``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist

from seer.config import ConfigError, PretrainConfig, config_to_dict, load_config

__all__ = ["pretrain", "finetune"]

ConfigLike = str | os.PathLike | PretrainConfig | Mapping | None


def _deep_set(node: dict, key: str, value: Any, where: str) -> None:
    """``node[key] = value``, merging a mapping into a section already there; a leaf given twice is an error."""
    if isinstance(value, Mapping) and isinstance(node.get(key), dict):
        for k, v in value.items():
            _deep_set(node[key], str(k), v, f"{where}.{k}")
    elif key in node:
        raise ConfigError(f"override {where!r} is given twice (as a dotted key and inside a section dict)")
    else:
        node[key] = dict(value) if isinstance(value, Mapping) else value


def _nest(overrides: Mapping[str, Any]) -> dict:
    """``{"train.total_steps": 20, "optim": {"base_lr": 0.1}}`` -> ``{"train": {"total_steps": 20}, "optim": ...}``."""
    nested: dict = {}
    for key, value in overrides.items():
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {key!r} has an empty key (e.g. train.total_steps=20)")
        node = nested
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is both a value and a section")
        _deep_set(node, parts[-1], value, key)
    return nested


def _merged(base: dict, nested: dict, node: Any) -> dict:
    """``base`` (a config as dicts) with ``nested`` overrides on top, section by section of the dataclass ``node``:
    a dict-valued key (``model.cfg``) is replaced whole, as a yaml recipe's override replaces it."""
    out = dict(base)
    for key, value in nested.items():
        section = getattr(node, key, None)
        if dataclasses.is_dataclass(section) and isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], dict(value), section)
        else:
            out[key] = value
    return out


def resolve_config(config: ConfigLike, overrides: Mapping[str, Any], kind: str) -> PretrainConfig:
    """The validated config ``config`` + ``overrides`` describe (see ``pretrain``); ``config`` is never modified."""
    nested = _nest(overrides)
    if isinstance(config, PretrainConfig):
        return load_config(None, _merged(config_to_dict(config), nested, config), kind=kind)
    if isinstance(config, Mapping):
        return load_config(None, _merged(_nest(config), nested, PretrainConfig()), kind=kind)
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise TypeError(
            f"config: expected a recipe name, a yaml path, a PretrainConfig or a dict, got {type(config).__name__}"
        )
    return load_config(config, nested, kind=kind)


def _run(cfg: PretrainConfig, allow_config_change: bool) -> dict:
    from seer.distributed.env import destroy_distributed
    from seer.train import loop

    # Under torchrun the loop joins a process group; one the caller had set up is theirs to tear down.
    owned_group = not (dist.is_available() and dist.is_initialized())
    finished = False
    try:
        summary = loop.pretrain(cfg, allow_config_change=allow_config_change)
        finished = True
    finally:
        if owned_group:
            destroy_distributed(wait_for_peers=finished)
    return summary


def pretrain(config: ConfigLike, /, *, allow_config_change: bool = False, **overrides: Any) -> dict:
    """Pretrain (or resume) a run, as `seer pretrain --config CONFIG key=value ...` does; returns its summary.

    Args:
        config: a shipped pretraining recipe's name (``"tiny_cpu"``, ``"seer_rg32"``; ``seer.catalog``), a yaml
            file of overrides, a ``PretrainConfig``, a nested dict, or None (the defaults in code).
        allow_config_change: resume a run directory whose checkpoints were trained with another config (by default
            only the keys ``seer.config.RESUME_MAY_CHANGE`` lists may differ; the old config is kept beside it).
        **overrides: config keys, dotted (``**{"optim.base_lr": 0.1}``) or as sections (``optim={"base_lr": 0.1}``)
            or top-level (``run_dir="runs/a"``), with Python values.

    Returns:
        The run's summary, as `seer pretrain` prints it: ``{"step", "loss", "run_dir", "checkpoint", "world_size",
        "global_batch", ...}`` (``"note"`` when the run directory was already at ``total_steps``).

    Raises:
        ConfigError: an unknown key (named, with its closest match), a value of the wrong type or an impossible one.
        FileNotFoundError: ``config`` is neither a file nor a shipped recipe (the message lists the recipes).
        FloatingPointError, RunDirBusy, RunDirConfigError: as ``seer.train.loop.pretrain``.

    Example::

        summary = seer.pretrain("tiny_cpu", run_dir="runs/a", train={"total_steps": 50})
        summary["checkpoint"]  # 'runs/a/checkpoints/step_00000050'
    """
    return _run(resolve_config(config, overrides, "pretrain"), allow_config_change)


def finetune(config: ConfigLike, /, *, allow_config_change: bool = False, **overrides: Any) -> dict:
    """Fine-tune a trunk, as `seer finetune --config CONFIG key=value ...` does; returns the run's summary.

    ``config`` names a fine-tuning recipe (``"tiny_cpu"``, ``"tiny_cpu_linear"``, ``"seer_rg32_in1k"``: the
    ``configs/finetune/`` ones) or is any other form ``pretrain`` takes; arguments, return value and errors are
    ``pretrain``'s. The recipes need the trunk and the labeled images::

        seer.finetune("tiny_cpu", model={"init_from": "runs/a"}, data={"images": "digits/train"},
                      train={"val_images": "digits/test"})
    """
    return _run(resolve_config(config, overrides, "finetune"), allow_config_change)
