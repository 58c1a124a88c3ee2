"""`seer export`: a training run written as a checkpoint file any ``seer.load_trunk`` user can read; a fine-tuning
(supervised) run as a classifier with its head and class names (``seer.load_classifier``, transformers, timm)."""

from __future__ import annotations

import argparse
import sys

from seer.train.checkpoint import read_classifier_state, resolve_checkpoint
from seer.weights.load import load_classifier, load_trunk
from seer.weights.save import save_trunk

__all__ = ["cli_export"]


def cli_export(argv: list[str] | None = None) -> int:
    """`seer export RUN_DIR OUT [--format seer|hf|timm|torchvision|onnx] [--trunk-only]`: write a run's trunk (and a
    fine-tuning run's classifier head)."""
    ap = argparse.ArgumentParser(prog="seer export", description=cli_export.__doc__)
    ap.add_argument("run_dir", help="a training run directory (latest checkpoint) or one checkpoint directory")
    ap.add_argument(
        "out", help="output path (a .safetensors file for --format seer, a directory for hf, a .onnx file for onnx)"
    )
    ap.add_argument("--format", default="seer", choices=["seer", "hf", "timm", "torchvision", "onnx"])
    ap.add_argument("--trunk-only", action="store_true", help="leave a fine-tuning run's classifier head out")
    args = ap.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.run_dir)  # a run or checkpoint directory only: never a hub id
        classifier = not args.trunk_only and bool(read_classifier_state(ckpt)[0])
        model = load_classifier(ckpt) if classifier else load_trunk(ckpt)
        save_trunk(model, args.out, format=args.format)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"seer export: {exc}", file=sys.stderr)
        return 1
    what = f"classifier ({model.n_classes} classes)" if classifier else "trunk"
    print(f"wrote {args.out} ({args.format}, {what}) from {ckpt}")
    return 0
