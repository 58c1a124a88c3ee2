"""Writing webdataset shards from a folder, a file list or a dataset (atomic, resumable, indexed)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import webdataset as wds

from seer.data.sources import Source, encode_item, item_description, resolve_source
from seer.io import (
    OUTPUT_MARKER,
    atomic_write,
    claim_output_files,
    clear_output_dir,
    mark_output_dir,
    prepare_output_dir,
)

log = logging.getLogger("seer.data")

INDEX_NAME = "index.json"  # written next to the shards; read by seer.data.shards.read
OUTPUT_KIND = "shards"  # the output marker's kind (seer.io.prepare_output_dir)


# ====================================================================================================================
# Writing


_POOL: dict[str, Any] = {}


def _pool_init(source: Source, options: dict) -> None:
    _POOL["source"], _POOL["options"] = source, options


def _pool_encode(position: int) -> tuple[int, dict | None, str | None]:
    try:
        return position, encode_item(_POOL["source"], position, **_POOL["options"]), None
    except Exception as exc:  # noqa: BLE001 - any unreadable item is recorded and skipped
        return position, None, f"{type(exc).__name__}: {exc}"


def _windowed_imap(pool: Any, order: list[int], workers: int) -> Iterator[tuple[int, dict | None, str | None]]:
    """Ordered `pool.imap` over windows of the work list: Pool.imap queues every task at once, so a slow writer
    would let encoded images pile up in memory; windows bound that to a few thousand images."""
    window = max(1024, workers * 256)
    chunk = max(1, min(64, min(window, len(order)) // (workers * 8)))
    for start in range(0, len(order), window):
        yield from pool.imap(_pool_encode, order[start : start + window], chunksize=chunk)


def _check_output_dir(out: Path, source: Any, overwrite: bool, flag: str = "overwrite=True") -> str:
    """``prepare_output_dir``'s state of ``out`` (refused: ``OutputDirError``, nothing changed); the source (a local
    folder or file list) is never inside it."""
    sources = [source] if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().exists() else []
    return prepare_output_dir(out, kind=OUTPUT_KIND, overwrite=overwrite, sources=sources,
                              flag=flag)  # fmt: skip


def _clear_output_dir(out: Path, prefix: str, state: str) -> None:
    """Remove a previous shards output's files (listed in its marker), the index first, so an interrupted rewrite
    never looks like a complete old run. In a directory of the user's (``overwrite``), also shard-named files that
    an unmarked earlier ``write_shards`` left (``<prefix>-NNNNNN.tar``, its temporaries): a `*.tar` glob or a stale
    index would read them with the new shards. Nothing else is removed."""
    out.mkdir(parents=True, exist_ok=True)
    clear_output_dir(out, OUTPUT_KIND, first=(INDEX_NAME,))
    if state != "foreign":
        return
    (out / INDEX_NAME).unlink(missing_ok=True)  # replaced at the end: until then the directory reads as incomplete
    stale = re.compile(rf"\.?{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?|\.{re.escape(INDEX_NAME)}\..*\.tmp")
    for p in out.iterdir():
        if stale.fullmatch(p.name) and p.is_file():
            p.unlink()


def write_shards(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "data",
    max_samples_per_shard: int = 1000,
    max_bytes_per_shard: float = 1e9,
    shuffle: bool = False,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    max_image_side: int | None = None,
    progress: bool = True,
    jpeg_quality: int = 90,
    image_format: str | None = None,
    flag: str = "overwrite=True",
) -> dict:
    """Write `source` as webdataset tar shards into `out_dir` and return the index (also saved as `index.json`).

    Args:
        source: an image folder (class subfolders -> labels 0..C-1 in sorted order; a flat folder is unlabeled),
            a CSV/TSV/TXT file list (`path[,label]`, labels may be integers or class names), or a torchvision-style
            dataset (`ds[i] -> (image, label)`; folder datasets without a transform are read from their files).
        out_dir: output directory: new, empty, or a previous `write_shards` output (marked by `.seer-output.json`),
            whose shards and index are replaced. Any other non-empty directory needs `overwrite=True`, which writes
            the shards and index beside the files there and removes only seer's earlier shards (`<prefix>-NNNNNN.tar`)
            and index; without it, `seer.io.OutputDirError` (a FileExistsError) is raised and nothing changes. A
            directory holding the source folder or file list is always refused.
        max_samples_per_shard, max_bytes_per_shard: a new shard starts when either limit is reached.
        shuffle, seed: write the samples in a seeded random order (keys stay the source indices).
        workers: processes reading (and optionally re-encoding) images; the parent only writes tar files.
        max_image_side: images whose longer side exceeds this are downscaled and re-encoded as JPEG; other images
            are stored byte for byte.
        jpeg_quality, image_format: encoding of re-encoded images and of images returned by a dataset
            (`image_format=None`: PNG up to 256 px, JPEG above).
        flag: how the caller gives `overwrite`, named in a refusal (`seer shards` passes "--overwrite").

    Unreadable items are skipped and listed in the index (`skipped`). Each shard is written under a hidden temporary
    name and renamed when closed; the index is written last (atomically), so an interrupted run leaves no partial
    shard under a final name and no index.
    """
    if not prefix or "/" in prefix or os.sep in prefix or prefix.startswith("."):
        raise ValueError(f"prefix {prefix!r} must be a plain, non-hidden file name prefix")
    if max_samples_per_shard < 1 or max_bytes_per_shard <= 0:
        raise ValueError("max_samples_per_shard and max_bytes_per_shard must be positive")
    if max_image_side is not None and max_image_side < 8:
        raise ValueError(f"max_image_side={max_image_side} is too small")
    out = Path(out_dir).expanduser()
    state = _check_output_dir(out, source, overwrite, flag)  # before the source is listed: a refusal costs nothing
    src = resolve_source(source)
    _clear_output_dir(out, prefix, state)

    def mark(names: list[str]) -> None:
        # The marker lists every file seer has (or is about to have) in the directory, the shard being written
        # included: a run killed half-way is recognised, and replaced, by the next one.
        if state == "foreign":
            claim_output_files(out, OUTPUT_KIND, [*names, INDEX_NAME])
        else:
            mark_output_dir(out, OUTPUT_KIND, [*names, INDEX_NAME])

    mark([f".{prefix}-000000.tar.tmp"])

    order = list(range(len(src)))
    if shuffle:
        random.Random(seed).shuffle(order)
    options = {"max_image_side": max_image_side, "jpeg_quality": jpeg_quality, "image_format": image_format}
    shards: list[dict] = []
    skipped: list[dict] = []
    writer: wds.ShardWriter | None = None

    def on_shard_closed(tmp_name: str) -> None:
        final = out / Path(tmp_name).name[1 : -len(".tmp")]
        os.replace(tmp_name, final)  # atomic: a shard under its final name is always complete
        shards.append({"name": final.name, "samples": writer.count, "bytes": final.stat().st_size})
        mark([s["name"] for s in shards] + [f".{prefix}-{len(shards):06d}.tar.tmp"])

    from tqdm.auto import tqdm

    workers = max(1, int(workers))
    pbar = tqdm(total=len(order), unit="img", desc=f"shards -> {out}", disable=not progress, dynamic_ncols=True)
    pool = None
    started = time.perf_counter()
    try:
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context().Pool(workers, initializer=_pool_init, initargs=(src, options))
            results: Iterable = _windowed_imap(pool, order, workers)
        else:
            _pool_init(src, options)
            results = map(_pool_encode, order)
        for position, sample, error in results:
            pbar.update(1)
            if error is not None:
                skipped.append({"index": position, "source": item_description(src, position), "error": error})
                if len(skipped) <= 5:
                    log.warning("skipping %s: %s", item_description(src, position), error)
                continue
            if writer is None:  # opened lazily: a source without a readable image must not produce an empty shard
                writer = wds.ShardWriter(
                    str(out / f".{prefix}-%06d.tar.tmp"),
                    maxcount=max_samples_per_shard,
                    maxsize=max_bytes_per_shard,
                    post=on_shard_closed,
                    verbose=0,
                    encoder=False,
                    mtime=0,  # reproducible tar bytes
                )
            writer.write(sample)
            if shards:
                pbar.set_postfix(shards=len(shards) + 1, refresh=False)
        if writer is not None:
            writer.close()
    except BaseException:
        # Interrupted or failed: drop the shard being written (never rename it) and write no index.
        tarstream = getattr(writer, "tarstream", None) if writer is not None else None
        if tarstream is not None:
            writer.post = None
            try:
                tarstream.close()
            finally:
                Path(writer.fname).unlink(missing_ok=True)
        raise
    finally:
        pbar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    if not shards:
        if state != "foreign":  # nothing written: the directory is left empty, as it was found (or created)
            (out / OUTPUT_MARKER).unlink(missing_ok=True)
        first = "; ".join(f"{s['source']}: {s['error']}" for s in skipped[:3])
        raise ValueError(f"no readable image in {src.description!r} ({len(skipped)} items failed: {first})")
    if skipped:
        log.warning("write_shards: skipped %d unreadable item(s) of %d (listed in the index)", len(skipped), len(src))
    last = len(shards) - 1
    index = {
        "format": "seer-shards",
        "version": 1,
        "prefix": prefix,
        "pattern": f"{prefix}-{{000000..{last:06d}}}.tar" if last > 0 else f"{prefix}-000000.tar",
        "shards": shards,
        "num_shards": len(shards),
        "total": sum(s["samples"] for s in shards),
        "class_names": src.class_names,
        "num_classes": len(src.class_names) if src.class_names is not None else None,
        "source": src.description,
        "source_kind": src.kind,
        "shuffled": bool(shuffle),
        "seed": seed,
        "max_samples_per_shard": max_samples_per_shard,
        "max_bytes_per_shard": max_bytes_per_shard,
        "max_image_side": max_image_side,
        "num_skipped": len(skipped),
        "skipped": skipped[:1000],
        "seconds": round(time.perf_counter() - started, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(out / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    if state != "foreign":  # (a foreign directory's marker may also list a shard temporary: harmless, never there)
        mark([s["name"] for s in shards])
    return index
