"""Linear-probe evaluation of one checkpoint on one dataset, end to end: images -> features -> JSON.

    python eval/linear.py --checkpoint ckpt.safetensors --train /data/in1k/train --test /data/in1k/val \\
        --layers avgpool res4 --lrs 0.01 0.1 1.0 --epochs 28 --out runs/linear-in1k
    python eval/linear.py --features --train train.npz --test val.npz --out lin.json   # cached: `seer linear`

A grid of heads (learning rates x head types x layers) trains in one pass over the cached features; the head is
selected on a held-out split of train and retrained on all of train before the test split is read.
``--method logreg --Cs ... --n-per-class N`` runs scikit-learn logistic regression in low-shot settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__":  # a source checkout's `seer`, also when it is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seer.evaluation.suites import add_single_run_args, cached_features_cli, run_single  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (rc := cached_features_cli(argv, "seer.evaluation.linear")) is not None:
        return rc
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_single_run_args(p)
    p.add_argument("--method", choices=("sgd", "logreg"), default="sgd")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    p.add_argument("--weight-decays", type=float, nargs="+", default=[0.0])
    p.add_argument("--heads", nargs="+", default=["linear", "bn"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--Cs", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0])
    p.add_argument("--val-fraction", type=float, default=0.2)
    args = p.parse_args(argv)
    if args.method == "sgd":
        proto = {
            "name": "linear",
            "lrs": args.lrs,
            "weight_decays": args.weight_decays,
            "head_types": args.heads,
            "epochs": args.epochs,
            "val_fraction": args.val_fraction,
        }
    else:
        proto = {"name": "logreg", "Cs": args.Cs, "val_fraction": args.val_fraction}
    return run_single(args, proto, "linear")


if __name__ == "__main__":
    sys.exit(main())
