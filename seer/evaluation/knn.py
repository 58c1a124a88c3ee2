"""Weighted kNN classification on frozen features (the DINO protocol), exact and out-of-core.

Protocol (Wu et al. 2018, as used by DINO / DINOv2): features are L2-normalized, each test sample retrieves its
k nearest train samples by cosine similarity, neighbour j votes for its class with weight ``exp(sim_j / T)``
(T = 0.07), and the classes are ranked by summed votes. Top-1 and top-5 are reported for every k in ``ks``; all
ks come from ONE exact search at ``max(ks)`` (the k nearest are a prefix of the max-k nearest).

The search is blocked fp32 GEMMs: for each train chunk (read once, from memory, a torch tensor or a memory-mapped
``.npy``), ``test_chunk @ train_chunk.T`` then a running top-k merge. After the first chunk most similarities fall
below the running k-th best of their row, so later blocks are filtered against that threshold and only the few
survivors are merged; that keeps the top-k bookkeeping a small fraction of the GEMM time. faiss ``IndexFlatIP``
(CPU, or GPU when faiss-gpu sees a GPU) is available as ``backend="faiss"``. ``backend="auto"`` takes the faster of
the two on this CPU (``pick_backend``: a short probe, once per process), since which one wins depends on the CPU.

Documented choices:
- ``k`` larger than the train bank raises ``ValueError`` unless ``clamp_k=True`` (then k is clamped to the bank
  size and ``settings["k_effective"]`` records what was used). Few-shot runs, whose banks are small, accept it too.
- A class that got no vote is never predicted (DINO's top-5 may count arbitrary zero-vote classes when fewer than
  5 classes got votes); ties between classes are broken by the smaller class index. Both make results deterministic.
- Labels may be any integers (any number of classes, not necessarily contiguous); test classes absent from the
  train bank simply cannot be predicted. A class with a single train sample is fine.
- Weights use ``exp((sim - max_sim_of_row) / T)``: the same ranking as ``exp(sim / T)`` without overflow when
  ``normalize=False`` (raw inner products).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seer.extras import require
from seer.hardware import resolve_device
from seer.logs import configure_logging

__all__ = [
    "eval_knn",
    "knn_search",
    "knn_vote",
    "pick_backend",
    "clear_backend_cache",
    "write_json",
    "load_features",
    "cli_main",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss")
DEFAULT_KS = (10, 20, 100, 200)  # DINO's
MERGE_THREADS: int | None = None  # torch threads of the top-k bookkeeping (None: 1 on CPUs with <= 4 threads)
BACKEND_ENV = "SEER_KNN_BACKEND"  # "torch" or "faiss": what backend="auto" uses, without probing
# The probe of backend="auto": the DINO protocol's largest default k on a small random bank, best of a few runs.
PROBE_TRAIN, PROBE_TEST, PROBE_MAX_DIM, PROBE_K, PROBE_REPEATS = 8192, 256, 512, 200, 2
# Searches with fewer train x test pairs than this take under ~2 s: a 0.6 s probe costs more than the faster backend
# (at most 1.7x) could save, so they run torch unless a probe has already been paid for in this process.
PROBE_MIN_PAIRS = 10**8
PROGRESS_MIN_PAIRS = 10**8  # progress=None shows a search's progress from this size on (about 2 s on 2 CPU cores)
_BACKEND_CACHE: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}  # (device type, torch threads) -> choice


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
_UNLABELED_FIX = (
    "drop those rows (keep = labels >= 0) or extract the features from a folder with one subfolder per class"
)


def _as_labels(labels: Any, name: str, fix: str = _UNLABELED_FIX) -> np.ndarray:
    """Class labels as int64: a 1-D integer array with no negative entry.

    The one check of labels for every protocol (``eval_knn``, ``eval_linear``, their CLIs and the suites). A
    negative label is the "no label" marker (``-1``: `seer extract` of a folder without class subfolders); taken as
    a class it would score an unlabeled test set 0.0. ``fix`` ends the message (the CLIs name their options).
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer class labels, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"{name} must hold integers (class indices), got dtype {arr.dtype}"
            + (" -- convert with labels.astype(int) if they are whole numbers" if arr.dtype.kind == "f" else "")
        )
    unlabeled = int((arr < 0).sum()) if arr.dtype.kind == "i" else 0
    if unlabeled:
        raise ValueError(
            f"{name}: {unlabeled} of {len(arr)} samples have no label (-1, or another negative value), which no "
            f"protocol can score; {fix}"
        )
    return arr.astype(np.int64, copy=False)


