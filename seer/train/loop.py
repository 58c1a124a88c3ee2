"""The pretraining loop: flat, top to bottom, one screen per section (nanoGPT habit).

    seer pretrain --config tiny_cpu train.total_steps=200          # a shipped recipe by name, or a yaml file
    torchrun --nproc_per_node 8 -m seer.cli pretrain --config seer_rg32

The loop knows no method: it trains whatever model ``cfg.method`` builds (``seer.train.methods``), any module with a
``trunk`` whose ``forward(batch)`` returns ``{"loss": ...}``, calling its ``before_forward(step)`` and
``before_optimizer_step(step)`` hooks when it defines them. One process with no launcher variables trains without a
process group; under torchrun / SLURM the model is sharded with FSDP2 (``seer.distributed.parallel.parallelize``),
built on the meta device and initialized shard by shard (``seer.distributed.materialize``: no rank holds it whole).
The run resumes from the latest complete checkpoint in ``cfg.run_dir`` automatically, if its config is the one that
checkpoint was trained with, up to the keys a resume may change (``seer.train.rundir``; ``--allow-config-change``
resumes anyway). ``train.max_minutes`` buys the run's length from its first steps' speed, once, kept on resume
(``seer.train.budget``). ``--dry-run`` prints what a run would do and writes nothing. Rank 0 shows the steps'
progress on stderr (``seer.progress``: a bar on a terminal, a line every 10 s elsewhere); the log lines go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from seer import hardware
from seer.config import (
    PretrainConfig,
    batch_per_gpu,
    crop_scales,
    crop_shapes,
    load_config,
    trunk_cfg,
    validate,
)
from seer.data.synthetic import SyntheticMultiCrop
from seer.extras import optional
from seer.models.regnet import RegNetCfg
from seer.progress import heartbeat, progress
from seer.train.budget import PROBE_STEPS, Budget, buy_steps, checkpoint_reserve, fit_warmup, probe_lr
from seer.train.methods import get_method, method_config
from seer.train.rundir import RunDirState, RunDirWrites, inspect_run_dir

__all__ = ["pretrain", "cli_main", "cli_finetune", "build_model", "peak_memory_bytes", "run_kind"]


def run_kind(cfg: PretrainConfig) -> str:
    """What the log calls the run: "pretraining" (a self-supervised method), "fine-tuning" (a method trained on
    labels, from ``model.init_from``) or "supervised training" (on labels, from a random init)."""
    if not get_method(cfg.method).labels:
        return "pretraining"
    return "fine-tuning" if cfg.model.init_from else "supervised training"


# ----------------------------------------------------------------------------------------------------------------
# The model and the data: a randomly initialized trunk under the method's model, multi-crop batches
# ----------------------------------------------------------------------------------------------------------------
def build_model(cfg: PretrainConfig, *, init_trunk: bool | None = None) -> nn.Module:
    """The trunk wrapped by ``cfg.method``'s model (on CPU, fp32).

    The trunk is randomly initialized, or holds ``cfg.model.init_from``'s weights when ``init_trunk`` (default:
    when ``cfg.run_dir`` has no checkpoint to resume from; resuming wins over ``init_from``).
    """
    from seer.models.regnet import build_trunk
    from seer.train.checkpoint import latest_checkpoint

    trunk = build_trunk(trunk_cfg(cfg.model), zero_init_last_bn=cfg.model.zero_init)
    if init_trunk is None:
        init_trunk = latest_checkpoint(cfg.run_dir) is None
    if init_trunk and cfg.model.init_from:
        _init_trunk_from(trunk, cfg.model.init_from, cfg)
    model = get_method(cfg.method).build(trunk, method_config(cfg), bn_splits=cfg.train.bn_splits)
    init_hook = getattr(model, "init_from_checkpoint", None)  # e.g. fine-tuning from a checkpoint's own head
    if init_trunk and cfg.model.init_from and init_hook is not None:
        try:
            init_hook(cfg.model.init_from)
        except ValueError as exc:
            raise ValueError(f"model.init_from: {exc}") from None
    return model


def _other_architecture(cfg: PretrainConfig, source: str, theirs: RegNetCfg | None, ours: RegNetCfg) -> str:
    """The message of a ``model.init_from`` whose trunk has another architecture than this run's."""

    def arch(c: RegNetCfg | None) -> str:
        if c is None:
            return "unknown"
        widths, depths, groups = c.stages()
        return f"stage widths {widths}, depths {depths}, group widths {groups}, stem {c.stem_width}"

    run = f"model.preset={cfg.model.preset}" if cfg.model.cfg is None else f"model.cfg={cfg.model.cfg}"
    return (
        f"model.init_from: {source} holds a different trunk architecture ({arch(theirs)}) than this run's "
        f"{run} ({arch(ours)}); set model.preset / model.cfg to the checkpoint's architecture"
    )


def _init_trunk_from(trunk: nn.Module, source: str, cfg: PretrainConfig) -> None:
    """Copy the weights ``seer.load_trunk(source)`` reads into ``trunk``; ValueError when the architectures differ."""
    from seer.weights import load_trunk

    try:
        loaded = load_trunk(source)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model.init_from: {exc}") from None
    except ValueError as exc:  # CheckpointError: unreadable, unknown layout, refused pickle
        raise ValueError(f"model.init_from: {exc}") from None
    want = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
    if want != got:
        raise ValueError(_other_architecture(cfg, source, loaded.cfg, trunk.cfg))
    with torch.no_grad():
        trunk.load_state_dict(loaded.state_dict())  # copies into the trunk's own (channels_last) parameters


# ----------------------------------------------------------------------------------------------------------------
# The sharded start: under a process group no rank ever holds the whole model (issue 30)
# ----------------------------------------------------------------------------------------------------------------
# True: under a process group the model is built on the meta device with its initialization recorded, sharded by
# ``parallelize``, and each rank then initializes only its shards (``seer.distributed.materialize``): the same
# weights, bit for bit, as building it whole. False: every rank builds the whole model first (the path before;
# kept to compare against, see tests/test_sharded_start.py). One process always builds the model whole.
SHARDED_START = True


