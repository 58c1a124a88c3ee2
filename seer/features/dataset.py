"""``extract_dataset``: features of a whole dataset written to disk in chunks, resumable, atomic and rank-sharded,
then merged into plain files in input order (``merge_features``; the layout is ``seer.features.files``).

The output directory follows ``seer.io.prepare_output_dir``'s rule, checked before any work; a resume is refused
when the settings or the weights changed (``meta.json`` records what identifies them); shard samples are known by
(shard, key); the merge is locked with ``flock``, which dies with a killed merger."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from seer.data.images import Preprocess, load_image
from seer.data.shards import EvalLoader
from seer.data.shards.read import _GroupByKeys  # the stage after which samples are named by shard (no public hook)
from seer.data.sources import resolve_source
from seer.features.backends import BackendChoice
from seer.features.files import (
    CHUNKS,
    LOCK_NAME,
    OWN_NAMES,
    chunk_path,
    chunk_paths,
    done_path,
    is_features_meta,
    is_own_name,
    read_chunk,
    read_meta,
    remove_outputs,
    skipped_path,
    write_chunk,
    write_json,
    write_merged,
)
from seer.features.inputs import ImageError, as_items, unpack
from seer.features.runner import DEFAULT_MODEL, Setup, eval_mode, make_setup, parameter_digest, progress_bar
from seer.io import OUTPUT_MARKER, OutputDirError, mark_output_dir, prepare_output_dir

try:
    import fcntl
except ImportError:  # Windows: merges are not locked (two concurrent merges write the same files, atomically)
    fcntl = None  # type: ignore[assignment]

__all__ = ["extract_dataset", "merge_features"]

# Settings that must not change between the runs (and ranks) that fill one output directory.
_SETTING_KEYS = ("model", "weights", "layer", "normalize", "dtype", "preprocess", "source", "shard_list", "n_inputs",
                 "world_size", "chunk_size", "format")  # fmt: skip
# Settings recorded since seer recorded them: a directory written before has none, and resumes without that check.
_LATER_KEYS = ("weights", "shard_list")


def _fix(flag: str) -> str:
    """How to get past a refused resume; ``flag`` is how the caller gives ``overwrite`` (`seer extract`:
    "--overwrite")."""
    return f"use another output directory, or pass {flag} to start over"


def _desc(rank: int, world_size: int) -> str:
    """The progress line's name: the rank only when there is more than one."""
    return f"features (rank {rank} of {world_size})" if world_size > 1 else "features"


_LINE_BREAK = "the name holds a line break, which inputs.txt (one input per line) cannot list; rename it"


