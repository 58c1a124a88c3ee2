"""Shard sample counts at start-up: rank 0 reads ``index.json`` (or counts the tar headers) and broadcasts them.

Without this every rank would read every shard's metadata at once: with 512 ranks and 10,000 shards on a shared
file system that takes hours, and the ranks that finish first hit the collective timeout waiting for the others.
The data code imports nothing distributed, so the broadcast lives here.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch.distributed as dist

from seer.data.shards.train import CountedShards, count_shards

__all__ = ["MAX_COUNTED_SHARDS", "broadcast_shard_counts"]

# Counting more shards than this at every start is refused: write index.json once (`seer shards index PATTERN`).
MAX_COUNTED_SHARDS = 1000


def broadcast_shard_counts(urls: Any, env: Any, *, max_counted: int | None = MAX_COUNTED_SHARDS) -> CountedShards:
    """The `CountedShards` of the pattern `urls` on every rank of `env` (a ``DistEnv``), read by rank 0 only.

    Rank 0 expands the pattern and reads the counts from ``index.json`` or, for at most `max_counted` local shards
    without one, from their tar headers; one ``broadcast_object_list`` hands the result to the other ranks, which
    touch no shard file. An error on rank 0 (no such shard, too many shards without an index, remote shards without
    one) is raised on every rank, with rank 0's message, so no rank waits in a collective for a peer that failed.
    """
    if not env.distributed:
        return count_shards(urls, max_counted=max_counted)
    payload: list[Any] = [None]
    error: BaseException | None = None
    if env.rank == 0:
        try:
            payload[0] = count_shards(urls, max_counted=max_counted)
        except Exception as exc:  # noqa: BLE001 - every rank raises it after the broadcast
            error = exc
            try:
                pickle.dumps(exc)
                payload[0] = exc
            except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
                payload[0] = RuntimeError(f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(payload, src=0, device=env.device)
    if error is not None:
        raise error
    if isinstance(payload[0], BaseException):
        raise payload[0]
    return CountedShards(*payload[0])
