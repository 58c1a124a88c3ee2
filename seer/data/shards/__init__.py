"""Webdataset tar shards: write them (`write_shards`, `seer shards`), stream them for training (`train_loader`:
every sample once per epoch, exactly resumable; see `seer.data.shards.epochs`) and evaluation (`eval_loader`), and
survive bad data.

Layout written by `write_shards` (one directory):

    data-000000.tar ...  members `<key>.<jpg|png|...>` (the original bytes), `<key>.cls` (label, -1 if none),
                         `<key>.json` ({"index", "label", "path", "width", "height", ...}); key = 10-digit source index
    index.json           shard names, sample counts, total, class names; written last: its presence marks a complete run

Reading never imports torch.distributed: rank and world size are arguments. Every skipped sample is counted by a
per-worker `SkipLog` and its records travel to the main process together with the batches (through the DataLoader's
own queues), so `loader.stats` / `loader.skipped` are exact whatever the number of workers.
"""

from __future__ import annotations

from seer.data.shards.cli import cli_main
from seer.data.shards.read import (
    EvalLoader,
    SampleError,
    SkipLog,
    eval_loader,
    expand_urls,
    make_nodesplitter,
    read_index,
    verify_shards,
)
from seer.data.shards.train import TrainLoader, shard_counts, train_loader
from seer.data.shards.write import write_shards

__all__ = [
    "write_shards",
    "expand_urls",
    "read_index",
    "train_loader",
    "eval_loader",
    "TrainLoader",
    "EvalLoader",
    "SkipLog",
    "SampleError",
    "verify_shards",
    "make_nodesplitter",
    "shard_counts",
    "cli_main",
]
