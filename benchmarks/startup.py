"""Start-up memory benchmark: peak RSS per rank from launch to the first training step, sharded start against the
whole-model start, on 4 gloo CPU ranks.

    python -m benchmarks.startup [--quick]

For each recipe (SwAV head included; synthetic data; the process stops at its first step, before any batch):

- ``whole``: every rank builds the whole model on the host first, then ``parallelize`` shards it (the path before
  issue 30; ``seer.train.loop.SHARDED_START = False``). Not run where 4 copies would not fit this machine's memory:
  then computed as the model + its shard + the interpreter baseline measured beside it;
- ``sharded``: the meta-device build, sharded, then each rank's shards initialized whole one tensor at a time.

Next to each: ``seer plan``'s start-up figures (``startup_memory``). Target: sharded <= 0.6x the model's fp32 size
per rank for RG-256. Seconds to the first step are noisy on a shared machine; memory figures are not.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
WORLD = 4
# Stops the run at its first step (os._exit: no teardown) and writes VmHWM, VmRSS and the seconds since launch.
_WORKER = """
import json, os, sys, time
t0 = time.time()
import seer.train.loop as loop
loop.SHARDED_START = sys.argv[1] == "sharded"
def first_step(self):
    d = {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
         if k in ("VmHWM", "VmRSS")}
    d["seconds"] = time.time() - t0
    json.dump(d, open(f"{sys.argv[2]}.{os.environ['RANK']}.json", "w"))
    os._exit(0)
loop._Data.__next__ = first_step
sys.exit(loop.cli_main(sys.argv[3:]))
"""


def _run(mode: str, recipe: str, tmp: Path) -> dict:
    """Peak RSS per rank (max over ranks) and seconds to the first step of ``recipe`` on ``WORLD`` gloo ranks."""
    script = tmp / "worker.py"
    script.write_text(_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"{recipe}-{mode}"
    args = ["--config", recipe, "data.source=synthetic", "data.image_size=224", "train.tensorboard=false",
            f"run_dir={tmp / f'run-{recipe}-{mode}'}"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), mode, str(out), *args],
            env=dict(
                os.environ,
                RANK=str(r),
                WORLD_SIZE=str(WORLD),
                LOCAL_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    records = []
    for r in range(WORLD):
        path = Path(f"{out}.{r}.json")
        if not path.is_file():
            raise RuntimeError(f"{recipe} {mode}: rank {r} did not reach its first step:\n{logs[r][-2000:]}")
        records.append(json.loads(path.read_text()))
    return {"peak_bytes": max(r["VmHWM"] for r in records), "seconds": max(r["seconds"] for r in records)}


def _baseline() -> int:
    """RSS of a process that has imported what a rank imports (torch, seer's loop, gloo not yet joined)."""
    code = "import seer.train.loop; print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[1]) * 1024


def measure(recipes: list[str]) -> list[dict]:
    from seer.config import load_config
    from seer.train.plan import startup_memory

    rows = []
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    base = _baseline()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for recipe in recipes:
            cfg = load_config(recipe, ["data.source=synthetic", "data.image_size=224"])
            s = startup_memory(cfg, WORLD)
            row = {"recipe": recipe, "model_bytes": s["model_bytes"], "plan": s, "baseline_bytes": base}
            whole_need = s["model_bytes"] + s["device_bytes"] + base
            if WORLD * whole_need < 0.8 * available:
                row["whole"] = _run("whole", recipe, tmp)
            else:
                row["whole"] = {"peak_bytes": whole_need, "seconds": None, "computed": True}
            row["sharded"] = _run("sharded", recipe, tmp)
            for mode in ("whole", "sharded"):
                row[mode]["ratio"] = row[mode]["peak_bytes"] / s["model_bytes"]
            rows.append(row)
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = [
        "# Start-up memory: peak RSS per rank up to the first step (4 gloo CPU ranks)",
        "",
        "| recipe | model fp32 | whole model first | sharded start | plan: shard + host working set | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, s, p = r["whole"], r["sharded"], r["plan"]
        how = "computed" if w.get("computed") else f"measured, {w['seconds']:.0f} s"
        target = "<= 0.6x: " + ("PASS" if s["ratio"] <= 0.6 else "MISS") if r["recipe"] == "seer_rg256" else ""
        lines.append(
            f"| {r['recipe']} | {r['model_bytes'] / GiB:.2f} GiB | {w['peak_bytes'] / GiB:.2f} GiB = {w['ratio']:.2f}x "
            f"({how}) | {s['peak_bytes'] / GiB:.2f} GiB = {s['ratio']:.2f}x ({s['seconds']:.0f} s) | "
            f"{p['device_bytes'] / GiB:.2f} + {p['host_bytes'] / GiB:.2f} GiB | {target} |"
        )
    base = rows[0]["baseline_bytes"] if rows else 0
    lines += ["", f"Each figure includes the rank's interpreter, torch and seer imports ({base / GiB:.2f} GiB here)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seer_rg32 only")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = measure(["seer_rg32"] if args.quick else ["seer_rg32", "seer_rg256"])
    payload = {"world_size": WORLD, "rows": rows, "target": {"rg256_sharded_ratio_max": 0.6},
               "seconds": time.time() - t0}  # fmt: skip
    md = _markdown(rows)
    from benchmarks.common import write_result

    write_result("startup", payload, md)
    return payload


if __name__ == "__main__":
    main()
