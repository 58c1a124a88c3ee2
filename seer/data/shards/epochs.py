"""The epoch layout of the training stream: every sample once per epoch, split over ranks and streams.

An *epoch* is all samples of the data once, in a seeded order:

1. the units (tar shards, or single image files) are permuted by ``(seed, epoch)`` and concatenated;
2. the concatenation is cut into ``world_size`` contiguous parts, one per rank, whose sizes differ by at most one
   sample (rank ``r`` gets positions ``[r N / W, (r + 1) N / W)``). A shard on a boundary is read by both ranks,
   each its own samples of it, so no sample is dropped or repeated whatever the shard sizes;
3. each rank's part is cut the same way into ``streams`` contiguous parts; a DataLoader worker reads whole
   streams, so the stream count, not the worker count, fixes the order;
4. each stream reads ``shuffle_buffer`` samples at a time and emits them in an order seeded by
   ``(seed, epoch, rank, stream, block)``.

A stream runs on into the next epoch without a break, and a batch takes its samples from one stream, so a batch can
straddle two epochs; every rank takes exactly one batch per step, so every rank runs the same number of steps.
Rank ``r``'s step ``j`` is the next batch of stream ``j % streams``. The position of a rank is therefore the step
and the number of samples each stream has consumed (``offsets``): a pure function of the step when no sample was
skipped, and saved in checkpoints to be exact when some were.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from webdataset.tariterators import base_plus_ext

__all__ = ["Layout", "count_tar_samples", "epoch_plan"]


def count_tar_samples(path: str | os.PathLike, max_member_bytes: int | None = None) -> tuple[int, str | None]:
    """Samples in a local tar shard, as webdataset groups them (consecutive members sharing a key), and the problem
    that stopped the count early (a truncated or empty file, or ``unreadable_shard``: not a regular file), if any.

    Reads member headers only (seeking over the data), so it is fast enough to run on every shard at start. A member
    over the member cap counts: reading it later skips its sample in its place. Extended headers over
    `max_member_bytes` (default: ``seer.data.limits``' cap) stop the count as ``bad_tar``.
    """
    from seer.data.images import open_regular_file
    from seer.data.limits import read_limits
    from seer.data.shards.read import _META_MEMBER, capped_tarinfo

    cap = max_member_bytes or read_limits().max_member_bytes
    try:
        f = open_regular_file(path)  # a FIFO would block here, a device never end
    except OSError:
        return 0, "unreadable_shard"
    n, last = 0, None
    try:
        with f, tarfile.open(fileobj=f, mode="r:*", tarinfo=capped_tarinfo(cap)) as tar:
            for info in tar:
                # the members the reader skips (webdataset's __meta__ / __index__/...), no more: a "__meta__.json"
                # is a sample to the reader, so it must take a position here too, or the shard's last sample is lost
                if not info.isreg() or _META_MEMBER.match(info.name):
                    continue
                prefix, _ = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix != last:
                    n, last = n + 1, prefix
    except (tarfile.TarError, EOFError, OSError) as exc:
        if n == 0 and "empty file" in str(exc):
            return 0, "empty_shard"
        return n, "bad_tar"
    if n == 0:  # tarfile stops quietly at some truncations: a non-empty file without a sample is a broken one
        return 0, "bad_tar" if os.path.getsize(path) > 0 else "empty_shard"
    return n, None


@dataclass(frozen=True)
class Layout:
    """Where every sample of every epoch goes: ``counts[u]`` samples in unit ``u`` (a shard or a file)."""

    counts: tuple[int, ...]
    world_size: int
    streams: int
    seed: int = 0
    shuffle_buffer: int = 1000
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.streams < 1:
            raise ValueError(f"world_size and streams must be >= 1, got {self.world_size}, {self.streams}")
        if any(c < 0 for c in self.counts):
            raise ValueError("unit sample counts must be >= 0")
        if self.total < self.world_size * self.streams:
            raise ValueError(
                f"{self.total} sample(s) cannot feed {self.world_size} rank(s) x {self.streams} stream(s): every "
                "stream needs at least one sample per epoch (use fewer data.workers / data.streams or more data)"
            )

    @cached_property
    def total(self) -> int:
        return int(sum(self.counts))

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the data and the layout (unit names and counts, streams, shuffle, seed); not the ranks."""
        h = hashlib.sha1()
        h.update(repr((self.counts, self.names, self.streams, self.seed, self.shuffle_buffer)).encode())
        return h.hexdigest()[:16]

    # -- sizes (the same every epoch) --------------------------------------------------------------------------------
    def rank_range(self, rank: int) -> tuple[int, int]:
        n, w = self.total, self.world_size
        return rank * n // w, (rank + 1) * n // w

    def stream_range(self, rank: int, stream: int) -> tuple[int, int]:
        """Epoch positions ``[a, b)`` of a stream in the concatenated (permuted) order."""
        a, b = self.rank_range(rank)
        m, v = b - a, self.streams
        return a + stream * m // v, a + (stream + 1) * m // v

    def stream_size(self, rank: int, stream: int) -> int:
        a, b = self.stream_range(rank, stream)
        return b - a

    # -- the order of one epoch ----------------------------------------------------------------------------------
    def unit_order(self, epoch: int) -> np.ndarray:
        """The permutation of the units in ``epoch``."""
        return np.random.default_rng([self.seed, epoch, 0x5EE7]).permutation(len(self.counts))

    def _epoch_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # the last epoch's (order, starts, ends), kept: a stream asks for many blocks of the same epoch
        cache = self.__dict__.get("_epoch_cache")
        if cache is None or cache[0] != epoch:
            order = self.unit_order(epoch)
            counts = np.asarray(self.counts, dtype=np.int64)[order]
            ends = np.cumsum(counts)
            cache = (epoch, order, ends - counts, ends)
            object.__setattr__(self, "_epoch_cache", cache)
        return cache[1], cache[2], cache[3]

    def pieces(self, epoch: int, rank: int, stream: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """The ``(unit, start, stop)`` pieces holding stream positions ``[lo, hi)`` of ``epoch``, in order."""
        a, _ = self.stream_range(rank, stream)
        order, starts, ends = self._epoch_arrays(epoch)
        g_lo, g_hi = a + lo, a + hi
        out = []
        i = int(np.searchsorted(ends, g_lo, side="right"))
        while i < len(order) and starts[i] < g_hi:
            s, e = max(g_lo, int(starts[i])), min(g_hi, int(ends[i]))
            if e > s:
                out.append((int(order[i]), s - int(starts[i]), e - int(starts[i])))
            i += 1
        return out

    def block_order(self, epoch: int, rank: int, stream: int, block: int, size: int) -> np.ndarray:
        """The order in which a stream emits the ``size`` samples of one shuffle block."""
        if self.shuffle_buffer <= 1:
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, rank, stream, block, 0xB10C]).permutation(size)

    # -- positions -----------------------------------------------------------------------------------------------
    def offsets_at_step(self, step: int, batch_size: int) -> list[int]:
        """Samples each stream has consumed after ``step`` steps when none was skipped."""
        v = self.streams
        return [(step // v + (1 if s < step % v else 0)) * batch_size for s in range(v)]

    def epochs_of(self, rank: int, offsets: Sequence[int]) -> list[float]:
        """The epoch (fractional) each stream of ``rank`` has reached."""
        return [o / self.stream_size(rank, s) for s, o in enumerate(offsets)]


def epoch_plan(layout: Layout, batch_size: int) -> dict:
    """How one epoch splits over the ranks: samples per rank and stream, steps per epoch, shards read per rank."""
    per_rank = [b - a for a, b in (layout.rank_range(r) for r in range(layout.world_size))]
    per_stream = [layout.stream_size(r, s) for r in range(layout.world_size) for s in range(layout.streams)]
    return {
        "samples": layout.total,
        "units": len(layout.counts),
        "world_size": layout.world_size,
        "streams_per_rank": layout.streams,
        "batch_size_per_rank": batch_size,
        "samples_per_rank": [min(per_rank), max(per_rank)],
        "samples_per_stream": [min(per_stream), max(per_stream)],
        "steps_per_epoch": layout.total / (batch_size * layout.world_size),
        "units_per_rank": len(layout.counts) / layout.world_size,
        "rule": "every sample once per epoch: contiguous parts of the permuted concatenation, sizes within one sample",
    }
