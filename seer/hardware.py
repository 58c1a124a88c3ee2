"""What this machine's CPU can do, asked of torch and oneDNN at run time (never guessed from the CPU's name).

Machines differ between runs: an Intel Xeon with AMX runs oneDNN's bf16 convolutions 2-3x faster than fp32, while
an AMD EPYC with AVX2 only has no oneDNN bf16 kernels at all (its fused convolution raises "bf16 path needs the
cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"). Every ISA-dependent choice in seer goes through
the functions here, so one place decides and tests can force each answer:

    SEER_CPU_BF16=0|1         environment override (also reaches worker processes)
    with force("cpu_bf16", False): ...   in-process override, for tests

oneDNN's own limit ``ONEDNN_MAX_CPU_ISA=AVX2`` (with ``ATEN_CPU_CAPABILITY=avx2``) makes a bigger CPU behave like
an AVX2-only one for real, which is how the suite checks the AVX2 branch on any machine.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import warnings
from collections.abc import Iterator

import torch

__all__ = [
    "cpu_bf16_kernels",
    "cpu_fp16_kernels",
    "cpu_amx",
    "cpu_info",
    "cpu_amp_dtype",
    "force",
]

_FORCED: dict[str, bool] = {}
_ENV = {"cpu_bf16": "SEER_CPU_BF16", "cpu_fp16": "SEER_CPU_FP16", "cpu_amx": "SEER_CPU_AMX"}
_WARNED: set[str] = set()


def _override(name: str) -> bool | None:
    if name in _FORCED:
        return _FORCED[name]
    raw = os.environ.get(_ENV[name], "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    return None


@functools.cache
def _probe(name: str) -> bool:
    mkldnn = torch.backends.mkldnn.is_available()
    try:
        if name == "cpu_bf16":
            # ideep's check, the one the bf16 convolution itself makes (it honours ONEDNN_MAX_CPU_ISA)
            return mkldnn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if name == "cpu_fp16":
            return mkldnn and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        if name == "cpu_amx":
            return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # an older torch without the query: the safe answer
        return False
    raise KeyError(name)


def _ask(name: str) -> bool:
    forced = _override(name)
    return _probe(name) if forced is None else forced


def cpu_bf16_kernels() -> bool:
    """True where oneDNN has bf16 convolution / matmul kernels on this CPU (AVX512-BW/VL/DQ, AVX-NE-CONVERT, AMX)."""
    return _ask("cpu_bf16")


def cpu_fp16_kernels() -> bool:
    """True where oneDNN has fp16 convolution kernels on this CPU (AVX512-FP16 or AMX-FP16)."""
    return _ask("cpu_fp16")


def cpu_amx() -> bool:
    """True on CPUs with AMX tiles, where bf16 inference is 2-3x fp32 (elsewhere bf16 is no faster than fp32)."""
    return _ask("cpu_amx")


@contextlib.contextmanager
def force(name: str, value: bool) -> Iterator[None]:
    """Answer ``name`` ("cpu_bf16", "cpu_fp16", "cpu_amx") with ``value`` inside the block, whatever the CPU."""
    if name not in _ENV:
        raise KeyError(f"unknown capability {name!r}; one of {sorted(_ENV)}")
    before = _FORCED.get(name)
    _FORCED[name] = bool(value)
    try:
        yield
    finally:
        if before is None:
            _FORCED.pop(name, None)
        else:
            _FORCED[name] = before


def cpu_amp_dtype(dtype: torch.dtype | None, *, what: str) -> torch.dtype | None:
    """The CPU autocast dtype to use for a requested one: ``dtype`` where oneDNN has kernels for it, else None
    (fp32) with one warning line per process and ``what`` that says why."""
    if dtype is None or dtype == torch.float32:
        return None
    ok = cpu_bf16_kernels() if dtype == torch.bfloat16 else cpu_fp16_kernels() if dtype == torch.float16 else True
    if ok:
        return dtype
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    key = f"{what}:{name}"
    if key not in _WARNED:
        _WARNED.add(key)
        need = "AVX512-BW/VL/DQ, AVX-NE-CONVERT or AMX" if name == "bf16" else "AVX512-FP16 or AMX-FP16"
        warnings.warn(
            f"{what}: {name} requested, but this CPU has no oneDNN {name} kernels (needs {need}; "
            f"torch reports {torch.backends.cpu.get_cpu_capability()}): running in fp32",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


@functools.cache
def _cpu_model() -> str:
    """The CPU's model name, for the record only (benchmark results), never for a decision."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_info() -> dict:
    """CPU model, torch's ISA level and the capabilities above: recorded in every benchmark result."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": cpu_bf16_kernels(),
        "onednn_fp16": cpu_fp16_kernels(),
        "amx": cpu_amx(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
    }