def _build_start(cfg: PretrainConfig, env) -> tuple[nn.Module, dict | None]:
    """The model ``parallelize`` receives, and what the sharded start still has to do after it (None: nothing).

    One process (or ``SHARDED_START`` off): ``build_model(cfg)``, whole, on ``env.device``. Under a process group:
    the same construction on the meta device, recorded (nothing is allocated); ``model.init_from`` is opened and its
    architecture checked now, before anything is allocated, and its trunk is read per shard in ``_finish_start``.
    """
    if not (env.distributed and SHARDED_START):
        return build_model(cfg).to(env.device), None
    from seer.distributed.materialize import InitRecorder
    from seer.models.regnet import build_trunk
    from seer.train.checkpoint import latest_checkpoint

    source = cfg.model.init_from if latest_checkpoint(cfg.run_dir) is None else None  # resuming wins, as above
    opened = None
    if source:  # checked against a meta trunk (shapes only), outside the recording: its own init draws nothing
        opened = _open_init_from(source, build_trunk(trunk_cfg(cfg.model), device="meta"), cfg)
    with InitRecorder() as recorder:
        with torch.device("meta"):
            model = build_model(cfg, init_trunk=False)
        hook = getattr(model, "init_from_checkpoint", None)  # a checkpoint's own head (fine-tuning)
        if source and hook is not None:
            # read from its file outside the meta device; recorded as a copy into the meta head, replayed with it
            try:
                hook(source)
            except ValueError as exc:
                raise ValueError(f"model.init_from: {exc}") from None
    return model, {"program": recorder.program(model), "init_from": opened}


def _finish_start(model: nn.Module, start: dict, env, log) -> None:
    """Allocate the sharded model on ``env.device`` and initialize each shard (``materialize``), then read
    ``model.init_from``'s trunk into it, each rank its own shards."""
    from seer.distributed.materialize import materialize

    t0 = time.time()
    opened = start["init_from"]
    stats = materialize(model, start["program"], env.device, skip=("trunk.",) if opened else ())
    log(
        f"sharded start: {stats['tensors']} tensors initialized whole one at a time and sharded "
        f"({stats['peak_bytes'] / 2**20:.0f} MiB held at most by the initialization; {time.time() - t0:.1f} s)"
    )
    if opened is not None:
        _load_trunk_shards(model, opened, env)