def load_features(path: str | os.PathLike) -> dict:
    """Read a feature file -> dict with ``features`` (and ``labels`` when the file has them).

    Accepts a ``seer extract`` output directory (or its ``features.npy`` / ``features.safetensors``: read with
    ``seer.features.load_feature_file``, memory-mapped, its ``meta`` included), a plain ``.npy`` (memory-mapped;
    labels from a ``<name>.labels.npy`` sidecar), or an ``.npz`` / ``.safetensors`` with ``features`` and ``labels``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file not found: {path}")
    seer_dir = path if path.is_dir() else path.parent
    if (seer_dir / "meta.json").is_file() and (path.is_dir() or path.stem == "features"):
        from seer.features import load_feature_file

        return dict(load_feature_file(path))
    if path.is_dir():
        raise ValueError(f"{path} is a directory without meta.json: not a `seer extract` output")
    try:
        if path.suffix == ".npy":
            out = {"features": np.load(path, mmap_mode="r")}
            side = path.with_name(path.stem + ".labels.npy")
            if side.exists():
                out["labels"] = np.load(side)
            return out
        if path.suffix == ".npz":
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
    except Exception as exc:  # noqa: BLE001 - numpy / zipfile / safetensors errors on a corrupt or foreign file
        raise ValueError(f"{path}: cannot read features ({type(exc).__name__}: {exc})") from None
    raise ValueError(f"unsupported feature file {path}: expected .npy, .npz, .safetensors or a seer features directory")


class _Bank:
    """A feature matrix read in row chunks: numpy/memmap array, torch tensor, .npy path, or a list of those."""

    def __init__(self, data: Any, name: str) -> None:
        self.name = name
        if isinstance(data, (str, os.PathLike)):
            data = load_features(data)["features"]
        parts = list(data) if isinstance(data, (list, tuple)) else [data]
        if not parts:
            raise ValueError(f"{name} is empty")
        self.parts = []
        for i, p in enumerate(parts):
            if isinstance(p, (str, os.PathLike)):
                p = load_features(p)["features"]
            if not isinstance(p, torch.Tensor):
                p = np.asarray(p) if not isinstance(p, np.ndarray) else p
                if p.dtype.kind not in "fiu":
                    raise TypeError(f"{name} (part {i}) must be numeric, got dtype {p.dtype}")
            if p.ndim != 2:
                raise ValueError(f"{name} (part {i}) must be 2-D [N, D], got shape {tuple(p.shape)}")
            self.parts.append(p)
        dims = {int(p.shape[1]) for p in self.parts}
        if len(dims) != 1:
            raise ValueError(f"{name} parts have different feature dims {sorted(dims)}")
        self.dim = dims.pop()
        self.n = sum(int(p.shape[0]) for p in self.parts)
        if self.n == 0:
            raise ValueError(f"{name} has no rows")

    def chunks(self, size: int, first: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(row_offset, raw_chunk)`` in order; chunks grow from ``first`` rows, doubling up to ``size``."""
        offset, now = 0, min(size, first or size)
        for p in self.parts:
            a, n = 0, int(p.shape[0])
            while a < n:
                yield offset + a, p[a : a + now]
                a += now
                now = min(size, 2 * now)
            offset += n

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Gather rows (sorted global indices) into one float32 array (used by few-shot subsets)."""
        out, offset = [], 0
        for p in self.parts:
            n = int(p.shape[0])
            sel = rows[(rows >= offset) & (rows < offset + n)] - offset
            if sel.size:
                out.append(_to_numpy32(p[sel] if not isinstance(p, torch.Tensor) else p[torch.from_numpy(sel)]))
            offset += n
        return np.concatenate(out, 0) if out else np.zeros((0, self.dim), np.float32)


def _to_numpy32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _to_tensor32(x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device=device, dtype=torch.float32)
    else:
        a = np.ascontiguousarray(x, dtype=np.float32)
        if not a.flags.writeable:  # read-only memmap: torch wants writable memory; copy this chunk into RAM
            a = a.copy()
        t = torch.from_numpy(a).to(device)
    return t.contiguous()


def _prepare(t: torch.Tensor, normalize: bool, name: str, offset: int) -> torch.Tensor:
    """Check finiteness (per chunk, so banks larger than memory are checked too) and L2-normalize.

    The row norms serve both: a NaN/Inf anywhere in a row makes its norm non-finite, so the full element-wise check
    only runs when a norm is not finite (saving two passes over every train chunk).
    """
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        bad = torch.nonzero(~torch.isfinite(t).all(1)).flatten()[:5].tolist()
        if bad:
            raise ValueError(f"{name} contains NaN or Inf values (e.g. rows {[offset + b for b in bad]})")
        norms = torch.linalg.vector_norm(t.double(), dim=1, keepdim=True).float()  # finite values, squares overflowed
    if normalize:
        t = t / norms.clamp_min(1e-12)
    return t


def _resolve_device(device: str | torch.device | None) -> torch.device:
    return resolve_device(device, what="device")  # None / "auto": CUDA when a GPU is visible


# ----------------------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------------------
def _merge(run_v: torch.Tensor, run_i: torch.Tensor, v: torch.Tensor, i: torch.Tensor, k: int, sort: bool = True):
    cat_v, cat_i = torch.cat([run_v, v], 1), torch.cat([run_i, i], 1)
    top_v, pos = torch.topk(cat_v, k, dim=1, sorted=sort)
    return top_v, cat_i.gather(1, pos)


def _sort_rows(run_v: torch.Tensor, run_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row's top-k by descending similarity (the running top-k is kept unsorted: ~3x cheaper merges)."""
    run_v, pos = torch.sort(run_v, dim=1, descending=True)
    return run_v, run_i.gather(1, pos)


