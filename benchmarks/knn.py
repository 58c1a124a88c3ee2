"""kNN search: seer's blocked fp32 GEMM + running top-k vs scikit-learn brute cosine vs a plain faiss IndexFlatIP.

Default size: 100k train x 10k test x 1024-d, k = 200 (eval_knn searches once at max(ks) = 200) -- about 2-3
minutes on 2 cores, most of it scikit-learn. ``--quick``: 20k x 2k x 512 (seconds). The achieved GFLOP/s of the
whole search (similarities + top-k, ``2 * n_test * n_train * dim`` flops) is compared with torch.mm's fp32 peak
measured in the same run; target >= 60% of that peak. All three methods must agree on the kNN accuracy.

    python -m benchmarks.knn [--quick] [--skip-sklearn] [--k 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import measure_mm_peak, status, write_result
from seer.evaluation.knn import eval_knn, knn_search, knn_vote

TARGET_FRACTION_OF_PEAK = 0.60


def _features(n: int, dim: int, centers: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Clustered features (so accuracies are meaningful), generated in chunks to keep memory flat."""
    labels = rng.integers(0, len(centers), n)
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, 8192):
        b = min(n, a + 8192)
        out[a:b] = centers[labels[a:b]] + rng.standard_normal((b - a, dim), dtype=np.float32) * 4.0
    return out, labels


def _accuracy(sims: np.ndarray, idx: np.ndarray, ytr: np.ndarray, yte: np.ndarray, k: int, n_classes: int) -> float:
    top1, _, _ = knn_vote(
        torch.from_numpy(np.ascontiguousarray(sims, dtype=np.float32)),
        torch.from_numpy(ytr)[torch.from_numpy(idx.astype(np.int64))],
        torch.from_numpy(yte),
        [k],
        0.07,
        n_classes,
    )
    return top1[k]


