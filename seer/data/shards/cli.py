"""`seer shards`: write or verify shards."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from seer.data.shards.read import verify_shards
from seer.data.shards.write import write_shards
from seer.logs import configure_logging

# ====================================================================================================================
# CLI


def _dataset_from_spec(spec: str) -> Any:
    """`tv:NAME:ROOT[:SPLIT]` -> a torchvision dataset already on disk (never downloads)."""
    parts = spec.split(":", 3)
    if len(parts) < 3:
        raise ValueError(f"{spec!r}: expected tv:NAME:ROOT[:SPLIT], e.g. tv:CIFAR10:/data/cifar:train")
    import inspect

    import torchvision.datasets as tvd

    name, root = parts[1], parts[2]
    split = parts[3] if len(parts) > 3 else "train"
    cls = getattr(tvd, name, None)
    if cls is None:
        raise ValueError(f"torchvision.datasets has no dataset {name!r}")
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "split" in params:
        kwargs["split"] = split
    elif "train" in params:
        kwargs["train"] = split == "train"
    if "download" in params:
        kwargs["download"] = False
    return cls(root, **kwargs)


def _cli_verify(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seer shards verify",
        description="Read shards to the end and report bad shards and samples (and counts that differ from the index).",
    )
    parser.add_argument("shards", help="shard directory (with index.json), index.json, or a shard pattern; files "
                        "found by a glob or an index are read as local files, never run as pipe: commands")  # fmt: skip
    parser.add_argument("--decode", action="store_true", help="also decode every image")
    parser.add_argument("--labels", action="store_true", help="a sample without a .cls label is a problem (eval data)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--world-size", type=int, default=1, help="ranks of the epoch coverage report (default: 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank per step (default: 32)")
    parser.add_argument("--streams", type=int, default=1, help="streams per rank: data.streams or data.workers")
    args = parser.parse_args(argv)
    configure_logging()  # INFO: the log names each shell command run for a pipe: pattern (per-sample warnings off)
    try:
        report = verify_shards(args.shards, decode=args.decode, workers=args.workers, progress=not args.no_progress,
                               require_label=args.labels)  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        print(f"seer shards verify: error: {exc}", file=sys.stderr)
        return 2
    for p in report["problems"][:50]:
        print(f"{p['kind']}: shard={p['url']} key={p['key']}: {p['error']}")
    if len(report["problems"]) > 50:
        print(f"... and {len(report['problems']) - 50} more problems")
    unlabeled = f" ({report['unlabeled']} without a label: fine for pretraining)" if report["unlabeled"] else ""
    print(f"{len(report['shards'])} shards, {report['total']} good samples{unlabeled}, {len(report['problems'])} "
          "problem(s)")  # fmt: skip
    print(_coverage_line(report, args.world_size, args.batch_size, args.streams))
    return 0 if report["ok"] else 1


def _coverage_line(report: dict, world_size: int, batch_size: int, streams: int) -> str:
    """What one training epoch over these shards is at a world size (seer.data.shards.epochs)."""
    from seer.data.shards.epochs import Layout, epoch_plan

    counts = tuple(r["samples"] for r in report["shards"])
    try:
        plan = epoch_plan(Layout(counts, world_size, streams), batch_size)
    except ValueError as exc:
        return f"epoch coverage: {exc}"
    lo, hi = plan["samples_per_rank"]
    return (
        f"epoch coverage at {world_size} rank(s) x {batch_size} images x {streams} stream(s): each of the "
        f"{plan['samples']} good samples once per epoch ({lo}-{hi} per rank, {plan['units_per_rank']:.1f} shards "
        f"per rank), {plan['steps_per_epoch']:.1f} steps per epoch; none drawn twice, none left out"
    )


def _cli_index(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="seer shards index",
        description="Write index.json (shard names and sample counts) beside existing shards, e.g. ones made by "
        "webdataset's ShardWriter, so training needs not count them at every start.",
    )
    parser.add_argument("shards", help="a shard pattern, e.g. 'data/train-{000000..000099}.tar' or 'data/*.tar'")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing index.json (the only file this command writes)"
    )
    args = parser.parse_args(argv)
    from seer.data.shards.train import index_shards

    try:
        index = index_shards(args.shards, overwrite=args.overwrite, flag="--overwrite")
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"seer shards index: error: {exc}", file=sys.stderr)
        return 2
    for p in index["problems"]:
        print(f"{p['problem']}: {p['name']}")
    print(f"indexed {index['total']} samples in {index['num_shards']} shards")
    return 0


def cli_main(argv: Sequence[str] | None = None) -> int:
    """`seer shards SOURCE OUT_DIR [options]`: write webdataset shards (see `write_shards`);
    `seer shards verify SHARDS [--decode]`: check them (see `verify_shards`); `seer shards index PATTERN`: write
    an index.json for shards made elsewhere (see `index_shards`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "verify":
        return _cli_verify(argv[1:])
    if argv and argv[0] == "index":
        return _cli_index(argv[1:])
    parser = argparse.ArgumentParser(
        prog="seer shards",
        description="Write webdataset tar shards from an image folder (class subfolders -> labels), a CSV/TXT file "
        "list (path[,label]) or a torchvision dataset on disk (tv:NAME:ROOT[:SPLIT]). "
        "`seer shards verify SHARDS [--decode]` checks written shards; `seer shards index PATTERN` indexes shards "
        "written by other tools. Shard size: the defaults (about 1000 samples, at most 1 GB per shard) with "
        "data.shuffle_buffer at or above the samples per shard, so a training shuffle block mixes whole shards; "
        "training reads each shard byte once per epoch at any ratio (a stream keeps its shard open across blocks). "
        "`seer pretrain` needs an index.json (written here) above 1,000 shards.",
    )
    parser.add_argument("source", help="image folder, .csv/.tsv/.txt file list, or tv:NAME:ROOT[:SPLIT]")
    parser.add_argument(
        "out_dir", help="output directory: new, empty, or a previous `seer shards` output (replaced); see --overwrite"
    )
    parser.add_argument("--prefix", default="data", help="shard file prefix (default: data)")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard (default: 1000); keep "
                        "it at or below the training data.shuffle_buffer (recipes: 5000)")  # fmt: skip
    parser.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard (default: 1e9, whichever of "
                        "--max-samples and --max-bytes is reached first ends a shard)")  # fmt: skip
    parser.add_argument("--shuffle", action="store_true", help="write samples in a seeded random order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="reader processes")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUT_DIR that is not a previous `seer shards` output: seer's earlier shards "
        "(<prefix>-NNNNNN.tar) and index.json there are replaced, every other file is left alone",
    )
    parser.add_argument("--max-image-side", type=int, default=None, help="downscale + re-encode larger images")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    configure_logging()
    source: Any = _dataset_from_spec(args.source) if args.source.startswith("tv:") else args.source
    try:
        index = write_shards(
            source,
            args.out_dir,
            prefix=args.prefix,
            max_samples_per_shard=args.max_samples,
            max_bytes_per_shard=args.max_bytes,
            shuffle=args.shuffle,
            seed=args.seed,
            workers=args.workers,
            overwrite=args.overwrite,
            max_image_side=args.max_image_side,
            progress=not args.no_progress,
            jpeg_quality=args.jpeg_quality,
            flag="--overwrite",
        )
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"seer shards: error: {exc}", file=sys.stderr)
        return 2
    classes = f", {index['num_classes']} classes" if index["num_classes"] else ""
    skipped = f", {index['num_skipped']} unreadable item(s) skipped" if index["num_skipped"] else ""
    print(
        f"wrote {index['total']} samples in {index['num_shards']} shards ({index['pattern']}{classes}{skipped}) "
        f"to {args.out_dir} in {index['seconds']:.1f}s"
    )
    return 0
