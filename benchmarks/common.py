"""Shared helpers for the benchmarks: timing, the fp32 matmul peak, machine info, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def timeit(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 3, min_time: float = 0.0) -> float:
    """Median seconds of one call of ``fn`` over ``repeat`` timed calls (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_mm_peak(n: int = 2048, repeat: int = 5) -> float:
    """Achieved fp32 torch.mm GFLOP/s on square n x n matrices: the machine's practical GEMM peak."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = timeit(lambda: torch.mm(a, b), warmup=2, repeat=repeat)
    return 2 * n**3 / seconds / 1e9


def machine_info() -> dict:
    """CPU, cores, threads and library versions, recorded next to every figure."""
    import torch

    info = {
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    from seer import hardware

    info.update(hardware.cpu_info())  # ISA level and the capabilities every ISA-dependent choice was made from
    for lib in ("torchvision", "timm", "transformers", "numpy", "faiss", "sklearn", "webdataset", "PIL"):
        try:
            module = __import__(lib)
            info[lib] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional library is just not recorded
            pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def status(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "MISS"


def write_result(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (payload + machine info) and ``results/<name>.md`` atomically."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(), **payload}
    json_path, md_path = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    for path, text in ((json_path, json.dumps(payload, indent=2, default=str)), (md_path, markdown.rstrip() + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(markdown)
    return json_path, md_path
