"""Linear probe: 10 heads (an LR grid) trained in ONE pass vs 10 sequential single-head runs, same work otherwise.

Two settings, both timed in the same run with the same code path (``seer.evaluation.linear``):

1. ``cached``: heads on cached features in memory (N x D features, C classes). The one-pass grid shares the batch
   gathering, the BN statistics and the per-step overhead, and turns 10 thin GEMMs into one wide one; the FLOPs of
   the heads themselves are the same, so the gain here is bounded by how much of a step is not head FLOPs.
2. ``online``: the augmentation mode (``eval_linear_online``), where every batch goes through the frozen trunk;
   10 sequential runs pay 10 trunk forwards per batch, the grid pays one.

Target: >= 5x for 10 heads. ``--quick`` shrinks both settings.

    python -m benchmarks.linear [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import status, write_result
from seer.evaluation.linear import HeadConfig, LinearHeads, _evaluate, _train, eval_linear_online

TARGET = 5.0


class _Clock:
    """Wall-clock and process CPU seconds of a block (CPU time is the robust one on a shared machine, with 1 thread)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def _timings(one_pass: _Clock, sequential: _Clock) -> dict:
    """Wall and CPU seconds of both modes and their ratios."""
    return {
        "one_pass_s": one_pass.wall,
        "sequential_s": sequential.wall,
        "speedup": sequential.wall / one_pass.wall,
        "one_pass_cpu_s": one_pass.cpu,
        "sequential_cpu_s": sequential.cpu,
        "speedup_cpu": sequential.cpu / one_pass.cpu,
    }


LRS = tuple(float(x) for x in np.geomspace(1e-3, 3.0, 10))


def _cached(n: int, dim: int, classes: int, epochs: int, batch_size: int) -> dict:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((classes, dim), dtype=np.float32)
    y = rng.integers(0, classes, n)
    x = torch.from_numpy(centers[y] + 3 * rng.standard_normal((n, dim), dtype=np.float32))
    n_fit = int(0.8 * n)
    fit, val = {"f": x[:n_fit]}, {"f": x[n_fit:]}
    y_fit, y_val = torch.from_numpy(y[:n_fit]), torch.from_numpy(y[n_fit:])
    kw = {
        "epochs": epochs,
        "batch_size": batch_size,
        "momentum": 0.9,
        "warmup_epochs": 0,
        "seed": 0,
        "progress": False,
        "desc": "",
    }

    def run(configs):
        heads = LinearHeads({"f": dim}, classes, configs, seed=0)
        _train(heads, fit, y_fit, **kw)
        return _evaluate(heads, val, y_val, 4096)[0]

    grid = [HeadConfig("f", "bn", lr, 0.0) for lr in LRS]
    run(grid[:1])  # warm-up
    with _Clock() as t_grid:
        acc_grid = run(grid)
    with _Clock() as t_seq:
        acc_seq = [run([c])[0] for c in grid]
    same = bool(np.allclose(acc_grid, acc_seq, atol=2.0 / len(y_val)))
    return {
        "n": n,
        "dim": dim,
        "classes": classes,
        "epochs": epochs,
        "batch_size": batch_size,
        **_timings(t_grid, t_seq),
        "same_accuracies": same,
        "best_val_top1": max(acc_grid),
    }


def _online(preset: str, resolution: int, n_batches: int, batch_size: int, epochs: int) -> dict:
    from seer.models.regnet import build_trunk

    trunk = build_trunk(preset).eval()
    g = torch.Generator().manual_seed(0)

    def batches(nb):
        out = []
        for _ in range(nb):
            y = torch.randint(0, 10, (batch_size,), generator=g)
            x = torch.rand(batch_size, 3, resolution, resolution, generator=g) + y[:, None, None, None] * 0.1
            out.append((x, y))
        return out

    train, val = batches(n_batches), batches(2)
    kw = {"num_classes": 10, "layers": ("avgpool",), "head_types": ("bn",), "epochs": epochs, "device": "cpu"}
    eval_linear_online(trunk, train[:1], None, val[:1], lrs=LRS[:1], **{**kw, "epochs": 1})  # warm-up
    with _Clock() as t_grid:
        grid = eval_linear_online(trunk, train, val, val, lrs=LRS, **kw)
    with _Clock() as t_seq:
        seq = [eval_linear_online(trunk, train, None, val, lrs=(lr,), **kw) for lr in LRS]
    same = bool(np.allclose([h["test_top1"] for h in grid["heads"]], [r["top1"] for r in seq], atol=1e-9))
    return {
        "preset": preset,
        "resolution": resolution,
        "images_per_epoch": n_batches * batch_size,
        "epochs": epochs,
        **_timings(t_grid, t_seq),
        "same_accuracies": same,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run both settings; returns the payload written to benchmarks/results/linear.json."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default, as users run it; 1: CPU time is the most robust on a busy machine)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        rows = {
            "cached, 10 classes": _cached(n=5000, dim=512, classes=10, epochs=2, batch_size=256),
            "cached, 100 classes": _cached(n=5000, dim=512, classes=100, epochs=2, batch_size=256),
            "online (frozen trunk)": _online("regnety_200mf", 32, n_batches=4, batch_size=32, epochs=1),
        }
    else:
        rows = {
            "cached, 10 classes": _cached(n=20000, dim=1024, classes=10, epochs=5, batch_size=256),
            "cached, 100 classes": _cached(n=20000, dim=1024, classes=100, epochs=5, batch_size=256),
            "online (frozen trunk)": _online("regnety_200mf", 64, n_batches=8, batch_size=32, epochs=1),
        }
    cached, online = rows["cached, 100 classes"], rows["online (frozen trunk)"]
    lines = [
        "# Linear probe: 10 heads in one pass vs 10 sequential runs",
        "",
        f"cached: {cached['n']} x {cached['dim']}-d features in memory, {cached['epochs']} epochs, batch "
        f"{cached['batch_size']}, BN + linear heads, LR grid of 10. online: {online['preset']} at "
        f"{online['resolution']} px, {online['images_per_epoch']} images x {online['epochs']} epoch(s); "
        f"{torch.get_num_threads()} torch threads.",
        "",
        "| setting | one pass s | 10 sequential s | speed-up | one pass CPU s | 10 sequential CPU s | "
        "speed-up (CPU) | target | status (CPU) | same accuracies |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['one_pass_s']:.2f} | {r['sequential_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['one_pass_cpu_s']:.2f} | {r['sequential_cpu_s']:.2f} | {r['speedup_cpu']:.2f}x | "
            f">= {TARGET:.0f}x | {status(r['speedup_cpu'], TARGET)} | {r['same_accuracies']} |"
        )
    lines += [
        "",
        "On cached features the heads' own FLOPs are the same in both modes (10 heads cost 10x one head's GEMMs); the",
        "one-pass grid saves the per-step work shared by all heads (batch gather, BN statistics, Python and kernel",
        "overhead, thin GEMMs), so its gain shrinks as the classes grow. Reading the data once is what pays when the",
        "data pass is the cost: the online mode (a trunk forward per batch), or features streamed from disk.",
        "At 100 classes x 1024-d the heads' GEMMs are most of a step and 10 heads cost 10x the FLOPs of one, so no",
        "implementation reaches 5x there; the 10-class and online rows are where a shared pass pays.",
        "Timings on a shared 2-core machine are noisy; the status uses CPU seconds (process time), which other",
        "processes disturb much less than wall time, most of all with `--threads 1`.",
    ]
    payload = {"settings": rows, "target_speedup": TARGET, "lrs": list(LRS)}
    write_result("linear_quick" if args.quick else "linear", payload, "\n".join(lines))
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
