"""Feature files on disk: the layout ``extract_dataset`` / ``seer extract`` write, its writers and its readers.

Layout of an output directory (every file is written under a temporary name, then renamed, see ``seer.io``)::

    meta.json                     settings; gets a "merged" entry once the final files below are complete
    chunks/r00000_c000000.npz     one rank's chunk: features, indices, labels, inputs, skipped_*
    chunks/r00000.done.json       the rank finished (its summary)
    chunks/r00000.skipped.json    shard samples the rank could not read (shards only)
    features.npy  (or features.safetensors)   [rows, D], in input order (np.load(..., mmap_mode="r"), faiss)
    indices.npy   labels.npy   inputs.txt   skipped.json

``read_chunk`` is the one reader of chunks (resume and merge), ``load_feature_file`` the one reader of merged output.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seer.io import atomic_path, atomic_write

__all__ = [
    "CHUNKS",
    "chunk_path",
    "chunk_paths",
    "done_path",
    "skipped_path",
    "write_json",
    "read_meta",
    "write_chunk",
    "read_chunk",
    "remove_outputs",
    "write_merged",
    "load_feature_file",
]

CHUNKS = "chunks"
MERGED_FILES = ("features.npy", "features.safetensors", "indices.npy", "labels.npy", "inputs.txt", "skipped.json")


def chunk_path(out: Path, rank: int, k: int) -> Path:
    """The ``k``-th chunk of ``rank``."""
    return out / CHUNKS / f"r{rank:05d}_c{k:06d}.npz"


def chunk_paths(out: Path, rank: int | None = None) -> list[Path]:
    """The chunks on disk (of one rank, or of all), in rank then chunk order."""
    pattern = "r*_c*.npz" if rank is None else f"r{rank:05d}_c*.npz"
    return sorted((out / CHUNKS).glob(pattern))


def done_path(out: Path, rank: int) -> Path:
    """Written when ``rank`` has finished (its summary)."""
    return out / CHUNKS / f"r{rank:05d}.done.json"


def skipped_path(out: Path, rank: int) -> Path:
    """Shard samples ``rank`` could not read (shards have no input position, so they are not in a chunk)."""
    return out / CHUNKS / f"r{rank:05d}.skipped.json"


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str))


def read_meta(out: Path) -> dict:
    """The settings (and merge record) of an output directory."""
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{out}: no meta.json (not a seer features directory)")
    return json.loads(meta_path.read_text())


# ----------------------------------------------------------------------------------------------------------------
# Chunks
# ----------------------------------------------------------------------------------------------------------------
def write_chunk(path: Path, feats: np.ndarray, indices: Sequence[int], labels: Sequence[int], inputs: Sequence[str],
                skipped: Sequence[dict]) -> None:  # fmt: skip
    """One chunk: ``feats`` rows with their input positions, labels and names, and the inputs it skipped."""
    arrays = {
        "features": feats,
        "indices": np.asarray(indices, dtype=np.int64),
        "labels": np.asarray(labels, dtype=np.int64),
        "inputs": np.asarray(inputs, dtype=np.str_),
        "skipped_indices": np.asarray([s["index"] for s in skipped], dtype=np.int64),
        "skipped_inputs": np.asarray([s["input"] for s in skipped], dtype=np.str_),
        "skipped_errors": np.asarray([s["error"] for s in skipped], dtype=np.str_),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)


def read_chunk(path: Path, fields: Sequence[str] = ("features", "indices", "labels", "inputs", "skipped")) -> dict:
    """The ``fields`` of one chunk (only those are read): arrays, and ``"skipped"`` as ``{"index", "input",
    "error"}`` dicts."""
    out: dict[str, Any] = {}
    with np.load(path) as z:
        for name in fields:
            if name == "skipped":
                rows = zip(z["skipped_indices"], z["skipped_inputs"], z["skipped_errors"])
                out[name] = [{"index": int(i), "input": str(s), "error": str(e)} for i, s, e in rows]
            else:
                out[name] = z[name]
    return out


def remove_outputs(out: Path, rank: int) -> None:
    """Start over: ``rank``'s chunks and records, and the merged files."""
    for p in (out / CHUNKS).glob(f"r{rank:05d}*"):
        p.unlink()
    for name in MERGED_FILES:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


# ----------------------------------------------------------------------------------------------------------------
# Merged output
# ----------------------------------------------------------------------------------------------------------------
def write_merged(out: Path, *, format: str, dtype: np.dtype, dim: int, chunks: Sequence[Path], dest: np.ndarray,
                 indices: np.ndarray, labels: np.ndarray, inputs: Sequence[str],
                 skipped: Sequence[dict]) -> list[str]:  # fmt: skip
    """Write the merged files: row ``j`` of the chunks (in ``chunks`` order) goes to row ``dest[j]``; returns their
    names. ``.npy`` features are filled chunk by chunk into a memory map: the array never has to fit in memory."""
    rows = len(dest)

    def fill(array: np.ndarray) -> None:
        offset = 0
        for path in chunks:
            feats = read_chunk(path, ("features",))["features"]
            if len(feats):
                array[dest[offset : offset + len(feats)]] = feats
            offset += len(feats)

    if format == "npy":
        with atomic_path(out / "features.npy") as tmp:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, dim))
            fill(mm)
            mm.flush()
            del mm
    else:
        from safetensors.numpy import save

        feats = np.empty((rows, dim), dtype=dtype)
        fill(feats)
        tensors = {"features": feats, "indices": indices, "labels": labels}
        data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "seer-features"})
        atomic_write(out / "features.safetensors", data)
    atomic_write(out / "indices.npy", lambda f: np.save(f, indices), binary=True)
    atomic_write(out / "labels.npy", lambda f: np.save(f, labels), binary=True)
    atomic_write(out / "inputs.txt", "".join(f"{s}\n" for s in inputs))
    write_json(out / "skipped.json", list(skipped))
    features = "features.npy" if format == "npy" else "features.safetensors"
    return [features, "indices.npy", "labels.npy", "inputs.txt", "skipped.json"]


def load_feature_file(path: str | os.PathLike, *, mmap: bool = True) -> dict:
    """Read features written by ``extract_dataset`` / ``seer extract``.

    Args:
        path: the output directory, or its ``features.npy`` / ``features.safetensors``.
        mmap: memory-map ``features.npy`` instead of reading it (for arrays larger than memory).

    Returns:
        ``{"features": [N, D], "labels": [N] (-1 = none), "indices": [N] input positions, "inputs": list of N
        paths / keys, "skipped": [...], "class_names": [...] | None, "meta": {...}}``.
    """
    path = Path(path).expanduser()
    out = path if path.is_dir() else path.parent
    meta = read_meta(out)
    if "merged" not in meta:
        raise RuntimeError(f"{out}: the chunks have not been merged yet; run seer.features.merge_features({out!s})")
    result: dict[str, Any] = {"meta": meta, "class_names": meta.get("class_names")}
    if (path.is_dir() and meta["format"] == "safetensors") or path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        result.update(load_file(str(out / "features.safetensors")))
    else:
        result["features"] = np.load(out / "features.npy", mmap_mode="r" if mmap else None)
        result["indices"] = np.load(out / "indices.npy")
        result["labels"] = np.load(out / "labels.npy")
    result["inputs"] = (out / "inputs.txt").read_text().splitlines()
    result["skipped"] = json.loads((out / "skipped.json").read_text())
    return result