def extract_dataset(source: Any, out_dir: str | os.PathLike, model: Any = None, *, rank: int = 0,
                    world_size: int = 1, layer: str = "avgpool", batch_size: int | None = None, device: Any = None,
                    normalize: bool = False, dtype: str = "float16", chunk_size: int = 4096,
                    num_workers: int | None = None, on_error: str = "skip", merge: bool | str = "auto",
                    format: str = "npy", progress: bool | None = None, amp: str | None = None,
                    overwrite: bool = False, backend: str = "auto", flag: str = "overwrite=True",
                    exact: bool = False, **preprocess: Any) -> dict:  # fmt: skip
    """Features of a whole dataset written to ``out_dir`` in chunks: resumable, atomic, rank-sharded.

    Every rank runs this with its own ``rank`` (of ``world_size``, passed explicitly: nothing here talks to
    torch.distributed). Rank ``r`` handles the ``r``-th contiguous slice of the inputs (shards: the ``r``-th share
    of the shard files) and writes chunks of ``chunk_size`` rows; a rerun skips the chunks already on disk. When
    the last rank finishes (``merge="auto"``), or when ``merge_features(out_dir)`` is called, the chunks are merged
    into plain ``.npy`` files in input order (see ``load_feature_file``).

    Args:
        source: an image folder (class subfolders -> labels), a CSV/TXT file list (``path[,label]``), webdataset
            shards (a ``.tar`` path, brace pattern or list of ``.tar`` files), a Dataset of ``(image, label)``,
            or a list of images / paths.
        out_dir: output directory.
        model, layer, batch_size, device, normalize, amp, num_workers, progress, backend, exact: as
            ``extract_features`` (``backend="auto"`` counts this call's inputs; the backend that ran, and why, is in
            the summary; ``exact`` is one of the settings a resume must repeat).
        dtype: "float16" (half the disk, what kNN / linear probes need) or "float32".
        on_error: "skip" (record unreadable inputs in ``skipped.json``) or "raise".
        merge: "auto" (merge when every rank is done), True (this rank merges: all must be done), False.
        format: "npy" or "safetensors" for the merged features file.
        overwrite: start over (this rank's chunks and the merged files are removed). ``out_dir`` must be new,
            empty or a previous extraction's; ``overwrite`` also accepts a directory holding other files: the files
            an extraction writes (``seer.features.files.OWN_NAMES``) are replaced there, nothing else is touched.
        flag: how the caller gives ``overwrite``, named in the messages that refuse ``out_dir`` or a resume
            (`seer extract` passes "--overwrite").
        **preprocess: resolution, crop_pct, interpolation, resize_mode, mean, std overrides.

    A rerun resumes only with the same settings and the same weights (a model file's size and modification time,
    a run's latest checkpoint, an in-memory model's parameters): anything else raises a ``ValueError`` saying what
    changed. An ``OutputDirError`` (a ``FileExistsError``) refuses ``out_dir``, before any work.

    Returns:
        A summary dict: rows written by this rank, skipped inputs, chunks, and the merge result if merged.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if format not in ("npy", "safetensors"):
        raise ValueError(f"format must be 'npy' or 'safetensors', got {format!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    unknown = set(preprocess) - {"resolution", "crop_pct", "interpolation", "resize_mode", "mean", "std"}
    if unknown:
        raise TypeError(f"extract_dataset: unknown keyword argument(s) {sorted(unknown)}")
    out = Path(out_dir).expanduser()
    shards = _is_shards(source)
    src = None if shards else _resolve_items(source)
    # Everything that can refuse the call does so before anything is written or computed.
    state = _prepare_output(out, source, overwrite, flag)
    unlistable = _unlistable_names(src, on_error) if src is not None else {}
    setup = make_setup(model, layer=layer, batch_size=batch_size, device=device, normalize=normalize, amp=amp,
                        preprocess=True, n_items=None if src is None else len(src.items), num_workers=num_workers,
                        needs_decode=True, overrides=preprocess, backend=backend, exact=exact,
                        progress=progress)  # fmt: skip
    loader = _shard_loader(source, setup, rank, world_size) if shards else None
    settings = {
        "model": _model_name(model),
        # what the weights are, not only where: a model file or a run's checkpoint may change between a kill and
        # the rerun that resumes it
        "weights": setup.weights if setup.weights is not None else {"digest": parameter_digest(setup.model)},
        "layer": layer,
        "normalize": normalize,
        "dtype": dtype,
        "preprocess": asdict(setup.preprocess),
        "source": f"shards:{source}" if shards else src.description,
        "shard_list": _shard_list(loader.urls) if loader is not None else None,
        "n_inputs": None if src is None else len(src.items),
        "world_size": world_size,
        "chunk_size": chunk_size,
        "format": format,
        "class_names": None if src is None else src.class_names,
    }
    settings["preprocess"]["mean"] = list(settings["preprocess"]["mean"])
    settings["preprocess"]["std"] = list(settings["preprocess"]["std"])
    out.mkdir(parents=True, exist_ok=True)
    if state != "foreign":  # a directory of other files is not marked as seer's: it stays theirs
        mark_output_dir(out, "features", files=OWN_NAMES)
    if overwrite:
        remove_outputs(out, rank)
    (out / CHUNKS).mkdir(exist_ok=True)
    _check_meta(out, settings, overwrite, model, flag)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    t0 = time.time()
    with eval_mode(setup.model):
        if loader is not None:
            summary = _extract_shards(loader, out, setup, rank, chunk_size, np_dtype, on_error, progress, flag)
        else:
            summary = _extract_items(src, out, setup, rank, world_size, chunk_size, np_dtype, on_error, progress,
                                     unlistable)  # fmt: skip
    choice = setup.runner.choice or BackendChoice("torch", "requested")
    summary.update(rank=rank, world_size=world_size, seconds=round(time.time() - t0, 3), backend=choice.as_dict())
    write_json(done_path(out, rank), summary)
    all_done = all(done_path(out, r).is_file() for r in range(world_size))
    if merge is True and not all_done:
        missing = [r for r in range(world_size) if not done_path(out, r).is_file()]
        raise RuntimeError(f"{out}: cannot merge yet, ranks {missing} are not done")
    if merge is True or (merge == "auto" and all_done):
        summary["merged"] = merge_features(out, flag=flag, _lock=merge == "auto")
    return summary


def _is_shards(source: Any) -> bool:
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if os.path.isdir(s) or s.lower().endswith((".csv", ".tsv", ".txt", ".lst", ".list")):
            return False
        return s.endswith(".tar") or "{" in s or "::" in s or s.startswith(("pipe:", "http://", "https://"))
    return (
        isinstance(source, (list, tuple))
        and bool(source)
        and all(isinstance(u, (str, os.PathLike)) and os.fspath(u).endswith(".tar") for u in source)
    )


@dataclass
class _Source:
    items: Sequence
    names: Callable[[int], str]
    description: str
    class_names: list[str] | None = None
    paths: bool = False  # the names are file paths (a folder, a file list, a list of paths)


def _resolve_items(source: Any) -> _Source:
    """A folder (class subfolders -> labels), a CSV/TXT file list, a Dataset, or a list of images."""
    if isinstance(source, (str, os.PathLike)):
        try:
            src = resolve_source(source)
        except UnicodeDecodeError as exc:  # a file list: folders give any name (undecodable bytes escaped)
            raise ValueError(
                f"{os.fspath(source)}: the file list is not UTF-8 (byte {exc.object[exc.start : exc.start + 1]!r} at "
                f"offset {exc.start}); write it as UTF-8, or extract the folder holding the images (a file name "
                f"that is not UTF-8 works there)"
            ) from None
        items = src.items  # (path, label) pairs
        return _Source(items, lambda i: items[i][0], f"{src.kind}:{src.description}", src.class_names, paths=True)
    seq, iterable = as_items(source)
    if seq is None:
        seq = list(iterable)
    if len(seq) == 0:
        raise ValueError("extract_dataset: no images (empty input)")
    first = unpack(seq[0])[0]
    if isinstance(first, (str, os.PathLike)):
        return _Source(seq, lambda i: os.fspath(unpack(seq[i])[0]), f"list of {len(seq)} paths", paths=True)
    classes = getattr(source, "classes", None)
    return _Source(seq, lambda i: f"#{i}", f"{type(source).__name__} of {len(seq)}",
                   [str(c) for c in classes] if classes is not None else None)  # fmt: skip


def _unlistable_names(src: _Source, on_error: str) -> dict[int, str]:
    """Inputs whose path holds a line break: ``inputs.txt`` lists one input per line, so they are skipped (listed
    in skipped.json), or refused before any work with ``on_error="raise"``. Any other name works, bytes included."""
    if not src.paths:
        return {}
    bad = {}
    for i in range(len(src.items)):
        name = src.names(i)
        if "\n" in name or "\r" in name:
            bad[i] = name
    if bad and on_error == "raise":
        first = next(iter(bad.values()))
        raise ValueError(f"{len(bad)} input(s) cannot be listed, e.g. {first!r}: {_LINE_BREAK} (or skip them: "
                         f"on_error='skip')")  # fmt: skip
    return bad


# ----------------------------------------------------------------------------------------------------------------
# The output directory
# ----------------------------------------------------------------------------------------------------------------
def _is_remote(url: str) -> bool:
    scheme = urlparse(url).scheme
    return url.startswith("pipe:") or (len(scheme) > 1 and scheme != "file")


def _local_sources(source: Any) -> list[str]:
    """The local paths (or shard patterns) a path source reads: the output directory must not hold them."""
    if isinstance(source, (str, os.PathLike)):
        parts = os.fspath(source).split("::") if _is_shards(source) else [os.fspath(source)]
    elif _is_shards(source):
        parts = [os.fspath(u) for u in source]
    else:
        return []  # images in memory, or a list of image paths (an output never replaces an image file)
    return [p.removeprefix("file://") for p in parts if p.strip() and not _is_remote(p)]


def _is_extraction(out: Path, names: Sequence[str]) -> bool:
    """``out`` holds a seer extraction: marked as one, being marked by another rank right now, or (written before
    seer marked its output directories) holding a features ``meta.json``."""
    if OUTPUT_MARKER in names:
        try:
            marker = json.loads((out / OUTPUT_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(marker, dict) and marker.get("kind") == "features"
    if any(n != OUTPUT_MARKER and n.startswith(f".{OUTPUT_MARKER}.") and is_own_name(n) for n in names):
        return True
    try:
        return is_features_meta(read_meta(out))
    except (OSError, ValueError):
        return False


def _prepare_output(out: Path, source: Any, overwrite: bool, flag: str) -> str:
    """``seer.io.prepare_output_dir``'s rule for an extraction, before any work: "new" / "empty"; "own" (a previous
    extraction, nothing else: resume it, or start over); "foreign" (other files too: only with ``overwrite``, which
    replaces the extraction's own file names there and touches nothing else). Raises ``OutputDirError`` otherwise,
    and always for a directory that holds the source."""
    # overwrite=True: the checks that hold whatever the user says (a file, the source inside); the rest is below,
    # where the temporary files of a rank writing at this moment count as the extraction's
    state = prepare_output_dir(out, kind="features", overwrite=True, sources=_local_sources(source),
                               what="output directory")  # fmt: skip
    if state in ("new", "empty"):
        return state
    names = sorted(p.name for p in out.iterdir())
    others = [n for n in names if not is_own_name(n)]
    ours = _is_extraction(out, names)
    if ours and not others:
        return "own"
    if overwrite:
        return "foreign"
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    if ours:
        raise OutputDirError(
            f"output directory {str(out)!r} holds a seer extraction and files seer did not write ({shown}): move "
            f"them out to resume it, or pass {flag} to start over (they are left "
            f"alone)"
        )
    clash = [n for n in names if is_own_name(n, marker=False)]
    replaced = f"; its {', '.join(clash)} would be replaced" if clash else ""
    raise OutputDirError(
        f"output directory {str(out)!r} is not empty and holds files seer did not write ({shown}): choose a new or "
        f"empty directory, or pass {flag} to write the features into it (other "
        f"files are left alone{replaced})"
    )


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _weights_change(old: Any, new: Any) -> str:
    """What differs between two ``weights`` records, in words."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"{old!r} -> {new!r}"
    parts = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if _json(a) == _json(b):
            continue
        if k == "files" and isinstance(a, dict) and isinstance(b, dict):
            changed = sorted(n for n in set(a) | set(b) if _json(a.get(n)) != _json(b.get(n)))
            parts.append(f"files changed: {', '.join(changed[:5])}")
        elif k == "digest":
            parts.append(f"parameters {str(a)[:12]}... -> {str(b)[:12]}...")
        elif k == "mtime_ns" and isinstance(a, int) and isinstance(b, int):
            stamp = "%Y-%m-%d %H:%M:%S"
            parts.append(f"modified {time.strftime(stamp, time.localtime(a / 1e9))} -> "
                         f"{time.strftime(stamp, time.localtime(b / 1e9))}")  # fmt: skip
        else:
            parts.append(f"{k} {a!r} -> {b!r}")
    return ", ".join(parts) or "recorded differently"


def _check_meta(out: Path, settings: dict, overwrite: bool, model: Any, flag: str) -> None:
    if (out / "meta.json").is_file() and not overwrite:
        old = read_meta(out)
        keys = [k for k in _SETTING_KEYS if k in old or k not in _LATER_KEYS]
        diff = [k for k in keys if _json(old.get(k)) != _json(settings.get(k))]
        if "weights" in diff:
            raise ValueError(
                f"{out}: the weights of {_model_label(model)} changed since these features were started "
                f"({_weights_change(old.get('weights'), settings['weights'])}); the chunks on disk come from the "
                f"old weights, and resuming would mix two models: {_fix(flag)}"
            )
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"{out} holds features of a different run ({details}); {_fix(flag)}")
        return
    write_json(out / "meta.json", settings)