def _merge_block(run_v: torch.Tensor, run_i: torch.Tensor, block: torch.Tensor, offset: int, k: int):
    """Merge a similarity block [q, b] into the running (unsorted) top-k (values, global indices) of each row."""
    q, b = block.shape
    thr = run_v.amin(1, keepdim=True)
    if bool(torch.isfinite(thr).all()):
        # Rows already hold k candidates: only entries above the row's k-th best can enter. After the first
        # chunk these are few, so a compare + nonzero replaces a full top-k over the block (~5x cheaper).
        if block.device.type == "cpu":
            # numpy's broadcast compare is ~6x faster than torch's on one CPU thread, and flatnonzero ~7x faster
            # than torch.nonzero (measured on a 512 x 16384 block: 1.5 + 1.0 ms vs 12 + 7 ms).
            flat = torch.from_numpy(np.flatnonzero(np.greater(block.numpy(), thr.numpy())))
            rows = torch.div(flat, b, rounding_mode="floor")
            cols = flat - rows * b
        else:
            rows, cols = torch.nonzero(block > thr, as_tuple=True)
        if rows.numel() == 0:
            return run_v, run_i
        counts = torch.bincount(rows, minlength=q)
        width = int(counts.max())
        if width <= max(k, b // 8):
            starts = torch.cumsum(counts, 0) - counts
            pos = torch.arange(rows.numel(), device=block.device) - starts[rows]
            pad_v = torch.full((q, width), -math.inf, device=block.device)
            pad_i = torch.full((q, width), -1, dtype=torch.long, device=block.device)
            pad_v[rows, pos] = block[rows, cols]
            pad_i[rows, pos] = cols + offset
            return _merge(run_v, run_i, pad_v, pad_i, k, sort=False)
    kk = min(k, b)
    v, i = torch.topk(block, kk, dim=1, sorted=False)
    return _merge(run_v, run_i, v, i + offset, k, sort=False)


def _prefetch(it: Iterator, fn) -> Iterator:
    """Run ``fn`` on the next item in a thread while the caller computes (overlaps memmap reads with GEMMs)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = None
        for item in it:
            nxt = pool.submit(fn, item)
            if fut is not None:
                yield fut.result()
            fut = nxt
        if fut is not None:
            yield fut.result()


def _search_torch(
    bank: _Bank,
    test: torch.Tensor,
    k: int,
    normalize: bool,
    train_chunk: int,
    test_chunk: int,
    device: torch.device,
    progress: bool | None,
):
    nt = test.shape[0]
    run_v = torch.full((nt, k), -math.inf, device=device)
    run_i = torch.full((nt, k), -1, dtype=torch.long, device=device)
    load = lambda oc: (oc[0], _prepare(_to_tensor32(oc[1], device), normalize, bank.name, oc[0]))  # noqa: E731
    # The first chunk needs a full top-k per row; later ones only merge the few entries above the running k-th
    # best. Growing the chunks from a small first one keeps that full top-k cheap while the threshold tightens.
    chunks = _prefetch(bank.chunks(train_chunk, first=max(2048, 4 * k)), load)
    bar = _bar(progress, bank.n, "kNN search", bank.n * nt)
    threads = torch.get_num_threads()
    # The top-k bookkeeping is a string of small ops. On few-core CPUs their intra-op threads mostly wait on each
    # other (badly so when other processes share the cores: measured 4-5x slower on 2 busy cores than one thread),
    # so they run on one thread there while the GEMMs keep all threads.
    merge_threads = MERGE_THREADS or (1 if device.type == "cpu" and threads <= 4 else threads)
    # One reused output buffer: a fresh 32 MB block per GEMM would be a fresh mmap, page-faulted in every time.
    buf = torch.empty(min(test_chunk, nt) * train_chunk, device=device)  # chunks never exceed train_chunk rows
    for offset, tr in chunks:
        tr_t = tr.t()
        for a in range(0, nt, test_chunk):
            q = test[a : a + test_chunk]
            block = torch.mm(q, tr_t, out=buf[: q.shape[0] * tr.shape[0]].view(q.shape[0], tr.shape[0]))
            if merge_threads != threads:
                torch.set_num_threads(merge_threads)
            try:
                run_v[a : a + test_chunk], run_i[a : a + test_chunk] = _merge_block(
                    run_v[a : a + test_chunk], run_i[a : a + test_chunk], block, offset, k
                )
            finally:
                if merge_threads != threads:
                    torch.set_num_threads(threads)
        if bar is not None:
            bar.update(tr.shape[0])
    if bar is not None:
        bar.close()
    return _sort_rows(run_v, run_i)


def _search_faiss(
    bank: _Bank, test: torch.Tensor, k: int, normalize: bool, train_chunk: int, use_gpu: bool, progress: bool | None
):
    faiss = require("faiss", 'backend="faiss"')

    test_np = test.cpu().numpy()
    nt, d = test_np.shape
    run_v = torch.full((nt, k), -math.inf)
    run_i = torch.full((nt, k), -1, dtype=torch.long)
    res = faiss.StandardGpuResources() if use_gpu else None
    bar = _bar(progress, bank.n, "kNN search (faiss)", bank.n * nt)
    for offset, raw in bank.chunks(train_chunk):
        tr = _prepare(_to_tensor32(raw, torch.device("cpu")), normalize, bank.name, offset).numpy()
        index = faiss.GpuIndexFlatIP(res, d) if use_gpu else faiss.IndexFlatIP(d)
        index.add(tr)
        dist, idx = index.search(test_np, min(k, tr.shape[0]))
        run_v, run_i = _merge(run_v, run_i, torch.from_numpy(dist), torch.from_numpy(idx) + offset, k)
        if bar is not None:
            bar.update(tr.shape[0])
    if bar is not None:
        bar.close()
    return run_v, run_i


def _faiss_gpus() -> int:
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None and hasattr(faiss, "GpuIndexFlatIP") else 0


def _faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _probe_seconds(dim: int) -> dict[str, float]:
    """Best-of-``PROBE_REPEATS`` seconds of each CPU backend on one small random problem of width ``dim``."""
    gen = torch.Generator().manual_seed(0)
    bank = _Bank(torch.randn(PROBE_TRAIN, dim, generator=gen), "probe")
    test = _prepare(torch.randn(PROBE_TEST, dim, generator=gen), True, "probe", 0)
    cpu = torch.device("cpu")
    runs = {
        "torch": lambda: _search_torch(bank, test, PROBE_K, True, 16384, 512, cpu, False),
        "faiss": lambda: _search_faiss(bank, test, PROBE_K, True, 16384, False, False),
    }
    best = dict.fromkeys(runs, math.inf)
    for _ in range(PROBE_REPEATS):  # interleaved, so a load spike from another process hits both alike
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def pick_backend(device: str | torch.device | None = "cpu", dim: int = PROBE_MAX_DIM,
                 pairs: int | None = None) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """The exact-search backend that ``backend="auto"`` uses on ``device`` -> ``(name, {"rule", "seconds"})``.

    In order: ``SEER_KNN_BACKEND=torch|faiss`` forces the answer; a non-CPU device gets "torch" (its GEMM path;
    faiss-gpu runs only when asked for by ``backend="faiss"``); without faiss, "torch"; otherwise the faster of the
    two on a random ``PROBE_TRAIN`` x ``PROBE_TEST`` problem of width ``min(dim, PROBE_MAX_DIM)``, k=``PROBE_K``
    (best of ``PROBE_REPEATS`` each: ~0.6 s on 2 busy cores). Which wins depends on the CPU (faiss 1.7x faster on an
    AMD EPYC without AVX-512, torch on Intel AMX), so the probe runs once per process and per (device type, torch
    threads); the first call's ``dim`` sizes it. ``clear_backend_cache()`` forgets it. A search of fewer than
    ``PROBE_MIN_PAIRS`` train x test ``pairs`` does not start a probe (it gets "torch", or an answer already cached).
    """
    # only the device's type matters to this choice: naming a GPU needs none (the search itself checks it)
    dev = _resolve_device(device) if device in (None, "auto") else torch.device(device)
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced != "auto":
        if forced not in ("torch", "faiss"):
            raise ValueError(f"{BACKEND_ENV} must be 'torch', 'faiss' or 'auto', got {forced!r}")
        return forced, {"rule": f"forced by {BACKEND_ENV}", "seconds": {}}
    if dev.type != "cpu":
        return "torch", {"rule": f"{dev.type}: torch, not probed", "seconds": {}}
    # Checked before the cache: faiss may be importable when a choice was cached and not now (tests hide it).
    if not _faiss_installed():
        return "torch", {"rule": "faiss not installed", "seconds": {}}
    key = (dev.type, torch.get_num_threads())
    if key not in _BACKEND_CACHE and pairs is not None and pairs < PROBE_MIN_PAIRS:
        return "torch", {"rule": f"small search ({pairs} pairs < {PROBE_MIN_PAIRS}): torch, not probed", "seconds": {}}
    if key not in _BACKEND_CACHE:
        seconds = _probe_seconds(max(1, min(int(dim), PROBE_MAX_DIM)))
        name = min(seconds, key=seconds.__getitem__)
        log.info("kNN backend auto -> %s (probe: %s)", name, {k: round(v, 4) for k, v in seconds.items()})
        _BACKEND_CACHE[key] = (name, {"rule": "probe", "seconds": seconds})
    name, record = _BACKEND_CACHE[key]
    return name, {"rule": record["rule"], "seconds": dict(record["seconds"])}


def clear_backend_cache() -> None:
    """Forget the probed ``backend="auto"`` choices: the next ``pick_backend`` call measures again."""
    _BACKEND_CACHE.clear()


def _bar(progress: bool | None, total: int, desc: str, pairs: int):
    """The search's progress (``seer.progress``: rate and ETA), in train rows. ``progress=None`` shows it for searches
    of ``PROGRESS_MIN_PAIRS`` train x test pairs or more (a few seconds and up): a bar per small search (a few-shot
    try, a layer of a small suite) would be noise."""
    from seer.progress import progress as _progress

    show = progress if progress is not None else pairs >= PROGRESS_MIN_PAIRS
    return _progress(total, desc, "row", enabled=show) if show else None


def knn_search(
    train_features: Any,
    test_features: Any,
    k: int,
    *,
    normalize: bool = True,
    backend: str = "auto",
    device: str | torch.device | None = None,
    train_chunk_size: int = 16384,
    test_chunk_size: int = 512,
    progress: bool | None = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search (cosine when ``normalize``): returns sorted ``(similarities, indices)``.

    ``train_features`` may be an array, a memory-mapped ``.npy`` (path or ``np.load(..., mmap_mode="r")``), a
    torch tensor, or a list of those (chunks); it is read one ``train_chunk_size`` chunk at a time, so the bank
    may be larger than memory. ``test_features`` is held in memory. Indices are global rows of the bank.
    ``backend``: "torch", "faiss", or "auto" (the faster of the two here: ``pick_backend``).
    """
    bank = train_features if isinstance(train_features, _Bank) else _Bank(train_features, "train_features")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if k < 1 or k > bank.n:
        raise ValueError(f"k={k} must be between 1 and the train bank size {bank.n}")
    dev = _resolve_device(device)
    test_bank = _Bank(test_features, "test_features")
    test = _prepare(_to_tensor32(test_bank.take(np.arange(test_bank.n)), dev), normalize, "test_features", 0)
    if test.shape[1] != bank.dim:
        raise ValueError(f"feature dims differ: train_features has {bank.dim}, test_features has {test.shape[1]}")
    if (pick_backend(dev, bank.dim, bank.n * test.shape[0])[0] if backend == "auto" else backend) == "faiss":
        use_gpu = dev.type == "cuda" and _faiss_gpus() > 0
        return _search_faiss(bank, test, k, normalize, train_chunk_size, use_gpu, progress)
    return _search_torch(bank, test, k, normalize, train_chunk_size, test_chunk_size, dev, progress)


# ----------------------------------------------------------------------------------------------------------------
# Voting
# ----------------------------------------------------------------------------------------------------------------
def knn_vote(
    sims: torch.Tensor,
    neighbor_labels: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    *,
    return_predictions: bool = False,
    chunk: int = 4096,
) -> tuple[dict, dict, dict]:
    """Temperature-weighted class votes for every k (prefixes of sorted neighbours) -> (top1, top5, predictions).

    ``sims``/``neighbor_labels``: [N, K] sorted by decreasing similarity; labels are contiguous class indices.
    A class's rank counts the classes with more votes, plus equal votes and a smaller index; a class with zero
    votes is never a prediction.
    """
    n = sims.shape[0]
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    cls = torch.arange(num_classes, device=sims.device)
    for a in range(0, n, chunk):
        s, lab, y = sims[a : a + chunk], neighbor_labels[a : a + chunk], test_labels[a : a + chunk]
        w = torch.exp((s - s[:, :1]) / temperature)  # per-row shift: same ranking, no overflow
        for k in ks:
            votes = torch.zeros(s.shape[0], num_classes, device=s.device)
            votes.scatter_add_(1, lab[:, :k], w[:, :k])
            true = votes.gather(1, y[:, None])
            rank = (votes > true).sum(1) + ((votes == true) & (cls[None] < y[:, None])).sum(1)
            got = true[:, 0] > 0
            correct1[k] += int((got & (rank < 1)).sum())
            correct5[k] += int((got & (rank < 5)).sum())
            if return_predictions:
                order = torch.sort(votes, dim=1, descending=True, stable=True)
                top = order.indices[:, :5].clone()
                top[order.values[:, :5] <= 0] = -1
                preds[k].append(top)
    top1 = {k: correct1[k] / n for k in ks}
    top5 = {k: correct5[k] / n for k in ks}
    return top1, top5, ({k: torch.cat(v).cpu().numpy() for k, v in preds.items()} if return_predictions else {})


# ----------------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------------
def eval_knn(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    normalize: bool = True,
    backend: str = "auto",
    device: str | torch.device | None = None,
    clamp_k: bool = False,
    n_per_class: int | None = None,
    n_tries: int = 5,
    seed: int = 0,
    train_chunk_size: int = 16384,
    test_chunk_size: int = 512,
    metadata: Mapping[str, Any] | None = None,
    return_predictions: bool = False,
    progress: bool | None = False,
) -> dict:
    """Weighted kNN top-1/top-5 (DINO protocol) for every k in ``ks`` from one exact search at ``max(ks)``.

    Args:
        train_features: [N, D] array / tensor / memory-mapped ``.npy`` (path or array) / list of chunks.
        train_labels: [N] integer labels >= 0 (any such integers; the number of classes is inferred). The "no
            label" marker -1 (or any negative label) raises ``ValueError``, here and in ``test_labels``.
        test_features: [M, D] (held in memory).
        test_labels: [M] integer labels >= 0.
        ks: numbers of neighbours; all come from one search at ``max(ks)``.
        temperature: T of the vote weights ``exp(sim / T)``.
        normalize: L2-normalize features (cosine similarity). ``False`` searches raw inner products.
        backend: "torch" (blocked fp32 GEMM + running top-k), "faiss" (IndexFlatIP, GPU when faiss-gpu and
            ``device`` is CUDA), or "auto": on CPU the faster of the two, measured once per process by
            ``pick_backend`` (a ~0.6 s probe; "torch" without faiss, or on CUDA); ``SEER_KNN_BACKEND=torch|faiss``
            forces its answer. ``settings["backend"]`` / ``settings["backend_choice"]`` record what ran and why.
        device: where the search runs ("cpu", "cuda", None = CUDA when available).
        clamp_k: clamp ks larger than the train bank to its size instead of raising ``ValueError``.
        n_per_class: few-shot: sample this many train samples per class (all of a class that has fewer),
            ``n_tries`` times with seeds ``seed .. seed + n_tries - 1``; accuracies are averaged over tries.
        metadata: caller's settings recorded in the result (layer, resolution, checkpoint, dataset ...).
        return_predictions: add ``predictions[k]`` = [M, 5] top-5 class labels (-1 where fewer classes voted).
        progress: show the search's progress on stderr (``seer.progress``: rows, rate, ETA); ``None``: only for
            searches of ``PROGRESS_MIN_PAIRS`` train x test pairs or more.

    Returns:
        ``{"top1": {k: acc}, "top5": {k: acc}, "settings": {...}, "metadata": {...}, "timing": {...}}``;
        accuracies are fractions in [0, 1]. Write it with ``write_json``.
    """
    t0 = time.perf_counter()
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    bank = _Bank(train_features, "train_features")
    test_bank = _Bank(test_features, "test_features")
    y_train = _as_labels(train_labels, "train_labels")
    y_test = _as_labels(test_labels, "test_labels")
    if len(y_train) != bank.n:
        raise ValueError(f"train_features has {bank.n} rows but train_labels has {len(y_train)}")
    if len(y_test) != test_bank.n:
        raise ValueError(f"test_features has {test_bank.n} rows but test_labels has {len(y_test)}")
    if test_bank.dim != bank.dim:
        raise ValueError(f"feature dims differ: train_features has {bank.dim}, test_features has {test_bank.dim}")
    classes = np.unique(np.concatenate([y_train, y_test]))
    dev = _resolve_device(device)
    if backend == "auto":
        chosen, choice = pick_backend(dev, bank.dim, bank.n * test_bank.n)
    else:
        chosen, choice = backend, {"rule": "requested", "seconds": {}}
    settings: dict[str, Any] = {
        "protocol": "knn",
        "ks": ks,
        "temperature": float(temperature),
        "normalize": bool(normalize),
        "metric": "cosine" if normalize else "inner_product",
        "voting": "sum of exp(sim/T) per class (DINO); zero-vote classes never predicted; ties -> smaller class",
        "backend": chosen,
        "backend_choice": {"requested": backend, **choice},
        "device": str(dev),
        "n_train": bank.n,
        "n_test": test_bank.n,
        "n_classes": int(len(classes)),
        "n_train_classes": int(len(np.unique(y_train))),
        "feature_dim": bank.dim,
        "precision": "fp32",
        "train_chunk_size": int(train_chunk_size),
        "test_chunk_size": int(test_chunk_size),
        "clamp_k": bool(clamp_k),
    }
    test = _prepare(_to_tensor32(test_bank.take(np.arange(test_bank.n)), dev), normalize, "test_features", 0)
    y_test_t = torch.from_numpy(np.searchsorted(classes, y_test)).to(dev)
    y_train_c = np.searchsorted(classes, y_train)

    def run(sub_bank: _Bank, sub_labels: np.ndarray) -> tuple[dict, dict, dict, dict]:
        k_eff = {k: min(k, sub_bank.n) for k in ks}
        if any(k_eff[k] != k for k in ks) and not (clamp_k or n_per_class):
            raise ValueError(
                f"k={max(ks)} is larger than the train bank ({sub_bank.n} samples); pass smaller ks or clamp_k=True"
            )
        kmax = max(k_eff.values())
        ts = time.perf_counter()
        if chosen == "faiss":
            use_gpu = dev.type == "cuda" and _faiss_gpus() > 0
            sims, idx = _search_faiss(sub_bank, test, kmax, normalize, train_chunk_size, use_gpu, progress)
            sims, idx = sims.to(dev), idx.to(dev)
        else:
            sims, idx = _search_torch(sub_bank, test, kmax, normalize, train_chunk_size, test_chunk_size, dev, progress)
        search_s = time.perf_counter() - ts
        nb_labels = torch.from_numpy(sub_labels).to(dev)[idx]
        top1, top5, preds = {}, {}, {}
        for k in ks:  # vote per distinct effective k (clamped ks share a search)
            t1, t5, p = knn_vote(
                sims, nb_labels, y_test_t, [k_eff[k]], temperature, len(classes), return_predictions=return_predictions
            )
            top1[k], top5[k] = t1[k_eff[k]], t5[k_eff[k]]
            if return_predictions:
                pk = p[k_eff[k]]
                preds[k] = np.where(pk >= 0, classes[np.clip(pk, 0, None)], -1)
        return top1, top5, preds, {"search_s": search_s, "k_effective": k_eff}

    if n_per_class is None:
        top1, top5, preds, info = run(bank, y_train_c)
        settings["k_effective"] = info["k_effective"]
        result: dict[str, Any] = {"top1": top1, "top5": top5}
        timing = {"search_s": info["search_s"]}
    else:
        if n_per_class < 1 or n_tries < 1:
            raise ValueError(f"n_per_class and n_tries must be >= 1, got {n_per_class}, {n_tries}")
        tries = []
        search_s = 0.0
        counts = np.bincount(y_train_c, minlength=len(classes))
        short = int(((counts > 0) & (counts < n_per_class)).sum())
        if short:
            warnings.warn(
                f"few-shot: {short} classes have fewer than {n_per_class} train samples; all are used", stacklevel=2
            )
        for t in range(n_tries):
            rows = _few_shot_rows(y_train_c, n_per_class, seed + t)
            sub = _Bank(bank.take(rows), "train_features")
            top1, top5, preds, info = run(sub, y_train_c[rows])
            search_s += info["search_s"]
            tries.append(
                {
                    "seed": seed + t,
                    "n_train": int(len(rows)),
                    "top1": top1,
                    "top5": top5,
                    "k_effective": info["k_effective"],
                }
            )
        result = {
            "top1": {k: float(np.mean([tr["top1"][k] for tr in tries])) for k in ks},
            "top5": {k: float(np.mean([tr["top5"][k] for tr in tries])) for k in ks},
            "top1_std": {k: float(np.std([tr["top1"][k] for tr in tries])) for k in ks},
            "tries": tries,
        }
        settings.update(
            {
                "n_per_class": int(n_per_class),
                "n_tries": int(n_tries),
                "seed": int(seed),
                "classes_with_fewer_than_n": short,
            }
        )
        timing = {"search_s": search_s}
    timing["total_s"] = time.perf_counter() - t0
    result.update({"settings": settings, "metadata": dict(metadata or {}), "timing": timing})
    if return_predictions:
        result["predictions"] = preds
    return result


def _few_shot_rows(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rows.append(rng.choice(idx, size=min(n, len(idx)), replace=False))
    return np.sort(np.concatenate(rows))


# ----------------------------------------------------------------------------------------------------------------
# Output and CLI
# ----------------------------------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a result dict as JSON atomically (temp file in the same directory, then ``os.replace``)."""
    from seer.io import atomic_write  # the umask's mode (mkstemp alone leaves 0600: unreadable by the group)

    return atomic_write(Path(path), json.dumps(_jsonable(result), indent=2) + "\n")


def _load_split(path: str, labels_path: str | None, what: str) -> tuple[Any, np.ndarray, dict]:
    data = load_features(path)
    if "features" not in data:
        raise KeyError(f"{path}: no 'features' entry (keys: {sorted(data)})")
    if labels_path is not None:
        labels = (
            load_features(labels_path).get("features") if labels_path.endswith(".safetensors") else np.load(labels_path)
        )
    else:
        labels = data.get("labels")
    if labels is None:
        raise ValueError(f"{path}: no labels in the file; pass --{what}-labels LABELS.npy")
    fix = f"extract from a folder with class subfolders or pass --{what}-labels"
    labels = _as_labels(labels, f"{labels_path or path}: {what} labels", fix)  # the check eval_knn / eval_linear make
    meta = data.get("meta") if isinstance(data.get("meta"), Mapping) else {}
    return data["features"], labels, dict(meta)


def _cli_inputs(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple:
    """The train / test splits and the metadata of `seer knn` and `seer linear`: ``--meta KEY=VALUE`` pairs, the
    file names, and the settings `seer extract` recorded with the train features (model, layer, preprocessing)."""
    meta: dict[str, Any] = {"train_file": args.train, "test_file": args.test}
    for item in args.meta:
        if "=" not in item:
            p.error(f"--meta expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        meta[k] = v
    xtr, ytr, m1 = _load_split(args.train, args.train_labels, "train")
    xte, yte, _ = _load_split(args.test, args.test_labels, "test")
    if m1:
        meta["train_features_meta"] = {
            k: m1[k] for k in ("model", "layer", "normalize", "dtype", "preprocess", "source") if k in m1
        }
    return xtr, ytr, xte, yte, meta


def _cli_ks(p: argparse.ArgumentParser, ks: list[int] | None, n_train: int, accepted: bool) -> list[int]:
    """`seer knn`'s ks: the defaults above the train bank's size are left out with a one-line note (every default
    above it: the bank's size instead); ks given with ``--ks`` above it are an error naming the flags, unless
    ``accepted`` (``--clamp-k``, or few-shot, whose banks are small: ``eval_knn`` clamps and records them)."""
    if ks is None:
        kept = [k for k in DEFAULT_KS if k <= n_train] or [n_train]
        if kept != list(DEFAULT_KS):
            print(f"seer knn: note: the train bank has {n_train} samples: k = {' '.join(map(str, kept))} instead of "
                  f"the default {' '.join(map(str, DEFAULT_KS))} (--ks chooses)", file=sys.stderr)  # fmt: skip
        return kept
    big = sorted({k for k in ks if k > n_train})
    if big and not accepted:
        p.error(f"--ks {' '.join(map(str, big))}: larger than the train bank ({n_train} samples); pass smaller --ks, "
                "or --clamp-k to clamp them to the bank size")  # fmt: skip
    return ks


def cli_main(argv: list[str] | None = None) -> int:
    """`seer knn`: weighted kNN on feature files written by `seer extract`; writes the result as JSON."""
    p = argparse.ArgumentParser(prog="seer knn", description=cli_main.__doc__)
    p.add_argument("--train", required=True, help="train features (.npy memory-mapped, .npz, .safetensors, seer)")
    p.add_argument("--test", required=True, help="test features file")
    p.add_argument("--train-labels", default=None, help="labels .npy when the features file has none")
    p.add_argument("--test-labels", default=None, help="labels .npy when the features file has none")
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help=f"numbers of neighbours (default: {' '.join(map(str, DEFAULT_KS))}, those above the train "
                   "bank's size left out with a note)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--no-normalize", action="store_true", help="raw inner products instead of cosine")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--clamp-k", action="store_true", help="clamp a --ks value above the bank size instead of failing")
    p.add_argument("--n-per-class", type=int, default=None, help="few-shot: train samples per class")
    p.add_argument("--tries", type=int, default=5, help="few-shot: seeded tries averaged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-chunk-size", type=int, default=16384)
    p.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recorded in the result (layer=res5, resolution=224, checkpoint=...)",
    )
    p.add_argument("--out", default=None, help="JSON output path (default: print only)")
    args = p.parse_args(argv)
    configure_logging()
    xtr, ytr, xte, yte, meta = _cli_inputs(p, args)
    ks = _cli_ks(p, args.ks, len(ytr), args.clamp_k or args.n_per_class is not None)
    res = eval_knn(
        xtr,
        ytr,
        xte,
        yte,
        ks=ks,
        temperature=args.temperature,
        normalize=not args.no_normalize,
        backend=args.backend,
        device=args.device,
        clamp_k=args.clamp_k,
        n_per_class=args.n_per_class,
        n_tries=args.tries,
        seed=args.seed,
        train_chunk_size=args.train_chunk_size,
        metadata=meta,
        progress=True,
    )
    for k in res["settings"]["ks"]:
        print(f"k={k:<4d} top1 {100 * res['top1'][k]:6.2f}  top5 {100 * res['top5'][k]:6.2f}")
    if args.out:
        write_json(res, args.out)
        print(f"wrote {args.out}")
    return 0
