"""Data loading throughput: seer's shard stream vs torchvision ImageFolder + DataLoader, same images, same transform.

Synthetic 500x375 JPEGs (ImageNet-like size) are written once as a class folder and as shards (`write_shards`).
Each round runs one pass of `train_loader` (the epoch stream, shuffle blocks, decode + transform in the workers)
and one pass of `DataLoader(ImageFolder(...), shuffle=True)` with 1 and 2 workers, back to back so machine load
affects both alike; images/s are medians over rounds, ratios the median of per-round ratios.

The transform is the SEER multi-crop (`MultiCrop.from_preset("seer")`, 2x224 + 4x96) when `seer.data.transforms`
is available, otherwise a plain RandomResizedCrop(224) + flip + normalize. With the multi-crop, `train_loader`
hands it the raw bytes (`decode="auto"`: it decodes JPEGs at reduced size when its crops allow), while ImageFolder
decodes fully with PIL; a third variant (ours with `decode="pil"`) isolates that effect.

Figures: images/s in steady state (after the first batch; the first batch, which includes worker start-up, is
reported separately as `startup_s`). Target: ours / reference >= 1.0.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import status, write_result
from seer.data.shards import train_loader, write_shards

TARGET = 1.0


def make_images(root: Path, n: int, classes: int = 4, size: tuple[int, int] = (500, 375), seed: int = 0) -> None:
    """Smooth random images with some noise, saved as quality-90 JPEGs (~ImageNet file sizes)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 255, (h // 12, w // 12, 3), dtype=np.uint8)).resize((w, h), 3)
        arr = np.asarray(small, dtype=np.int16) + rng.integers(-12, 12, (h, w, 3), dtype=np.int16)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"img{i:05d}.jpg", quality=90)


