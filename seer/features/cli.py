"""`seer extract`: features of a folder, file list or shards written to files on disk (``extract_dataset``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from seer.data.images import INTERPOLATIONS
from seer.features.dataset import extract_dataset, merge_features
from seer.features.runner import DEFAULT_MODEL, LAYERS
from seer.logs import configure_logging

__all__ = ["cli_main"]


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def cli_main(argv: Sequence[str] | None = None) -> int:
    """`seer extract SOURCE OUT_DIR [options]`: features of a folder, file list or shards to files on disk."""
    p = argparse.ArgumentParser(
        prog="seer extract",
        description="Extract features of an image folder (class subfolders -> labels), a CSV/TXT file list "
        "(path[,label]) or webdataset shards into OUT_DIR: features.npy (or .safetensors), labels.npy, indices.npy, "
        "inputs.txt. OUT_DIR must be new, empty or a previous extraction (a directory holding other files needs "
        "--overwrite, which replaces only the files extract writes there). Resumable: rerun the same command after "
        "an interruption (refused if the settings or the model's weights changed). Multi-process: run one command "
        "per rank with --rank/--world-size (defaults from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS); the last "
        "rank to finish merges.",
    )
    p.add_argument("source", help="image folder, .csv/.txt file list, or shards (.tar, brace pattern)")
    p.add_argument("out_dir", help="output directory")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint path, run directory, HF hub id, or released SEER weights by name (seer-rg32 ...: "
        f"`seer models` lists them) (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--layer", default="avgpool", choices=LAYERS)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast dtype (CUDA)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "compile", "onnxruntime", "openvino"],
        help="who runs the trunk (auto: a short probe for 5000+ images on CPU; see docs/features.md)",
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalize the features")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored feature dtype")
    p.add_argument("--format", default="npy", choices=["npy", "safetensors"], help="merged features file format")
    p.add_argument("--chunk-size", type=int, default=4096, help="rows per chunk (the unit of resumption)")
    p.add_argument("--workers", type=int, default=None, help="decoding worker processes")
    p.add_argument("--rank", type=int, default=_env_int("RANK", "SLURM_PROCID", default=0))
    p.add_argument("--world-size", type=int, default=_env_int("WORLD_SIZE", "SLURM_NTASKS", default=1))
    p.add_argument("--no-merge", action="store_true", help="do not merge (run `--merge-only` later)")
    p.add_argument("--merge-only", action="store_true", help="only merge the chunks already written")
    p.add_argument("--on-error", default="skip", choices=["skip", "raise"], help="unreadable images")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in OUT_DIR (also: write into a directory holding other files; only the files extract "
        "writes are removed or replaced, nothing else)",
    )
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", default=None, choices=sorted(INTERPOLATIONS))
    p.add_argument("--resize-mode", default=None, choices=["shorter", "warp"])
    p.add_argument(
        "--exact",
        action="store_true",
        help="decode JPEGs in full and resize every image whole: timm's / torchvision's / HF's pixels exactly "
        "(default: large JPEGs are draft-decoded and pre-reduced, faster; see docs/features.md, 'Exact or fast')",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    configure_logging()  # the backend probe's choice (seer.features) and the loader's warnings (seer.data)
    try:
        if args.merge_only:
            merged = merge_features(args.out_dir, flag="--overwrite")
            print(json.dumps({"merged": merged}))
            return 0
        summary = extract_dataset(
            args.source, args.out_dir, args.model, rank=args.rank, world_size=args.world_size, layer=args.layer,
            batch_size=args.batch_size, device=args.device, normalize=args.normalize, dtype=args.dtype,
            chunk_size=args.chunk_size, num_workers=args.workers, on_error=args.on_error,
            merge=False if args.no_merge else "auto", format=args.format,
            progress=False if args.no_progress else None, amp=args.amp, overwrite=args.overwrite, backend=args.backend,
            flag="--overwrite", exact=args.exact,
            **{k: v for k, v in (("resolution", args.resolution), ("crop_pct", args.crop_pct),
                                 ("interpolation", args.interpolation), ("resize_mode", args.resize_mode))
               if v is not None},
        )  # fmt: skip
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"seer extract: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str))
    return 0
