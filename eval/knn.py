"""kNN evaluation of one checkpoint on one dataset (DINO protocol), end to end: images -> features -> JSON.

    python eval/knn.py --checkpoint ckpt.safetensors --train /data/in1k/train --test /data/in1k/val \\
        --resolution 224 --layers avgpool res4 --out runs/knn-in1k
    python eval/knn.py --features --train train.npy --test val.npy --out knn.json    # cached features: `seer knn`

Image folders (class subfolders) or webdataset shards; ``--checkpoint`` takes anything ``seer.load_trunk`` reads,
or a preset name with ``--random-init`` for a random-weights baseline. Features are cached in OUT/features and the
result (every setting) is written to OUT/results.json, results.md and results.png (see eval/benchmark.py).
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
        from seer.evaluation.knn import cli_main

        argv.remove("--features")
        return cli_main(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file/dir/hub id, or a preset with --random-init")
    p.add_argument("--random-init", action="store_true", help="--checkpoint is a preset name: random weights")
    p.add_argument("--train", required=True, help="train image folder or shard pattern")
    p.add_argument("--test", required=True, help="test image folder or shard pattern")
    p.add_argument("--name", default="dataset")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--layers", nargs="+", default=["avgpool"])
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--n-per-class", type=int, default=None, help="few-shot: train samples per class")
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--clamp-k", action="store_true")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    ckpt = {"name": Path(args.checkpoint).stem or args.checkpoint}
    ckpt.update({"preset": args.checkpoint} if args.random_init else {"source": args.checkpoint})
    proto = {"name": "knn", "ks": args.ks, "temperature": args.temperature, "clamp_k": args.clamp_k}
    if args.n_per_class:
        proto.update({"n_per_class": args.n_per_class, "n_tries": args.tries})
    suite = {
        "name": f"knn-{args.name}",
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
