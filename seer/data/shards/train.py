"""The training stream: every sample once per epoch (``seer.data.shards.epochs``), exactly resumable.

Sources: webdataset tar shards (any URL ``expand_urls`` accepts; sample counts from ``index.json`` or, for local
shards without one, counted from the tar headers), or plain images (a folder or a list file: each file is a unit,
so an epoch is a full permutation).

Workers: DataLoader worker ``k`` of ``n`` runs the streams ``s`` with ``s % n == k`` and hands the main process one
batch of each of them per request (a "bundle"); the main process emits rank step ``j`` from stream ``j % streams``.
The order therefore depends on the stream count, never on the worker count, and resuming with more or fewer
workers sees the same samples. Augmentation RNGs are seeded per sample from ``(seed, epoch, rank, stream,
position)``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.utils import make_seed

from seer.data.images import open_regular_file
from seer.data.limits import read_limits
from seer.data.shards.epochs import Layout, count_tar_samples, epoch_plan
from seer.data.shards.read import (
    SampleError,
    SkipLog,
    _check_rank,
    _identity,
    _LoaderBase,
    _Prepare,
    expand_urls,
    is_local_url,
    read_index,
    shard_samples,
)
from seer.data.shards.write import INDEX_NAME
from seer.data.sources import IMAGE_MEMBER_KEYS
from seer.data.transforms import DECODE_CACHE_MAX_ITEM, decode_cache_bytes
from seer.io import atomic_write

log = logging.getLogger("seer.data")

__all__ = [
    "TrainLoader",
    "train_loader",
    "shard_counts",
    "count_shards",
    "CountedShards",
    "index_shards",
    "image_units",
    "POSITION_VERSION",
]

POSITION_VERSION = 1


# ====================================================================================================================
# Units: what an epoch permutes


def _index_counts(urls: list[str]) -> dict[str, int] | None:
    """Sample counts from an ``index.json`` beside the shards (write_shards writes one), if it lists them all."""
    counts: dict[str, int] = {}
    for parent in sorted({os.path.dirname(u) for u in urls}):
        file = Path(parent) / INDEX_NAME
        if not file.is_file():
            return None
        try:
            index = read_index(file)
        except ValueError:
            return None
        counts.update({u: int(s["samples"]) for u, s in zip(index["urls"], index["shards"])})
    return counts if all(u in counts for u in urls) else None


class CountedShards(NamedTuple):
    """The shards of a pattern as `shard_counts` finds them: URLs, sample counts, problems found while counting."""

    urls: list[str]
    counts: list[int]
    problems: list[tuple[str, str]]


def index_command(urls: Any, expanded: list[str]) -> str:
    """The ``seer shards index`` command(s) that index the local shards `expanded` (of the pattern `urls`)."""
    by_dir: dict[str, set[str]] = {}
    for u in expanded:
        path = os.path.abspath(_local(u))
        by_dir.setdefault(os.path.dirname(path), set()).add(os.path.splitext(path)[1])
    commands = []
    for d, exts in sorted(by_dir.items()):  # an index covers one directory: one command per directory
        if len(by_dir) == 1 and isinstance(urls, str) and "::" not in urls and not os.path.isdir(urls):
            pattern = urls  # the user's own pattern
        else:
            pattern = os.path.join(d, "*" + (exts.pop() if len(exts) == 1 else ""))
        overwrite = " --overwrite" if os.path.exists(os.path.join(d, INDEX_NAME)) else ""  # one listing other shards
        commands.append(f"seer shards index {shlex.quote(pattern)}{overwrite}")
    return " && ".join(commands[:3]) + (f" (and {len(commands) - 3} more directories)" if len(commands) > 3 else "")


def shard_counts(
    urls: Any, problems: list | None = None, *, max_counted: int | None = None
) -> tuple[list[str], list[int]]:
    """The shard URLs of a pattern and their sample counts: from ``index.json`` when there is one, else counted
    from the tar headers of local shards (a truncated shard counts the samples before the cut, and is appended to
    ``problems`` as ``(kind, url)``). Remote shards need an index (``seer shards index`` writes one).

    Raises:
        ValueError: more than `max_counted` local shards have no index (before any is counted: counting them on
            a shared file system at every start is slow); the message gives the ``seer shards index`` command.
    """
    expanded = expand_urls(urls)
    local = all(is_local_url(u) for u in expanded)
    counts = _index_counts(expanded) if local else None
    if counts is not None:
        return expanded, [counts[u] for u in expanded]
    if not local:
        remote = next(u for u in expanded if not is_local_url(u))
        raise ValueError(
            f"{remote!r}: the training stream needs every shard's sample count to give each sample once per epoch; "
            f"shards that are not local files need an {INDEX_NAME} (write one with `seer shards index PATTERN`)"
        )
    if max_counted is not None and len(expanded) > max_counted:
        raise ValueError(
            f"{len(expanded)} shards without an {INDEX_NAME} listing them all: counting their samples at every start "
            f"reads every shard's tar headers (more than {max_counted} shards are refused); write the index once "
            f"with `{index_command(urls, expanded)}`"
        )
    if len(expanded) > 200:
        log.warning("counting the samples of %d shards without an %s (seer shards index writes one)", len(expanded),
                    INDEX_NAME)  # fmt: skip
    out = []
    for u in expanded:
        n, problem = count_tar_samples(_local(u))
        if problem is not None and problems is not None:
            problems.append((problem, u))
        out.append(n)
    return expanded, out


def count_shards(urls: Any, *, max_counted: int | None = None) -> CountedShards:
    """`shard_counts` of a pattern with its problems, as one value (what training broadcasts from rank 0)."""
    problems: list = []
    expanded, counts = shard_counts(urls, problems, max_counted=max_counted)
    return CountedShards(expanded, counts, [(str(k), str(u)) for k, u in problems])


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def index_shards(urls: Any, *, overwrite: bool = False, flag: str = "overwrite=True") -> dict:
    """Write an ``index.json`` beside existing local shards (made by webdataset's ``ShardWriter``, ``tar``, ...):
    their names and sample counts, counted from the tar headers. The training stream reads counts from it instead
    of counting at every start, and remote copies of the shards can use it. Returns the index. ``flag`` is how the
    caller gives ``overwrite``, named when an index exists (`seer shards index` passes "--overwrite")."""
    paths = [u[len("file://") :] if u.startswith("file://") else u for u in expand_urls(urls)]
    dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(dirs) != 1 or not all(is_local_url(p) for p in paths):
        raise ValueError(f"{urls!r}: an index covers local shards in one directory (found {len(dirs)} directories)")
    odd = [p for p in paths if not os.path.isfile(p)]
    if odd:
        raise ValueError(f"{odd[0]!r}: not a regular file (an index lists only regular shard files)")
    out = Path(dirs.pop())
    if (out / INDEX_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out / INDEX_NAME} exists (pass {flag} to replace it)")
    shards, problems = [], []
    for p in paths:
        n, problem = count_tar_samples(p)
        if problem is not None:
            problems.append({"name": os.path.basename(p), "problem": problem})
        shards.append({"name": os.path.basename(p), "samples": n, "bytes": os.path.getsize(p)})
    index = {
        "format": "seer-shards",
        "version": 1,
        "shards": shards,
        "num_shards": len(shards),
        "total": sum(s["samples"] for s in shards),
        "class_names": None,
        "num_classes": None,
        "source": str(urls),
        "source_kind": "indexed",
        "problems": problems,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(out / INDEX_NAME, json.dumps(index, indent=1) + "\n")
    return index


def image_units(path: str | os.PathLike) -> list[tuple[str, int]]:
    """``(path, label)`` for every image of a folder (class subfolders give labels) or a CSV/TXT file list."""
    from seer.data.sources import resolve_source

    source = resolve_source(os.fspath(path))
    return [(str(p), int(y)) for p, y in source.items]


class _TarUnits:
    """Reads ``[start, stop)`` of a shard's samples; a shard that ends early yields ``missing_sample`` errors, so
    positions never shift. Members over ``max_member_bytes`` are skipped as ``oversized_member`` samples.

    One per stream: a stream's consecutive blocks read consecutive pieces of a shard, so the shard it stopped in is
    kept open and the next block continues it (each shard byte read once per epoch, whatever the shard size over the
    shuffle buffer). A piece that does not continue it (a start, a resume, the next shard) opens its shard at
    ``start``: a local uncompressed shard by seeking over the headers before it (``seek_sample``), any other by
    reading from its first member.

    Small samples (members of at most ``DECODE_CACHE_MAX_ITEM`` bytes in all) of a piece read without a skip are kept,
    up to ``cache_bytes`` per stream (``SEER_DECODE_CACHE_MB``), and the next epoch's read of that piece replays them:
    the same samples in the same order, without parsing the tar again (a small-image recipe reads a few thousand
    samples every epoch). First come, no eviction; a piece with a sample over the caps is read from its shard."""

    def __init__(self, urls: list[str], max_member_bytes: int, cache_bytes: int = 0):
        self.urls, self.max_member_bytes = urls, max_member_bytes
        self._open: tuple[int, int, Iterator[dict]] | None = None  # (unit, next sample, its samples from there)
        self.cache_bytes, self.cache_used = int(cache_bytes), 0
        self._cache: dict[tuple[int, int, int], list[dict]] = {}  # (unit, start, stop) -> its samples

    def name(self, unit: int) -> str:
        return self.urls[unit]

    def read(self, unit: int, start: int, stop: int, skips: SkipLog) -> Iterator[dict | SampleError]:
        cached = self._cache.get((unit, start, stop))
        if cached is not None:
            yield from cached
            return
        url = self.urls[unit]
        if self._open is not None and self._open[:2] == (unit, start):
            samples = self._open[2]
        else:
            self.close()
            samples = shard_samples(url, skips, self.max_member_bytes, start=start)
        self._open = None
        i = start
        skipped = sum(skips.counts.values())
        keep: list[dict] | None = [] if self.cache_bytes > 0 else None
        size = 0
        while i < stop:
            sample = next(samples, None)
            if sample is None:
                break
            i += 1
            if keep is not None:
                n = _sample_bytes(sample)
                keep = keep if n is not None and n <= DECODE_CACHE_MAX_ITEM else None
                if keep is not None:
                    keep.append(sample)
                    size += n
            yield sample
        if i == stop:
            # Kept only when the whole piece came without a skip: a replay then yields exactly what a read would.
            if (
                keep is not None
                and sum(skips.counts.values()) == skipped
                and self.cache_used + size <= self.cache_bytes
            ):
                self._cache[(unit, start, stop)] = keep
                self.cache_used += size
            self._open = (unit, stop, samples)
            return
        for j in range(i, stop):
            yield SampleError("missing_sample", None, url, f"the shard ended before sample {j} (its count says {stop})")

    def close(self) -> None:
        """Close the shard kept open (its file, or its ``pipe:`` command)."""
        if self._open is not None:
            self._open[2].close()
            self._open = None


def _sample_bytes(sample: dict) -> int | None:
    """The bytes of a sample's members (None when one is not plain bytes, e.g. an ``OversizedMember``)."""
    total = 0
    for k, v in sample.items():
        if isinstance(v, (bytes, bytearray)):
            total += len(v)
        elif not (k.startswith("__") and isinstance(v, str)):
            return None
    return total


class _FileUnits:
    """Each image file is a unit of one sample: ``{"__key__": path, <ext>: bytes[, "cls": label]}``. Only regular
    files of at most ``max_file_bytes`` are read; others are skipped (``unreadable_shard``, ``oversized_file``)."""

    def __init__(self, items: list[tuple[str, int]], root: str, max_file_bytes: int):
        self.items, self.root, self.max_file_bytes = items, root, max_file_bytes

    def name(self, unit: int) -> str:
        return self.items[unit][0]

    def read(self, unit: int, start: int, stop: int, skips: SkipLog) -> Iterator[dict | SampleError]:
        path, label = self.items[unit]
        key = os.path.relpath(path, self.root) if self.root else path
        try:
            with open_regular_file(path) as f:  # a FIFO named .jpg would block, /dev/zero never end
                data = f.read(self.max_file_bytes + 1)
        except OSError as exc:
            yield SampleError("unreadable_shard", key, path, f"{type(exc).__name__}: {exc}")
            return
        if len(data) > self.max_file_bytes:
            why = (f"the file is over the cap of {self.max_file_bytes} bytes per image file (SEER_MAX_FILE_MB or "
                   "seer.data.limits.limits(max_file_bytes=...) raise it)")  # fmt: skip
            yield SampleError("oversized_file", key, path, why)
            return
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        sample: dict[str, Any] = {"__key__": key, "__url__": path, ext if ext in IMAGE_MEMBER_KEYS else "img": data}
        if label >= 0:
            sample["cls"] = str(label).encode("ascii")
        yield sample


# ====================================================================================================================
# One stream, inside a worker


class _Stream:
    """Batches of one stream of one rank, from raw position ``offset`` on (across epochs, forever)."""

    def __init__(self, loader: TrainLoader, units: Any, layout: Layout, stream: int, offset: int, skips: SkipLog):
        self.loader, self.units, self.layout, self.stream, self.skips = loader, units, layout, stream, skips
        self.rank = loader.rank
        self.size = layout.stream_size(self.rank, stream)
        self.offset = offset
        self._items = self._raw()

    def _raw(self) -> Iterator[tuple[int, int, dict | SampleError]]:
        """(epoch, position, sample or error) from ``self.offset`` on."""
        lay, rank, v, block = self.layout, self.rank, self.stream, max(1, self.loader.shuffle_buffer)
        epoch, q = divmod(self.offset, self.size)
        while True:
            k = q // block
            lo, hi = k * block, min((k + 1) * block, self.size)
            raw: list = []
            for unit, start, stop in lay.pieces(epoch, rank, v, lo, hi):
                raw += self.units.read(unit, start, stop, self.skips)
            if len(raw) != hi - lo:  # a unit yields exactly its piece; anything else is a bug, not bad data
                raise RuntimeError(f"stream {v}: read {len(raw)} samples for positions [{lo}, {hi})")
            order = lay.block_order(epoch, rank, v, k, hi - lo)
            for idx in range(q - lo, hi - lo):
                yield epoch, lo + idx, raw[order[idx]]
            raw.clear()
            q = hi
            if q == self.size:
                epoch, q = epoch + 1, 0

    def _prepare(self, epoch: int, pos: int, sample: dict) -> tuple:
        seed = make_seed(self.loader.seed, epoch, self.rank, self.stream, pos)
        prepare = self.loader._prepare
        if get_worker_info() is not None:  # a worker process: its global RNGs are ours
            import numpy as np

            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return prepare(sample)
        state = random.getstate()  # the main process: leave the caller's RNG state as it was
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            try:
                return prepare(sample)
            finally:
                random.setstate(state)

    def next_batch(self) -> dict:
        """The next batch: ``{"stream", "batch", "keys", "offset" (after it), "epochs": {epoch: [seen, skipped]}}``."""
        samples, keys, epochs = [], [], {}
        while len(samples) < self.loader.batch_size:
            epoch, pos, item = next(self._items)
            self.offset += 1
            tally = epochs.setdefault(epoch, [0, 0])
            try:
                if isinstance(item, SampleError):
                    raise item
                out, label = self._prepare(epoch, pos, item)
            except SampleError as exc:
                self.skips.handler(exc)
                tally[1] += 1
                continue
            samples.append((out, label))
            keys.append(item.get("__key__"))
            tally[0] += 1
        batch = self.loader.collate_fn(samples)
        return {"stream": self.stream, "batch": batch, "keys": keys, "offset": self.offset, "epochs": epochs}


class _Bundles(IterableDataset):
    """A worker's streams, one batch of each per item (the main process reorders them into steps)."""

    def __init__(self, loader: TrainLoader, offsets: list[int]):
        super().__init__()
        self.loader, self.offsets = loader, offsets

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        loader = self.loader
        skips = SkipLog(max_consecutive=loader.max_consecutive_skips)
        loader._prepare = _Prepare(loader.transform, loader.decode, loader.require_label, with_meta=False)
        loader._prepare.skips = skips
        layout = loader.layout
        owned = [s for s in range(layout.streams) if s % nw == wid]
        # units per stream: a tar stream keeps the shard it stopped in open for its next block
        mine = [_Stream(loader, loader._units(), layout, s, self.offsets[s], skips) for s in owned]
        while mine:
            yield [s.next_batch() for s in mine], skips.drain()


# ====================================================================================================================
# The loader


class TrainLoader(_LoaderBase):
    """The training stream of one rank: each ``iter()`` yields ``steps_per_epoch`` batches ``(images_or_crops,
    labels)``, continuing where the previous pass stopped; every sample once per epoch (see
    ``seer.data.shards.epochs``), the same step count on every rank.

    ``position()`` is the resumable state (step, per-stream offsets, per-epoch counts); pass it back as
    ``position=`` to continue exactly, at any number of workers. Without it, ``start_step`` derives the position
    (exact when no sample was skipped). ``last_keys`` holds the sample keys of the last batch; ``coverage()`` the
    per-epoch counts of this rank. Skips are in ``.stats`` and ``.skipped``.
    """

    keep_skipped = 1000

    def __init__(
        self,
        urls: Any = None,
        transform: Callable | None = None,
        *,
        batch_size: int,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        streams: int | None = None,
        shuffle_buffer: int = 1000,
        start_step: int = 0,
        position: dict | None = None,
        images: str | os.PathLike | None = None,
        collate_fn: Callable | None = None,
        decode: str = "auto",
        require_label: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: str | None = None,
        max_consecutive_skips: int = 1000,
        counted: CountedShards | None = None,
    ):
        _check_rank(rank, world_size, batch_size, num_workers)
        if (urls is None) == (images is None):
            raise ValueError("pass shard urls or images= (a folder or a file list), not both")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if streams is not None and streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        if images is not None:
            self.items = image_units(images)
            root = os.fspath(images)
            self.root = root if os.path.isdir(root) else os.path.dirname(os.path.abspath(root))
            self.urls, counts, names = None, [1] * len(self.items), tuple(os.path.relpath(p, self.root)
                                                                             for p, _ in self.items)  # fmt: skip
        else:
            self.items, self.root = None, ""
            if counted is not None:  # counted elsewhere (training counts on rank 0 and broadcasts the counts)
                self.urls, counts, problems = list(counted.urls), list(counted.counts), list(counted.problems)
            else:
                problems = []
                self.urls, counts = shard_counts(urls, problems)
            names = tuple(os.path.basename(u) for u in self.urls)
        self.transform, self.batch_size = transform, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.collate_fn = collate_fn or default_collate
        self.decode, self.require_label = decode, require_label
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.max_consecutive_skips = max_consecutive_skips
        self.limits = read_limits()  # the caps in force now, also in spawned workers
        _Prepare(transform, decode, require_label, False)  # validate arguments early
        if sum(counts) == 0:
            found = ", ".join(f"{k}: {u}" for k, u in problems[:3]) if images is None else ""
            raise ValueError(f"no readable sample in {urls if images is None else images!r}"
                             + (f" ({found})" if found else ""))  # fmt: skip
        self.layout = Layout(tuple(counts), world_size, streams or max(1, num_workers), seed, shuffle_buffer, names)
        if position is not None:
            self.resume_note = self._restore(position)
        else:
            self.step = start_step
            self.offsets = self.layout.offsets_at_step(start_step, batch_size)
            self.epoch_counts: dict[int, list[int]] = {}
            self.resume_note = (
                ""
                if start_step == 0
                else (
                    f"data position derived from step {start_step} (exact when no sample was skipped; another "
                    "world size or batch changes the order)"
                )
            )
        self.num_workers = min(num_workers, self.layout.streams)
        if num_workers > self.layout.streams:
            log.warning("%d workers for %d streams: %d worker(s) would idle; using %d", num_workers,
                        self.layout.streams, num_workers - self.layout.streams, self.num_workers)  # fmt: skip
        self.steps_per_epoch = steps_per_epoch or max(1, self.layout.rank_range(rank)[1] - self.layout.rank_range(
            rank)[0]) // batch_size  # fmt: skip
        self.last_keys: list = []
        self._it: Iterator | None = None
        self._queues: list[deque] = [deque() for _ in range(self.layout.streams)]
        self._reset_stats()
        if images is None:  # shards found truncated or empty while counting: reported once, as the readers would
            self._absorb([{"kind": k, "key": None, "url": u, "error": "found while counting samples"}
                          for k, u in problems])  # fmt: skip

    def __getstate__(self) -> dict:
        # what a spawned worker needs: not the main process's iterator, queued batches or skip records
        state = dict(self.__dict__)
        state.update(_it=None, _queues=[], skipped=[])
        return state

    # -- position ------------------------------------------------------------------------------------------------
    def position(self) -> dict:
        """This rank's resumable data position (plain data: it goes into the checkpoint)."""
        return {
            "version": POSITION_VERSION,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "streams": self.layout.streams,
            "batch_size": self.batch_size,
            "fingerprint": self.layout.fingerprint,
            "offsets": list(self.offsets),
            "epochs": self.layout.epochs_of(self.rank, self.offsets),
            "epoch_counts": {str(e): list(c) for e, c in sorted(self.epoch_counts.items())},
        }

    def _restore(self, pos: dict) -> str:
        """Adopt a saved position when it fits this data and layout; otherwise derive one from its step."""
        step = int(pos.get("step", 0))
        why = None
        if pos.get("version") != POSITION_VERSION:
            why = f"unknown position version {pos.get('version')!r}"
        elif pos.get("world_size") != self.world_size or pos.get("rank") != self.rank:
            why = f"saved at world size {pos.get('world_size')}, now {self.world_size}: the data order changes"
        elif pos.get("batch_size") != self.batch_size:
            why = f"batch {pos.get('batch_size')} per rank then, {self.batch_size} now: the data order changes"
        elif pos.get("streams") != self.layout.streams:
            streams = int(pos["streams"])  # keep the saved stream count: it, not the worker count, fixes the order
            self.layout = Layout(self.layout.counts, self.world_size, streams, self.seed, self.shuffle_buffer,
                                 self.layout.names)  # fmt: skip
        if why is None and pos.get("fingerprint") != self.layout.fingerprint:
            why = "the data (shard names or sample counts), the seed or the shuffle buffer changed"
        if why is not None:
            self.step = step
            self.offsets = self.layout.offsets_at_step(step, self.batch_size)
            self.epoch_counts = {}
            return f"data position not restored ({why}); continuing at step {step} from the derived position"
        self.step = step
        self.offsets = [int(o) for o in pos["offsets"]]
        self.epoch_counts = {int(e): [int(c[0]), int(c[1])] for e, c in pos.get("epoch_counts", {}).items()}
        return f"data position restored (step {step}, epoch {min(pos.get('epochs') or [0]):.3f})"

    def coverage(self) -> dict:
        """Per epoch of this rank: samples seen, skipped, and the epoch's size on this rank."""
        a, b = self.layout.rank_range(self.rank)
        return {e: {"seen": c[0], "skipped": c[1], "of": b - a, "complete": c[0] + c[1] == b - a}
                for e, c in sorted(self.epoch_counts.items())}  # fmt: skip

    def plan(self) -> dict:
        """How one epoch splits over ranks and streams (``epoch_plan``)."""
        return epoch_plan(self.layout, self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- reading -------------------------------------------------------------------------------------------------
    def _units(self) -> Any:
        if self.items is not None:
            return _FileUnits(self.items, self.root, self.limits.max_file_bytes)
        # the cap shared by the rank's streams (one _TarUnits each)
        return _TarUnits(self.urls, self.limits.max_member_bytes, decode_cache_bytes() // max(1, self.layout.streams))

    def _stream_iter(self) -> Iterator:
        bundles = _Bundles(self, list(self.offsets))
        if self.num_workers == 0:
            return iter(bundles)
        kwargs = {"prefetch_factor": self.prefetch_factor} if self.prefetch_factor is not None else {}
        if self.multiprocessing_context is not None:
            kwargs["multiprocessing_context"] = self.multiprocessing_context
        dl = DataLoader(bundles, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                        pin_memory=self.pin_memory, **kwargs)  # fmt: skip
        return iter(dl)

    def _next(self) -> Any:
        v = self.step % self.layout.streams
        while not self._queues[v]:
            if self._it is None:
                self._it = self._stream_iter()
            try:
                bundle, records = next(self._it)
            except StopIteration:  # cannot happen: streams are endless
                raise RuntimeError(f"rank {self.rank}: the training stream ended") from None
            self._absorb(records)
            for item in bundle:
                self._queues[item["stream"]].append(item)
        item = self._queues[v].popleft()
        self.step += 1
        self.offsets[v] = item["offset"]
        for e, (seen, skipped) in item["epochs"].items():
            c = self.epoch_counts.setdefault(int(e), [0, 0])
            c[0] += seen
            c[1] += skipped
        self.last_keys = item["keys"]
        self.stats["batches"] += 1
        self.stats["samples"] += len(item["keys"])
        return item["batch"]

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.steps_per_epoch):
            yield self._next()
        self.log_summary()

    def close(self) -> None:
        """Stop the workers (they are also stopped when the loader is garbage-collected)."""
        self._it = None


def train_loader(urls: Any, transform: Callable | None, **kwargs: Any) -> TrainLoader:
    """Training stream over shards (or, with ``urls=None, images=PATH``, an image folder or file list): every
    sample once per epoch, shards permuted per epoch and split over ranks and streams without replacement, the same
    step count on every rank, exactly resumable (``position()`` / ``position=``).

    ``transform(PIL.Image) -> tensor or list of crops``; with ``decode="bytes"`` it receives the raw bytes, and the
    default ``decode="auto"`` does that for seer's ``MultiCrop``. Default collation is ``default_collate``. Extra
    keywords: ``streams`` (default: ``num_workers`` or 1; fixes the order), ``position``, ``images``, ``decode``,
    ``require_label`` (False: missing labels become -1), ``pin_memory``, ``prefetch_factor``,
    ``multiprocessing_context``, ``max_consecutive_skips``, ``counted`` (the `CountedShards` of `urls`, counted
    elsewhere: this rank then reads no shard metadata); and ``batch_size`` (required), ``steps_per_epoch``,
    ``seed``, ``rank``, ``world_size``, ``num_workers``, ``shuffle_buffer``, ``start_step``, ``collate_fn``. See
    ``TrainLoader``.
    """
    return TrainLoader(urls, transform, **kwargs)


def describe(loader: TrainLoader) -> str:
    """One log line: the epoch's size and split."""
    p = loader.plan()
    lo, hi = p["samples_per_rank"]
    what = f"{p['units']} shards" if loader.urls is not None else "image files"
    return (
        f"data: {p['samples']} samples in {what}; an epoch is {p['steps_per_epoch']:.1f} steps at "
        f"{p['world_size']} rank(s) x {p['batch_size_per_rank']} ({lo}-{hi} samples per rank, "
        f"{p['streams_per_rank']} stream(s) per rank on {loader.num_workers} worker(s)); every sample once per epoch"
    )