def cpu_time_efficiency(xtr: np.ndarray, xte: np.ndarray, k: int) -> dict:
    """Single-thread efficiency from CPU time (robust on a shared machine, where wall-clock peaks swing 5x).

    CPU seconds of the whole search (every thread of the process, the prefetch thread included) against the CPU
    seconds of torch.mm on 2048^3, both on one torch thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        torch.mm(a, b)
        peak = []
        for _ in range(3):
            c = time.process_time()
            torch.mm(a, b)
            peak.append(2 * 2048**3 / (time.process_time() - c) / 1e9)
        knn_search(xtr[:4096], xte[:256], k, device="cpu")  # warm-up
        c = time.process_time()
        knn_search(xtr, xte, k, device="cpu")
        ours = 2.0 * len(xtr) * len(xte) * xtr.shape[1] / (time.process_time() - c) / 1e9
    finally:
        torch.set_num_threads(threads)
    return {
        "n_train": len(xtr),
        "n_test": len(xte),
        "mm_gflops_1t": max(peak),
        "search_gflops_1t": ours,
        "fraction": ours / max(peak),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the payload written to benchmarks/results/knn.json."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="20k x 2k x 512")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--skip-faiss", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.dim = 20_000, 2_000, 512
    n_tr, n_te, d, k = args.n_train, args.n_test, args.dim, args.k
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.classes, d), dtype=np.float32)
    xtr, ytr = _features(n_tr, d, centers, rng)
    xte, yte = _features(n_te, d, centers, rng)
    flops = 2.0 * n_tr * n_te * d
    print(f"kNN benchmark: {n_tr} train x {n_te} test x {d}-d, k={k}, {torch.get_num_threads()} torch threads")

    peak_before = max(measure_mm_peak(2048), measure_mm_peak(4096, repeat=3))
    print(f"torch.mm fp32 peak: {peak_before:.1f} GFLOP/s")

    rows: dict[str, dict] = {}
    # --- ours (the whole eval_knn; the search part is timed inside)
    # best of two runs, as the mm peak is a best-of-several too (the machine is shared)
    runs = [eval_knn(xtr, ytr, xte, yte, ks=(k,), device="cpu", backend="torch") for _ in range(2)]
    res = min(runs, key=lambda r: r["timing"]["search_s"])
    ours_search = res["timing"]["search_s"]
    peak_adjacent = measure_mm_peak(4096, repeat=3)
    rows["seer (torch blocked GEMM)"] = {
        "search_s": ours_search,
        "total_s": res["timing"]["total_s"],
        "top1": res["top1"][k],
    }
    print(
        f"seer: search {ours_search:.2f}s ({flops / ours_search / 1e9:.1f} GFLOP/s), "
        f"total {res['timing']['total_s']:.2f}s, top1 {res['top1'][k]:.4f}"
    )

    # --- plain faiss IndexFlatIP on normalized vectors
    if not args.skip_faiss:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        t0 = time.perf_counter()
        a, b = xtr.copy(), xte.copy()
        faiss.normalize_L2(a)
        faiss.normalize_L2(b)
        index = faiss.IndexFlatIP(d)
        index.add(a)
        dist, idx = index.search(b, k)
        t_faiss = time.perf_counter() - t0
        del a, b, index
        rows["faiss IndexFlatIP"] = {"search_s": t_faiss, "top1": _accuracy(dist, idx, ytr, yte, k, args.classes)}
        print(f"faiss: {t_faiss:.2f}s ({flops / t_faiss / 1e9:.1f} GFLOP/s)")

    # --- scikit-learn brute cosine
    if not args.skip_sklearn:
        from sklearn.neighbors import KNeighborsClassifier

        t0 = time.perf_counter()
        knn = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", n_jobs=-1).fit(xtr, ytr)
        dist, idx = knn.kneighbors(xte, n_neighbors=k)
        t_sk = time.perf_counter() - t0
        rows["scikit-learn brute cosine"] = {
            "search_s": t_sk,
            "top1": _accuracy(1.0 - dist, idx, ytr, yte, k, args.classes),
        }
        print(f"sklearn: {t_sk:.2f}s ({flops / t_sk / 1e9:.1f} GFLOP/s)")

    eff = cpu_time_efficiency(xtr, xte[: min(n_te, 4096)], k)  # the whole bank, fewer queries
    print(
        f"single-thread CPU-time efficiency: {eff['search_gflops_1t']:.1f} / {eff['mm_gflops_1t']:.1f} GFLOP/s "
        f"= {eff['fraction']:.2f}"
    )
    peak_after = measure_mm_peak(4096, repeat=3)
    peak = max(peak_before, peak_adjacent, peak_after)  # the strictest reference
    for r in rows.values():
        r["gflops"] = flops / r["search_s"] / 1e9
    frac = rows["seer (torch blocked GEMM)"]["gflops"] / peak
    accs = {name: r["top1"] for name, r in rows.items()}
    agree = max(accs.values()) - min(accs.values()) <= 1.0 / n_te + 1e-12  # at most one boundary tie apart
    payload = {
        "size": {"n_train": n_tr, "n_test": n_te, "dim": d, "k": k, "classes": args.classes},
        "mm_peak_gflops": peak,
        "mm_peak_before": peak_before,
        "mm_peak_after": peak_after,
        "methods": rows,
        "fraction_of_peak": frac,
        "target_fraction": TARGET_FRACTION_OF_PEAK,
        "accuracies_agree": agree,
        "pass": bool(frac >= TARGET_FRACTION_OF_PEAK and agree),
    }
    ours = rows["seer (torch blocked GEMM)"]["search_s"]
    lines = [
        f"# kNN search, {n_tr} x {n_te} x {d}-d, k = {k} (fp32, exact)",
        "",
        f"torch.mm fp32 peak in this run: {peak:.1f} GFLOP/s (max of: start {peak_before:.1f}, right after seer "
        f"{peak_adjacent:.1f}, end {peak_after:.1f}).",
        "",
        "| method | search s | GFLOP/s | % of mm peak | seer speed-up | kNN top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['search_s']:.2f} | {r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f}% | "
            f"{r['search_s'] / ours:.2f}x | {r['top1']:.4f} |"
        )
    lines += [
        "",
        "| figure | value | reference | ratio | target | status |",
        "|---|---|---|---|---|---|",
        f"| seer search GFLOP/s vs torch.mm peak | {rows['seer (torch blocked GEMM)']['gflops']:.1f} | {peak:.1f} | "
        f"{frac:.2f} | >= {TARGET_FRACTION_OF_PEAK:.2f} | {status(frac, TARGET_FRACTION_OF_PEAK)} |",
        f"| seer search vs torch.mm, 1 thread, CPU time ({eff['n_train']} x {eff['n_test']}) | "
        f"{eff['search_gflops_1t']:.1f} | {eff['mm_gflops_1t']:.1f} | {eff['fraction']:.2f} | "
        f">= {TARGET_FRACTION_OF_PEAK:.2f} | {status(eff['fraction'], TARGET_FRACTION_OF_PEAK)} |",
        f"| accuracies agree across methods | {agree} | | | True | {'PASS' if agree else 'MISS'} |",
        "",
        "Timings on a shared machine are noisy: the wall-clock peak is the largest of three measurements (start,",
        "right after seer's search, end); the single-thread CPU-time row is the contention-robust figure.",
    ]
    write_result("knn_quick" if args.quick else "knn", payload, "\n".join(lines))
    print("\n".join(lines))
    return payload


if __name__ == "__main__":
    main()
