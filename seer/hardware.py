"""What this machine's CPU can do, asked of torch and oneDNN at run time (never guessed from the CPU's name).

Machines differ between runs: an Intel Xeon with AMX runs oneDNN's bf16 convolutions 2-3x faster than fp32, while
an AMD EPYC with AVX2 only has no oneDNN bf16 kernels at all (its fused convolution raises "bf16 path needs the
cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"). Every ISA-dependent choice in seer goes through
the functions here, so one place decides and tests can force each answer:

    SEER_CPU_BF16=0|1         environment override (also reaches worker processes)
    with force("cpu_bf16", False): ...   in-process override, for tests

oneDNN's own limit ``ONEDNN_MAX_CPU_ISA=AVX2`` (with ``ATEN_CPU_CAPABILITY=avx2``) makes a bigger CPU behave like
an AVX2-only one for real, which is how the suite checks the AVX2 branch on any machine.

``resolve_device`` is the one place a user's device ("auto", "cpu", "cuda", "cuda:1", a torch.device) becomes a
``torch.device``: asking for a GPU that is not there fails here, naming the argument and what this machine has,
rather than deep inside torch with its driver's words.
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
    "resolve_device",
    "cuda_summary",
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


# ----------------------------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------------------------
_DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"


def _cuda_build() -> str | None:
    """The GPU toolkit this torch was built for ("CUDA 12.4", "ROCm 6.1"), or None for a CPU-only build."""
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    hip = getattr(torch.version, "hip", None)
    return f"ROCm {hip}" if hip else None


def _no_gpu_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False on a CUDA build: torch's own first sentence when it has one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - its message (no driver, driver too old, ...) is the reason we report
        text = str(exc).split(". ")[0].strip()
        if text:
            return text + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
    return "no GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")


def cuda_summary() -> str:
    """One line on this torch's GPU support: its build and the GPUs it sees (for ``seer --version`` and errors)."""
    build = _cuda_build()
    if build is None:
        return f"CPU-only build of torch {torch.__version__} (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} built for {build}; no GPU: {_no_gpu_reason()}"
    n = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    return f"torch {torch.__version__} built for {build}; {n} GPU{'s' if n != 1 else ''} visible: {', '.join(names)}"


def resolve_device(device: str | int | torch.device | None = "auto", *, what: str = "device") -> torch.device:
    """The ``torch.device`` a user's ``device`` names, checked against this machine before torch sees it.

    Args:
        device: "auto" or None (CUDA when a GPU is visible, else the CPU), "cpu", "cuda" (the current GPU),
            "cuda:N" or N (GPU N), or a ``torch.device``. Other torch device types ("meta", "mps", ...) pass through.
        what: the argument or config key the value came from, named in the error (``"train.device"``).

    Raises:
        ValueError: naming ``what`` and the value, when it is not a device, or when it asks for a GPU this machine
            does not have: a CPU-only torch build, no GPU visible (torch's reason: no driver, CUDA_VISIBLE_DEVICES),
            or an index beyond the visible GPUs (with how many there are).
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(
            f"{what}: expected {_DEVICE_FORMS} or a torch.device, got {device!r} ({type(device).__name__})"
        )
    if isinstance(device, str):
        device = device.strip()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:  # torch: "Expected one of cpu, cuda, ... device type at start of ..."
        raise ValueError(f"{what}={device!r} is not a device: use {_DEVICE_FORMS}") from exc
    if dev.type == "cuda":
        build = _cuda_build()
        if build is None:
            raise ValueError(
                f"{what}={device!r}, but this torch ({torch.__version__}) is a CPU-only build (torch.version.cuda is "
                f"None): use {what}='cpu' or 'auto', or install a CUDA build of torch"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                f"{what}={device!r}, but no CUDA GPU is visible to this process ({_no_gpu_reason()}; torch "
                f"{torch.__version__} built for {build}): use {what}='cpu' or 'auto'"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            which = "cuda:0" if n == 1 else f"cuda:0 .. cuda:{n - 1}"
            where = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
            raise ValueError(f"{what}={device!r}, but this process sees {n} CUDA GPU{'s' if n != 1 else ''} "
                             f"({which}{where})")  # fmt: skip
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{what}={device!r}, but this machine has no Apple MPS device: use {what}='cpu' or 'auto'")
    return dev
