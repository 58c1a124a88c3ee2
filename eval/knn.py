"""kNN evaluation of one checkpoint on one dataset (DINO protocol), end to end: images -> features -> JSON.

    python eval/knn.py --checkpoint ckpt.safetensors --train /data/in1k/train --test /data/in1k/val \\
        --resolution 224 --layers avgpool res4 --out runs/knn-in1k
    python eval/knn.py --features --train train.npy --test val.npy --out knn.json    # cached features: `seer knn`

Image folders (class subfolders) or webdataset shards; ``--checkpoint`` takes anything ``seer.load_trunk`` reads,
or a preset name with ``--random-init`` for a random-weights baseline. Features are cached in OUT/features and the
result (every setting) is written to OUT/results.json, results.md and results.png (see seer.evaluation.suites).
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
    if (rc := cached_features_cli(argv, "seer.evaluation.knn")) is not None:
        return rc
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_single_run_args(p)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--clamp-k", action="store_true")
    args = p.parse_args(argv)
    proto = {"name": "knn", "ks": args.ks, "temperature": args.temperature, "clamp_k": args.clamp_k}
    return run_single(args, proto, "knn")


if __name__ == "__main__":
    sys.exit(main())
