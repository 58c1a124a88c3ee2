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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import markdown_table, run_suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--features" in argv:
        from seer.evaluation.linear import cli_main

        argv.remove("--features")
        return cli_main(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file/dir/hub id, or a preset with --random-init")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--name", default="dataset")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--layers", nargs="+", default=["avgpool"])
    p.add_argument("--method", choices=("sgd", "logreg"), default="sgd")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
    p.add_argument("--weight-decays", type=float, nargs="+", default=[0.0])
    p.add_argument("--heads", nargs="+", default=["linear", "bn"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--Cs", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0])
    p.add_argument("--n-per-class", type=int, default=None, help="low-shot: train samples per class")
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=64, help="feature-extraction batch size")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    ckpt = {"name": Path(args.checkpoint).stem or args.checkpoint}
    ckpt.update({"preset": args.checkpoint} if args.random_init else {"source": args.checkpoint})
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
    if args.n_per_class:
        proto.update({"n_per_class": args.n_per_class, "n_tries": args.tries})
    suite = {
        "name": f"linear-{args.name}",
        "features": {
            "layers": args.layers,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
            "device": args.device,
        },
        "checkpoints": [ckpt],
        "datasets": [
            {
                "name": args.name,
                "train": args.train,
                "test": args.test,
                "resolution": args.resolution,
                "crop_pct": args.crop_pct,
            }
        ],
        "protocols": [proto],
    }
    payload = run_suite(suite, args.out)
    print(markdown_table(payload["rows"], suite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
