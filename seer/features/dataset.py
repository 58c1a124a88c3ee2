"""``extract_dataset``: features of a whole dataset written to disk in chunks, resumable, atomic and rank-sharded,
then merged into plain files in input order (``merge_features``; the layout is ``seer.features.files``)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seer.data.images import Preprocess, load_image
from seer.data.shards import eval_loader
from seer.data.sources import resolve_source
from seer.features.backends import BackendChoice
from seer.features.files import (
    CHUNKS,
    chunk_path,
    chunk_paths,
    done_path,
    read_chunk,
    read_meta,
    remove_outputs,
    skipped_path,
    write_chunk,
    write_json,
    write_merged,
)
from seer.features.inputs import ImageError, as_items, unpack
from seer.features.runner import DEFAULT_MODEL, Setup, eval_mode, make_setup, progress_bar

__all__ = ["extract_dataset", "merge_features"]

# Settings that must not change between the runs (and ranks) that fill one output directory.
_SETTING_KEYS = ("model", "layer", "normalize", "dtype", "preprocess", "source", "n_inputs", "world_size",
                 "chunk_size", "format")  # fmt: skip


def extract_dataset(source: Any, out_dir: str | os.PathLike, model: Any = None, *, rank: int = 0,
                    world_size: int = 1, layer: str = "avgpool", batch_size: int | None = None, device: Any = None,
                    normalize: bool = False, dtype: str = "float16", chunk_size: int = 4096,
                    num_workers: int | None = None, on_error: str = "skip", merge: bool | str = "auto",
                    format: str = "npy", progress: bool | None = None, amp: str | None = None,
                    overwrite: bool = False, backend: str = "auto", **preprocess: Any) -> dict:  # fmt: skip
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
        model, layer, batch_size, device, normalize, amp, num_workers, progress, backend: as ``extract_features``
            (``backend="auto"`` counts this call's inputs; the backend that ran, and why, is in the summary).
        dtype: "float16" (half the disk, what kNN / linear probes need) or "float32".
        on_error: "skip" (record unreadable inputs in ``skipped.json``) or "raise".
        merge: "auto" (merge when every rank is done), True (this rank merges: all must be done), False.
        format: "npy" or "safetensors" for the merged features file.
        overwrite: start over (this rank's chunks and the merged files are removed).
        **preprocess: resolution, crop_pct, interpolation, resize_mode, mean, std overrides.

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
    (out / CHUNKS).mkdir(parents=True, exist_ok=True)
    if overwrite:
        remove_outputs(out, rank)
    shards = _is_shards(source)
    src = None if shards else _resolve_items(source)
    setup = make_setup(model, layer=layer, batch_size=batch_size, device=device, normalize=normalize, amp=amp,
                        preprocess=True, n_items=None if src is None else len(src.items), num_workers=num_workers,
                        needs_decode=True, overrides=preprocess, backend=backend)  # fmt: skip
    settings = {
        "model": _model_name(model),
        "layer": layer,
        "normalize": normalize,
        "dtype": dtype,
        "preprocess": asdict(setup.preprocess),
        "source": f"shards:{source}" if shards else src.description,
        "n_inputs": None if src is None else len(src.items),
        "world_size": world_size,
        "chunk_size": chunk_size,
        "format": format,
        "class_names": None if src is None else src.class_names,
    }
    settings["preprocess"]["mean"] = list(settings["preprocess"]["mean"])
    settings["preprocess"]["std"] = list(settings["preprocess"]["std"])
    _check_meta(out, settings, overwrite)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    t0 = time.time()
    with eval_mode(setup.model):
        if shards:
            summary = _extract_shards(source, out, setup, rank, world_size, chunk_size, np_dtype, on_error, progress)
        else:
            summary = _extract_items(src, out, setup, rank, world_size, chunk_size, np_dtype, on_error, progress)
    choice = setup.runner.choice or BackendChoice("torch", "requested")
    summary.update(rank=rank, world_size=world_size, seconds=round(time.time() - t0, 3), backend=choice.as_dict())
    write_json(done_path(out, rank), summary)
    all_done = all(done_path(out, r).is_file() for r in range(world_size))
    if merge is True and not all_done:
        missing = [r for r in range(world_size) if not done_path(out, r).is_file()]
        raise RuntimeError(f"{out}: cannot merge yet, ranks {missing} are not done")
    if merge is True or (merge == "auto" and all_done):
        summary["merged"] = merge_features(out, _lock=merge == "auto")
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


def _resolve_items(source: Any) -> _Source:
    """A folder (class subfolders -> labels), a CSV/TXT file list, a Dataset, or a list of images."""
    if isinstance(source, (str, os.PathLike)):
        src = resolve_source(source)
        items = src.items  # (path, label) pairs
        return _Source(items, lambda i: items[i][0], f"{src.kind}:{src.description}", src.class_names)
    seq, iterable = as_items(source)
    if seq is None:
        seq = list(iterable)
    if len(seq) == 0:
        raise ValueError("extract_dataset: no images (empty input)")
    first = unpack(seq[0])[0]
    if isinstance(first, (str, os.PathLike)):
        return _Source(seq, lambda i: os.fspath(unpack(seq[i])[0]), f"list of {len(seq)} paths")
    classes = getattr(source, "classes", None)
    return _Source(seq, lambda i: f"#{i}", f"{type(source).__name__} of {len(seq)}",
                   [str(c) for c in classes] if classes is not None else None)  # fmt: skip


def _check_meta(out: Path, settings: dict, overwrite: bool) -> None:
    if (out / "meta.json").is_file() and not overwrite:
        old = read_meta(out)
        diff = [
            k for k in _SETTING_KEYS if json.dumps(old.get(k), default=str) != json.dumps(settings.get(k), default=str)
        ]
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(
                f"{out} holds features of a different run ({details}); use another directory or overwrite=True"
            )
        return
    write_json(out / "meta.json", settings)


def _model_name(model: Any) -> str:
    if model is None:
        return DEFAULT_MODEL
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    cfg = getattr(model, "cfg", None)
    return f"{type(model).__name__}({cfg.to_dict() if hasattr(cfg, 'to_dict') else ''})"


def _extract_items(src: _Source, out: Path, setup: Setup, rank: int, world_size: int, chunk_size: int,
                   np_dtype: Any, on_error: str, progress: bool | None) -> dict:  # fmt: skip
    n = len(src.items)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    starts = list(range(lo, hi, chunk_size))
    todo = [(k, s) for k, s in enumerate(starts) if not chunk_path(out, rank, k).is_file()]
    rows = skipped_total = 0
    with progress_bar(sum(min(s + chunk_size, hi) - s for _, s in todo), progress, f"rank {rank}") as bar:
        for k, start in todo:
            positions = range(start, min(start + chunk_size, hi))
            feats, idx, labels, skipped = [], [], [], []
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


def _extract_shards(urls: Any, out: Path, setup: Setup, rank: int, world_size: int, chunk_size: int,
                    np_dtype: Any, on_error: str, progress: bool | None) -> dict:  # fmt: skip
    # Resume: the keys already in this rank's chunks are not computed again.
    done_keys: set[str] = set()
    existing = chunk_paths(out, rank)
    for path in existing:
        done_keys.update(read_chunk(path, ("inputs",))["inputs"].tolist())
    k = len(existing)
    urls = [os.fspath(u) for u in urls] if isinstance(urls, (list, tuple)) else os.fspath(urls)
    loader = eval_loader(urls, _ShardTransform(setup.preprocess),
                         batch_size=setup.batch_size, rank=rank, world_size=world_size,
                         num_workers=setup.num_workers, decode="bytes", require_label=False)  # fmt: skip
    feats: list[np.ndarray] = []
    idx: list[int] = []
    labels: list[int] = []
    keys: list[str] = []
    rows = 0

    def flush() -> None:
        nonlocal k, feats, idx, labels, keys, rows
        if not idx:
            return
        write_chunk(chunk_path(out, rank, k), np.concatenate(feats), idx, labels, keys, [])
        rows += len(idx)
        k += 1
        feats, idx, labels, keys = [], [], [], []

    with progress_bar(None, progress, f"rank {rank}") as bar:
        for images, labs, batch_keys, indices in loader:
            keep = [i for i, key in enumerate(batch_keys) if key not in done_keys]
            bar.update(len(batch_keys))
            if not keep:
                continue
            images = images if len(keep) == len(batch_keys) else images[keep]
            feats.append(setup.runner(images).cpu().numpy().astype(np_dtype))
            idx += [int(indices[i]) for i in keep]
            labels += [int(labs[i]) for i in keep]
            keys += [str(batch_keys[i]) for i in keep]
            if len(idx) >= chunk_size:
                flush()
        flush()
    skipped = [{"index": -1, "input": r.get("key") or r.get("url"), "error": f"{r.get('kind')}: {r.get('error')}"}
               for r in getattr(loader, "skipped", [])]  # fmt: skip
    if skipped and on_error == "raise":
        raise ImageError(f"cannot read {len(skipped)} shard sample(s); first: {skipped[0]['input']}: "
                         f"{skipped[0]['error']}")  # fmt: skip
    if skipped:
        write_json(skipped_path(out, rank), skipped)
    return {"chunks": k, "rows_written": rows, "skipped": len(skipped)}


def merge_features(out_dir: str | os.PathLike, *, _lock: bool = False) -> dict:
    """Merge every rank's chunks into ``features.npy`` / ``indices.npy`` / ``labels.npy`` / ``inputs.txt`` in input
    order (each input exactly once, checked), plus ``skipped.json``; ``meta.json`` records the merge last."""
    out = Path(out_dir)
    meta = read_meta(out)
    world_size = int(meta["world_size"])
    missing = [r for r in range(world_size) if not done_path(out, r).is_file()]
    if missing:
        raise RuntimeError(f"{out}: ranks {missing} have not finished; run them (same settings) before merging")
    lock = out / ".merge.lock"
    if _lock:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return {"merged_by": "another rank"}
    try:
        return _merge(out, meta, world_size)
    finally:
        if _lock:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _merge(out: Path, meta: dict, world_size: int) -> dict:
    paths = chunk_paths(out)
    indices, labels, inputs, skipped = [], [], [], []
    dim = None
    for path in paths:
        chunk = read_chunk(path, ("indices", "labels", "inputs", "skipped"))
        indices.append(chunk["indices"])
        labels.append(chunk["labels"])
        inputs += chunk["inputs"].tolist()
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
    if ordered:
        dup = np.flatnonzero(np.diff(all_idx[order]) == 0)
        if len(dup):
            raise RuntimeError(f"{out}: input {int(all_idx[order][dup[0]])} appears in more than one chunk")
    n_inputs = meta.get("n_inputs")
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
