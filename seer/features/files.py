"""Feature files on disk: the layout ``extract_dataset`` / ``seer extract`` write, its writers and its readers.

Layout of an output directory (every file is written under a temporary name, then renamed, see ``seer.io``)::

    .seer-output.json             marks the directory as seer's (``seer.io.mark_output_dir``)
    meta.json                     settings; gets a "merged" entry once the final files below are complete
    chunks/r00000_c000000.npz     one rank's chunk: features, indices, labels, inputs, shards (shards only), skipped_*
    chunks/r00000.done.json       the rank finished (its summary)
    chunks/r00000.skipped.json    shard samples the rank could not read (shards only)
    features.npy  (or features.safetensors)   [rows, D], in input order (np.load(..., mmap_mode="r"), faiss)
    indices.npy   labels.npy   inputs.txt   skipped.json
    .merge.lock                   held (``flock``) by the process merging; the OS releases it if that process dies

Those names (``OWN_NAMES``) are all an extraction ever writes, removes or replaces in its directory: it writes into a
directory that holds anything else only when told to overwrite, and then touches nothing else. ``inputs.txt`` is
UTF-8 with ``surrogateescape``: a file name that is not UTF-8 (bytes on Linux) is written as its own bytes and read
back as the same ``str`` Python's ``os`` functions give, so the path opens.

``read_chunk`` is the one reader of chunks (resume and merge), ``load_feature_file`` the one reader of merged output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seer.io import OUTPUT_MARKER, atomic_path, atomic_write

__all__ = [
    "CHUNKS",
    "LOCK_NAME",
    "OWN_NAMES",
    "is_own_name",
    "is_features_meta",
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
LOCK_NAME = ".merge.lock"
MERGED_FILES = ("features.npy", "features.safetensors", "indices.npy", "labels.npy", "inputs.txt", "skipped.json")
# Every name an extraction writes at the top of its directory (the marker aside).
OWN_NAMES = ("meta.json", CHUNKS, LOCK_NAME, *MERGED_FILES)
# ``seer.io.atomic_path``'s temporary names: ".{name}.{8 random characters}.tmp"
_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
# The files of one rank in chunks/ (and their temporary names)
_RANK_FILE = r"r{rank:05d}(_c[0-9]{{6}}\.npz|\.done\.json|\.skipped\.json)"
# What identifies a features meta.json (also one written before the output marker existed)
_META_KEYS = ("model", "layer", "dtype", "world_size", "chunk_size", "format")


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


def is_own_name(name: str, *, marker: bool = True) -> bool:
    """``name`` (at the top of an output directory) is one an extraction writes: ``OWN_NAMES``, the output marker
    (unless ``marker=False``), or the temporary name of one of those while it is being written."""
    temp = _TEMP.match(name)
    name = temp.group("name") if temp else name
    return name in OWN_NAMES or (marker and name == OUTPUT_MARKER)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str))


def is_features_meta(meta: Any) -> bool:
    """``meta`` is the ``meta.json`` of a features directory (seer's own, any version)."""
    return isinstance(meta, dict) and all(k in meta for k in _META_KEYS)


def read_meta(out: Path) -> dict:
    """The settings (and merge record) of an output directory; a ``ValueError`` naming the file when it is not
    the ``meta.json`` of a features directory."""
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{out}: no meta.json (not a seer features directory)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc}); not a seer features directory, or damaged") from None
    if not is_features_meta(meta):
        raise ValueError(f"{meta_path} is not the meta.json of seer features (no {', '.join(_META_KEYS)})")
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Chunks
# ----------------------------------------------------------------------------------------------------------------
def write_chunk(path: Path, feats: np.ndarray, indices: Sequence[int], labels: Sequence[int], inputs: Sequence[str],
                skipped: Sequence[dict], shards: Sequence[str] | None = None) -> None:  # fmt: skip
    """One chunk: ``feats`` rows with their input positions, labels and names, the shard of each row (shards: a key
    is often unique only within its shard), and the inputs it skipped."""
    arrays = {
        "features": feats,
        "indices": np.asarray(indices, dtype=np.int64),
        "labels": np.asarray(labels, dtype=np.int64),
        "inputs": np.asarray(inputs, dtype=np.str_),
        "skipped_indices": np.asarray([s["index"] for s in skipped], dtype=np.int64),
        "skipped_inputs": np.asarray([s["input"] for s in skipped], dtype=np.str_),
        "skipped_errors": np.asarray([s["error"] for s in skipped], dtype=np.str_),
    }
    if shards is not None:
        urls, rows = np.unique(np.asarray(shards, dtype=np.str_), return_inverse=True)
        arrays["shard_urls"], arrays["shards"] = urls, rows.astype(np.int32)
    atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)


def read_chunk(path: Path, fields: Sequence[str] = ("features", "indices", "labels", "inputs", "skipped")) -> dict:
    """The ``fields`` of one chunk (only those are read): arrays, ``"skipped"`` as ``{"index", "input", "error"}``
    dicts, and ``"shards"`` as the shard URL of each row (``None`` in chunks of files, and in shard chunks written by
    seer before it recorded them)."""
    out: dict[str, Any] = {}
    with np.load(path) as z:
        for name in fields:
            if name == "shards":
                out[name] = z["shard_urls"][z["shards"]].tolist() if "shards" in z.files else None
            elif name == "skipped":
                rows = zip(z["skipped_indices"], z["skipped_inputs"], z["skipped_errors"])
                out[name] = [{"index": int(i), "input": str(s), "error": str(e)} for i, s, e in rows]
            else:
                out[name] = z[name]
    return out


def remove_outputs(out: Path, rank: int) -> None:
    """Start over: ``rank``'s chunks and records, and the merged files; nothing else (an unrelated file, even one
    in ``chunks/``, is left alone)."""
    own = re.compile(_RANK_FILE.format(rank=rank))
    chunks = out / CHUNKS
    if chunks.is_dir():
        for p in chunks.iterdir():
            temp = _TEMP.match(p.name)
            if own.fullmatch(temp.group("name") if temp else p.name) and not p.is_dir():
                with contextlib.suppress(FileNotFoundError):
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
    # surrogateescape: a file name that is not UTF-8 is written as its own bytes (see the module docstring)
    atomic_write(out / "inputs.txt", "".join(f"{s}\n" for s in inputs).encode("utf-8", "surrogateescape"))
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
    # split on "\n" only, not splitlines(): a file name may hold "\x0c", "\x1c", "\u2028" ...
    lines = (out / "inputs.txt").read_bytes().decode("utf-8", "surrogateescape").split("\n")
    result["inputs"] = lines[:-1] if lines[-1] == "" else lines
    result["skipped"] = json.loads((out / "skipped.json").read_text())
    return result
