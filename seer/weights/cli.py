"""`seer export`: a training run written as a checkpoint file any ``seer.load_trunk`` user can read; a fine-tuning
(supervised) run as a classifier with its head and class names (``seer.load_classifier``, transformers, timm)."""

from __future__ import annotations

import argparse
import sys

from seer.train.checkpoint import read_classifier_state, read_newest, resolve_checkpoint
from seer.weights.load import load_classifier, load_trunk
from seer.weights.save import check_export_target, save_trunk

__all__ = ["cli_export"]


def cli_export(argv: list[str] | None = None) -> int:
    """`seer export RUN_DIR OUT [--format seer|hf|timm|torchvision|onnx] [--trunk-only] [--overwrite]`: write a run's
    trunk (and a fine-tuning run's classifier head)."""
    ap = argparse.ArgumentParser(prog="seer export", description=cli_export.__doc__)
    ap.add_argument("run_dir", help="a training run directory (latest checkpoint) or one checkpoint directory")
    ap.add_argument(
        "out",
        help="output path: a .safetensors file for --format seer, a .onnx file for onnx (an existing file is "
        "replaced), a directory for hf (new, empty, or a previous seer HF export, which is replaced; never a "
        "directory holding RUN_DIR)",
    )
    ap.add_argument("--format", default="seer", choices=["seer", "hf", "timm", "torchvision", "onnx"])
    ap.add_argument("--trunk-only", action="store_true", help="leave a fine-tuning run's classifier head out")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="--format hf: write into a non-empty directory that is not a previous seer HF export; seer's files "
        "(config.json, preprocessor_config.json, model.safetensors) replace those names, stale HF weight indexes "
        "and shards are removed, every other file is left alone",
    )
    args = ap.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.run_dir)  # a run or checkpoint directory only: never a hub id
        # Before the weights are read: a refused target costs nothing, and changes nothing. An HF directory must not
        # hold the run; a file may go into the run directory (runs/x/trunk.safetensors), not into the checkpoint.
        sources = (args.run_dir, ckpt) if args.format == "hf" else (ckpt,)
        check_export_target(args.out, args.format, overwrite=args.overwrite, sources=sources, flag="--overwrite")

        def read(ckpt):  # the head check and the weights from one checkpoint, even while keep_last rotates them
            classifier = not args.trunk_only and bool(read_classifier_state(ckpt)[0])
            return ckpt, classifier, load_classifier(ckpt) if classifier else load_trunk(ckpt)

        ckpt, classifier, model = read_newest(args.run_dir, read)
        save_trunk(model, args.out, format=args.format, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as exc:  # FileExistsError: OutputDirError
        print(f"seer export: {exc}", file=sys.stderr)
        return 1
    what = f"classifier ({model.n_classes} classes)" if classifier else "trunk"
    print(f"wrote {args.out} ({args.format}, {what}) from {ckpt}")
    return 0
