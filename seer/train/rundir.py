"""What a run directory already holds, and whether a config may continue it.

    found = inspect_run_dir(cfg, world_size)      # RunDirConfigError when cfg would change what was trained

Starting a run in a directory that holds checkpoints resumes that run, so the config must be the one its newest
checkpoint was trained with (``meta.json`` records it; the run's ``config.yaml`` for checkpoints older than that), up
to the keys ``seer.config.RESUME_MAY_CHANGE`` lists: the run's length, logging, checkpoint cadence, and how and where
the same computation runs (the world size included: checkpoints reshard). Any other difference, or another global
batch, is refused before anything is written, naming the keys, unless ``allow_config_change``; then ``config.yaml``
becomes the new config (what the next checkpoints record) and the old one is kept as ``config.step_XXXXXXXX.yaml``.

``RunDirWrites`` is what rank 0 writes before the run's first checkpoint (``config.yaml``, ``metrics.jsonl``, the empty
``checkpoints/``, ...): ``undo()`` takes it back when the run fails before that checkpoint, so a failed start leaves
no directory that looks like a run (only the lock file, which is never deleted: ``seer.train.rundir_lock``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seer.config import RESUME_MAY_CHANGE, PretrainConfig, batch_per_gpu, config_differences, config_to_dict
from seer.io import atomic_write

__all__ = ["RunDirConfigError", "RunDirState", "RunDirWrites", "inspect_run_dir", "format_changes", "CONFIG_NAME"]

CONFIG_NAME = "config.yaml"
GLOBAL_BATCH = "global batch"  # the pseudo-key of a global batch that differs (data.* x the world size)


class RunDirConfigError(ValueError):
    """The run directory holds a run trained with another config (the message names the keys that differ)."""


@dataclass
class RunDirState:
    """A run directory as ``inspect_run_dir`` found it."""

    run_dir: Path
    checkpoint: Path | None = None  # the newest complete checkpoint, None for a new run
    step: int = 0  # its step (0: nothing trained yet)
    loss: float | None = None  # the loss its meta.json records (None: saved before seer recorded it)
    saved_config: dict | None = None  # the config it was trained with (None: none recorded)
    # (key, the run's value, this config's value): changes RESUME_MAY_CHANGE allows, and the others
    allowed: list[tuple[str, Any, Any]] = field(default_factory=list)
    refused: list[tuple[str, Any, Any]] = field(default_factory=list)

    def nothing_to_train(self, total_steps: int) -> str | None:
        """Why a run of ``total_steps`` steps has nothing left to train here (None when it has)."""
        if self.checkpoint is None or self.step < total_steps:
            return None
        where = f"{self.run_dir} is already at step {self.step} of train.total_steps={total_steps}"
        if self.step > total_steps:
            where = f"the newest checkpoint of {self.run_dir} is at step {self.step}, past train.total_steps="
            where += str(total_steps)
        return f"{where}: nothing to train (raise train.total_steps to train longer)"

    def resume_line(self, total_steps: int) -> str:
        """One line: what a run in this directory does (start, resume, or nothing)."""
        if self.checkpoint is None:
            return f"starts at step 0 ({self.run_dir} holds no checkpoint)"
        done = self.nothing_to_train(total_steps)
        if done is not None:
            return done
        same = "the same config" if not (self.allowed or self.refused) else "the config changed as listed below"
        return f"resumes from {self.checkpoint} (step {self.step} -> {total_steps}), {same}"


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_changes(changes: list[tuple[str, Any, Any]], limit: int = 12, indent: str = "  ") -> str:
    """``key: old -> new`` lines, at most ``limit`` of them (then how many more)."""
    lines = [f"{indent}{key}: {_short(old)} -> {_short(new)}" for key, old, new in changes[:limit]]
    if len(changes) > limit:
        lines.append(f"{indent}... and {len(changes) - limit} more")
    return "\n".join(lines)


def _saved_config(run_dir: Path, meta: dict) -> dict | None:
    """The config the newest checkpoint was trained with: its meta.json's, else the run's config.yaml (written by
    versions that did not record it in the checkpoint), else None."""
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    path = run_dir / CONFIG_NAME
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RunDirConfigError(f"{path}: cannot read the run's config ({exc})") from None
        return data if isinstance(data, dict) else None
    return None


def inspect_run_dir(cfg: PretrainConfig, world_size: int, *, allow_config_change: bool = False) -> RunDirState:
    """What ``cfg.run_dir`` holds and how ``cfg`` differs from the config of its newest checkpoint. Reads only.

    Raises:
        RunDirConfigError: the run directory holds checkpoints trained with another config in a key that changes
            what is trained (or another global batch), and ``allow_config_change`` is False. The message names the
            keys and both values, and says how to go on.
        ValueError: the newest checkpoint's meta.json is unreadable (naming it).
    """
    from seer.train.checkpoint import latest_checkpoint, read_meta

    run_dir = Path(cfg.run_dir)
    found = RunDirState(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return found
    meta = read_meta(ckpt)
    loss = meta.get("loss")
    found.checkpoint, found.step = ckpt, int(meta["step"])
    found.loss = float(loss) if isinstance(loss, (int, float)) and not isinstance(loss, bool) else None
    found.saved_config = _saved_config(run_dir, meta)
    if found.saved_config is not None:
        for change in config_differences(found.saved_config, cfg):
            (found.allowed if change[0] in RESUME_MAY_CHANGE else found.refused).append(change)
    saved_batch, batch = meta.get("global_batch"), batch_per_gpu(cfg, world_size) * world_size
    if isinstance(saved_batch, int) and saved_batch != batch:  # the lr scales with it: another optimization
        found.refused.append((GLOBAL_BATCH, saved_batch, batch))
    if found.refused and not allow_config_change:
        raise RunDirConfigError(_refusal(found, world_size))
    return found


def _refusal(found: RunDirState, world_size: int) -> str:
    keys = ", ".join(k for k, _, _ in found.refused)
    text = (
        f"run_dir {found.run_dir} holds a run trained to step {found.step} ({found.checkpoint.name}) with another "
        f"config; these keys differ ({keys}) and change what is trained (the model, the method, the data, the "
        f"optimizer or the schedule):\n{format_changes(found.refused)}\n"
    )
    if any(k == GLOBAL_BATCH for k, _, _ in found.refused):
        text += (
            f"  (the global batch is data.global_batch_size, or data.batch_size_per_gpu x the world size, "
            f"{world_size} here; set it to the run's to resume on another world size)\n"
        )
    return text + (
        "Nothing was written. To continue this run with the new values anyway, pass --allow-config-change "
        "(allow_config_change=True from Python); to train them from the start, give another run_dir. A resume may "
        "change only the run's length (train.total_steps), logging, checkpoint cadence and how the same computation "
        "runs (world size, compile, activation checkpointing: seer.config.RESUME_MAY_CHANGE)."
    )


class RunDirWrites:
    """Rank 0's record of the run directory when it took the lock; ``undo()`` puts it back as it was.

    Made after the lock is taken (so nothing of another run can be mistaken for this one's) and before anything is
    written. ``committed()`` once the run saved a checkpoint: from then on the directory is a run, and stays.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.before = set(os.listdir(self.run_dir)) if self.run_dir.is_dir() else set()
        path = self.run_dir / CONFIG_NAME
        self.config_before = path.read_bytes() if path.is_file() else None
        self._committed = False

    def committed(self) -> None:
        """The run saved its first checkpoint: nothing is undone after this."""
        self._committed = True

    def start(self, cfg: PretrainConfig, found: RunDirState, log: Callable[[str], None]) -> None:
        """Create ``checkpoints/`` (an unwritable run directory fails now, not at the first save) and write
        ``config.yaml``; after an allowed change of a key that changes what is trained, keep the old config as
        ``config.step_XXXXXXXX.yaml`` first."""
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if found.checkpoint is not None and found.saved_config is None:
            log(f"warning: {found.checkpoint.name} records no config and {self.run_dir} has no {CONFIG_NAME}: this "
                "config cannot be checked against the one the run was trained with")  # fmt: skip
        if found.allowed:
            log(f"resuming with changed settings that do not change what is trained:\n{format_changes(found.allowed)}")
        if found.refused:
            kept = self.run_dir / f"config.{found.checkpoint.name}.yaml"
            log(
                f"--allow-config-change: resuming {found.checkpoint.name} with a config that changes what is trained:"
                f"\n{format_changes(found.refused)}\nconfig.yaml now holds the new config; the one steps up to "
                f"{found.step} were trained with is kept as {kept.name}"
            )
            if found.saved_config is not None and not kept.exists():
                atomic_write(kept, yaml.safe_dump(found.saved_config, sort_keys=False))
        text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)  # as seer.config.dump_config writes it
        if self.config_before != text.encode():
            atomic_write(self.run_dir / CONFIG_NAME, text)

    def undo(self, log: Callable[[str], None]) -> None:
        """Remove what this run created and restore ``config.yaml``, unless it saved a checkpoint. Best effort: the
        error that stopped the run is the one to report."""
        from seer.train.checkpoint import list_checkpoints
        from seer.train.rundir_lock import LOCK_NAME

        if self._committed or not self.run_dir.is_dir():
            return
        undone = []
        for name in sorted(set(os.listdir(self.run_dir)) - self.before - {LOCK_NAME}):
            path = self.run_dir / name
            if name == "checkpoints" and list_checkpoints(self.run_dir):
                continue  # never a complete checkpoint (none can be this run's, but a checkpoint is never guessed at)
            try:
                is_dir = path.is_dir() and not path.is_symlink()
                if is_dir:
                    shutil.rmtree(path)
                else:
                    path.unlink()
                undone.append(f"{name}/" if is_dir else name)
            except OSError:
                pass
        path = self.run_dir / CONFIG_NAME
        try:
            if self.config_before is not None and (not path.is_file() or path.read_bytes() != self.config_before):
                atomic_write(path, self.config_before)
                undone.append(f"{CONFIG_NAME} (restored)")
        except OSError:
            pass
        if undone:
            log(f"no checkpoint was saved: removed what this run wrote in {self.run_dir} ({', '.join(undone)})")
