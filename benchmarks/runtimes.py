"""CPU inference of a SEER trunk in the runtimes CPU users pick, side by side in one run.

For regnety_800mf and regnety_1_6gf (random weights; speed does not depend on them) at batch 16, 224 px, fp32:

- seer eager (``backend="torch"``: the trunk's oneDNN-fused conv + BN + ReLU kernels);
- ``torch.compile`` (inductor, ``freezing``: ``backend="compile"``);
- ONNX Runtime (CPU execution provider, all graph optimizations: ``backend="onnxruntime"``);
- OpenVINO (CPU, f32 precision hint: ``backend="openvino"``);

each measured through ``seer.features.backends.make_backend`` (the path ``extract_features`` runs), as images/s,
GFLOP/s (2 x the trunk's MACs) and share of the machine's fp32 ``torch.mm`` peak. Each runtime's features are
checked against eager torch (max error relative to the largest feature). Then end-to-end ``extract_features`` of
200 JPEGs (500x375, decode + resize + crop + forward) with regnety_800mf for every backend, and transformers'
``RegNetModel`` with its image processor, as its documentation shows, for the reference. A runtime that is not
installed is reported as such. ``backend="auto"``'s choice on this machine is recorded.

    python -m benchmarks.runtimes [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, measure_mm_peak, timeit, write_result

BACKENDS = ("torch", "compile", "onnxruntime", "openvino")
# opt-in bf16, measured where oneDNN has bf16 kernels (AVX512-BF16 / AMX): (row, backend, amp)
BF16_ROWS = (("torch_bf16", "torch", torch.bfloat16), ("openvino_bf16", "openvino", torch.bfloat16))
LABELS = {"torch": "seer eager", "compile": "torch.compile (inductor, freezing)", "onnxruntime": "ONNX Runtime (CPU)",
          "openvino": "OpenVINO (CPU, f32)", "torch_bf16": "seer eager, amp='bf16' (opt-in)",
          "openvino_bf16": "OpenVINO, bf16 hint (opt-in)"}  # fmt: skip


def _inference(preset: str, batch: int, resolution: int, repeat: int, peak: float) -> dict:
    from seer import hardware
    from seer.features.backends import installed, make_backend
    from seer.models.regnet import build_trunk, complexity, get_preset

    torch.manual_seed(0)
    trunk = build_trunk(get_preset(preset)).eval()
    x = torch.randn(batch, 3, resolution, resolution)
    gflop = 2 * complexity(preset, resolution)["macs"] * batch / 1e9
    out: dict = {}
    ref = None
    rows = [(name, name, None) for name in BACKENDS]
    if hardware.cpu_bf16_kernels():
        rows += list(BF16_ROWS)
    for name, kind, amp in rows:
        if not installed(kind):
            out[name] = {"status": "not installed"}
            continue
        try:
            backend = make_backend(kind, trunk, "avgpool", x, amp=amp)
        except Exception as exc:  # a runtime that fails on this model is reported, the others still run
            out[name] = {"status": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
            continue
        with torch.inference_mode():
            feats = backend(x)
            seconds = timeit(lambda b=backend: b(x), warmup=1, repeat=repeat, min_time=2.0)
        ref = feats if name == "torch" else ref
        err = float((feats - ref).abs().max() / ref.abs().max()) if ref is not None else None
        out[name] = {"status": "ok", "batch_seconds": seconds, "images_per_s": batch / seconds,
                     "gflops": gflop / seconds, "mm_peak_share": gflop / seconds / peak,
                     "setup_seconds": backend.setup_seconds, "max_rel_err_vs_torch": err}  # fmt: skip
        print(f"[runtimes] {preset} {name}: {batch / seconds:.1f} img/s, {gflop / seconds / peak:.0%} of mm peak, "
              f"set-up {backend.setup_seconds:.1f} s, err {err}", flush=True)  # fmt: skip
    return out


def _end_to_end(paths: list[str], seer_file: str, hf_dir: str, batch: int, repeat: int) -> dict:
    import seer
    from benchmarks.extract import _worker_hf
    from seer.features.backends import installed

    trunk = seer.load_trunk(seer_file)
    out: dict = {}
    ref = None
    for name in BACKENDS:
        if not installed(name):
            out[name] = {"status": "not installed"}
            continue

        def run(name=name):
            return seer.extract_features(paths, trunk, batch_size=batch, progress=False, backend=name)

        t0 = time.perf_counter()
        feats = run()  # includes the backend's set-up (export / compile), cached for the timed runs
        first = time.perf_counter() - t0
        seconds = timeit(run, warmup=0, repeat=repeat)
        ref = feats if name == "torch" else ref
        err = float(np.abs(feats - ref).max() / np.abs(ref).max())
        out[name] = {"status": "ok", "seconds": seconds, "images_per_s": len(paths) / seconds,
                     "first_call_seconds": first, "max_rel_err_vs_torch": err}  # fmt: skip
        print(f"[runtimes] end to end {name}: {len(paths) / seconds:.1f} img/s (first call {first:.1f} s)", flush=True)
    if importlib.util.find_spec("transformers") is not None:
        hf = _worker_hf(hf_dir, paths, batch, repeat)
        out["transformers"] = {"status": "ok", "seconds": hf["seconds"], "images_per_s": len(paths) / hf["seconds"]}
        print(f"[runtimes] end to end transformers: {len(paths) / hf['seconds']:.1f} img/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.extract import make_jpegs
    from seer.features.backends import choose
    from seer.models.regnet import build_trunk, get_preset
    from seer.weights import save_trunk

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="regnety_800mf only, 64 images, fewer repeats")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args(argv)
    presets = ["regnety_800mf"] if args.quick else ["regnety_800mf", "regnety_1_6gf"]
    repeat = 3 if args.quick else 5
    n_images = 64 if args.quick else args.images
    peak = measure_mm_peak()
    print(f"[runtimes] fp32 torch.mm peak {peak:.0f} GFLOP/s, {torch.get_num_threads()} threads", flush=True)
    results: dict = {"inference": {p: _inference(p, args.batch, args.resolution, repeat, peak) for p in presets}}
    with tempfile.TemporaryDirectory(prefix="seer-runtimes-") as tmp:
        torch.manual_seed(0)
        trunk = build_trunk(get_preset("regnety_800mf"))
        save_trunk(trunk, Path(tmp) / "model.safetensors")
        save_trunk(trunk, Path(tmp) / "hf", format="hf")
        paths = make_jpegs(Path(tmp) / "jpegs", n_images)
        results["end_to_end"] = _end_to_end(paths, str(Path(tmp) / "model.safetensors"), str(Path(tmp) / "hf"),
                                            args.batch, max(2, repeat // 2))  # fmt: skip
        auto = choose(trunk.eval(), "avgpool", torch.zeros(args.batch, 3, args.resolution, args.resolution),
                      n_images=10**5)  # fmt: skip
        results["auto_choice_for_100k_images"] = auto.as_dict()
    settings = {"batch": args.batch, "resolution": args.resolution, "precision": "fp32",
                "threads": torch.get_num_threads(), "jpegs": n_images, "presets": presets,
                "weights": "random (seed 0)"}  # fmt: skip
    payload = {"settings": settings, "machine": machine_info(), "mm_peak_gflops": peak, **results}
    lines = [
        "# CPU inference runtimes",
        "",
        f"fp32, batch {args.batch}, {args.resolution} px, {torch.get_num_threads()} threads; CPU "
        f"{payload['machine']['processor']}; fp32 torch.mm peak {peak:.0f} GFLOP/s. Features of every runtime are "
        "checked against eager torch (max error / max feature).",
        "",
        "| model | runtime | img/s | vs seer eager | share of mm peak | set-up (s) | max rel. err |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, rows in results["inference"].items():
        base = rows["torch"].get("images_per_s")
        for name in rows:
            r = rows[name]
            if r["status"] != "ok":
                lines.append(f"| {preset} | {LABELS[name]} | {r['status']} | | | | |")
                continue
            lines.append(f"| {preset} | {LABELS[name]} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x "
                         f"| {r['mm_peak_share']:.0%} | {r['setup_seconds']:.1f} "
                         f"| {r['max_rel_err_vs_torch']:.1e} |")  # fmt: skip
    e2e = results["end_to_end"]
    lines += ["", f"End to end, `extract_features` of {n_images} JPEGs (500x375) with regnety_800mf:", "",
              "| pipeline | img/s | vs transformers | first call (s, set-up included) |",
              "|---|---|---|---|"]  # fmt: skip
    hf = e2e.get("transformers", {}).get("images_per_s")
    for name in (*BACKENDS, "transformers"):
        r = e2e.get(name)
        if r is None or r["status"] != "ok":
            continue
        ratio = f"{r['images_per_s'] / hf:.2f}x" if hf else "-"
        label = "transformers RegNetModel + processor" if name == "transformers" else f"backend={name!r}"
        lines.append(f"| {label} | {r['images_per_s']:.1f} | {ratio} | {r.get('first_call_seconds', 0):.1f} |")
    a = results["auto_choice_for_100k_images"]
    lines += ["", f'`backend="auto"` for 100k images here: **{a["backend"]}** ({a["rule"]}).']
    write_result("runtimes", payload, "\n".join(lines) + "\n")
    return payload


if __name__ == "__main__":
    main()