def _model_label(model: Any) -> str:
    if model is None:
        return f"the default model {DEFAULT_MODEL!r}"
    return f"model {os.fspath(model)!r}" if isinstance(model, (str, os.PathLike)) else "the model in memory"


def _model_name(model: Any) -> str:
    if model is None:
        return DEFAULT_MODEL
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    cfg = getattr(model, "cfg", None)
    return f"{type(model).__name__}({cfg.to_dict() if hasattr(cfg, 'to_dict') else ''})"


def _extract_items(src: _Source, out: Path, setup: Setup, rank: int, world_size: int, chunk_size: int,
                   np_dtype: Any, on_error: str, progress: bool | None,
                   unlistable: dict[int, str]) -> dict:  # fmt: skip
    n = len(src.items)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    starts = list(range(lo, hi, chunk_size))
    todo = [(k, s) for k, s in enumerate(starts) if not chunk_path(out, rank, k).is_file()]
    rows = skipped_total = 0
    desc = _desc(rank, world_size)
    with progress_bar(sum(min(s + chunk_size, hi) - s for _, s in todo), progress, desc) as bar:
        for k, start in todo:
            span = range(start, min(start + chunk_size, hi))
            positions = [p for p in span if p not in unlistable]
            feats, idx, labels = [], [], []
            skipped = [{"index": p, "input": unlistable[p], "error": _LINE_BREAK} for p in span if p in unlistable]
            bar.update(len(skipped))
            for pos_list, imgs, labs, errors in setup.batches(src.items, positions):
                for pos, desc, err in errors:
                    if on_error == "raise":
                        raise ImageError(f"cannot read image {desc}: {err}")
                    skipped.append({"index": pos, "input": desc, "error": err})
                if imgs is not None:
                    feats.append(setup.runner(imgs).cpu().numpy().astype(np_dtype))
                    idx += pos_list
                    labels += labs
                bar.update(len(pos_list) + len(errors))
            dim = feats[0].shape[1] if feats else 0
            arr = np.concatenate(feats) if feats else np.zeros((0, dim), np_dtype)
            write_chunk(chunk_path(out, rank, k), arr, idx, labels, [src.names(i) for i in idx], skipped)
            rows += len(idx)
            skipped_total += len(skipped)
    return {"chunks": len(starts), "chunks_written": len(todo), "rows_written": rows, "skipped": skipped_total,
            "range": [lo, hi]}  # fmt: skip


