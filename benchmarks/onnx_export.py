"""Does every RegNetY preset export to ONNX and run in ONNX Runtime with seer's features? Time, size and peak memory.

Each preset is built with random weights (seed 0) in its own process, exported with ``export_onnx`` at a small
resolution (the graph's cost does not depend on it; the weights do), run in ONNX Runtime on a batch of 2 and
compared with eager torch (max error relative to the largest feature). Presets whose fp32 weights exceed
``--max-gb`` are skipped as not fitting this machine. Not part of ``make bench`` (minutes per large preset):

    python -m benchmarks.onnx_export [--presets regnety_800mf regnety_128gf] [--max-gb 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, write_result


def _one(preset: str, resolution: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch

    from seer.models.regnet import build_trunk, get_preset
    from seer.weights.onnx import export_onnx

    torch.manual_seed(0)
    trunk = build_trunk(get_preset(preset)).eval()
    x = torch.randn(2, 3, resolution, resolution)
    with torch.inference_mode():
        want = trunk(x).numpy()
    with tempfile.TemporaryDirectory(prefix="seer-onnx-") as tmp:
        t0 = time.perf_counter()
        path = export_onnx(trunk, Path(tmp) / f"{preset}.onnx", resolution=resolution, check=False)
        seconds = time.perf_counter() - t0
        files = {p.name: p.stat().st_size for p in Path(tmp).iterdir()}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": x.numpy()})[0]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"status": "ok", "export_seconds": seconds, "files": files, "max_rel_err": err, "peak_rss_gb": peak_gb}


def main(argv: list[str] | None = None) -> dict:
    from seer.models.regnet import PRESETS, complexity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--max-gb", type=float, default=6.0, help="skip presets with more fp32 weights than this")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_one(args.worker, args.resolution)))
        return {}
    results = {}
    for preset in args.presets:
        gb = complexity(preset, args.resolution)["params"] * 4 / 1e9
        if gb > args.max_gb:
            results[preset] = {"status": f"skipped: {gb:.1f} GB of fp32 weights > --max-gb {args.max_gb}"}
        else:
            cmd = [sys.executable, "-m", "benchmarks.onnx_export", "--worker", preset, "--resolution",
                   str(args.resolution)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines:
                results[preset] = json.loads(lines[-1])
            else:
                results[preset] = {"status": f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}
        results[preset]["weights_gb"] = gb
        print(f"[onnx_export] {preset}: {results[preset]}", flush=True)
    lines = [
        "# ONNX export of every preset",
        "",
        f"Random weights, exported at {args.resolution} px (dynamic batch), run in ONNX Runtime on a batch of 2 and "
        f"compared with eager torch; one process per preset; CPU {machine_info()['processor']}.",
        "",
        "| preset | fp32 weights (GB) | status | export (s) | files | max rel. err | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, r in results.items():
        if r["status"] != "ok":
            lines.append(f"| {preset} | {r['weights_gb']:.2f} | {r['status']} | | | | |")
            continue
        files = ", ".join(f"{k} ({v / 1e6:.0f} MB)" for k, v in r["files"].items())
        lines.append(f"| {preset} | {r['weights_gb']:.2f} | ok | {r['export_seconds']:.1f} | {files} | "
                     f"{r['max_rel_err']:.1e} | {r['peak_rss_gb']:.1f} |")  # fmt: skip
    write_result("onnx_export", {"settings": vars(args), "machine": machine_info(), "results": results},
                 "\n".join(lines) + "\n")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