def _open_init_from(source: str, trunk: nn.Module, cfg: PretrainConfig) -> tuple[str, object]:
    """``("dcp", checkpoint dir)`` for a pretraining run (or one of its checkpoints), else ``("file", Checkpoint)``
    memory-mapped: opened and checked against ``trunk``'s architecture (a meta trunk: shapes only), no value read."""
    from seer.weights.formats import CheckpointError, cfg_from_dict

    path = Path(source).expanduser()
    try:
        run_dir = (path / "checkpoints").is_dir() or (path / ".metadata").is_file()
        if path.is_dir() and not (path / "config.json").is_file() and run_dir:
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata

            from seer.train.checkpoint import SafeReader, read_meta, resolve_checkpoint

            # Every rank must read the same checkpoint: rank 0 names it (a run still training may rotate its newest).
            names = [str(resolve_checkpoint(path)) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(names, src=0)
            ckpt_dir = Path(names[0])
            md = SafeReader(str(ckpt_dir)).read_metadata()
            got = {
                k[len("model.trunk.") :]: tuple(v.size)
                for k, v in md.state_dict_metadata.items()
                if k.startswith("model.trunk.") and isinstance(v, TensorStorageMetadata)
            }
            theirs = read_meta(ckpt_dir).get("regnet_cfg")
            loaded_cfg = cfg_from_dict(theirs) if isinstance(theirs, dict) else None
            opened: tuple[str, object] = ("dcp", ckpt_dir)
        else:
            from seer.weights.load import open_trunk

            ckpt, loaded_cfg = open_trunk(source)
            got = {k: tuple(v.shape) for k, v in ckpt.state_dict.items()}
            opened = ("file", ckpt)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model.init_from: {exc}") from None
    except ValueError as exc:  # CheckpointError: unreadable, unknown layout, refused pickle
        raise ValueError(f"model.init_from: {exc}") from None
    want = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
    if opened[0] == "file":  # formats without num_batches_tracked get zeros, as load_trunk gives them
        got.update({k: v for k, v in want.items() if k.endswith("num_batches_tracked") and k not in got})
    if want != got:
        raise CheckpointError(_other_architecture(cfg, source, loaded_cfg, trunk.cfg))
    return opened


def _all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """No NaN or infinity in ``t`` (a DTensor: in this rank's shard), checked a chunk at a time: ``isfinite`` makes an
    ``abs`` copy and two masks, which for a whole shard would be as large as the shard itself."""
    local = t.to_local() if hasattr(t, "to_local") else t
    if not local.is_floating_point():
        return True
    flat = local.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _load_trunk_shards(model: nn.Module, opened: tuple[str, object], env) -> None:
    """Copy ``model.init_from``'s trunk into the sharded trunk: each rank reads its own rows of each tensor (a
    memory-mapped file) or its own shards (DCP), never the whole checkpoint at once. Every rank then agrees on the
    first tensor holding a NaN or an infinity, and all raise the same ``CheckpointError`` naming it."""
    from seer.distributed.materialize import copy_into
    from seer.weights.formats import CheckpointError

    targets = model.trunk.state_dict()
    kind, src = opened
    keys = list(targets)
    first_bad = len(keys)
    if kind == "dcp":
        from seer.train.checkpoint import _dcp_load  # the run-directory reader's own safe DCP load

        try:
            _dcp_load({"model": {f"trunk.{k}": v for k, v in targets.items()}}, src)
        except ValueError as exc:
            raise ValueError(f"model.init_from: {exc}") from None
        first_bad = next((i for i, k in enumerate(keys) if not _all_finite(targets[k])), len(keys))
        origin, theirs = str(src), dict.fromkeys(keys, None)
    else:
        for i, k in enumerate(keys):
            value = src.state_dict.get(k)
            if value is None:  # num_batches_tracked: absent from some formats (load_trunk also gives zeros)
                value = torch.zeros(targets[k].shape, dtype=targets[k].dtype)
            copy_into(targets[k], value)
            if first_bad == len(keys) and not _all_finite(targets[k]):
                first_bad = i
        origin, theirs = src.origin, src.renamed
    flag = torch.tensor([first_bad], dtype=torch.int64, device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    first_bad = int(flag.item())
    if first_bad < len(keys):
        k = keys[first_bad]
        name = k if theirs.get(k) in (None, k) else f"{k} ({theirs[k]})"
        raise CheckpointError(
            f"model.init_from: {origin}: tensor {name} holds NaN or infinite values; refusing to load weights that "
            f"compute NaN (or, through a fused conv + ReLU, all-zero) features (a training run that diverged saves "
            f"such weights: use an earlier checkpoint)."
        )


class _Data:
    """The loop's batches: ``next(data)`` is this rank's crop list for the next step; ``position()`` the resumable
    data position (None for synthetic data, whose batches are a pure function of the step)."""

    def __init__(self, cfg: PretrainConfig, env, per_gpu: int, start_step: int, position: dict | None = None,
                 counted=None):  # fmt: skip
        self.cfg, self.env, self.step, self.loader, self.stats, self._keys = cfg, env, start_step, None, {}, None
        self._reported: set[int] = set()
        self.labels = None  # this step's labels (a method that trains on them reads these)
        d = cfg.data
        if d.source == "synthetic":
            self.synthetic = SyntheticMultiCrop(crop_shapes(d), d.image_size, d.synthetic_classes, cfg.train.seed,
                                                crop_scales(d))  # fmt: skip
            self.per_gpu = per_gpu
            return
        from seer.data.shards import train_loader
        from seer.data.transforms import MultiCrop, collate_multicrop

        # Self-supervised methods never need labels: unlabeled samples (an image alone, a plain tar of .jpg) train. A
        # method that trains on labels gets them, and a sample without one is an error naming it.
        self.loader = train_loader(
            d.urls if d.source == "shards" else None,
            # crops' colour operations batched in collate (same draws and pixels; seer.data.transforms)
            MultiCrop.from_preset(d.multicrop, batch_color=True),
            images=d.images if d.source == "images" else None,
            batch_size=per_gpu,
            seed=cfg.train.seed,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=d.workers,
            streams=d.streams or None,
            shuffle_buffer=d.shuffle_buffer,
            start_step=start_step,
            position=position,
            collate_fn=collate_multicrop,
            require_label=get_method(cfg.method).labels,
            counted=counted,
        )
        self._reported = {e for e, c in self.loader.coverage().items() if c["complete"]}  # before a resume
        if d.record_keys:
            keys_dir = Path(cfg.run_dir) / "data_keys"
            keys_dir.mkdir(parents=True, exist_ok=True)
            self._keys = open(keys_dir / f"rank{env.rank:05d}.jsonl", "a")

    def describe(self) -> str:
        if self.loader is None:
            return "data: synthetic (a pure function of the step)"
        from seer.data.shards.train import describe

        note = f"; {self.loader.resume_note}" if self.loader.resume_note else ""
        return describe(self.loader) + note

    def __next__(self) -> list:
        if self.loader is None:
            crops = self.synthetic.batch(self.step, self.env.rank, self.per_gpu, self.env.world_size)
        else:
            crops, self.labels = self.loader._next()
            self.stats = self.loader.stats
            if self._keys is not None:
                self._keys.write(json.dumps({"step": self.step + 1, "keys": self.loader.last_keys}) + "\n")
                self._keys.flush()
        self.step += 1
        return crops

    def position(self) -> dict | None:
        return None if self.loader is None else self.loader.position()

    def class_names(self) -> list[str] | None:
        """The training images' class names (class subfolders / a file list's labels), when the source has them."""
        if self.loader is None or self.cfg.data.source != "images":
            return None
        from seer.data.sources import resolve_source

        names = resolve_source(self.cfg.data.images).class_names
        return [str(n) for n in names] if names else None

    def steps_per_epoch(self) -> int | None:
        """Steps in one epoch of the training data (None for synthetic data)."""
        if self.loader is None:
            return None
        return max(1, round(self.loader.plan()["steps_per_epoch"]))

    def epoch(self) -> float | None:
        """How far this rank is through the data, in epochs (the slowest stream); None for synthetic data."""
        if self.loader is None:
            return None
        return min(self.loader.layout.epochs_of(self.env.rank, self.loader.offsets))

    def finished_epochs(self) -> list[tuple[int, dict]]:
        """Epochs this rank completed since the last call, with their counts (seen, skipped, of)."""
        if self.loader is None:
            return []
        done = [(e, c) for e, c in self.loader.coverage().items() if c["complete"] and e not in self._reported]
        self._reported.update(e for e, _ in done)
        return done

    def close(self) -> None:
        if self._keys is not None:
            self._keys.close()
        if self.loader is not None:
            self.loader.close()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated bytes, or the process RSS high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # VmHWM: this process image's peak (ru_maxrss would include a forking parent's)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig, *, allow_config_change: bool = False) -> dict:
    """Train (or resume) the run ``cfg`` describes; returns ``{"step", "loss", "run_dir", "checkpoint", ...}``.

    Rank 0 holds ``run_dir/.lock`` from before the run directory is first written until the end (see
    ``seer.train.rundir_lock``): a second run on the same directory waits ``train.lock_wait_minutes``, then fails.
    A run directory holding checkpoints is resumed only with the config they were trained with, up to the keys
    ``seer.config.RESUME_MAY_CHANGE`` lists (``allow_config_change=True``: any change, the old config kept as
    ``config.step_XXXXXXXX.yaml``). A run already at ``total_steps`` trains nothing and says so in the summary's
    ``note``. A run that fails before its first checkpoint takes back what it wrote (``RunDirWrites``).

    Raises:
        FloatingPointError: the loss became NaN/inf (on every rank), or the weights did at a checkpoint save
            (``save_checkpoint`` checks them first): the newest checkpoint is left as it was, nothing is saved.
        RunDirBusy: another process holds the run directory (on every rank, before anything is written).
        RunDirConfigError: the run directory's checkpoints were trained with another config (a ValueError naming
            the keys that differ; on every rank, before anything is written).
    """
    from seer.distributed.env import init_distributed

    t_start = time.time()  # a time budget (train.max_minutes) counts from here: setup is part of the run
    # -- setup: process group, config checks, the run directory's lock and its config check ---------------------
    env = init_distributed(device=cfg.train.device, timeout_minutes=cfg.train.dist_timeout_minutes)
    validate(cfg, env.world_size)
    lock = _lock_run_dir(cfg, env)
    try:
        found = _inspect_on_rank0(cfg, env, allow_config_change)
        note = _nothing_left(cfg, found)
        if note is not None:
            return _nothing_to_train(cfg, env, found, note)
        writes = RunDirWrites(cfg.run_dir) if env.is_main else None  # after the lock: nothing here is another run's
        try:
            return _train(cfg, env, found, writes, t_start)
        except BaseException:
            if writes is not None:
                writes.undo(_logger(env))
            raise
    finally:
        if lock is not None:
            lock.release()


def _logger(env):
    """The loop's log: rank 0's lines on stdout, written around the progress bar when one is shown."""

    def log(msg: str) -> None:
        if env.is_main:
            _write_line(msg)

    return log


def _write_line(msg: str) -> None:
    # tqdm.write clears a bar shown on the terminal, prints, and draws the bar again; without a bar it prints.
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def _inspect_on_rank0(cfg: PretrainConfig, env, allow_config_change: bool) -> RunDirState:
    """``inspect_run_dir`` on rank 0 (under the lock), its answer or its error given to every rank."""
    result: object = None
    if env.is_main:
        try:
            result = inspect_run_dir(cfg, env.world_size, allow_config_change=allow_config_change)
        except Exception as exc:
            if not env.distributed:
                raise
            result = exc
    if env.distributed:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if isinstance(result, Exception):
        raise result
    return result


def _saved_budget(cfg: PretrainConfig, ckpt: Path | None):
    """The ``Budget`` the run's checkpoint ``ckpt`` bought, when ``cfg`` has a time budget (else None)."""
    from seer.train.checkpoint import read_meta

    if not cfg.train.max_minutes or ckpt is None:
        return None
    return Budget.from_meta(read_meta(ckpt))


def _nothing_left(cfg: PretrainConfig, found: RunDirState) -> str | None:
    """Why the run directory has nothing left to train for ``cfg`` (None when it has): at ``train.total_steps``, or
    at the step count its time budget bought (a run with a budget that bought none yet always trains)."""
    if not cfg.train.max_minutes:
        return found.nothing_to_train(cfg.total_steps)
    bought = _saved_budget(cfg, found.checkpoint)
    if bought is None:  # none bought yet: only a cap on the count can have been reached
        cap = cfg.train.total_steps
        return found.nothing_to_train(cap) if cap and found.checkpoint is not None and found.step >= cap else None
    if found.step < bought.total_steps:
        return None
    return (
        f"{found.run_dir} is already at step {found.step} of the {bought.total_steps} steps its time budget "
        f"(train.max_minutes={bought.max_minutes:g}) bought: nothing to train (a resume keeps the bought count; "
        f"train.max_minutes=0 train.total_steps=N trains to step N)"
    )


def _nothing_to_train(cfg: PretrainConfig, env, found: RunDirState, note: str) -> dict:
    """The summary of a run already at (or past) its length (``note`` says which): the newest checkpoint's step and
    loss."""
    if found.loss is None:
        note += f"; {found.checkpoint.name} records no loss (saved by an older seer), so loss is null"
    _logger(env)(note)
    per_gpu = batch_per_gpu(cfg, env.world_size)
    return {
        "step": found.step,
        "loss": found.loss,
        "run_dir": str(found.run_dir),
        "checkpoint": str(found.checkpoint),
        "world_size": env.world_size,
        "global_batch": per_gpu * env.world_size,
        "data_skipped": {},
        "note": note,
    }


# What rank 0 tells the other ranks while it takes the run directory's lock.
_LOCK_WAITING, _LOCK_HELD, _LOCK_FAILED = 0, 1, 2


def _lock_run_dir(cfg: PretrainConfig, env):
    """Rank 0 takes ``run_dir/.lock`` (waiting up to ``train.lock_wait_minutes``); every rank learns the outcome.

    Only rank 0 locks: the lock is the job's, and its other ranks (on other nodes too) share the run. While rank 0
    waits it tells the others at every poll, so each collective is short however long the wait (no collective
    timeout fires); when it fails, every rank raises before anything is written.
    """
    from seer.train.rundir_lock import RunDirBusy, lock_run_dir

    def tell(state: int) -> int:
        if not env.distributed:
            return state
        flag = torch.tensor([state], dtype=torch.int32, device=env.device)
        dist.broadcast(flag, src=0)
        return int(flag.item())

    if not env.is_main:
        while (state := tell(_LOCK_WAITING)) == _LOCK_WAITING:
            pass
        if state != _LOCK_HELD:
            raise RunDirBusy(f"rank 0 could not lock the run directory {cfg.run_dir} (its own error says why)")
        return None
    try:
        lock = lock_run_dir(cfg.run_dir, cfg.train.lock_wait_minutes, log=lambda m: print(m, flush=True),
                            on_wait=lambda: tell(_LOCK_WAITING))  # fmt: skip
    except BaseException:
        with contextlib.suppress(Exception):  # a peer already gone: rank 0's own error is the one to report
            tell(_LOCK_FAILED)
        raise
    try:
        tell(_LOCK_HELD)
    except BaseException:
        lock.release()
        raise
    return lock


def _train(cfg: PretrainConfig, env, found: RunDirState, writes: RunDirWrites | None, t_start: float) -> dict:
    """``pretrain`` once the process group is up, the config checked and the run directory locked and checked
    (``found``); ``writes``: rank 0's record of what it writes before the first checkpoint; ``t_start``: when
    ``pretrain`` began (a time budget counts from there)."""
    from seer.distributed.parallel import parallelize
    from seer.train.checkpoint import clean_partial, latest_checkpoint, load_checkpoint, save_checkpoint
    from seer.train.optim import build_optimizer, clip_grad_norm, cosine_schedule, scaled_lr, set_lr

    # -- setup: batch, run directory --------------------------------------------------------------------------------
    per_gpu = batch_per_gpu(cfg, env.world_size)
    global_batch = per_gpu * env.world_size
    # With a time budget the length is unknown until bought (seer.train.budget); train.total_steps caps it (0: none).
    budget_s = 60 * cfg.train.max_minutes
    cap = cfg.train.total_steps if budget_s else 0
    total = cfg.total_steps if not budget_s else cap or sys.maxsize
    run_dir = Path(cfg.run_dir)
    kind = run_kind(cfg)
    log = _logger(env)
    if writes is not None:  # checkpoints/ (an unwritable run dir fails now, not at a save) and config.yaml
        writes.start(cfg, found, log)
    clean_partial(run_dir)

    # -- shard counts: before the model is built, so a refused source costs seconds, not the build of a 10B -------
    counted = None
    if cfg.data.source == "shards":
        from seer.train.shard_counts import broadcast_shard_counts

        # Rank 0 alone reads the shards' sample counts (index.json, or the tar headers of at most 1,000 shards) and
        # broadcasts them: 512 ranks reading 10,000 shards' metadata at once would outlast the collective timeout.
        counted = broadcast_shard_counts(cfg.data.urls, env)

    # -- model, parallelism, optimizer, schedules ----------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)  # identical initialization on every rank before sharding
    model, start = _build_start(cfg, env)  # under a process group: on the meta device (the sharded start)
    fsdp = cfg.train.fsdp
    precision = cfg.train.precision
    if (
        precision == "bf16"
        and env.device.type == "cpu"
        and hardware.cpu_amp_dtype(torch.bfloat16, what="train.precision") is None
    ):
        # Without oneDNN bf16 kernels (AVX2-only CPUs) bf16 convolutions fall back to reference kernels: measured
        # 3.5x slower than fp32 for a regnety_400mf training step. Train in fp32 (one warning line says why).
        precision = "fp32"
    model = parallelize(
        model,
        activation_checkpointing=cfg.model.activation_checkpointing,
        compile=cfg.train.compile,
        precision=precision,
        reshard_after_forward=fsdp.reshard_after_forward,
        cpu_offload=fsdp.cpu_offload,
        shard_unit=fsdp.shard_unit,
        sync_bn_group=cfg.train.sync_bn_group,
        reduce_dtype=fsdp.reduce_dtype,
        device=env.device,
    )
    if start is not None:
        _finish_start(model, start, env, log)
    optimizer = build_optimizer(model, cfg.optim)
    peak_lr = scaled_lr(cfg.optim.base_lr, global_batch, cfg.optim.reference_batch)
    o = cfg.optim

    def schedule(steps: int, warmup: int):  # per-step lr; with a time budget, built once the length is bought
        return cosine_schedule(peak_lr, steps, warmup, o.start_warmup_lr * peak_lr, o.final_lr_ratio)

    lrs = schedule(total, o.warmup_iters) if not budget_s else None
    # Without FSDP, bf16 runs use autocast (FSDP runs get bf16 from the MixedPrecisionPolicy instead).
    autocast = (
        torch.autocast(env.device.type, dtype=torch.bfloat16)
        if precision == "bf16" and not env.distributed
        else contextlib.nullcontext()
    )

    # -- resume ---------------------------------------------------------------------------------------------------
    start_step, data_position = 0, None
    ckpt = latest_checkpoint(run_dir)
    # This rank's state outside the shared state dict (e.g. a method's queue), through the model's optional hooks.
    model_rank_state = getattr(model, "rank_state", None)
    load_model_rank_state = getattr(model, "load_rank_state", None)
    bought = None  # what a time budget bought (seer.train.budget.Budget)
    if ckpt is not None:
        meta = load_checkpoint(ckpt, model, optimizer)
        start_step = int(meta["step"])
        bought = Budget.from_meta(meta) if budget_s else None
        if bought is not None:  # never measured again: the resumed run follows the schedule the first start bought
            total = bought.total_steps
            lrs = schedule(total, bought.warmup_iters)
            log(
                f"time budget: resuming with the {total} steps bought at step {bought.measured_at_step} "
                f"({bought.sec_per_step:.3f} s/step; not measured again), warmup {bought.warmup_iters} steps"
            )
        data_position = (meta.get("rank_state") or {}).get("data")
        log(f"resumed from {ckpt} (step {start_step}, saved by {meta.get('world_size')} ranks)")
        if cfg.model.init_from:
            log(f"model.init_from={cfg.model.init_from} ignored: resuming from the run's own checkpoint")
        if meta.get("rank_state_status") == "world_size_mismatch":
            log("resumed on a different world size: per-rank state (queue, data position) not restored")
        elif load_model_rank_state is not None and "method" in (meta.get("rank_state") or {}):
            load_model_rank_state(meta["rank_state"]["method"])
        elif load_model_rank_state is not None:
            log(f"{ckpt.name} holds no per-rank state of the method (queue): not restored")
    elif cfg.model.init_from:
        log(f"initialized trunk from {cfg.model.init_from}")
    measure_at = start_step + 1 + PROBE_STEPS  # with a time budget: the step the count is bought at
    if budget_s and bought is None and cap and cap <= measure_at:
        # The cap ends the run before the budget's measurement: the cap is the length, the warmup fitted to it.
        total = cap
        lrs = schedule(total, fit_warmup(o.warmup_iters, total))
        log(f"time budget: train.total_steps={cap} ends the run by step {measure_at}, the step the budget is "
            f"measured at: {cap} steps")  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{kind} {cfg.model.preset if cfg.model.cfg is None else cfg.model.cfg} + {cfg.method}: "
        f"{n_params / 1e6:.2f}M "
        f"params, world {env.world_size} ({env.backend or 'no process group'}, {env.device}), "
        f"batch {per_gpu}/rank = {global_batch}, lr {peak_lr:.4g}, steps {start_step} -> "
        + (
            f"{total}"
            if lrs is not None
            else f"as many as train.max_minutes={cfg.train.max_minutes:g} buys "
            f"(measured over steps {start_step + 2}-{measure_at})"
        )
    )
    metrics_file = open(run_dir / "metrics.jsonl", "a") if env.is_main else None
    writer = None
    tensorboard = (
        optional("torch.utils.tensorboard", "TensorBoard logs") if env.is_main and cfg.train.tensorboard else None
    )
    if tensorboard is not None:
        writer = tensorboard.SummaryWriter(str(run_dir / "tensorboard"))
    ckpt_meta = {
        "global_batch": global_batch,
        "regnet_cfg": trunk_cfg(cfg.model).to_dict(),
        # how the run's own monitor and validation feed it images: what its exports and load_* default to
        "preprocess": {
            "resolution": max(r for _, r in crop_shapes(cfg.data)),
            "crop_pct": 1.0,
            "interpolation": "bicubic",
            "resize_mode": "shorter",
        },  # fmt: skip
        "config": _as_plain(cfg),
    }

    # -- train ------------------------------------------------------------------------------------------------------
    # The method's optional hooks (found on the wrapped model: FSDP2 keeps the module's class as a base).
    before_forward = getattr(model, "before_forward", None)
    before_optimizer_step = getattr(model, "before_optimizer_step", None)
    diagnose = getattr(model, "diagnose", None)  # optional: names a collapse of the method's outputs
    with_labels = get_method(cfg.method).labels
    monitor = None
    if cfg.train.monitor_images:
        from seer.train.monitor import KNNMonitor, format_line

        monitor = KNNMonitor(cfg.train.monitor_images, max(r for _, r in crop_shapes(cfg.data)),
                             cfg.train.monitor_max_images, report=env.is_main)  # fmt: skip
    last_diagnosis = None
    model.train()
    data = _Data(cfg, env, per_gpu, start_step, data_position, counted)
    log(data.describe())
    class_names = data.class_names()
    if class_names is not None:
        ckpt_meta["classes"] = class_names  # the exported classifier's labels
    validator, val_every = None, cfg.train.val_every
    if cfg.train.val_images:
        if not hasattr(model, "logits"):
            raise ValueError(f"train.val_images: method {cfg.method!r} has no classifier to validate (supervised has)")
        from seer.train.monitor import ClassifierValidator, format_val_line

        validator = ClassifierValidator(cfg.train.val_images, max(r for _, r in crop_shapes(cfg.data)), class_names,
                                        report=env.is_main)  # fmt: skip
        # 0: every epoch, but not more often than the log lines: an epoch of a small folder can be shorter than a
        # step (48 images, a batch of 64), and validating every step would cost more than the training.
        val_every = val_every or max(data.steps_per_epoch() or 1, cfg.train.log_every)
    last_save = time.time()
    last_ckpt = ckpt
    t_window, data_time, step_time, n_window, loss_val = time.time(), 0.0, 0.0, 0, float("nan")
    t_run, done_steps = time.time(), 0
    t_measure, budget_record = None, None  # a time budget: when its timed steps began; the record metrics.jsonl gets
    bar = progress(total if lrs is not None else None, kind, unit="step", enabled=env.is_main,
                   initial=start_step)  # rank 0, on stderr  # fmt: skip
    for step in itertools.count(start_step):
        if step >= total:  # the length may be bought during the run (a time budget)
            break
        t0 = time.time()
        crops = [c.to(env.device, non_blocking=True) for c in next(data)]
        t1 = time.time()

        # until a time budget has bought the length, the warmup's own values (they do not depend on the length)
        lr = (
            float(lrs[step])
            if lrs is not None
            else probe_lr(step, peak_lr, o.warmup_iters, o.start_warmup_lr * peak_lr)
        )
        set_lr(optimizer, lr)
        if before_forward is not None:
            before_forward(step)
        # torch.compile compiles forward and backward on the first step: minutes on a large model, without a line
        first_compile = cfg.train.compile and step == start_step
        with heartbeat(f"{kind}: compiling the model on the first step (train.compile=true)",
                       enabled=env.is_main) if first_compile else contextlib.nullcontext():  # fmt: skip
            with autocast:
                out = model(crops, data.labels.to(env.device)) if with_labels else model(crops)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if before_optimizer_step is not None:  # e.g. drop the gradients of parameters still frozen
            before_optimizer_step(step)
        if cfg.optim.clip_grad > 0:
            # the optimizer's parameters: the (sharded) ones that hold the reduced gradients
            clip_grad_norm([p for g in optimizer.param_groups for p in g["params"]], cfg.optim.clip_grad)

        # The step's one host sync. Every rank must agree before anything is updated: average the loss (no update
        # after a non-finite loss on any rank) and the "checkpoint by time" vote, in one all-reduce read once. Until
        # here the host queues forward and backward without waiting for the device.
        save_by_time = cfg.train.ckpt_every_minutes > 0 and time.time() - last_save >= 60 * cfg.train.ckpt_every_minutes
        stats = torch.stack([loss.detach().float(), torch.full((), float(save_by_time), device=loss.device)])
        if env.distributed:
            dist.all_reduce(stats)
            stats[0] /= env.world_size
        loss_val, votes = stats.tolist()
        save_by_time = votes > 0
        if not math.isfinite(loss_val):
            # Named as what it is: the newest checkpoint, whose weights were checked finite when it was saved (or
            # resumed from), taken before this step. Not "the last good one": the weights may go bad before the loss.
            newest = (
                f"The newest checkpoint, {last_ckpt} (step {int(last_ckpt.name.rsplit('_', 1)[-1])}), was saved "
                f"before step {step + 1} with finite weights and is untouched: lower optim.base_lr or raise "
                f"optim.warmup_iters and resume with --allow-config-change (these keys change what is trained)."
                if last_ckpt is not None
                else f"No checkpoint was saved before step {step + 1}: lower optim.base_lr or raise "
                f"optim.warmup_iters and start again."
            )
            raise FloatingPointError(f"loss is {loss_val} at step {step + 1} (lr {lr:.4g}); stopping. {newest}")
        optimizer.step()
        done = step + 1
        done_steps += 1
        t2 = time.time()
        bar.update(1, loss=f"{loss_val:.4f}", lr=f"{lr:.4g}")
        data_time, step_time, n_window = data_time + (t1 - t0), step_time + (t2 - t1), n_window + 1

        # -- time budget: the length bought once this process's first steps are timed (seer.train.budget) --------
        if lrs is None and done == start_step + 1:  # the first step (compile, loader start) is not timed
            t_measure = time.time()
        elif lrs is None and done == measure_at:
            bought = _buy(cfg, env, model, optimizer, t_start, t_measure, done, cap)
            total, lrs = bought.total_steps, schedule(bought.total_steps, bought.warmup_iters)
            ckpt_meta["budget"] = budget_record = bought.to_meta()  # every later checkpoint: a resume reuses it
            bar.set_total(total)
            log(bought.line(env.world_size))

        # -- log ----------------------------------------------------------------------------------------------------
        if done % cfg.train.log_every == 0 or done == total:
            elapsed = time.time() - t_window
            rate = n_window * global_batch / max(elapsed, 1e-9)
            sec_per_step = (time.time() - t_run) / done_steps
            record = {
                "step": done,
                "loss": loss_val,
                "lr": lr,
                "images_per_sec": rate,
                "step_time": step_time / n_window,
                "data_time": data_time / n_window,
                "peak_memory_gb": peak_memory_bytes(env.device) / 2**30,
            }
            if lrs is not None:  # a time budget's length is unknown until bought: no eta before
                record["eta_min"] = (total - done) * sec_per_step / 60
            if budget_record is not None:  # once, on the first log line after the count was bought
                record["budget"], budget_record = budget_record, None
            if data.epoch() is not None:
                record["epoch"] = data.epoch()
            finished = data.finished_epochs()  # every sample of the epoch seen once (or counted as skipped)
            if finished:
                log(_epochs_line(finished, env.distributed))
            log(
                f"step {done}/{total if lrs is not None else '?'}  loss {loss_val:.4f}  lr {record['lr']:.4g}  "
                f"{rate:.1f} img/s  step {record['step_time']:.3f}s  data {record['data_time']:.3f}s  "
                + (f"epoch {record['epoch']:.2f}  " if "epoch" in record else "")
                + f"peak {record['peak_memory_gb']:.2f} GB  eta "
                + (f"{record['eta_min']:.1f} min" if "eta_min" in record else "? (time budget not bought yet)")
            )
            diagnosis = diagnose(out, done) if diagnose is not None else None
            kind = diagnosis.split(" at step")[0] if diagnosis else None
            if diagnosis is not None:
                record["collapse"] = diagnosis
                if kind != last_diagnosis:  # each new kind once, not every log line
                    log(f"collapse: {diagnosis}")
            last_diagnosis = kind
            if monitor is not None and (done % cfg.train.monitor_every == 0 or done == total):
                result = monitor(model, score=env.is_main)
                if result is not None:
                    record["monitor_knn_top1"] = result["top1"]
                    log(format_line(done, result, loss_val))
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if writer is not None:
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, done)
            t_window, data_time, step_time, n_window = time.time(), 0.0, 0.0, 0

        if validator is not None and (done % val_every == 0 or done == total):  # every rank: the forward is collective
            result = validator(model, score=env.is_main)
            if result is not None:
                log(format_val_line(done, result, data.epoch()))
                if metrics_file is not None:
                    metrics_file.write(json.dumps({"step": done, "val_top1": result["top1"],
                                                   "val_top5": result["top5"]}) + "\n")  # fmt: skip
                    metrics_file.flush()
                if writer is not None:
                    writer.add_scalar("val/top1", result["top1"], done)
                    writer.add_scalar("val/top5", result["top5"], done)

        # -- checkpoint ---------------------------------------------------------------------------------------------
        every = cfg.train.ckpt_every_steps
        if (every > 0 and done % every == 0) or save_by_time or done == total:
            meta = dict(ckpt_meta)
            rank_state = {}  # this rank's own state, saved as one file per rank
            if model_rank_state is not None:
                rank_state["method"] = model_rank_state()
            position = data.position()
            if position is not None:  # epoch, per-stream offsets, per-epoch counts: exact resume on shards
                rank_state["data"] = position
            meta["loss"] = loss_val  # what a run asked to train no further reports (its summary)
            last_ckpt = save_checkpoint(run_dir, done, model, optimizer, meta=meta, keep_last=cfg.train.keep_last,
                                        rank_state=rank_state)  # fmt: skip
            if writes is not None:
                writes.committed()  # the directory is a run now: a later failure takes nothing back
            last_save = time.time()
            log(f"saved {last_ckpt}")
        if cfg.train.crash_at_step and done == cfg.train.crash_at_step:
            os._exit(3)  # testing: die like a killed job (no cleanup, no final checkpoint)
        if cfg.train.min_step_seconds:  # testing: a run of known length on any machine
            time.sleep(max(0.0, cfg.train.min_step_seconds - (time.time() - t0)))

    bar.close()
    if writer is not None:
        writer.close()
    if metrics_file is not None:
        metrics_file.close()
    data.close()
    data_stats = data.stats
    if data_stats.get("skipped"):  # bad shard samples this rank skipped (corrupt, unlabeled, truncated, empty)
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(data_stats["by_kind"].items()))
        who = f"rank {env.rank}: " if env.distributed else ""
        print(f"{who}skipped {data_stats['skipped']} bad sample(s) or shard(s): {kinds}", flush=True)
    return {
        "step": max(total, start_step),
        "loss": loss_val,
        "run_dir": str(run_dir),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "world_size": env.world_size,
        "global_batch": global_batch,
        "data_skipped": {k: data_stats[k] for k in ("samples", "skipped", "by_kind") if k in data_stats},
        **({"budget": bought.to_meta()} if bought is not None else {}),
    }


