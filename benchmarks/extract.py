"""End-to-end feature extraction on JPEG files: seer.extract_features vs transformers.RegNetModel + its processor.

Both read the same synthetic JPEG files (500x375), use the same weights (a SEER-like RegNetY-800MF trunk saved by
``seer.save_trunk(format="hf")``), the same batch size and resolution, on CPU, decoding included. Each pipeline
runs in its own process so its peak RSS is its own. A second measurement loads a regnety_32gf checkpoint and
reports the peak RSS it adds over the interpreter's baseline, as a multiple of the file size (target <= 1.3).

    python -m benchmarks.extract            # ~2 minutes on 2 cores
    python -m benchmarks.extract --quick    # smaller model and fewer images
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NAME = "extract"
TARGET_SPEEDUP = 1.8
TARGET_RSS_RATIO = 1.3


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[str]:
    """Photo-like synthetic JPEGs: smooth color fields plus texture, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(np.asarray(low, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Workers (one process per pipeline)
# ----------------------------------------------------------------------------------------------------------------
def _worker_seer(model_dir: str, paths: list[str], batch_size: int, repeat: int, num_workers: int | None) -> dict:
    import seer

    trunk = seer.load_trunk(model_dir)
    seer.extract_features(paths[:batch_size], trunk, batch_size=batch_size, progress=False)  # warm-up
    times, cpu, feats = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        feats = seer.extract_features(paths, trunk, batch_size=batch_size, progress=False, num_workers=num_workers)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"seconds": min(times), "cpu_seconds": min(cpu), "features": feats}


def _worker_hf(model_dir: str, paths: list[str], batch_size: int, repeat: int) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, RegNetModel

    # As the transformers documentation shows: processor(images, return_tensors="pt") -> model(**inputs).
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = RegNetModel.from_pretrained(model_dir).eval()

    def run(files: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(files), batch_size):
            images = [Image.open(p).convert("RGB") for p in files[start : start + batch_size]]
            inputs = processor(images, return_tensors="pt")
            with torch.no_grad():
                out.append(model(**inputs).pooler_output.flatten(1).numpy())
        return np.concatenate(out)

    run(paths[:batch_size])  # warm-up
    times, cpu, feats = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        feats = run(paths)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"seconds": min(times), "cpu_seconds": min(cpu), "features": feats}


def _worker_load(path: str) -> dict:
    import safetensors.torch  # noqa: F401 - imported before the baseline: we measure the weights, not the code
    import torch

    import seer
    import seer.weights  # noqa: F401

    # Warm-up: the first meta-device model loads ~150 MB of code (torch's meta kernels) once per process; that is
    # not a function of the checkpoint, so it belongs to the baseline.
    seer.build_trunk("regnety_200mf", device="meta")
    float(torch.ones(8).sum())
    baseline = _current_rss_mb()
    t0 = time.perf_counter()
    trunk = seer.load_trunk(path)
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # touch every weight, as a forward would
        checksum = float(sum(float(p.float().sum()) for p in trunk.parameters()))
    return {"baseline_mb": baseline, "peak_mb": _peak_rss_mb(), "load_seconds": seconds, "checksum": checksum}


def _worker_naive_load(path: str, preset: str) -> dict:
    """The usual way, for comparison: build the model, read the state dict, copy it in."""
    import torch
    from safetensors.torch import load_file

    import seer

    seer.build_trunk("regnety_200mf")
    float(torch.ones(8).sum())
    baseline = _current_rss_mb()
    trunk = seer.build_trunk(preset)
    trunk.load_state_dict(load_file(path))
    with torch.no_grad():
        float(sum(float(p.sum()) for p in trunk.parameters()))
    return {"baseline_mb": baseline, "peak_mb": _peak_rss_mb()}


