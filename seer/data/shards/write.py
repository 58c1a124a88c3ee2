"""Writing webdataset shards from a folder, a file list or a dataset (atomic, resumable, indexed)."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import webdataset as wds

from seer.data.sources import Source, encode_item, item_description, resolve_source
from seer.io import atomic_write

log = logging.getLogger("seer.data")

INDEX_NAME = "index.json"  # written next to the shards; read by seer.data.shards.read


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


def _prepare_output_dir(out: Path, prefix: str, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.iterdir())
    if not existing:
        return
    if not overwrite:
        shown = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise FileExistsError(
            f"output directory {str(out)!r} is not empty ({shown}); pass overwrite=True (--overwrite)"
        )
    # Remove the completion marker first, so an interrupted overwrite never looks like a complete old run.
    (out / INDEX_NAME).unlink(missing_ok=True)
    for pattern in (f"{prefix}-*.tar", f".{prefix}-*.tar.tmp", f".{INDEX_NAME}.*.tmp"):
        for p in out.glob(pattern):
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
) -> dict:
    """Write `source` as webdataset tar shards into `out_dir` and return the index (also saved as `index.json`).

    Args:
        source: an image folder (class subfolders -> labels 0..C-1 in sorted order; a flat folder is unlabeled),
            a CSV/TSV/TXT file list (`path[,label]`, labels may be integers or class names), or a torchvision-style
            dataset (`ds[i] -> (image, label)`; folder datasets without a transform are read from their files).
        out_dir: output directory; must be empty unless `overwrite=True` (which removes `<prefix>-*.tar` and the
            index there, nothing else).
        max_samples_per_shard, max_bytes_per_shard: a new shard starts when either limit is reached.
        shuffle, seed: write the samples in a seeded random order (keys stay the source indices).
        workers: processes reading (and optionally re-encoding) images; the parent only writes tar files.
        max_image_side: images whose longer side exceeds this are downscaled and re-encoded as JPEG; other images
            are stored byte for byte.
        jpeg_quality, image_format: encoding of re-encoded images and of images returned by a dataset
            (`image_format=None`: PNG up to 256 px, JPEG above).

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
    src = resolve_source(source)
    out = Path(out_dir).expanduser()
    _prepare_output_dir(out, prefix, overwrite)

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
    return index
