"""`seer export`: a pretraining run's trunk written as a checkpoint file any ``seer.load_trunk`` user can read."""

from __future__ import annotations

import argparse
import sys

from seer.train.checkpoint import resolve_checkpoint
from seer.weights.load import load_trunk
from seer.weights.save import save_trunk

__all__ = ["cli_export"]


def cli_export(argv: list[str] | None = None) -> int:
    """`seer export RUN_DIR OUT [--format seer|hf|timm]`: write a pretraining run's trunk for ``seer.load_trunk``."""
    ap = argparse.ArgumentParser(prog="seer export", description=cli_export.__doc__)
    ap.add_argument("run_dir", help="a pretraining run directory (latest checkpoint) or one checkpoint directory")
    ap.add_argument("out", help="output path (a .safetensors file for --format seer, a directory for hf)")
    ap.add_argument("--format", default="seer", choices=["seer", "hf", "timm"])
    args = ap.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.run_dir)  # a run or checkpoint directory only: never a hub id
        trunk = load_trunk(ckpt)
    except (FileNotFoundError, ValueError) as exc:
        print(f"seer export: {exc}", file=sys.stderr)
        return 1
    save_trunk(trunk, args.out, format=args.format)
    print(f"wrote {args.out} ({args.format}) from {ckpt}")
    return 0
