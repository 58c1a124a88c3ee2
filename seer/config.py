"""Pretraining configuration: a dataclass tree with defaults in code, yaml overrides, dotted CLI overrides.

    cfg = load_config("tiny_cpu", ["optim.base_lr=0.1", "train.total_steps=50"])   # a shipped recipe, or a path

A yaml file holds only the keys it changes (``yaml.safe_load``: configs are data, never code). Unknown keys and
values of the wrong type are rejected with the full dotted key and a close-match suggestion; impossible values
(negative learning rate, a NaN or infinite number anywhere, crops larger than the synthetic images, ...) are
rejected by ``validate``. The resolved config is written next to the run's outputs with ``dump_config``.

This file assembles the tree; a component's own knobs live with it: the method's section (``swav``:
``seer.ssl.swav.SwAVConfig``, chosen by ``method``, see ``seer.train.methods``) validates itself, and the multi-crop
presets ``data.multicrop`` names are ``seer.data.transforms.PRESETS``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from seer.catalog import looks_like_path, resolve
from seer.io import atomic_write, parse_key_values
from seer.ssl.swav import SwAVConfig
from seer.train.supervised import SupervisedConfig
from seer.validation import check_numbers as _check_numbers

__all__ = [
    "ModelConfig",
    "SwAVConfig",
    "DataConfig",
    "OptimConfig",
    "FSDPConfig",
    "TrainConfig",
    "PretrainConfig",
    "ConfigError",
    "resolve_recipe",
    "load_config",
    "dump_config",
    "config_to_dict",
    "config_from_dict",
    "validate",
    "check_numbers",
    "crop_shapes",
    "crop_scales",
    "batch_per_gpu",
    "trunk_cfg",
    "RESUME_MAY_CHANGE",
    "config_differences",
]


class ConfigError(ValueError):
    """A bad config key or value; the message names the full dotted key."""


# ----------------------------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The RegNetY trunk."""

    preset: str = "regnety_400mf"  # a RegNetY preset: a seer.models.regnet.PRESETS name (`seer presets`)
    # RegNetCfg fields overriding the preset (e.g. {"depth": 4, "w0": 16, ...}); a full dict needs no preset.
    cfg: dict | None = None
    # False | True/"block" | "stage" | SEER-style groups (one list of segment end indices per stage).
    activation_checkpointing: bool | str | list = False
    # Zero the last BN gamma of every residual branch. Off, as in the references: VISSL's RegNet trunks use
    # ClassyVision's init_weights (every BN gamma 1) and SwAV's ResNet-50 zero_init_residual=False.
    zero_init: bool = False
    # Start the trunk from these weights instead of a random init (continued pretraining; ignored when run_dir
    # holds a checkpoint: resuming wins): anything seer.load_trunk reads (a run dir or checkpoint, a safetensors /
    # torch file, a timm or HF hub id in the local cache). Its architecture must be the one preset/cfg describe.
    init_from: str | None = None


