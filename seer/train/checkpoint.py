"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run directory::

    run_dir/config.yaml
    run_dir/metrics.jsonl
    run_dir/checkpoints/step_00001000/{.metadata, __0_0.distcp, ..., rank00000.pt, ..., meta.json}

Every rank writes its shards under ``checkpoints/.tmp-step_XXXXXXXX``, and its own per-rank state (``rank_state``:
what differs between ranks and so has no place in the shared state dict, such as SwAV's queue or a data stream's
position) as ``rank{r:05d}.pt``; after a barrier rank 0 writes ``meta.json`` (step, data position, RNG states of
every rank, config, what a time budget bought: ``seer.train.budget``) and renames the directory, so a ``step_*``
directory is always complete. DCP stores global tensor shapes, so a checkpoint saved by N ranks loads on M ranks
(or on one process with no process group); the per-rank state is restored only on the world size that saved it.

Weights are checked before they are written and after they are read: a parameter or buffer holding a NaN or an
infinity stops the save (``FloatingPointError``) and refuses the resume (``ValueError``), so no checkpoint of a run
that diverged is saved or trained on. A checkpoint written for another model (``CheckpointMismatchError``), an
unreadable ``meta.json`` and a checkpoint removed while it is read (``CheckpointRemovedError``: the run's own
``keep_last`` rotation; readers of a run directory then read its newest checkpoint) each get their own error.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import itertools
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

__all__ = [
    "CheckpointMismatchError",
    "CheckpointRemovedError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "read_trunk_state",
    "read_classifier_state",
    "resolve_checkpoint",
    "read_meta",
    "read_newest",
]

_STEP_RE = re.compile(r"^step_(\d{8,})$")
META_NAME = "meta.json"
# How often a reader of a run directory starts again from the newest checkpoint when the one it reads is removed
# (each retry means keep_last newer checkpoints were saved meanwhile: 5 is plenty)
READ_ATTEMPTS = 5
_T = TypeVar("_T")


class CheckpointMismatchError(ValueError):
    """The checkpoint is intact but holds another model than the one it is loaded into (another architecture,
    head or method): its keys or shapes differ. Nothing is wrong with the files."""


class CheckpointRemovedError(FileNotFoundError):
    """A checkpoint directory disappeared while it was being read: a job still training the run rotated it away
    (``keep_last``) or saved the same step again. The files were fine; the newest checkpoint can be read."""


def _removed(ckpt_dir: Path) -> CheckpointRemovedError:
    return CheckpointRemovedError(
        errno.ENOENT,
        f"{ckpt_dir}: the checkpoint was removed while it was being read (a job still training the run rotates its "
        f"checkpoints, train.keep_last); read the run's newest checkpoint",
    )


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a collective, so that all ranks fail together)."""
    if not _dist():
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _rank_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"rank{rank:05d}.pt"


def _to_cpu(obj: Any) -> Any:
    """Tensors moved to the CPU inside plain containers (a per-rank file loads on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes a single process whenever no process group exists: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# DCP reads ``.metadata`` with a bare ``pickle.load`` and non-tensor items (optimizer hyper-parameters) with
# ``torch.load(weights_only=False)``: a crafted run directory would run code when loaded. The reader and planner
# below read the same files but only rebuild DCP's own metadata classes, torch dtypes / sizes and plain containers.
_SAFE_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
}


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata":
            obj = getattr(dcp.metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == module:  # its dataclasses and enums, nothing imported
                return obj
        elif (module, name) in _SAFE_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))
        ):
            return super().find_class(module, name)
        raise _Refused(f"global '{module}.{name}' is not allowed in checkpoint metadata")