def _buy(cfg: PretrainConfig, env, model: nn.Module, optimizer, t_start: float, t_measure: float, done: int,
         cap: int) -> Budget:  # fmt: skip
    """The steps ``train.max_minutes`` buys, at step ``done``, from the ``PROBE_STEPS`` steps timed since
    ``t_measure``: every rank takes the slowest rank's seconds per step, elapsed time and checkpoint reserve (one max
    all-reduce), so all compute the same count."""
    now = time.time()
    sec_per_step = (now - t_measure) / PROBE_STEPS
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # this rank's shard of the checkpoint
    nbytes = sum(t.numel() * t.element_size() for t in local)
    agreed = torch.tensor([sec_per_step, now - t_start, checkpoint_reserve(nbytes, sec_per_step)], dtype=torch.float64,
                          device=env.device)  # fmt: skip
    if env.distributed:
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    sec_per_step, elapsed, reserve = agreed.tolist()
    budget_s = 60 * cfg.train.max_minutes
    uncapped = buy_steps(budget_s, elapsed, reserve, sec_per_step, done, 0)
    total = min(uncapped, cap) if cap else uncapped
    return Budget(max_minutes=cfg.train.max_minutes, total_steps=total, warmup_iters=fit_warmup(cfg.optim.warmup_iters,
                  total), measured_at_step=done, sec_per_step=sec_per_step, elapsed_seconds=elapsed,
                  reserve_seconds=reserve, capped=bool(cap) and uncapped > cap)  # fmt: skip