@dataclass
class DataConfig:
    """Where images come from and how they are cropped."""

    source: str = "synthetic"  # synthetic | shards | images
    urls: str | None = None  # webdataset pattern for source=shards, e.g. "data/train-{000000..000099}.tar"
    images: str | None = None  # an image folder or a CSV/TXT file list for source=images (streamed, no shards)
    multicrop: str = "cpu_tiny"  # a multi-crop preset: a seer.data.transforms.PRESETS name
    crops: list | None = None  # explicit [[count, resolution], ...] instead of the preset (synthetic source only)
    batch_size_per_gpu: int = 32  # images per rank and step (when global_batch_size is 0)
    # When > 0, the global batch; the per-GPU batch is then global_batch_size / world size (must divide).
    global_batch_size: int = 0
    workers: int = 0  # data-loading processes per rank (0: in the training process)
    # Streams per rank (0: data.workers, at least 1). The stream count, not the worker count, fixes the sample order;
    # a resumed run keeps the count its checkpoint was saved with.
    streams: int = 0
    shuffle_buffer: int = 1000  # samples a streamed source (shards, images) shuffles among
    # Audit: append every step's sample keys to run_dir/data_keys/rank{r}.jsonl (shards and images sources).
    record_keys: bool = False
    image_size: int = 96  # side of the generated images (synthetic source)
    synthetic_classes: int = 16  # number of procedural image families (synthetic source)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule; ``lr = base_lr * global_batch / reference_batch``."""

    name: str = "lars"  # lars | sgd
    base_lr: float = 0.3  # the peak lr at a global batch of reference_batch (scaled linearly to the real one)
    reference_batch: int = 256  # the global batch base_lr is given for
    momentum: float = 0.9  # LARS / SGD momentum
    nesterov: bool = False  # SGD only (VISSL's fine-tune recipes use it)
    weight_decay: float = 1e-6  # L2 weight decay (see exclude_bn_bias)
    exclude_bn_bias: bool = False  # BN and bias parameters: no weight decay and no LARS adaptation
    trust_coeff: float = 0.001  # LARS: local lr = trust_coeff x |w| / (|g| + weight_decay x |w|)
    warmup_iters: int = 0  # steps of linear warmup to the peak lr, then a cosine decay to the last step
    start_warmup_lr: float = 0.0  # as a fraction of the peak lr
    final_lr_ratio: float = 0.001  # cosine ends at base lr x this
    clip_grad: float = 0.0  # max global grad norm; 0 disables


@dataclass
class FSDPConfig:
    """FSDP2 options (applied when a process group is initialized)."""

    reshard_after_forward: bool = True  # free gathered parameters after forward (ZeRO-3); False keeps them (ZeRO-2)
    cpu_offload: bool = False  # sharded parameters, gradients and optimizer state in host memory (CUDA only)
    shard_unit: str = "block"  # block | group (the activation-checkpointing groups, or stages)
    # Gradient reduce-scatter dtype: fp32 | bf16 (halves the traffic; VISSL's 10B reduces in fp16). BatchNorm and
    # fp32 units (SwAV's prototypes) always reduce in fp32.
    reduce_dtype: str = "fp32"


