"""`seer export`: a training run written as a checkpoint file any ``seer.load_trunk`` user can read; a fine-tuning
(supervised) run as a classifier with its head and class names (``seer.load_classifier``, transformers, timm).
`seer models`: the released SEER weights by name, and which of them are in the local caches."""

from __future__ import annotations

import argparse
import json
import sys

from seer.weights.load import load_classifier, load_trunk
from seer.weights.named import NAMED_WEIGHTS, SEER_LICENSE_URL
from seer.weights.read import cached_snapshot
from seer.weights.save import check_export_target, save_trunk

__all__ = ["cli_export", "cli_models"]


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
    # imported here: `seer models` (same module) starts without torch's distributed checkpointing
    from seer.train.checkpoint import read_classifier_state, read_newest, resolve_checkpoint

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


def _human(n: float) -> str:
    """``141333770 -> '141.3M'``, ``9.3e9 -> '9.32B'``."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def cli_models(argv: list[str] | None = None) -> int:
    """`seer models [--json]`: the released SEER weights ``seer.load_trunk`` / ``seer.load_classifier`` accept by
    name, with their trunk, size, preprocessing, licence, sources and whether a local cache holds them."""
    ap = argparse.ArgumentParser(prog="seer models", description=cli_models.__doc__)
    ap.add_argument("--json", action="store_true", help="print a JSON list (every field, every source URL)")
    args = ap.parse_args(argv)
    rows = []
    for entry in NAMED_WEIGHTS.values():
        row = entry.to_dict()
        # the local HF cache only: no request is made, so this is as fast offline as online
        row["cached"] = [label for label, repo in entry.hub_sources() if cached_snapshot(repo) is not None]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "kind", "trunk", "params", "fp32", "input", "sources", "cached")
    table = [header]
    for r in rows:
        pre = r["preprocess"]
        sources = [s for s, present in (("hf", r["hf_tried"]), ("timm", r["timm_name"]), ("vissl", True)) if present]
        table.append((
            r["name"], r["kind"], r["preset"], _human(r["params"]), f"{r['fp32_bytes'] / 1e9:.1f} GB",
            f"{pre['resolution']} px crop {pre['crop_pct']:g}", ",".join(sources), ",".join(r["cached"]) or "-",
        ))  # fmt: skip
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    print()
    print("Load one with seer.load_trunk(NAME) (classifiers: seer.load_classifier(NAME)); seer.extract_features and")
    print("model.init_from take the names too. An existing local path of that name wins; then the local HF cache")
    print("(the HF repository, then timm's), then a download from the HF hub, then timm's. Offline, nothing is")
    print("downloaded: get the VISSL file (`seer models --json` lists every URL) and pass its path.")
    notes = [f"  {r['name']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        print("Notes:")
        print("\n".join(notes))
    print(f"Licence of all of them: SEER licence, non-commercial research only ({SEER_LICENSE_URL}).")
    return 0