class SafeReader(dcp.FileSystemReader):
    """``FileSystemReader`` that refuses pickled code in ``.metadata`` and names the file when it is unreadable."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            if not Path(self.path).is_dir():
                raise _removed(Path(self.path)) from None
            raise
        except _Refused as exc:
            raise ValueError(
                f"{path}: refused to load checkpoint metadata ({exc}); nothing in it was executed"
            ) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise ValueError(f"{path}: unreadable checkpoint metadata, truncated or corrupt ({exc!r})") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not DCP checkpoint metadata (a {type(metadata).__name__})")
        # A shard shorter than the extents the metadata records is truncated (cheap: one stat per file).
        need: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for rel, size in need.items():
            shard = Path(self.path) / rel
            have = shard.stat().st_size if shard.is_file() else -1
            if have < size:
                if not Path(self.path).is_dir():
                    raise _removed(Path(self.path))
                what = f"{have} bytes" if have >= 0 else "missing"
                raise ValueError(f"{shard}: checkpoint shard truncated or corrupt ({what}, metadata expects {size})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _safe_planner() -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class _SafeLoadPlanner(DefaultLoadPlanner):
        """Non-tensor items (optimizer hyper-parameters) are read with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: Any) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # DCP's own helper

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return _SafeLoadPlanner()