@dataclass
class TrainConfig:
    """Length, logging, checkpointing, numerics."""

    total_steps: int = 0  # 0 -> epochs x steps_per_epoch; with max_minutes > 0: a cap on the steps it buys (0: none)
    # A time budget in minutes (0: off): the run's length is bought from the seconds per step measured over its first
    # steps, the warmup fitted to it; train.epochs is then ignored. The count is saved in the checkpoints and reused on
    # resume; it depends on the machine, so a seed no longer fixes the run (docs/pretraining.md, "A time budget").
    max_minutes: float = 0.0
    epochs: int = 1  # with total_steps 0, the run is epochs x steps_per_epoch steps
    steps_per_epoch: int = 100  # steps of one epoch, for the run length above
    log_every: int = 10  # steps between log lines (loss, lr, images/s, data time, memory, ETA)
    ckpt_every_steps: int = 0  # 0 disables step-based checkpoints (one is always written at the end)
    ckpt_every_minutes: float = 0.0  # also checkpoint when this long has passed since the last save; 0 disables
    keep_last: int = 3  # checkpoints kept in run_dir/checkpoints; older ones are deleted
    seed: int = 0  # the initialization and the data order
    precision: str = "fp32"  # fp32 | bf16
    compile: bool = False  # torch.compile each block (after activation checkpointing, before FSDP)
    device: str = "auto"  # auto | cpu | cuda
    # Emulate N ranks' BatchNorm batches in one process (ghost batch norm): the trunk sees each crop batch in N
    # equal chunks, as N FSDP ranks without SyncBN would.
    bn_splits: int = 1
    # Ranks per SyncBatchNorm group on CUDA (SEER's syncBN64): 0 all ranks, 1 no sync (plain BatchNorm per rank).
    # A value that does not divide the world size gives way to its largest divisor below it (496 GPUs: 62).
    sync_bn_group: int = 64
    tensorboard: bool = True  # TensorBoard logs in run_dir/tensorboard (skipped without the tensorboard extra)
    # Collective timeout: a rank that waits this long on a peer (hung, or gone without closing its sockets) raises
    # instead of blocking the job until its time limit. Raise it when a checkpoint save takes longer.
    dist_timeout_minutes: float = 10.0
    # A second run on this run_dir (double submission, a requeue while the old job still dies) waits this long for
    # the holder of run_dir/.lock to end, then fails naming it (seer.train.rundir_lock); 0: fail at once.
    lock_wait_minutes: float = 5.0
    crash_at_step: int = 0  # testing: hard-exit right after this step, as a kill would; 0 disables
    # testing: a step takes at least this long (a sleep), so a run outlasts a short time limit on any machine
    min_step_seconds: float = 0.0
    # Are the features learning? A kNN on a labeled image folder (class subfolders) every monitor_every steps.
    monitor_images: str | None = None
    monitor_every: int = 100  # steps between two kNN monitor runs
    monitor_max_images: int = 1000  # at most this many of monitor_images (an even subsample)
    # Methods with a classifier (supervised, fine-tuning): top-1 / top-5 on a labeled folder or file list, every
    # val_every steps (0: every epoch of the training data, at most once per log_every steps) and at the end.
    val_images: str | None = None
    val_every: int = 0  # steps between validations on val_images; 0: every epoch, at most once per log_every
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class PretrainConfig:
    """The whole pretraining run."""

    run_dir: str = "runs/pretrain"  # checkpoints, config.yaml and metrics.jsonl; one holding checkpoints resumes
    method: str = "swav"  # a seer.train.methods.METHODS name; its options are the section of the same name
    model: ModelConfig = field(default_factory=ModelConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def total_steps(self) -> int:
        return self.train.total_steps or self.train.epochs * self.train.steps_per_epoch


# ----------------------------------------------------------------------------------------------------------------
# Typed merge of plain dicts into the tree
# ----------------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NONFINITE = re.compile(r"[-+]?(nan|inf|infinity)", re.IGNORECASE)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. Raises naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float (10**400) is the infinity 1e400 reads as
                return math.inf if value > 0 else -math.inf
        # YAML 1.1 (PyYAML) reads 1e-6 (no dot) as a string; it is the float every user means. "nan" / "inf" are
        # read as the floats they spell, so that validate() rejects them as non-finite, as it does YAML's .nan / .inf.
        if isinstance(value, str) and (_FLOAT_LITERAL.fullmatch(value.strip()) or _NONFINITE.fullmatch(value.strip())):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _merge(node: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of overrides to a dataclass node in place, checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in dataclasses.fields(node)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]!s}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        current = getattr(node, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{key}.")
        else:
            setattr(node, name, _coerce(value, hints[name], key))


def _dotted_to_nested(items: list[str] | tuple[str, ...]) -> dict:
    try:
        pairs = parse_key_values(items, what="override", example="optim.base_lr=0.1")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    nested: dict = {}
    for key, raw in pairs:
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} is both a value and a section")
        node[parts[-1]] = value
    return nested