def get_transform() -> tuple[object, str, object | None]:
    """(transform, description, collate_fn) -- the SEER multi-crop if it has landed, else a plain transform."""
    try:
        from seer.data.transforms import MultiCrop, collate_multicrop

        tf = MultiCrop.from_preset("seer")
        return tf, f"MultiCrop('seer'), {tf.n_crops} crops", collate_multicrop
    except Exception as exc:  # noqa: BLE001 - not landed yet, or failing: fall back and say so
        import torchvision.transforms as T

        tf = T.Compose(
            [
                T.RandomResizedCrop(224, scale=(0.14, 1.0)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        return tf, f"RandomResizedCrop(224)+flip+normalize (multi-crop unavailable: {type(exc).__name__})", None


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed_pass(batches, batch_size: int) -> dict:
    """Iterate once; steady-state images/s counts the images after the first batch. `ips_per_cpu` is images per
    CPU-second of the main process and its workers: a figure of work per image that other load on the machine
    disturbs far less than wall-clock time."""
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    first = None
    n = 0
    for batch in batches:
        n += len(batch[1])
        if first is None:
            first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    gc.collect()  # make sure the loader is gone and its workers are joined (reaped) before reading their CPU time
    cpu = _cpu_seconds() - cpu0
    steady = (n - n_first) / (end - first) if end > first else float("nan")
    total = n / (end - t0)
    return {
        "images": n,
        "seconds": end - t0,
        "startup_s": first - t0,
        "steady_ips": steady,
        "total_ips": total,
        "cpu_s": cpu,
        "ips_per_cpu": n / cpu,
    }


def run_ours(
    shards: Path, transform, collate, workers: int, steps: int, batch_size: int, seed: int, decode: str = "auto"
) -> dict:
    loader = train_loader(
        str(shards),
        transform,
        batch_size=batch_size,
        steps_per_epoch=steps,
        num_workers=workers,
        shuffle_buffer=256,
        seed=seed,
        collate_fn=collate,
        decode=decode,
    )
    return _timed_pass(loader, batch_size)


def run_reference(folder: Path, transform, collate, workers: int, steps: int, batch_size: int) -> dict:
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder), transform=transform)
    kwargs = {"collate_fn": collate} if collate is not None else {}
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True, **kwargs
    )

    def limited():
        for i, b in enumerate(loader):
            if i >= steps:
                break
            yield b

    return _timed_pass(limited(), batch_size)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="96 images, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 96, 2
    logging.getLogger("seer.data").setLevel(logging.ERROR)
    transform, description, collate = get_transform()
    multicrop = collate is not None  # MultiCrop gets the raw bytes (reduced-size JPEG decode); also time PIL input
    steps = args.images // args.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="seer-bench-loader-"))
    try:
        folder, shards = tmp / "folder", tmp / "shards"
        make_images(folder, args.images)
        t0 = time.perf_counter()
        index = write_shards(folder, shards, max_samples_per_shard=max(8, args.images // 8), workers=2, progress=False)
        write_ips = index["total"] / (time.perf_counter() - t0)
        runs: dict[str, list[dict]] = {}
        # Untimed warm-up of both paths (first DataLoader start, imports, page cache).
        run_ours(shards, transform, collate, 1, 2, args.batch_size, seed=0)
        run_reference(folder, transform, collate, 1, 2, args.batch_size)
        for r in range(args.rounds):
            for w in args.workers:
                order = ["ours", "reference", "ours_pil"] if multicrop else ["ours", "reference"]
                order = order if r % 2 == 0 else order[::-1]
                for who in order:
                    if who == "reference":
                        res = run_reference(folder, transform, collate, w, steps, args.batch_size)
                    else:
                        decode = "pil" if who == "ours_pil" else "auto"
                        res = run_ours(shards, transform, collate, w, steps, args.batch_size, seed=r, decode=decode)
                    runs.setdefault(f"{who}/{w}", []).append(res)
                    print(
                        f"round {r} workers {w} {who:9s}: {res['steady_ips']:.1f} img/s steady, "
                        f"{res['total_ips']:.1f} img/s overall, start-up {res['startup_s']:.2f}s"
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def med(key: str, field: str) -> float:
        return statistics.median(x[field] for x in runs[key])

    def paired(a: str, b: str, field: str) -> float:
        """Median over rounds of the ratio of two variants run back to back (robust to load drifting between
        rounds on a shared machine)."""
        return statistics.median(x[field] / y[field] for x, y in zip(runs[a], runs[b]))

    rows, lines = [], []
    for w in args.workers:
        ours, ref = med(f"ours/{w}", "steady_ips"), med(f"reference/{w}", "steady_ips")
        ours_total, ref_total = med(f"ours/{w}", "total_ips"), med(f"reference/{w}", "total_ips")
        ratio = paired(f"ours/{w}", f"reference/{w}", "steady_ips")
        cpu_ratio = paired(f"ours/{w}", f"reference/{w}", "ips_per_cpu")
        row = {
            "workers": w,
            "ours_ips": ours,
            "reference_ips": ref,
            "ratio": ratio,
            "ours_total_ips": ours_total,
            "reference_total_ips": ref_total,
            "ratio_total": paired(f"ours/{w}", f"reference/{w}", "total_ips"),
            "ours_startup_s": med(f"ours/{w}", "startup_s"),
            "reference_startup_s": med(f"reference/{w}", "startup_s"),
            "ours_ips_per_cpu": med(f"ours/{w}", "ips_per_cpu"),
            "reference_ips_per_cpu": med(f"reference/{w}", "ips_per_cpu"),
            "ratio_per_cpu": cpu_ratio,
            "status_per_cpu": status(cpu_ratio, TARGET),
            "target": TARGET,
            "status": status(ratio, TARGET),
        }
        rows.append(row)
        lines.append(
            f"| images/s, {w} worker{'s' if w > 1 else ''} (steady) | {ours:.1f} | {ref:.1f} | {ratio:.2f}x | "
            f">= {TARGET:.1f}x | {row['status']} |"
        )
        lines.append(
            f"| images per CPU-second, {w} worker{'s' if w > 1 else ''} (main + workers) | "
            f"{row['ours_ips_per_cpu']:.1f} | {row['reference_ips_per_cpu']:.1f} | {cpu_ratio:.2f}x | "
            f">= {TARGET:.1f}x | {row['status_per_cpu']} |"
        )
        lines.append(
            f"| images/s, {w} worker{'s' if w > 1 else ''} (whole pass incl. start-up) | {ours_total:.1f} | "
            f"{ref_total:.1f} | {row['ratio_total']:.2f}x | (info) | |"
        )
        if f"ours_pil/{w}" in runs:
            pil = med(f"ours_pil/{w}", "steady_ips")
            pil_ratio = paired(f"ours_pil/{w}", f"reference/{w}", "steady_ips")
            row["ours_pil_ips"] = pil
            lines.append(
                f"| images/s, {w} worker{'s' if w > 1 else ''} (steady), ours with decode='pil' (full decode, as "
                f"ImageFolder) | {pil:.1f} | {ref:.1f} | {pil_ratio:.2f}x | "
                "(info) | |"
            )
    markdown = "\n".join(
        [
            "# loader: shards (seer train_loader) vs torchvision ImageFolder + DataLoader",
            "",
            f"{args.images} synthetic 500x375 JPEGs, batch {args.batch_size}, transform: {description}; "
            f"{args.rounds} interleaved rounds: images/s are medians, ratios the median of per-round ratios. "
            "Reference: ImageFolder + DataLoader(shuffle=True), "
            "same transform, same worker count.",
            "",
            "| figure | seer | reference | ratio | target | status |",
            "|---|---|---|---|---|---|",
            *lines,
            f"| write_shards, 2 workers (images/s) | {write_ips:.1f} | - | - | (info) | |",
            "",
            "Measured on a shared 2-core machine: wall-clock figures are noisy when other work runs; images per "
            "CPU-second (CPU time of the main process and its DataLoader workers) measure the work per image and "
            "are far less sensitive to other load.",
        ]
    )
    payload = {
        "images": args.images,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "transform": description,
        "rows": rows,
        "runs": runs,
        "write_shards_ips": write_ips,
    }
    write_result("loader_quick" if args.quick else "loader", payload, markdown)
    return payload


if __name__ == "__main__":
    main()