class _ShardTransform:
    """Encoded bytes from a shard -> uint8 HWC array (runs in the eval_loader workers)."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, data: bytes) -> np.ndarray:
        # a writable copy: the loader's default_collate turns it into a tensor
        return np.array(self.preprocess(load_image(bytes(data), draft=self.preprocess.draft_size())))


# Joins a sample's key and its shard's position in the URL list inside the shard stream ("key@3"); split from the
# right, where only digits follow it.
_KEY_SEP = "@"


class _KeyByShard:
    """Stream stage after the grouping by key: each sample's key gets its shard's position appended. Keys are
    often unique only within a shard, and the evaluation stream yields keys, not shards (a class: it is pickled
    into the DataLoader workers)."""

    def __init__(self, urls: Sequence[str]):
        self.positions = {u: i for i, u in enumerate(urls)}

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            key = sample.get("__key__")
            if key is not None:
                pos = self.positions.get(sample.get("__url__"))
                if pos is None:
                    raise RuntimeError(f"sample {key!r} comes from {sample.get('__url__')!r}, not a listed shard")
                sample["__key__"] = f"{key}{_KEY_SEP}{pos}"
            yield sample


class _ShardKeyedLoader(EvalLoader):
    """``seer.data.shards.EvalLoader`` whose samples are known by (shard, key): see ``split``."""

    def pipeline(self) -> Any:
        pipe = super().pipeline()
        at = next((i for i, stage in enumerate(pipe.pipeline) if isinstance(stage, _GroupByKeys)), None)
        if at is None:
            raise RuntimeError("seer.data.shards' evaluation stream has no grouping by key to follow")
        pipe.pipeline.insert(at + 1, _KeyByShard(self.urls))
        return pipe

    def split(self, key: str, url: str | None = None) -> tuple[str | None, str]:
        """``(shard URL, key)`` of a key from this stream; a key recorded before the shard was appended (a
        skipped shard, a sample the grouping dropped) comes back as it is, with ``url``."""
        raw, sep, pos = key.rpartition(_KEY_SEP)
        if sep and pos.isdigit() and int(pos) < len(self.urls) and (url is None or self.urls[int(pos)] == url):
            return self.urls[int(pos)], raw
        return url, key


def _shard_loader(source: Any, setup: Setup, rank: int, world_size: int) -> _ShardKeyedLoader:
    urls = [os.fspath(u) for u in source] if isinstance(source, (list, tuple)) else os.fspath(source)
    return _ShardKeyedLoader(urls, _ShardTransform(setup.preprocess), batch_size=setup.batch_size, rank=rank,
                             world_size=world_size, num_workers=setup.num_workers, decode="bytes",
                             require_label=False)  # fmt: skip


def _shard_list(urls: Sequence[str]) -> dict:
    """What identifies the shard files a pattern expands to (a glob may find other files at the rerun)."""
    text = "\n".join(os.fspath(u) for u in urls).encode("utf-8", "surrogateescape")
    return {"count": len(urls), "sha256": hashlib.sha256(text).hexdigest()}


def _next_chunk(existing: Sequence[Path]) -> int:
    """The number after the last chunk on disk (not the count: a chunk lost in between is not overwritten)."""
    return max((int(p.stem.rpartition("_c")[2]) + 1 for p in existing), default=0)


def _extract_shards(loader: _ShardKeyedLoader, out: Path, setup: Setup, rank: int, chunk_size: int, np_dtype: Any,
                    on_error: str, progress: bool | None, flag: str) -> dict:  # fmt: skip
    # Resume: the samples already in this rank's chunks, by (shard, key), are not computed again.
    done: set[tuple[str | None, str]] = set()
    existing = chunk_paths(out, rank)
    for path in existing:
        chunk = read_chunk(path, ("inputs", "shards"))
        keys = chunk["inputs"].tolist()
        done.update(zip(chunk["shards"] or [None] * len(keys), keys))
    legacy = {key for shard, key in done if shard is None}  # chunks of an older seer: keys only
    k = _next_chunk(existing)
    feats: list[np.ndarray] = []
    idx: list[int] = []
    labels: list[int] = []
    keys: list[str] = []
    shards: list[str] = []
    unlistable: list[dict] = []
    rows = seen = 0

    def flush() -> None:
        nonlocal k, feats, idx, labels, keys, shards, rows
        if not idx:
            return
        write_chunk(chunk_path(out, rank, k), np.concatenate(feats), idx, labels, keys, [], shards=shards)
        rows += len(idx)
        k += 1
        feats, idx, labels, keys, shards = [], [], [], [], []

    with progress_bar(None, progress, _desc(rank, loader.world_size)) as bar:
        for images, labs, batch_keys, indices in loader:
            keep = []
            for i, composite in enumerate(batch_keys):
                shard, key = loader.split(str(composite))
                if "\n" in key or "\r" in key:
                    unlistable.append({"index": -1, "input": key, "shard": shard, "error": _LINE_BREAK})
                    continue
                seen += 1
                if (shard, key) not in done and key not in legacy:
                    keep.append((i, shard, key))
            bar.update(len(batch_keys))
            if not keep:
                continue
            sel = [i for i, _, _ in keep]
            images = images if len(sel) == len(batch_keys) else images[sel]
            feats.append(setup.runner(images).cpu().numpy().astype(np_dtype))
            for i, shard, key in keep:
                index = int(indices[i])
                # the stream numbers a sample by its .json "index" (seer's shards), else by a numeric key; the key
                # it sees carries the shard's position, so a numeric key is read here
                idx.append(int(key) if index < 0 and key.isdigit() else index)
                labels.append(int(labs[i]))
                keys.append(key)
                shards.append(shard)
            if len(idx) >= chunk_size:
                flush()
        flush()
    skipped = []
    for r in loader.skipped:
        shard, key = loader.split(r["key"], r.get("url")) if r.get("key") is not None else (r.get("url"), None)
        skipped.append({"index": -1, "input": key or shard, "shard": shard,
                        "error": f"{r.get('kind')}: {r.get('error')}"})  # fmt: skip
    skipped += unlistable
    if skipped and on_error == "raise":
        raise ImageError(f"cannot read {len(skipped)} shard sample(s); first: {skipped[0]['input']}: "
                         f"{skipped[0]['error']}")  # fmt: skip
    if skipped:
        write_json(skipped_path(out, rank), skipped)
    else:  # a sample skipped by an earlier pass was read this time
        with contextlib.suppress(FileNotFoundError):
            skipped_path(out, rank).unlink()
    # Every sample this pass read is in the chunks once: never a silently short (or padded) result.
    on_disk = sum(len(read_chunk(p, ("indices",))["indices"]) for p in chunk_paths(out, rank))
    if on_disk != seen:
        what = "some of them are missing" if on_disk < seen else "the chunks hold samples these shards did not give"
        raise RuntimeError(
            f"{out}: rank {rank}'s chunks hold {on_disk} samples but its shards gave {seen} now ({what}): the "
            f"shards changed since the chunks were written, a shard could not be read this time (see the warnings; "
            f"rerun), or the chunks were written by an older seer that knew samples by key only; {_fix(flag)}"
        )
    return {"chunks": len(chunk_paths(out, rank)), "rows_written": rows, "rows": on_disk, "samples": seen,
            "skipped": len(skipped)}  # fmt: skip


def merge_features(out_dir: str | os.PathLike, *, flag: str = "overwrite=True", _lock: bool = False) -> dict:
    """Merge every rank's chunks into ``features.npy`` / ``indices.npy`` / ``labels.npy`` / ``inputs.txt`` in input
    order (each input exactly once, checked), plus ``skipped.json``; ``meta.json`` records the merge last. ``flag``
    names the way to start over in an error (`seer extract` passes "--overwrite")."""
    out = Path(out_dir)
    meta = read_meta(out)
    world_size = int(meta["world_size"])
    missing = [r for r in range(world_size) if not done_path(out, r).is_file()]
    if missing:
        raise RuntimeError(f"{out}: ranks {missing} have not finished; run them (same settings) before merging")
    if not _lock or fcntl is None:
        return _merge(out, meta, world_size, flag)
    # The last ranks to finish race to merge; one merges. The lock is the OS's (flock): it dies with its holder, so
    # a merger killed midway leaves nothing that stops the rerun. Two merges would only write the same files twice
    # (atomically), so a file system without flock merges unlocked.
    lock = out / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            return {"merged_by": holder or "another process"}
        except OSError:  # ENOLCK, EOPNOTSUPP: no flock here
            return _merge(out, meta, world_size, flag)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            return _merge(out, meta, world_size, flag)
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    finally:
        os.close(fd)


def _merge(out: Path, meta: dict, world_size: int, flag: str) -> dict:
    paths = chunk_paths(out)
    indices, labels, inputs, skipped = [], [], [], []
    samples: set[tuple[str, str]] = set()  # shards: (shard, key) of every row
    dim = None
    for path in paths:
        chunk = read_chunk(path, ("indices", "labels", "inputs", "skipped", "shards"))
        indices.append(chunk["indices"])
        labels.append(chunk["labels"])
        names = chunk["inputs"].tolist()
        for pair in zip(chunk["shards"] or (), names):
            if pair in samples:
                raise RuntimeError(
                    f"{out}: sample {pair[1]!r} of {pair[0]} appears in more than one chunk; {_fix(flag)}"
                )
            samples.add(pair)
        inputs += names
        skipped += chunk["skipped"]
        if dim is None and len(chunk["indices"]):
            dim = int(read_chunk(path, ("features",))["features"].shape[1])
    for r in range(world_size):
        if skipped_path(out, r).is_file():
            skipped += json.loads(skipped_path(out, r).read_text())
    all_idx = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if dim is None:
        raise RuntimeError(f"{out}: no features in any chunk ({len(skipped)} inputs skipped)")
    # Order: by input index when every row has one (files, datasets, shards written by seer), else as written.
    ordered = bool(len(all_idx)) and int(all_idx.min()) >= 0
    order = np.argsort(all_idx, kind="stable") if ordered else np.arange(len(all_idx))
    n_inputs = meta.get("n_inputs")
    if ordered:
        dup = np.flatnonzero(np.diff(all_idx[order]) == 0)
        if len(dup) and n_inputs is not None:
            raise RuntimeError(f"{out}: input {int(all_idx[order][dup[0]])} appears in more than one chunk")
        if len(dup):  # shards numbered by key, per shard: samples are told apart by (shard, key) above
            ordered, order = False, np.arange(len(all_idx))
    if n_inputs is None:  # shards: the rows are what the ranks counted in their shards (``_extract_shards``)
        done = [json.loads(done_path(out, r).read_text()) for r in range(world_size)]
        if all(isinstance(d, dict) and "rows" in d for d in done):  # (ranks of an older seer did not count)
            expected = sum(int(d["rows"]) for d in done)
            if expected != len(all_idx):
                raise RuntimeError(
                    f"{out}: the chunks hold {len(all_idx)} samples but the ranks wrote {expected}: chunks were "
                    f"removed or added after the ranks finished; rerun the same command to recompute them, or "
                    f"{_fix(flag)}"
                )
    if n_inputs is not None:
        covered = np.zeros(n_inputs, dtype=np.int64)
        np.add.at(covered, all_idx, 1)
        np.add.at(covered, np.asarray([s["index"] for s in skipped], dtype=np.int64), 1)
        bad = np.flatnonzero(covered != 1)
        if len(bad):
            raise RuntimeError(f"{out}: inputs {bad[:10].tolist()} are covered {covered[bad[:10]].tolist()} times")
    dest = np.empty(len(order), dtype=np.int64)
    dest[order] = np.arange(len(order))
    files = write_merged(out, format=meta["format"], dtype=np.dtype(meta["dtype"]), dim=dim, chunks=paths, dest=dest,
                         indices=all_idx[order], labels=all_labels[order], inputs=[inputs[i] for i in order],
                         skipped=sorted(skipped, key=lambda s: s["index"]))  # fmt: skip
    merged = {"rows": len(order), "dim": dim, "skipped": len(skipped), "ordered_by_index": ordered, "files": files}
    write_json(out / "meta.json", {**meta, "merged": merged})
    return merged