def _epochs_line(finished: list[tuple[int, dict]], distributed: bool) -> str:
    """One line for the epochs finished since the last log line (a small folder finishes many per step)."""
    who = " (rank 0's counts)" if distributed else ""
    finished = sorted(finished, key=lambda ec: ec[0])
    seen, skipped, of = (sum(c[k] for _, c in finished) for k in ("seen", "skipped", "of"))
    first, last = finished[0][0], finished[-1][0]
    if len(finished) == 1:
        return f"epoch {first} done{who}: {seen} samples seen, {skipped} skipped, of {of}"
    return f"epochs {first}-{last} done ({len(finished)} epochs){who}: {seen} samples seen, {skipped} skipped, of {of}"


def _as_plain(cfg: PretrainConfig) -> dict:
    from seer.config import config_to_dict

    return config_to_dict(cfg)


def cli_main(argv: list[str] | None = None) -> int:
    """`seer pretrain --config X [key=value ...]`."""
    return _cli(argv, "pretrain", "Self-supervised pretraining of a RegNetY trunk.")


def cli_finetune(argv: list[str] | None = None) -> int:
    """`seer finetune --config X [key=value ...]`: a recipe of ``configs/finetune/`` through the same loop."""
    return _cli(
        argv,
        "finetune",
        "Fine-tune a trunk (any seer.load_trunk source, model.init_from) on labeled images: "
        "a new or the checkpoint's own head, the whole network or a linear head on the frozen trunk.",
    )