def _run_worker(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        cmd = [sys.executable, "-m", "benchmarks.extract", "--worker", *args, "--out", out]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
        result = json.loads(Path(out).read_text())
        if Path(out + ".npy").is_file():
            result["features"] = np.load(out + ".npy")
        return result
    finally:
        for path in (out, out + ".npy"):
            if os.path.exists(path):
                os.unlink(path)


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------
def measure_load_rss(preset: str = "regnety_32gf", workdir: str | os.PathLike | None = None,
                     naive: bool = False) -> dict:  # fmt: skip
    """Peak RSS added by ``seer.load_trunk`` of a ``preset`` checkpoint (random weights), over the file size."""
    import seer

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / f"{preset}.safetensors"
        trunk = seer.build_trunk(preset)
        seer.save_trunk(trunk, path)
        del trunk
        size_mb = path.stat().st_size / 2**20
        r = _run_worker(["load", str(path)])
        result = {
            "preset": preset,
            "file_mb": round(size_mb, 1),
            "baseline_mb": round(r["baseline_mb"], 1),
            "peak_mb": round(r["peak_mb"], 1),
            "added_mb": round(r["peak_mb"] - r["baseline_mb"], 1),
            "ratio": round((r["peak_mb"] - r["baseline_mb"]) / size_mb, 3),
            "load_seconds": round(r["load_seconds"], 2),
        }
        if naive:
            n = _run_worker(["naive_load", str(path), preset])
            result["naive_added_mb"] = round(n["peak_mb"] - n["baseline_mb"], 1)
            result["naive_ratio"] = round((n["peak_mb"] - n["baseline_mb"]) / size_mb, 3)
        return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.extract", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="regnety_400mf, 64 images, one repeat")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--preset", default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--skip-rss", action="store_true", help="skip the regnety_32gf loading measurement")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker_main(args)

    import torch

    import seer

    preset = args.preset or ("regnety_400mf" if args.quick else "regnety_800mf")
    n_images = args.images or (64 if args.quick else 200)
    repeat = args.repeat or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_jpegs(tmp / "jpegs", n_images)
        (tmp / "files.json").write_text(json.dumps(paths))
        torch.manual_seed(0)
        trunk = seer.build_trunk(preset)
        seer.save_trunk(trunk, tmp / "hf", format="hf")  # 224 px, crop 0.875, bicubic processor config
        common = [str(tmp / "hf"), str(tmp / "files.json"), str(args.batch_size), "1", "0"]
        # Alternate the two pipelines (one process per pass, warm-up excluded) and keep each one's best pass:
        # on a shared machine the load changes from minute to minute, and the best pass is the least disturbed.
        runs: dict[str, list[dict]] = {"hf": [], "seer": []}
        for _ in range(repeat):
            for kind in ("hf", "seer"):
                runs[kind].append(_run_worker([kind, *common]))
        hf = min(runs["hf"], key=lambda r: r["seconds"])
        ours = min(runs["seer"], key=lambda r: r["seconds"])
        hf["peak_mb"] = max(r["peak_mb"] for r in runs["hf"])
        ours["peak_mb"] = max(r["peak_mb"] for r in runs["seer"])
        # Contention-robust figure: CPU time per image of each pipeline run single-threaded in one process
        # (decoding included, no worker processes), on the first 64 files.
        (tmp / "files64.json").write_text(json.dumps(paths[:64]))
        single = [str(tmp / "hf"), str(tmp / "files64.json"), str(args.batch_size), "1", "1"]
        cpu_ms = {k: 1000 * _run_worker([k, *single])["cpu_seconds"] / min(64, n_images) for k in ("hf", "seer")}
        agree = float(np.mean(np.sum(ours["features"] * hf["features"], 1) / (
            np.linalg.norm(ours["features"], axis=1) * np.linalg.norm(hf["features"], axis=1))))  # fmt: skip
    ours_ips, hf_ips = n_images / ours["seconds"], n_images / hf["seconds"]
    speedup = ours_ips / hf_ips
    payload = {
        "preset": preset,
        "images": n_images,
        "image_size": [500, 375],
        "batch_size": args.batch_size,
        "resolution": 224,
        "seer_passes_s": [round(r["seconds"], 2) for r in runs["seer"]],
        "hf_passes_s": [round(r["seconds"], 2) for r in runs["hf"]],
        "seer_images_per_s": round(ours_ips, 2),
        "hf_images_per_s": round(hf_ips, 2),
        "speedup": round(speedup, 3),
        "target_speedup": TARGET_SPEEDUP,
        "seer_cpu_ms_per_image_1thread": round(cpu_ms["seer"], 2),
        "hf_cpu_ms_per_image_1thread": round(cpu_ms["hf"], 2),
        "cpu_speedup_1thread": round(cpu_ms["hf"] / cpu_ms["seer"], 3),
        "seer_peak_rss_mb": round(ours["peak_mb"], 1),
        "hf_peak_rss_mb": round(hf["peak_mb"], 1),
        "feature_cosine_seer_vs_hf": round(agree, 5),
        "note": "2 shared CPU cores; other jobs were running, so figures are noisy",
    }
    rows = [
        "| figure | seer | transformers | ratio | target | status |",
        "|---|---|---|---|---|---|",
        f"| images/s, {preset}, {n_images} JPEGs 500x375, batch {args.batch_size}, 224 px, end to end | "
        f"{ours_ips:.1f} | {hf_ips:.1f} | {speedup:.2f}x | >= {TARGET_SPEEDUP}x | "
        f"{'PASS' if speedup >= TARGET_SPEEDUP else 'MISS'} |",
        f"| CPU ms per image, one thread, decoding included (contention-robust) | {cpu_ms['seer']:.1f} | "
        f"{cpu_ms['hf']:.1f} | {cpu_ms['hf'] / cpu_ms['seer']:.2f}x | >= {TARGET_SPEEDUP}x | "
        f"{'PASS' if cpu_ms['hf'] / cpu_ms['seer'] >= TARGET_SPEEDUP else 'MISS'} |",
        f"| peak RSS (MB) | {ours['peak_mb']:.0f} | {hf['peak_mb']:.0f} | {ours['peak_mb'] / hf['peak_mb']:.2f}x | "
        f"- | - |",
    ]
    if not args.skip_rss:
        rss = measure_load_rss("regnety_400mf" if args.quick else "regnety_32gf", naive=True)
        payload["load_rss"] = rss
        rows.append(
            f"| peak RSS added by load_trunk / checkpoint size ({rss['preset']}, {rss['file_mb']:.0f} MB) | "
            f"{rss['ratio']:.2f} | build + load_state_dict: {rss['naive_ratio']:.2f} | - | <= {TARGET_RSS_RATIO} | "
            f"{'PASS' if rss['ratio'] <= TARGET_RSS_RATIO else 'MISS'} |"
        )
    rows.append(f"\nFeature agreement (mean cosine, seer vs transformers on the same files): {agree:.4f}. "
                "Measured on 2 shared CPU cores while other jobs ran: figures are noisy.")  # fmt: skip
    markdown = "\n".join(rows)
    try:
        from benchmarks.common import write_result

        write_result(NAME, payload, markdown)
    except ImportError:  # pragma: no cover - common.py ships with the benchmarks
        print(markdown)
    return payload


def _worker_main(args: argparse.Namespace) -> dict:
    kind, *rest = args.worker
    if kind in ("seer", "hf"):
        model_dir, files, batch_size, repeat, threads = rest
        paths = json.loads(Path(files).read_text())
        if int(threads) > 0:  # single-threaded: CPU time then measures work, whatever else runs on the machine
            import torch

            torch.set_num_threads(int(threads))
        if kind == "seer":
            r = _worker_seer(model_dir, paths, int(batch_size), int(repeat), 0 if int(threads) > 0 else None)
        else:
            r = _worker_hf(model_dir, paths, int(batch_size), int(repeat))
        np.save(args.out + ".npy", r.pop("features"))
        r["peak_mb"] = _peak_rss_mb()
    elif kind == "load":
        r = _worker_load(rest[0])
    elif kind == "naive_load":
        r = _worker_naive_load(rest[0], rest[1])
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    Path(args.out).write_text(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