def _dcp_load(state: dict, ckpt_dir: Path, **kwargs: Any) -> None:
    """``dcp.load`` through the safe reader and planner; a truncated or corrupt shard is a ValueError naming it."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=SafeReader(str(ckpt_dir)), planner=_safe_planner(), **kwargs)
    except (CheckpointException, Exception) as exc:  # noqa: BLE001 - DCP wraps every reader error (BaseException)
        if not ckpt_dir.is_dir():  # rotated away while being read: the files were not corrupt
            raise _removed(ckpt_dir) from None
        first = exc
        if isinstance(exc, CheckpointException) and exc.failures:
            first = next(iter(exc.failures.values()))
            first = first[0] if isinstance(first, tuple) else first
        if isinstance(first, ValueError) and str(ckpt_dir) in str(first):
            raise first from None  # already names the file (refused or unreadable metadata)
        lines = [line.strip() for line in str(first).splitlines() if line.strip()] or [repr(first)]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0])[:300]
        raise ValueError(
            f"{ckpt_dir}: cannot read the checkpoint, truncated or corrupt ({type(first).__name__}: {reason})"
        ) from None


def _ckpt_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = _ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META_NAME).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory of a run (``None`` if there is none)."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    """A checkpoint's ``meta.json``: a JSON object with an integer ``step``.

    Raises:
        ValueError: naming the file, when it is not valid JSON or not such an object (truncated or corrupt).
        CheckpointRemovedError: the checkpoint directory was removed (rotated away) before it could be read.
    """
    path = Path(ckpt_dir) / META_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not Path(ckpt_dir).is_dir():
            raise _removed(Path(ckpt_dir)) from None
        raise
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: unreadable checkpoint metadata, truncated or corrupt ({exc})") from None
    if not isinstance(meta, dict) or isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int):
        what = f"a JSON {type(meta).__name__}" if not isinstance(meta, dict) else "an object without an integer 'step'"
        raise ValueError(f"{path}: corrupt checkpoint metadata ({what}, not the object seer writes)")
    return meta


def read_newest(path: str | os.PathLike, read: Callable[[Path], _T]) -> _T:
    """``read(checkpoint)`` of the checkpoint ``path`` names (see ``resolve_checkpoint``).

    For a run directory, a checkpoint removed while it is read (the run's own ``keep_last`` rotation, a job still
    training) is no error: ``read`` starts again on the run's newest checkpoint, up to ``READ_ATTEMPTS`` times. One
    checkpoint directory named explicitly is never swapped for another: its removal is a ``CheckpointRemovedError``.
    """
    path = Path(path)
    explicit = (path / ".metadata").is_file()
    for attempt in range(READ_ATTEMPTS):
        ckpt = resolve_checkpoint(path)
        try:
            return read(ckpt)
        except CheckpointRemovedError:
            if explicit or attempt == READ_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------------------------
# RNG states (json-friendly)
# ----------------------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def rng_state() -> dict:
    """This process's torch / CUDA / numpy / python RNG states as json-ready values."""
    np_state = np.random.get_state()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()

    torch.set_rng_state(tensor(state["torch"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    meta: dict | None = None,
    keep_last: int = 3,
    rank_state: dict | None = None,
) -> Path:
    """Save model + optimizer (sharded, DCP) and metadata as ``checkpoints/step_{step:08d}``; keep the last K.

    ``rank_state``: this rank's own state (a dict of tensors and plain python values, e.g. ``{"method": {"queue":
    ...}}``), written with ``torch.save`` as ``rank{r:05d}.pt`` in the checkpoint before it is renamed complete;
    ``load_checkpoint`` gives it back on the same world size. Every rank passes one or none.

    Collective: every rank must call it. BN running statistics are averaged over ranks first.

    Raises:
        FloatingPointError: a parameter or buffer holds a NaN or an infinity (each rank checks its own shards, every
            rank raises): nothing is written, so no checkpoint holds the diverged weights.
        OSError: a file could not be written (disk full, read-only): the earlier checkpoints are intact.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from seer.distributed.parallel import sync_bn_stats

    root = _ckpt_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a crash left it half-written
    _barrier()
    sync_bn_stats(model)
    _reshard(model)
    bad = _agreed_nonfinite(model)
    if bad is not None:  # a NaN weight decay trained NaN weights, whose export gave all-zero features: never save them
        latest = latest_checkpoint(run_dir)
        raise FloatingPointError(
            f"{_nonfinite_what(bad)} after step {step}: stopping without saving checkpoint {final.name}. "
            + (
                f"The newest checkpoint is {latest} (step {_step_of(latest)}), saved before step {step}; it is "
                f"untouched: fix the cause (optim.*: lower optim.base_lr, raise optim.warmup_iters) and resume with "
                f"--allow-config-change (allow_config_change=True from Python: these keys change what is trained)."
                if latest is not None
                else f"No checkpoint was saved before step {step}."
            )
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_single_process():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    except (CheckpointException, OSError) as exc:  # disk full, not writable: DCP wraps it in a BaseException
        first = exc
        if isinstance(exc, CheckpointException) and exc.failures:
            first = next(iter(exc.failures.values()))
            first = first[0] if isinstance(first, tuple) else first
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(first, BaseException) and not isinstance(first, Exception):
            # SystemExit / KeyboardInterrupt raised inside the save (submitit's timeout handler exits from the signal
            # handler to requeue the job): not a disk error. Let it through, the half-written checkpoint removed.
            raise first from None
        raise _write_error(run_dir, final, first) from None
    failure = None
    if rank_state is not None:
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()  # serialized in memory first: a full disk is then an OSError from write()
            torch.save(_to_cpu(rank_state), buf)
            with open(_rank_file(tmp, _rank()), "wb") as f:
                f.write(buf.getbuffer())
        except OSError as exc:
            failure = exc
    if _any_rank(failure is not None):  # one rank's disk full fails the save on every rank, none waits forever
        _barrier()
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(run_dir, final, failure, "per-rank state")
    states = [None] * dist.get_world_size() if _dist() else None
    if _dist():
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    _barrier()  # every rank's shards are on disk
    failure = None
    if _rank() == 0:
        info = {"step": step, "world_size": len(states), **(meta or {}), "rng": states}
        if rank_state is not None:
            info["rank_files"] = True
        try:
            _complete(tmp, final, json.dumps(info))
        except OSError as exc:  # a full disk while writing meta.json: the same error as for the shards
            failure = exc
    if _any_rank(failure is not None):  # rank 0 alone writes meta.json: the others must not wait for it forever
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(run_dir, final, failure, META_NAME)
    if _rank() == 0:
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            # renamed first: a kill during the deletion must not leave a step_* dir with meta.json but no shards
            doomed = old.with_name(f".tmp-{old.name}.deleting")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    _barrier()
    return final


def _complete(tmp: Path, final: Path, meta_text: str) -> None:
    """Write ``meta.json`` into the temporary checkpoint and rename it ``final`` (rank 0)."""
    tmp_meta = tmp / f".{META_NAME}.tmp"
    with open(tmp_meta, "w") as f:
        f.write(meta_text)
    os.replace(tmp_meta, tmp / META_NAME)
    if not final.exists():
        os.replace(tmp, final)
        return
    # The same step saved again (e.g. after a resume): the old one is renamed away first, so that a reader never sees
    # it half deleted (which looks corrupt), and renamed back if the new one cannot take its place.
    doomed = final.with_name(f".tmp-{final.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(final, doomed)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(doomed, final)
        raise
    shutil.rmtree(doomed, ignore_errors=True)


def _write_error(run_dir: str | os.PathLike, final: Path, exc: BaseException | None, what: str = "") -> OSError:
    """The error of a checkpoint that could not be written (whichever file failed): what failed, and that the
    earlier checkpoints are intact (the new one is written aside and only renamed complete at the end)."""
    why = f"{type(exc).__name__}: {exc}" if exc is not None else "another rank could not write its file"
    return OSError(
        getattr(exc, "errno", None) or errno.EIO,
        f"cannot write checkpoint {final.name} under {final.parent} ({what + ', ' if what else ''}{why}); the "
        f"earlier checkpoints are intact (latest: {latest_checkpoint(run_dir) or 'none'})",
    )


def _step_of(ckpt: Path) -> int:
    return int(_STEP_RE.match(ckpt.name).group(1))


@torch.no_grad()
def _first_nonfinite(model: nn.Module) -> str | None:
    """The name of this rank's first parameter or buffer holding a NaN or an infinity (under FSDP, of its own
    shards), or None. One host sync per device, not one per tensor."""
    from torch.distributed.tensor import DTensor

    tensors: list[tuple[str, torch.Tensor]] = []
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_floating_point() and local.numel():
            tensors.append((name, local.detach()))
    first = None
    for device in {t.device for _, t in tensors}:
        index = [i for i, (_, t) in enumerate(tensors) if t.device == device]
        finite = torch.stack([torch.isfinite(tensors[i][1]).all() for i in index])
        if not bool(finite.all()):
            i = index[int((~finite).nonzero()[0, 0])]
            first = i if first is None else min(first, i)
    return None if first is None else tensors[first][0]


def _agreed_nonfinite(model: nn.Module) -> tuple[int, str] | None:
    """(rank, name) of the first non-finite parameter or buffer on any rank, the same on every rank; None when every
    rank's are finite. Collective: each rank checks its own shards, then all agree (as on a NaN loss)."""
    bad = _first_nonfinite(model)
    if not _any_rank(bad is not None):
        return None
    if not _dist():
        return 0, bad
    names: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, bad)
    return next((r, n) for r, n in enumerate(names) if n is not None)


