"""`make bench`: run every benchmark in one process after another, then gather benchmarks/RESULTS.md.

Each benchmark writes results/<name>.json and results/<name>.md; RESULTS.md is the machine, the library versions
and every table, with each figure beside its reference and target. `--quick` passes --quick to every benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import RESULTS_DIR, machine_info

ROOT = Path(__file__).resolve().parent
# Order: cheapest first, so a partial run still reports something useful.
BENCHMARKS = [
    "trunk",
    "multicrop",
    "loader",
    "extract",
    "runtimes",
    "knn",
    "linear",
    "memory",
    "startup",
    "pretrain_throughput",
]


def available() -> list[str]:
    names = [name for name in BENCHMARKS if (ROOT / f"{name}.py").exists()]
    # The GPU check needs CUDA (elsewhere it exits 3 after its CPU-side checks): listed only where torch sees a GPU,
    # so `make bench` on a CPU machine runs what it always ran.
    import torch

    if (ROOT / "gpu.py").exists() and torch.cuda.is_available():
        names.append("gpu")
    return names


def gather(names: list[str], failures: dict[str, str], seconds: dict[str, float]) -> Path:
    info = machine_info()
    lines = [
        "# seer benchmark results",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `make bench`.",
        "",
        "| machine | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items() if v is not None],
        "",
    ]
    for name in names:
        md = RESULTS_DIR / f"{name}.md"
        lines.append(f"## {name} ({seconds.get(name, 0):.0f} s)")
        lines.append("")
        if name in failures:
            lines += ["FAILED:", "", "```", failures[name].strip()[-2000:], "```", ""]
        elif md.exists():
            body = md.read_text().strip().splitlines()
            if body and body[0].startswith("# "):
                body = body[1:]
            lines += [*body, ""]
    out = ROOT / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    names = args.names or available()
    failures: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name in names:
        print(f"\n=== benchmark {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            module.main(["--quick"] if args.quick else [])
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            failures[name] = traceback.format_exc()
            print(failures[name], file=sys.stderr)
        seconds[name] = time.perf_counter() - t0
    out = gather(names, failures, seconds)
    (RESULTS_DIR / "run_all.json").write_text(json.dumps({"seconds": seconds, "failed": list(failures)}, indent=2))
    print(f"\nwrote {out}")
    return 1 if failures else 0


def cli_main(argv: list[str]) -> int:
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