def _cli(argv: list[str] | None, kind: str, description: str) -> int:
    from seer.config import ConfigError
    from seer.distributed.env import destroy_distributed

    # the keys are listed by one command that reads them from the code, so this help cannot fall out of date
    flag = " --kind finetune" if kind == "finetune" else ""
    epilog = (f"Config keys: `seer config show RECIPE [key=value ...]{flag}` prints every key, its value in that "
              "recipe and its doc.")  # fmt: skip
    ap = argparse.ArgumentParser(prog=f"seer {kind}", description=description, epilog=epilog)
    ap.add_argument("--config", help=f"a shipped {kind} recipe's name (tiny_cpu, ...) or a yaml file of overrides")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=0.1 train.total_steps=100")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and the run directory, print what the run would do, write nothing",
    )
    ap.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a run directory whose checkpoints were trained with another config (refused otherwise); the old "
        "config is kept as config.step_XXXXXXXX.yaml",
    )
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, kind=kind)
        if args.dry_run:
            return _dry_run(cfg, kind, args.allow_config_change)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"seer {kind}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the run directory's check (RunDirConfigError), an unreadable checkpoint
        print(f"seer {kind}: {exc}", file=sys.stderr)
        return 1
    finished = False
    try:
        summary = pretrain(cfg, allow_config_change=args.allow_config_change)
        finished = True
    except (FloatingPointError, OSError, ValueError) as exc:  # NaN loss, disk full / unwritable, bad checkpoint
        print(f"seer {kind}: {exc}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed(wait_for_peers=finished)
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0:
        print(json.dumps(summary))
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _dry_run(cfg: PretrainConfig, kind: str, allow_config_change: bool) -> int:
    """`seer pretrain --dry-run`: the checks a run makes before it writes anything (the config at the launcher's
    world size, the run directory's), and what it would train; nothing is created, written or joined."""
    from seer.distributed.env import detect_launcher

    launcher = detect_launcher(dict(os.environ)) or {}
    world, rank = int(launcher.get("world_size", 1)), int(launcher.get("rank", 0))
    validate(cfg, world)
    found = inspect_run_dir(cfg, world, allow_config_change=allow_config_change)
    if rank != 0:
        return 0
    with torch.device("meta"):  # the parameter count without allocating (a 10B model too) or reading init_from
        model = build_model(cfg, init_trunk=False)
    n_params = sum(p.numel() for p in model.parameters())
    n_trunk = sum(p.numel() for p in model.trunk.parameters())
    per_gpu = batch_per_gpu(cfg, world)
    d, o, total = cfg.data, cfg.optim, cfg.total_steps
    bought = _saved_budget(cfg, found.checkpoint)
    steps, resume = f"{total}", found.resume_line(total)
    if cfg.train.max_minutes:  # the length is bought at run time, or was by the checkpoint a resume reuses
        total = bought.total_steps if bought is not None else cfg.train.total_steps
        steps = f"{total} (bought by train.max_minutes={bought.max_minutes:g}; a resume keeps them)" if bought else (
            f"as many as train.max_minutes={cfg.train.max_minutes:g} buys, measured over the first "
            f"{PROBE_STEPS + 1} steps" + (f" (at most train.total_steps={total})" if total else "")
        )  # fmt: skip
        if bought is not None or total:
            resume = found.resume_line(total)
        elif found.checkpoint is not None:
            resume = f"resumes from {found.checkpoint} (step {found.step}; the time budget buys the length)"
    from seer.train.optim import scaled_lr

    crops = " + ".join(f"{c}x{r} px" for c, r in crop_shapes(d))
    source = {"synthetic": f"synthetic images ({d.image_size} px, {d.synthetic_classes} families)",
              "shards": f"shards {d.urls}", "images": f"images {d.images}"}[d.source]  # fmt: skip
    run_dir = Path(cfg.run_dir)
    where = "exists" if run_dir.is_dir() else "does not exist: the run would create it"
    arch = f"model.preset={cfg.model.preset}" + (f", model.cfg={cfg.model.cfg}" if cfg.model.cfg is not None else "")
    lines = [
        f"seer {kind} --dry-run: nothing was created or written",
        f"  run       {run_kind(cfg)}, method {cfg.method}",
        f"  model     {arch}: {_count(n_params)} params ({_count(n_trunk)} in the trunk)",
        f"  init      {cfg.model.init_from or 'random'}" + (" (ignored: resuming)" if found.checkpoint else ""),
        f"  data      {source}; crops {crops}" + (f" ({d.multicrop})" if d.crops is None else ""),
        f"  batch     {per_gpu * world} global = {per_gpu} per rank x {world} rank(s)"
        + ("" if launcher else " (no launcher variables: one process)"),
        f"  steps     {steps}: {o.name}, peak lr {scaled_lr(o.base_lr, per_gpu * world, o.reference_batch):.4g} "
        f"(optim.base_lr {o.base_lr:g} x {per_gpu * world} / {o.reference_batch}), warmup {o.warmup_iters}, "
        f"{cfg.train.precision}",
        f"  run_dir   {run_dir} ({where})",
        f"  resume    {resume}",
    ]
    from seer.train.rundir import format_changes

    if found.allowed:
        lines.append(f"  changes a resume may make:\n{format_changes(found.allowed, indent='    ')}")
    if found.refused:
        lines.append(
            "  changes of what is trained, allowed by --allow-config-change (the old config would be kept as "
            f"config.{found.checkpoint.name}.yaml):\n{format_changes(found.refused, indent='    ')}"
        )
    print("\n".join(lines))
    return 0