def _nonfinite_what(bad: tuple[int, str]) -> str:
    rank, name = bad
    where = f" on rank {rank}" if _dist() and dist.get_world_size() > 1 else ""
    return f"the model's {name!r} holds NaN or infinite values{where}"


def _reshard(model: nn.Module) -> None:
    """Put every FSDP unit back into its sharded state (units kept gathered across steps, like bf16 BatchNorms,
    would otherwise expose their gathered copies to the state dict)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def clean_partial(run_dir: str | os.PathLike) -> None:
    """Remove half-written ``.tmp-step_*`` directories (rank 0 only) left by a killed run."""
    root = _ckpt_root(run_dir)
    if _rank() == 0 and root.is_dir():
        for p in root.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
    _barrier()


def _check_same_model(ckpt_dir: Path, meta: dict, saved: dict, model_sd: dict) -> None:
    """CheckpointMismatchError naming the first key whose presence or shape differs between the checkpoint and the
    model (whose state dict ``model_sd`` holds global shapes, sharded or not). DCP would report it as a failed read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    theirs = {
        k[len("model.") :]: tuple(v.size)
        for k, v in saved.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    ours = {k: tuple(v.shape) for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    problems = [
        f"{k!r} is {theirs[k]} in the checkpoint, {shape} in this run's model"
        if k in theirs
        else f"{k!r} {shape} of this run's model is not in the checkpoint"
        for k, shape in ours.items()
        if theirs.get(k) != shape
    ] + [f"{k!r} {shape} of the checkpoint is not in this run's model" for k, shape in theirs.items() if k not in ours]
    if not problems:
        return
    saved_cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    model_cfg = saved_cfg.get("model") if isinstance(saved_cfg.get("model"), dict) else {}
    if model_cfg.get("cfg") is not None:
        arch = f" (saved with method={saved_cfg.get('method')}, model.cfg={model_cfg['cfg']})"
    elif model_cfg:
        arch = f" (saved with method={saved_cfg.get('method')}, model.preset={model_cfg.get('preset')})"
    else:
        arch = ""
    more = f"; {len(problems) - 1} more tensor(s) differ" if len(problems) > 1 else ""
    raise CheckpointMismatchError(
        f"{ckpt_dir} is intact but was written for another model than this run's{arch}: {problems[0]}{more}. "
        f"Resume with the config the run was saved with (the 'config' entry of {ckpt_dir / META_NAME}), or train "
        f"the new model in a new run_dir."
    )


def _refuse_nonfinite(ckpt_dir: Path, model: nn.Module) -> None:
    """ValueError on every rank when the loaded weights hold a NaN or an infinity (a checkpoint saved before saves
    were checked): training on from it would give NaN losses, its features all zeros."""
    bad = _agreed_nonfinite(model)
    if bad is None:
        return
    earlier = [p for p in list_checkpoints(ckpt_dir.parent.parent) if p.name < ckpt_dir.name]
    hint = f"the checkpoint before it is {earlier[-1]}" if earlier else "the run has no checkpoint before it"
    raise ValueError(
        f"{ckpt_dir}: the checkpoint's weights are not finite ({_nonfinite_what(bad)}): it was saved after the run "
        f"diverged. Move it out of {ckpt_dir.parent} to resume from an earlier one ({hint})."
    )


def load_checkpoint(ckpt_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load model (+ optimizer) state in place from a checkpoint saved at any world size; returns its metadata.

    Optimizer entries absent from the checkpoint (parameters that had never been stepped, e.g. frozen prototypes)
    stay absent, so the resumed run takes exactly the same updates as the uninterrupted one. RNG states are
    restored when the world size matches.

    The returned metadata also holds ``rank_state``: this rank's dict given to ``save_checkpoint`` (read with
    ``torch.load(weights_only=True)``), or None; and ``rank_state_status``: ``"restored"``, ``"none_saved"`` or
    ``"world_size_mismatch"`` (saved by another number of ranks: per-rank state cannot be mapped, and is not
    returned). A per-rank file the checkpoint records but that is missing or unreadable is a ValueError naming it.

    Raises:
        CheckpointMismatchError: the checkpoint is intact but holds another model (architecture, head, method).
        ValueError: an unreadable file (naming it), or loaded weights holding a NaN or an infinity.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    saved = SafeReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        model_sd = get_model_state_dict(model)
        _check_same_model(ckpt_dir, meta, saved, model_sd)
        _dcp_load({"model": model_sd}, ckpt_dir)
        set_model_state_dict(model, model_sd)
        _refuse_nonfinite(ckpt_dir, model)
        world = dist.get_world_size() if _dist() else 1
        meta["rank_state"], meta["rank_state_status"] = _load_rank_state(ckpt_dir, meta, world)
        return meta
    _reshard(model)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # creates optimizer state to load into
    _check_same_model(ckpt_dir, meta, saved, model_sd)
    missing = sorted(
        fqn for fqn, st in optim_sd["state"].items() if any(f"optim.state.{fqn}.{k}" not in saved for k in st)
    )
    for fqn in missing:
        optim_sd["state"].pop(fqn)
    _dcp_load({"model": model_sd, "optim": optim_sd}, ckpt_dir)
    # strict=False only tolerates the missing optimizer entries; every model key was loaded by dcp.load above.
    options = StateDictOptions(strict=not missing)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    if missing:
        by_name = dict(model.named_parameters())
        for fqn in missing:
            optimizer.state.pop(by_name[fqn], None)
    _refuse_nonfinite(ckpt_dir, model)
    world = dist.get_world_size() if _dist() else 1
    if meta.get("world_size") == world and meta.get("rng"):
        set_rng_state(meta["rng"][_rank()])
    meta["rank_state"], meta["rank_state_status"] = _load_rank_state(ckpt_dir, meta, world)
    return meta


def _load_rank_state(ckpt_dir: Path, meta: dict, world: int) -> tuple[dict | None, str]:
    if not meta.get("rank_files"):
        return None, "none_saved"
    if meta.get("world_size") != world:
        return None, "world_size_mismatch"
    path = _rank_file(ckpt_dir, _rank())
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        if not ckpt_dir.is_dir():
            raise _removed(ckpt_dir) from None
        raise ValueError(f"{path}: per-rank checkpoint state missing (meta.json records one file per rank)") from None
    except Exception as exc:  # noqa: BLE001 - pickle / zip errors of a truncated or crafted file
        reason = repr(exc)[:300]
        raise ValueError(f"{path}: unreadable per-rank checkpoint state, truncated or corrupt ({reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: per-rank checkpoint state is a {type(state).__name__}, not a dict")
    return state, "restored"


# ----------------------------------------------------------------------------------------------------------------
# Reading the trunk back in one process (seer.load_trunk, `seer export`)
# ----------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory a path names: itself (one ``step_*`` directory) or a run's latest checkpoint."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"no such run or checkpoint directory: {path}")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (expected {path}/checkpoints/step_*/{META_NAME})")
    return ckpt


def read_trunk_state(path: str | os.PathLike, prefix: str = "trunk.") -> tuple[dict[str, torch.Tensor], dict]:
    """The trunk's full (unsharded) state dict and its ``RegNetCfg`` dict from a run or checkpoint directory.

    Works in a single process without a process group, whatever the world size that saved it.
    Keys are ours (timm's regnety names: ``stem.conv.weight``, ``s1.b1.conv1.conv.weight`` ...). A run's checkpoint
    removed while it is read is read again from the run's newest one (``read_newest``).
    """
    return read_newest(path, lambda ckpt: _read_trunk_state(ckpt, prefix))


def _read_trunk_state(ckpt: Path, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_meta(ckpt)
    md = SafeReader(str(ckpt)).read_metadata()
    want = f"model.{prefix}"
    state: dict[str, torch.Tensor] = {}
    for key, item in md.state_dict_metadata.items():
        if key.startswith(want) and isinstance(item, TensorStorageMetadata):
            state[key[len(want) :]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise ValueError(f"{ckpt}: no tensors under 'model.{prefix}' in the checkpoint")
    _dcp_load({"model": {prefix + k: v for k, v in state.items()}}, ckpt, no_dist=True)
    cfg = meta.get("regnet_cfg")
    if cfg is None:
        raise ValueError(f"{ckpt}/{META_NAME} has no 'regnet_cfg'")
    return state, cfg


def read_classifier_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """A supervised / fine-tuning run's linear classifier (``model.head``: ``{"weight", "bias"}``) and the class names
    it recorded (``meta["classes"]``), from a run or checkpoint directory.

    ``({}, None)`` when the method's head is not a linear classifier (SwAV's projection and prototypes): only the
    checkpoint's metadata is read then, never the head's tensors.
    """
    return read_newest(path, _read_classifier_state)


def _read_classifier_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    md = SafeReader(str(ckpt)).read_metadata()
    names = {k[len("model.head.") :] for k in md.state_dict_metadata if k.startswith("model.head.")}
    if names != {"weight", "bias"}:
        return {}, None
    state, _ = read_trunk_state(ckpt, prefix="head.")
    if state["weight"].dim() != 2:
        return {}, None
    classes = read_meta(ckpt).get("classes")
    return state, [str(c) for c in classes] if isinstance(classes, list) else None
