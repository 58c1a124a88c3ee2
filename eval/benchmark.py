"""Frozen-feature benchmark suites: datasets x protocols x checkpoints -> a markdown table, JSON and a plot.

    python eval/benchmark.py --suite small --out runs/eval-small
    python eval/benchmark.py --suite imagenet1k --set IMAGENET_DIR=/data/imagenet \\
        --checkpoint rg32=/ckpt/seer_rg32.safetensors --out runs/eval-in1k

The same command as `seer eval-suite`; the code (the suite language, features, protocols, table, plot) is
``seer.evaluation.suites``. See docs/evaluation.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a source checkout's `seer`, also when it is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seer.evaluation.suites import main as _main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="python eval/benchmark.py")


if __name__ == "__main__":
    sys.exit(main())
