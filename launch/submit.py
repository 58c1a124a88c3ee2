"""Launch pretraining and evaluation on SLURM (or on this machine) with submitit: `seer launch` as a script.

    python launch/submit.py pretrain --config seer_rg256 --nodes 64 --gpus-per-node 8 \\
        --partition learn --timeout-min 4320 [--account A --qos Q ...] [key=value ...]
    python launch/submit.py pretrain --resume runs/seer_rg256            # resubmit a stopped run by hand
    python launch/submit.py pretrain --config tiny_cpu --local --tasks-per-node 2
    python launch/submit.py pretrain ... --dry-run                       # print the sbatch script, submit nothing
    python launch/submit.py eval --suite small --out runs/eval-small --local
    python launch/submit.py collect runs/eval-small                      # (re)build the table of an eval launch
    python launch/submit.py status runs/seer_rg256                       # submissions and attempts of a job dir

The code is ``seer.launch`` (``seer.launch.cli.main``); see docs/slurm.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a source checkout's `seer`, also when it is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seer.launch.cli import main as _main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="python launch/submit.py")


if __name__ == "__main__":
    sys.exit(main())
