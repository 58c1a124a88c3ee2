"""Multi-crop augmentation speed (images/s on one core) and Sinkhorn time, each beside its reference, in one run.

Multi-crop: SEER's 2x224 + 4x96 (and SwAV's 2x224 + 6x96) on 500x375 JPEG bytes (synthetic images with structure,
saved by PIL at quality 90), ``seer.data.transforms.MultiCrop`` vs SwAV's own pipeline (PIL decode +
torchvision.transforms per crop, built by ``MultiCrop.torchvision_reference()`` with the same parameters).
One thread; the two pipelines alternate image by image, so machine load affects both alike; images/s per core is
counted in CPU time of the process (wall-clock figures are reported too); the figure is the median over rounds.
Target (issue 4): >= 1.5x the reference.

Sinkhorn: 4096 scores x 16000 prototypes (fp32, CPU seconds on one thread), ``seer.ssl.swav.sinkhorn``
(stabilized) vs SwAV's ``distributed_sinkhorn`` verbatim (one process), at 3 and 10 iterations. Reported, no target.

    python -m benchmarks.multicrop [--quick] [--images N] [--rounds R]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import status, write_result
from seer.data.transforms import MultiCrop
from seer.ssl.swav import sinkhorn

TARGET = 1.5


def synthetic_jpegs(n: int, width: int = 500, height: int = 375, seed: int = 0) -> list[bytes]:
    """Photographs stand-ins: smooth color fields, edges, texture and noise, JPEG quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        f = rng.uniform(10, 60, size=3)
        p = rng.uniform(0, 2 * np.pi, size=3)
        img = np.stack(
            [
                128 + 100 * np.sin(x / f[0] + p[0]) * np.cos(y / (2 * f[0])),
                128 + 90 * np.cos(y / f[1] + p[1]),
                128 + 80 * np.sin((x + y) / f[2] + p[2]),
            ],
            axis=-1,
        )
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(40, 150)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r**2] *= rng.uniform(0.3, 0.9, size=3)  # an object with an edge
        img += rng.normal(0, 12, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_multicrop(preset: str, jpegs: list[bytes], rounds: int) -> dict:
    ours = MultiCrop.from_preset(preset)
    ref = ours.torchvision_reference()
    for data in jpegs[:3]:  # warm-up
        ours(data)
        ref(data)
    cpu = {"ours": [], "ref": []}
    wall = {"ours": [], "ref": []}
    pipelines = {"ours": ours, "ref": ref}
    for r in range(rounds):
        spent_cpu = {"ours": 0.0, "ref": 0.0}
        spent_wall = {"ours": 0.0, "ref": 0.0}
        order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
        for data in jpegs:
            for name in order:
                c0, w0 = time.process_time(), time.perf_counter()
                pipelines[name](data)
                spent_cpu[name] += time.process_time() - c0
                spent_wall[name] += time.perf_counter() - w0
        for name in pipelines:
            cpu[name].append(len(jpegs) / spent_cpu[name])
            wall[name].append(len(jpegs) / spent_wall[name])
    ratios = [a / b for a, b in zip(cpu["ours"], cpu["ref"])]
    wall_ratios = [a / b for a, b in zip(wall["ours"], wall["ref"])]
    return {
        "preset": preset,
        "crops": " + ".join(f"{c}x{s}" for c, s in zip(ours.counts, ours.sizes)),
        "ours_img_s": statistics.median(cpu["ours"]),
        "ref_img_s": statistics.median(cpu["ref"]),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "wall_ours_img_s": statistics.median(wall["ours"]),
        "wall_ref_img_s": statistics.median(wall["ref"]),
        "wall_ratio": statistics.median(wall_ratios),
        "rounds": rounds,
        "images": len(jpegs),
    }


@torch.no_grad()
def swav_distributed_sinkhorn(out: torch.Tensor, n_iters: int, epsilon: float) -> torch.Tensor:
    """SwAV's main_swav.distributed_sinkhorn, world size 1 (the reference)."""
    Q = torch.exp(out / epsilon).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iters):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def bench_sinkhorn(batch: int, protos: int, iters: list[int], repeat: int) -> list[dict]:
    """CPU seconds of one call on one thread (median over ``repeat``, ours and SwAV's alternating)."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(batch, 128, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(protos, 128, generator=g), dim=1)
    scores = z @ c.t()
    fns = {"ours": sinkhorn, "ref": swav_distributed_sinkhorn}
    rows = []
    for n in iters:
        spent: dict[str, list[float]] = {"ours": [], "ref": []}
        for r in range(repeat + 1):  # the first round warms up
            for name in ("ours", "ref") if r % 2 == 0 else ("ref", "ours"):
                t0 = time.process_time()
                fns[name](scores, n, 0.05)
                if r:
                    spent[name].append(time.process_time() - t0)
        ours, ref = statistics.median(spent["ours"]), statistics.median(spent["ref"])
        diff = float((sinkhorn(scores, n, 0.05) - swav_distributed_sinkhorn(scores, n, 0.05)).abs().max())
        rows.append({"batch": batch, "prototypes": protos, "iters": n, "ours_s": ours, "ref_s": ref,
                     "ratio": ref / ours, "max_abs_diff": diff, "threads": torch.get_num_threads()})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds, SEER preset only")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    n_images = args.images or (16 if args.quick else 40)
    rounds = args.rounds or (3 if args.quick else 5)
    presets = ["seer"] if args.quick else ["seer", "swav"]

    random.seed(0)
    torch.manual_seed(0)
    jpegs = synthetic_jpegs(n_images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: one thread, as in a DataLoader worker
    try:
        crops = [bench_multicrop(p, jpegs, rounds) for p in presets]
        sink = bench_sinkhorn(4096, 16000, [3, 10], repeat=1 if args.quick else 3)
    finally:
        torch.set_num_threads(threads)

    lines = [
        "# Multi-crop augmentation and Sinkhorn (CPU)",
        "",
        f"500x375 JPEG bytes (quality 90), one thread, {n_images} images x {rounds} interleaved rounds (median). "
        "Reference: SwAV's pipeline, PIL + torchvision.transforms.",
        "",
        "Images/s per core = images / CPU seconds of this (single-threaded) process, so other processes' load does not "
        "count; wall-clock figures are in the last column.",
        "",
        "| preset | crops | seer img/s/core | reference img/s/core | ratio (min-max over rounds) | target | | "
        "wall-clock img/s seer / ref (ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in crops:
        lines.append(
            f"| {r['preset']} | {r['crops']} | {r['ours_img_s']:.1f} | {r['ref_img_s']:.1f} | "
            f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | >= {TARGET}x | "
            f"{status(r['ratio'], TARGET)} | {r['wall_ours_img_s']:.1f} / {r['wall_ref_img_s']:.1f} "
            f"({r['wall_ratio']:.2f}x) |"
        )
    lines += [
        "",
        f"Sinkhorn, {sink[0]['batch']} scores x {sink[0]['prototypes']} prototypes, fp32, one thread, CPU seconds "
        "per call: seer (stabilized: per-prototype max shift, guarded sums, one in-place buffer) vs SwAV's "
        "distributed_sinkhorn.",
        "",
        "| iterations | seer s | SwAV s | SwAV / seer | max abs difference of codes |",
        "|---|---|---|---|---|",
    ]
    for r in sink:
        lines.append(f"| {r['iters']} | {r['ours_s']:.3f} | {r['ref_s']:.3f} | {r['ratio']:.2f}x | "
                     f"{r['max_abs_diff']:.1e} |")  # fmt: skip
    lines += ["", "Timings on a shared machine are noisy; the interleaving makes the ratio the reliable figure."]
    payload = {"multicrop": crops, "sinkhorn": sink, "target": TARGET, "quick": args.quick}
    name = "multicrop_quick" if args.quick else "multicrop"
    write_result(name, payload, "\n".join(lines))
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