def config_to_dict(cfg: Any) -> dict:
    """The config tree as plain dicts (yaml/json-ready)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> PretrainConfig:
    """Defaults updated by a (possibly partial) nested dict, validated."""
    cfg = PretrainConfig()
    _merge(cfg, data or {})
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] | dict = (),
                kind: str = "pretrain", *, check: bool = True) -> PretrainConfig:  # fmt: skip
    """Defaults <- yaml file (overrides only) <- dotted ``key=value`` overrides; validated.

    ``path`` is a yaml file or the name of a shipped recipe of ``kind`` ("pretrain": ``"seer_rg32"``; "finetune":
    ``configs/finetune/``; see ``seer.catalog``). ``supervised.n_classes: 0`` on an image folder or file list is
    its number of classes. ``overrides`` may also be a nested dict of Python values (``{"train": {"epochs": 2}}``,
    what ``seer.pretrain`` passes). ``check=False`` skips ``validate`` (keys and types are still checked): `seer
    config show` shows a recipe that needs more overrides before it runs.

    Raises:
        ConfigError: naming the dotted key of an unknown key, a wrong type or an impossible value.
        FileNotFoundError: when ``path`` is neither a file nor a recipe name (the message lists the names).
    """
    cfg = PretrainConfig()
    if path is not None:
        path = resolve_recipe(path, kind)
        with open(path) as f:
            try:
                data = yaml.safe_load(f)
            except (yaml.YAMLError, UnicodeDecodeError) as exc:  # a binary file is not yaml either
                raise ConfigError(f"{path}: not valid yaml: {exc}") from None
        try:
            _merge(cfg, data or {})
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    _merge(cfg, overrides if isinstance(overrides, dict) else _dotted_to_nested(list(overrides)))
    _infer_classes(cfg)
    if check:
        validate(cfg)
    return cfg


def resolve_recipe(name: str | os.PathLike, kind: str) -> Path:
    """A recipe file of ``kind``, else (a bare name) one of the other training kind: `seer plan --config
    seer_rg32_in1k` and `seer launch pretrain` find fine-tuning recipes (the loop runs the recipe's method),
    `seer finetune` pretraining ones."""
    from seer.catalog import RecipeNotFoundError

    try:
        return resolve(name, kind)
    except RecipeNotFoundError:
        other = {"pretrain": "finetune", "finetune": "pretrain"}.get(kind)
        if other is None or looks_like_path(os.fspath(name)):
            raise
        try:
            return resolve(name, other)
        except RecipeNotFoundError:
            pass
        raise


def _infer_classes(cfg: PretrainConfig) -> None:
    """``supervised.n_classes: 0`` -> the class count of ``data.images`` (class subfolders or a label column)."""
    d = cfg.data
    if cfg.method != "supervised" or cfg.supervised.n_classes or d.source != "images" or not d.images:
        return
    if not os.path.exists(os.path.expanduser(d.images)):
        return  # validate() names the missing source
    from seer.data.sources import resolve_source

    try:
        names = resolve_source(cfg.data.images).class_names
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.images: {exc}") from None
    if not names:
        raise ConfigError(f"supervised.n_classes: 0 and data.images={cfg.data.images!r} has no labels to count")
    cfg.supervised.n_classes = len(names)


def dump_config(cfg: PretrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as yaml (atomically: temp file then rename)."""
    atomic_write(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def crop_shapes(data: DataConfig) -> list[tuple[int, int]]:
    """The multi-crop runs ``[(count, resolution), ...]`` of a data config: ``data.crops`` or the preset's."""
    from seer.data.transforms import preset_crops

    if data.crops is not None:
        return [(int(c), int(r)) for c, r in data.crops]
    return preset_crops(data.multicrop)


def crop_scales(data: DataConfig) -> list[tuple[float, float]]:
    """RandomResizedCrop area range per crop run: the preset's, or SwAV's for explicit ``data.crops``."""
    from seer.data.transforms import PRESETS, swav_scales

    if data.crops is not None:
        return list(swav_scales(len(data.crops)))
    return [tuple(sc) for sc in PRESETS[data.multicrop]["scales"]]


def _bad(key: str, value: Any, why: str, fix: str = "") -> ConfigError:
    """``key: why, got value``, then ``fix``: the override that repairs it where that is not ``key`` itself."""
    return ConfigError(f"{key}: {why}, got {value!r}" + (f"; {fix}" if fix else ""))


def check_numbers(node: Any, prefix: str = "") -> None:
    """``seer.validation.check_numbers`` raising ``ConfigError``: no NaN / inf float, no integer beyond 64 bits."""
    _check_numbers(node, prefix, error=ConfigError)


def validate(cfg: PretrainConfig, world_size: int | None = None) -> None:
    """Reject impossible values, naming the dotted key. ``world_size`` adds the checks that depend on it."""
    from seer.data.transforms import PRESETS
    from seer.distributed.env import collective_timeout
    from seer.distributed.parallel import REDUCE_DTYPES, SHARD_UNITS
    from seer.models.regnet import checkpoint_segments
    from seer.train.methods import get_method, method_config

    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    check_numbers(cfg)  # first: every range check below lets a NaN through
    try:
        get_method(cfg.method)
    except ValueError as exc:
        raise ConfigError(f"method: {exc}") from None
    # model
    try:
        depths = trunk_cfg(m).depths
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise ConfigError(f"model.{'cfg' if m.cfg is not None else 'preset'}: {exc}") from None
    try:
        checkpoint_segments(m.activation_checkpointing, depths)
    except ValueError as exc:
        raise ConfigError(f"model.activation_checkpointing: {exc}") from None
    if m.init_from is not None and not m.init_from.strip():
        raise _bad("model.init_from", m.init_from, "must name a run, checkpoint, weights file or hub id",
                   "set model.init_from=null for a random init")  # fmt: skip
    # data
    if d.source not in ("synthetic", "shards", "images"):
        raise _bad("data.source", d.source, "must be 'synthetic', 'shards' or 'images'")
    if d.source == "shards" and not d.urls:
        raise _bad("data.urls", d.urls, "is required when data.source is 'shards'",
                   "set data.urls=PATTERN (e.g. data.urls='data/train-{000000..000099}.tar')")  # fmt: skip
    if d.source == "images" and not d.images:
        raise _bad("data.images", d.images, "is required when data.source is 'images' (an image folder or a list file)",
                   "set data.images=DIR (class subfolders) or data.images=FILE (a CSV/TXT list)")  # fmt: skip
    if d.streams < 0:
        raise _bad("data.streams", d.streams, "must be >= 0 (0: one per worker)")
    if d.crops is None and d.multicrop not in PRESETS:
        close = difflib.get_close_matches(d.multicrop, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _bad("data.multicrop", d.multicrop, f"must be one of {sorted(PRESETS)}{hint}")
    if d.crops is not None:
        ok = all(isinstance(c, list) and len(c) == 2 and all(isinstance(v, int) and v > 0 for v in c) for c in d.crops)
        if not ok or not d.crops:
            raise _bad("data.crops", d.crops, "must be a list of [count, resolution] pairs of positive integers")
    shapes = crop_shapes(d)
    n_crops = sum(c for c, _ in shapes)
    for key in ("batch_size_per_gpu", "image_size", "synthetic_classes", "shuffle_buffer"):
        if getattr(d, key) < 1:
            raise _bad(f"data.{key}", getattr(d, key), "must be >= 1")
    if d.workers < 0:
        raise _bad("data.workers", d.workers, "must be >= 0")
    if d.source == "synthetic" and max(r for _, r in shapes) > d.image_size:
        largest = max(r for _, r in shapes)
        raise _bad("data.image_size", d.image_size, f"is smaller than the largest crop ({largest} px)",
                   f"set data.image_size={largest} or smaller crops (data.crops / data.multicrop)")  # fmt: skip
    if get_method(cfg.method).labels and d.source == "synthetic":
        raise _bad("data.source", d.source, f"method {cfg.method!r} trains on labels",
                   "set data.source=images data.images=DIR (class subfolders), or data.source=shards data.urls=PATTERN "
                   "(shards with a cls entry)")  # fmt: skip
    # the method's own section (swav.*)
    section = method_config(cfg)
    if section is not None:
        try:
            section.validate(n_crops)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    # optim
    if o.name not in ("lars", "sgd"):
        raise _bad("optim.name", o.name, "must be 'lars' or 'sgd'")
    if not (math.isfinite(o.base_lr) and o.base_lr > 0):
        raise _bad("optim.base_lr", o.base_lr, "must be a finite number > 0")
    if o.reference_batch < 1:
        raise _bad("optim.reference_batch", o.reference_batch, "must be >= 1")
    if not 0 <= o.momentum < 1:
        raise _bad("optim.momentum", o.momentum, "must be in [0, 1)")
    if o.weight_decay < 0:
        raise _bad("optim.weight_decay", o.weight_decay, "must be >= 0")
    if not o.trust_coeff > 0:
        raise _bad("optim.trust_coeff", o.trust_coeff, "must be > 0")
    if not 0 <= o.final_lr_ratio <= 1:
        raise _bad("optim.final_lr_ratio", o.final_lr_ratio, "must be in [0, 1]")
    if not 0 <= o.start_warmup_lr <= 1:
        raise _bad("optim.start_warmup_lr", o.start_warmup_lr, "must be in [0, 1] (a fraction of the peak lr)")
    if o.nesterov and (o.name != "sgd" or o.momentum <= 0):
        raise _bad("optim.nesterov", o.nesterov, "needs optim.name=sgd and optim.momentum > 0",
                   "set optim.nesterov=false, or optim.name=sgd with optim.momentum=0.9")  # fmt: skip
    if o.clip_grad < 0:
        raise _bad("optim.clip_grad", o.clip_grad, "must be >= 0 (0 disables clipping)")
    # train
    if t.total_steps < 0:
        raise _bad("train.total_steps", t.total_steps, "must be >= 0 (0: train.epochs x train.steps_per_epoch)")
    for key in ("epochs", "steps_per_epoch"):
        if getattr(t, key) < 1:
            raise _bad(f"train.{key}", getattr(t, key), "must be >= 1", "or set train.total_steps=N (the run's steps)")
    if o.warmup_iters < 0:
        raise _bad("optim.warmup_iters", o.warmup_iters, "must be >= 0 (0: no warmup)")
    if not (math.isfinite(t.max_minutes) and t.max_minutes >= 0):
        raise _bad("train.max_minutes", t.max_minutes, "must be a finite number >= 0 (0: no time budget)")
    # With a time budget the warmup is fitted to the steps it buys (seer.train.budget.fit_warmup): nothing to check.
    # a short run of a recipe with a long warmup: name the override that fixes it
    if not t.max_minutes and o.warmup_iters >= cfg.total_steps:
        raise _bad("optim.warmup_iters", o.warmup_iters, f"must be in [0, total steps = {cfg.total_steps})",
                   f"set optim.warmup_iters=0 (no warmup) or below {cfg.total_steps}, or raise train.total_steps "
                   f"above {o.warmup_iters}")  # fmt: skip
    for key in ("log_every", "keep_last", "bn_splits", "monitor_every", "monitor_max_images"):
        if getattr(t, key) < 1:
            raise _bad(f"train.{key}", getattr(t, key), "must be >= 1")
    if t.val_every < 0:
        raise _bad("train.val_every", t.val_every, "must be >= 0 (0: every epoch)")
    if t.min_step_seconds < 0:
        raise _bad("train.min_step_seconds", t.min_step_seconds, "must be >= 0")
    if not (math.isfinite(t.lock_wait_minutes) and t.lock_wait_minutes >= 0):
        raise _bad("train.lock_wait_minutes", t.lock_wait_minutes, "must be a finite number >= 0 (0: fail at once)")
    for key in ("ckpt_every_steps", "ckpt_every_minutes", "crash_at_step"):
        if getattr(t, key) < 0:
            raise _bad(f"train.{key}", getattr(t, key), "must be >= 0 (0 disables)")
    try:
        collective_timeout(t.dist_timeout_minutes)
    except ValueError as exc:
        raise ConfigError(f"train.dist_timeout_minutes: {exc}") from None
    if t.precision not in ("fp32", "bf16"):
        raise _bad("train.precision", t.precision, "must be 'fp32' or 'bf16'")
    if t.device not in ("auto", "cpu", "cuda"):
        raise _bad("train.device", t.device, "must be 'auto', 'cpu' or 'cuda'")
    if t.fsdp.shard_unit not in SHARD_UNITS:
        raise _bad("train.fsdp.shard_unit", t.fsdp.shard_unit, f"must be one of {', '.join(map(repr, SHARD_UNITS))}")
    if t.fsdp.reduce_dtype not in REDUCE_DTYPES:
        raise _bad("train.fsdp.reduce_dtype", t.fsdp.reduce_dtype, f"must be one of {', '.join(REDUCE_DTYPES)}")
    if t.sync_bn_group < 0:
        raise _bad("train.sync_bn_group", t.sync_bn_group, "must be >= 0 (ranks per BN group; 0: all, 1: no sync)")
    if d.global_batch_size < 0:
        raise _bad("data.global_batch_size", d.global_batch_size, "must be >= 0 (0: batch_size_per_gpu x world)")
    if world_size is not None:
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        per_gpu = batch_per_gpu(cfg, world_size)
        if per_gpu % t.bn_splits:
            fits = max(k for k in range(1, min(t.bn_splits, per_gpu) + 1) if per_gpu % k == 0)
            fix = f"set train.bn_splits={fits}, or a per-GPU batch it divides (data.batch_size_per_gpu)"
            raise _bad("train.bn_splits", t.bn_splits, f"must divide the per-GPU batch ({per_gpu})", fix)


def batch_per_gpu(cfg: PretrainConfig, world_size: int) -> int:
    """Images per GPU per step: ``data.global_batch_size / world_size`` if set, else ``data.batch_size_per_gpu``."""
    g = cfg.data.global_batch_size
    if g <= 0:
        return cfg.data.batch_size_per_gpu
    if g % world_size:
        raise ConfigError(
            f"data.global_batch_size: is not divisible by the world size {world_size}, got {g}. "
            + _nearest_batches_hint(cfg, world_size)
        )
    return g // world_size


def _nearest_batches_hint(cfg: PretrainConfig, world_size: int) -> str:
    """The nearest global batches that divide ``world_size``, with the peak lr and warmup start each gives.

    A 64-node user of a recipe written for another world size (seer_10b: 7936 = 16 x 496) must re-derive the
    batch, the lr and the warmup start; this says what each choice gives, as ``_train`` computes them.
    """
    g, o = cfg.data.global_batch_size, cfg.optim
    below, above = g // world_size * world_size, (g // world_size + 1) * world_size
    choices = [b for b in (below, above) if b > 0]
    valid = " or ".join(f"{b} ({b // world_size} per GPU)" for b in choices)
    lrs = [o.base_lr * b / o.reference_batch for b in choices]  # seer.train.optim.scaled_lr
    lr_text = ", ".join(f"{lr:.4g} at {b}" for lr, b in zip(lrs, choices))
    text = (
        f"Nearest valid: {valid}. The peak lr scales with it (optim.base_lr x global batch / optim.reference_batch "
        f"= {o.base_lr:g} x B / {o.reference_batch}): {lr_text}."
    )
    if o.warmup_iters > 0:
        starts = ", ".join(f"{o.start_warmup_lr * lr:.4g} at {b}" for lr, b in zip(lrs, choices))
        text += (
            f" The warmup starts at optim.start_warmup_lr x the peak = {o.start_warmup_lr:g} x peak: {starts}; for "
            f"an absolute start (VISSL's: 0.3 x images per node / 256, 0.15 at 16 x 8 GPUs) set "
            f"optim.start_warmup_lr = start / peak."
        )
    return text + ' See "Global batch, lr and warmup at another world size" in docs/pretraining.md.'


def trunk_cfg(model: ModelConfig):
    """The RegNetCfg a model config describes (preset, updated by ``model.cfg``)."""
    from seer.models.regnet import resolve_cfg

    if model.cfg is None:
        return resolve_cfg(model.preset)
    if set(model.cfg) >= {"depth", "w0", "wa", "wm", "group_w"}:
        return resolve_cfg(dict(model.cfg))
    return resolve_cfg({**resolve_cfg(model.preset).to_dict(), **model.cfg})


# ----------------------------------------------------------------------------------------------------------------
# Resuming a run directory: which keys may differ from the config its checkpoints were trained with
# ----------------------------------------------------------------------------------------------------------------
# dotted key -> why a resumed run may change it. These keys extend or observe a run, or say where and how the same
# computation runs. Every other key changes what is trained (the model, the method and its head, the data, the
# optimizer, the schedule, the numerics): ``seer.train.rundir`` refuses a resume that changes one, naming it, unless
# --allow-config-change. The global batch is compared on its own, so its split over the ranks may change.
RESUME_MAY_CHANGE: dict[str, str] = {
    "run_dir": "where the run lives (a moved run directory)",
    "train.total_steps": "the run's length: training longer (the lr schedule is recomputed for the new length)",
    "train.epochs": "the run's length (when train.total_steps is 0)",
    "train.steps_per_epoch": "the run's length (when train.total_steps is 0)",
    "train.max_minutes": "the run's length: a resume keeps the step count its checkpoint bought (0: train.total_steps "
    "sets the length again)",
    "train.log_every": "logging",
    "train.tensorboard": "logging",
    "train.monitor_images": "observing: the kNN monitor",
    "train.monitor_every": "observing: the kNN monitor",
    "train.monitor_max_images": "observing: the kNN monitor",
    "train.val_images": "observing: validation",
    "train.val_every": "observing: validation",
    "data.record_keys": "observing: the audit of sample keys",
    "train.ckpt_every_steps": "checkpoint cadence",
    "train.ckpt_every_minutes": "checkpoint cadence",
    "train.keep_last": "checkpoint cadence",
    "data.batch_size_per_gpu": "the split of the global batch over the ranks (the world size: checkpoints reshard)",
    "data.global_batch_size": "the split of the global batch over the ranks (the world size: checkpoints reshard)",
    "train.bn_splits": "BatchNorm batches as another world size would split them",
    "train.sync_bn_group": "BatchNorm groups, which follow the world size",
    "data.workers": "loader processes (the stream count, not the worker count, fixes the sample order)",
    "data.streams": "a resumed run keeps the stream count of its checkpoint",
    "model.activation_checkpointing": "memory against compute, the same result",
    "train.compile": "speed, the same computation",
    "train.device": "where the run computes",
    "train.fsdp.reshard_after_forward": "memory against communication, the same result",
    "train.fsdp.cpu_offload": "where parameters are kept, the same result",
    "train.fsdp.shard_unit": "how parameters are sharded, the same result",
    "train.dist_timeout_minutes": "operations",
    "train.lock_wait_minutes": "operations",
    "train.crash_at_step": "testing",
    "train.min_step_seconds": "testing",
}


def config_differences(saved: dict, cfg: PretrainConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, cfg's value)`` for each key of ``cfg`` whose value differs from ``saved`` (a
    config as ``config_to_dict`` writes it, e.g. a checkpoint's), in the tree's order.

    A key ``saved`` lacks (written before the key existed) counts as holding its default in code; keys ``saved``
    holds that the tree no longer has are ignored (no run can set them).
    """
    out: list[tuple[str, Any, Any]] = []

    def walk(node: Any, default: Any, old: Any, prefix: str) -> None:
        old = old if isinstance(old, dict) else {}
        for f in dataclasses.fields(node):
            key, value = f"{prefix}{f.name}", getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, getattr(default, f.name), old.get(f.name), f"{key}.")
                continue
            before = old.get(f.name, getattr(default, f.name))
            if isinstance(value, tuple):  # yaml / json give lists
                value = list(value)
            if before != value:
                out.append((key, before, value))

    walk(cfg, PretrainConfig(), saved, "")
    return out
