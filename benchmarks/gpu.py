"""GPU check: one node with 1-8 GPUs, what seer's GPU path does there, in under 5 minutes on one GPU.

    python -m benchmarks.gpu                      # every section; results/gpu.json + results/gpu.md
    python -m benchmarks.gpu --gpus 8 --out DIR   # at most 8 GPUs of this node; results elsewhere
    python -m benchmarks.gpu --sections train knn # some sections only
    python -m benchmarks.gpu --cpu-check          # only the checks that need no GPU (exit 0 when they pass)

Sections, each written to the JSON (and the markdown table) as soon as it has its figures:

1. ``tests``: the ``gpu``-marked tests (``pytest -m gpu``, a subprocess): passed / failed / skipped counts.
2. ``train``: a SwAV training step of the RG-32 and RG-128 recipes (``configs/pretrain/seer_rg32.yaml``,
   ``seer_rg128.yaml``: FSDP2, per-block activation checkpointing, bf16, LARS, 16 images per GPU, 2x224 + 4x96
   crops) through seer's own loop (``seer.train.loop.pretrain``), launched with torchrun on every GPU used (FSDP2
   on a world of 1 on one GPU, as ``torchrun --nproc_per_node 1`` runs it). Synthetic data: the recipe's crops of
   ``data.source: synthetic``, generated once and served from the GPU every step, because generating them takes
   ~0.3 s per 16 images on a CPU core, more than a step; the prototypes are not frozen (the steady state).
   5 warm-up steps, then 20 timed (4 log windows): images/s, MFU (model FLOPs of ``seer plan``, 3 x forward) and
   HFU (4 x forward: with the recomputation) against the GPU's dense bf16 peak (``PEAK_BF16_TFLOPS`` by device
   name, ``SEER_GPU_PEAK_TFLOPS`` overrides) and against a bf16 matmul measured here; peak memory
   (``torch.cuda.max_memory_allocated``, max over ranks) against ``seer plan``'s prediction
   (``seer.train.plan.plan``) without its fixed 3 GB framework allowance; the checkpoint save the loop writes at
   the end, timed. BatchNorm syncs as the recipes say (``train.sync_bn_group`` 64: all GPUs of one node).
3. ``syncbn`` (2+ GPUs): the RG-32 step with ``train.sync_bn_group`` = 0 (all ranks) against smaller groups
   (half the GPUs, 2, 1 = no sync), in one torchrun launch.
4. ``extract``: ``seer.extract_features`` on GPU 0 with a randomly initialized RG-32 trunk: uint8 tensors
   (preprocessing + trunk; fp32 and bf16 autocast) and 512 JPEG files end to end (decoding in worker processes).
5. ``knn``: ``seer.evaluation.knn.knn_search`` on GPU 0, 100k x 10k x 1024-d, k=200: torch (blocked GEMM +
   running top-k) against faiss (``GpuIndexFlatIP`` with faiss-gpu; skipped with faiss-cpu only), and whether
   they find the same neighbours.

Run it from a checkout with the dev extra (``make venv``: pytest, timm), faiss-gpu optional; ``make bench`` runs it
only where torch sees a GPU. It records the GPUs, driver, torch, CUDA, cuDNN and NCCL versions. Before any GPU work
it runs the checks that need no GPU (the recipes load with the check's overrides, ``seer plan`` runs for both
models at this world size, the ``gpu`` tests are collected, torchrun and faiss import). On a machine without a CUDA
GPU it writes those, prints ``no CUDA GPU: <why>`` as its last line and exits 3. Exit codes: 0 every section
passed, 1 a section or check failed, 2 bad arguments, 3 no CUDA GPU.

How long it should take (estimated, nothing measured on a GPU yet: no GPU has run seer). Steps cost little: one
RG-32 step is 11.3 TFLOP per GPU with the recomputation (``seer plan``), 33 ms at 35% of an H100's 989 TFLOP/s,
and one RG-128 step 44.7 TFLOP, 130 ms; 25 steps of both are ~4 s. The rest is start-up, which does not shrink with
more GPUs:

| section | 1 H100 | 8 x H100 (one node) |
|---|---|---|
| CPU checks (configs, plans, test collection, versions) | 15 s | 15 s |
| gpu tests (collection ~7 s + 3 tests) | 30 s | 30 s |
| RG-32: torchrun + imports ~10 s, build 4 s, cuDNN autotuning ~10 s, 25 steps 1 s, save 1.4 GB ~3 s | 30 s | 35 s |
| RG-128: build 7 s, autotuning ~15 s, 25 steps 4 s, save 6.2 GB (1 GPU) / 0.8 GB per GPU (8) ~10 s | 50 s | 45 s |
| sync BN: 4 RG-32 runs in one launch (groups 8, 4, 2, 1) | - | 80 s |
| extract (2,048 tensors x 2 precisions, 512 JPEGs written and read) | 25 s | 25 s |
| kNN (100k x 10k x 1024: 4.1 TFLOP per search, torch and faiss, data generation ~5 s) | 15 s | 15 s |
| total | ~3 min | ~4 min |
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
NAME = "gpu"
SECTIONS = ("tests", "train", "syncbn", "extract", "knn")
MODELS = {"rg32": "seer_rg32", "rg128": "seer_rg128"}  # the two recipes the train section runs
SYNCBN_MODEL = "rg32"
PEAK_ENV = "SEER_GPU_PEAK_TFLOPS"
NO_GPU_EXIT = 3
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name in this order (more specific names first: "H100 PCIe" before "H100", "A100" before
# "A10"). A GPU not listed gets no MFU unless SEER_GPU_PEAK_TFLOPS is set.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"GH200", 989.0),
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),
    (r"H100 PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"H100|H800", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
]


# ----------------------------------------------------------------------------------------------------------------
# Small pure helpers (tested on CPU)
# ----------------------------------------------------------------------------------------------------------------
def gpu_peak_tflops(device_name: str, environ: dict | None = None) -> tuple[float | None, str]:
    """Dense bf16 peak TFLOP/s of a GPU by its name -> ``(tflops or None, where it came from)``."""
    env = os.environ if environ is None else environ
    forced = env.get(PEAK_ENV, "").strip()
    if forced:
        try:
            value = float(forced)
        except ValueError:
            raise ValueError(f"{PEAK_ENV} must be a number of TFLOP/s, got {forced!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{PEAK_ENV} must be a finite number > 0, got {forced!r}")
        return value, f"{PEAK_ENV}"
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, f"table ({pattern})"
    return None, f"unknown GPU {device_name!r}: set {PEAK_ENV}"


def syncbn_groups(n_gpus: int) -> list[int]:
    """The ``train.sync_bn_group`` settings compared on ``n_gpus``: 0 (all ranks), then half, 2 and 1 (no sync),
    each a divisor smaller than the world."""
    out = [0]
    for g in (n_gpus // 2, 2, 1):
        if 0 < g < n_gpus and n_gpus % g == 0 and g not in out:
            out.append(g)
    return out


def train_figures(result: dict, warmup_steps: int, flops_per_image: float, hfu_factor: float,
                  n_gpus: int, peak_tflops: float | None, mm_tflops: float | None) -> dict:  # fmt: skip
    """Throughput, MFU and HFU of one training run from the loop's ``metrics.jsonl`` records.

    The records after ``warmup_steps`` are equal log windows; each holds the window's images/s (wall clock, the
    host synced once a step). The step time is their mean seconds per step (images/s is the global batch over it).
    """
    global_batch = result["global_batch"]
    windows = [r for r in result["records"] if r["step"] > warmup_steps and r.get("images_per_sec")]
    if not windows:
        raise ValueError(f"no log window after the {warmup_steps} warm-up steps in {len(result['records'])} records")
    step_s = [global_batch / r["images_per_sec"] for r in windows]
    mean_step = sum(step_s) / len(step_s)
    ips = global_batch / mean_step
    achieved = ips * flops_per_image / n_gpus / 1e12  # model TFLOP/s per GPU
    out = {
        "windows": len(windows),
        "step_s": mean_step,
        "step_s_min": min(step_s),
        "step_s_max": max(step_s),
        "images_per_sec": ips,
        "images_per_sec_per_gpu": ips / n_gpus,
        "tflops_per_gpu": achieved,
        "data_s": sum(r.get("data_time", 0.0) for r in windows) / len(windows),
        "loss": windows[-1].get("loss"),
    }
    out["mfu"] = achieved / peak_tflops if peak_tflops else None
    out["hfu"] = achieved * hfu_factor / peak_tflops if peak_tflops else None
    out["mfu_of_measured_mm"] = achieved / mm_tflops if mm_tflops else None
    return out


def _fmt(x, spec: str = ".1f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# ----------------------------------------------------------------------------------------------------------------
# The report: rewritten (JSON + markdown, atomically) every time a figure arrives
# ----------------------------------------------------------------------------------------------------------------
class Report:
    """The payload of results/gpu.json; ``write()`` rewrites it and results/gpu.md."""

    def __init__(self, out_dir: Path, args: dict):
        self.out_dir = out_dir
        self.payload: dict = {"benchmark": NAME, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "status": "running",
                              "args": args, "machine": None, "gpu": None, "cpu_checks": {}, "sections": {},
                              "seconds": {}}  # fmt: skip

    def section(self, name: str) -> dict:
        return self.payload["sections"].setdefault(name, {"status": "running"})

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.payload["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        for path, text in ((self.out_dir / f"{NAME}.json", json.dumps(self.payload, indent=2, default=str)),
                           (self.out_dir / f"{NAME}.md", render(self.payload))):  # fmt: skip
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)


def render(p: dict) -> str:
    """The markdown table of a payload (whatever sections it has so far)."""
    lines = [f"# GPU check ({p.get('status')})", ""]
    gpu = p.get("gpu") or {}
    if gpu:
        devs = gpu.get("devices") or []
        name = f"{len(devs)} x {devs[0]['name']}" if devs else "none"
        lines += [
            "| GPU | driver | torch | CUDA | cuDNN | NCCL | bf16 peak (TFLOP/s) | bf16 matmul measured |",
            "|---|---|---|---|---|---|---|---|",
            f"| {name} | {gpu.get('driver') or '-'} | {gpu.get('torch')} | {gpu.get('cuda') or '-'} | "
            f"{gpu.get('cudnn') or '-'} | {gpu.get('nccl') or '-'} | {_fmt(gpu.get('peak_tflops'), '.0f')} "
            f"({gpu.get('peak_source', '-')}) | {_fmt(gpu.get('bf16_mm_tflops'), '.0f')} |",
            "",
        ]
    m = p.get("machine") or {}
    if m:
        lines += [f"CPU: {m.get('processor')}, {m.get('cores')} cores; python {m.get('python')}.", ""]
    checks = p.get("cpu_checks") or {}
    if checks:
        lines += ["| CPU-side check | result |", "|---|---|"]
        for key, value in checks.items():
            ok = value.get("ok") if isinstance(value, dict) else value
            note = value.get("note", "") if isinstance(value, dict) else ""
            lines.append(f"| {key} | {'ok' if ok else 'FAILED'}{': ' + note if note else ''} |")
        lines.append("")
    sections = p.get("sections") or {}
    for name in SECTIONS:
        s = sections.get(name)
        if s is None:
            continue
        lines += [f"## {name}: {s.get('status')}"]
        if any(s.get(key) for key in ("passed", "runs", "rows", "note", "error")):
            lines.append("")
        if name == "tests" and "passed" in s:
            counts = f"{s['passed']} | {s['failed']} | {s['errors']} | {s['skipped']} | {s.get('seconds', 0):.0f}"
            lines += ["| passed | failed | errors | skipped | seconds |", "|---|---|---|---|---|", f"| {counts} |"]
            lines += [f"- failed: `{t}`" for t in s.get("failures", [])]
        if name == "train" and s.get("runs"):
            lines += [
                "| model | GPUs | batch/GPU | img/s | img/s/GPU | step s (min-max) | MFU | HFU | MFU of bf16 mm | "
                "peak alloc GiB | plan GiB (w/o 3 GB overhead) | measured/plan | save s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in s["runs"]:
                f = r.get("figures") or {}
                lines.append(
                    f"| {r['name']} | {r.get('gpus')} | {r.get('batch_per_gpu')} | {_fmt(f.get('images_per_sec'))} | "
                    f"{_fmt(f.get('images_per_sec_per_gpu'))} | {_fmt(f.get('step_s'), '.3f')} "
                    f"({_fmt(f.get('step_s_min'), '.3f')}-{_fmt(f.get('step_s_max'), '.3f')}) | {_pct(f.get('mfu'))} | "
                    f"{_pct(f.get('hfu'))} | {_pct(f.get('mfu_of_measured_mm'))} | "
                    f"{_fmt(r.get('peak_allocated_gib'), '.2f')} | {_fmt(r.get('plan_allocated_gib'), '.2f')} | "
                    f"{_fmt(r.get('measured_over_plan'), '.2f')} | {_fmt(r.get('save_s'))} |"
                    + (f" {r['error']} |" if r.get("error") else "")
                )
        if name == "syncbn" and s.get("runs"):
            lines += ["| train.sync_bn_group | ranks per group | step s | img/s | step vs all ranks |",
                      "|---|---|---|---|---|"]  # fmt: skip
            base = next((r for r in s["runs"] if r.get("group") == 0 and r.get("figures")), None)
            for r in s["runs"]:
                f = r.get("figures") or {}
                rel = f["step_s"] / base["figures"]["step_s"] if f and base else None
                lines.append(f"| {r.get('group')} | {r.get('ranks_per_group')} | {_fmt(f.get('step_s'), '.3f')} | "
                             f"{_fmt(f.get('images_per_sec'))} | {_fmt(rel, '.3f')} |")  # fmt: skip
        if name == "extract" and s.get("rows"):
            lines += ["| input | amp | images | img/s |", "|---|---|---|---|"]
            lines += [f"| {r['input']} | {r['amp'] or 'fp32'} | {r['images']} | {r['images_per_sec']:.0f} |"
                      for r in s["rows"]]  # fmt: skip
        if name == "knn" and s.get("rows"):
            lines += ["| backend | seconds | GFLOP/s | same neighbours as torch |", "|---|---|---|---|"]
            lines += [f"| {r['backend']} | {r['seconds']:.3f} | {r['gflops']:.0f} | {_pct(r.get('overlap'))} |"
                      for r in s["rows"]]  # fmt: skip
        for key in ("note", "error"):
            if s.get(key):
                lines += ["", f"{key}: {s[key]}"]
        lines.append("")
    if p.get("seconds"):
        lines.append("Seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in p["seconds"].items()) + ".")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------------------------
def no_gpu_reason() -> str | None:
    """None when a CUDA GPU is usable, else why not (torch's own words where it has them)."""
    import torch

    if torch.version.cuda is None:
        return f"this torch is a CPU build ({torch.__version__}); install a CUDA build"
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - its message is the reason we report
        return f"{str(exc).split('. ')[0].strip()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"torch.cuda.is_available() is False (CUDA_VISIBLE_DEVICES={visible!r}, torch {torch.__version__})"


def gpu_versions() -> dict:
    """Driver, torch, CUDA, cuDNN and NCCL versions and the visible devices (CUDA initialized)."""
    import torch

    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": None, "cudnn": None, "nccl": None}
    with contextlib.suppress(Exception):
        info["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(Exception):
        v = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    if info["driver"] is None:
        with contextlib.suppress(OSError):
            text = Path("/proc/driver/nvidia/version").read_text()
            found = re.search(r"Kernel Module\s+([\d.]+)", text)
            info["driver"] = found.group(1) if found else text.splitlines()[0]
    devices = []
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        devices.append({"name": prop.name, "memory_gib": prop.total_memory / 2**30,
                        "capability": f"{prop.major}.{prop.minor}", "sms": prop.multi_processor_count})  # fmt: skip
    info["devices"] = devices
    return info


def measure_bf16_mm(n: int = 8192, repeat: int = 10) -> float:
    """Achieved bf16 torch.mm TFLOP/s on GPU 0 (n x n): the practical peak next to the data-sheet one."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        torch.mm(a, b)
    stop.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(stop) / 1000 / repeat
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / seconds / 1e12


# ----------------------------------------------------------------------------------------------------------------
# Training runs: seer's loop under torchrun (the worker below), one launch for a list of runs
# ----------------------------------------------------------------------------------------------------------------
def train_overrides(recipe: str, run_dir: Path, *, steps: int, warmup: int, batch_per_gpu: int, device: str,
                    extra: list[str] = ()) -> list[str]:  # fmt: skip
    """The recipe's config with synthetic data, ``warmup + steps`` steps logged every ``warmup`` steps, no
    checkpoint but the loop's final one, the prototypes trained from the first step."""
    from seer.config import crop_shapes, load_config

    largest = max(r for _, r in crop_shapes(load_config(recipe).data))
    return [
        "data.source=synthetic",
        f"data.image_size={largest}",
        "data.workers=0",
        f"data.batch_size_per_gpu={batch_per_gpu}",
        "data.global_batch_size=0",
        f"train.total_steps={warmup + steps}",
        f"train.log_every={warmup}",
        "train.ckpt_every_steps=0",
        "train.ckpt_every_minutes=0",
        "train.tensorboard=false",
        "train.monitor_images=null",
        "train.lock_wait_minutes=0",
        "train.dist_timeout_minutes=5",  # a hung rank fails the section instead of the 10-minute default
        f"train.device={device}",
        "optim.warmup_iters=0",
        "swav.freeze_prototypes_iters=0",
        f"run_dir={run_dir}",
        *extra,
    ]


def launch_runs(runs: list[dict], nproc: int, workdir: Path, *, device: str, timeout: float,
                on_result: Callable[[dict], None]) -> tuple[int, str]:  # fmt: skip
    """Run ``runs`` (``{"name", "config", "overrides"}``) one after another in one torchrun launch of ``nproc``
    processes; ``on_result`` gets each run's result as soon as rank 0 writes it. Returns (exit code, log tail)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "spec.json"
    out = workdir / "results.jsonl"
    log = workdir / "torchrun.log"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps({"runs": runs, "out": str(out), "device": device}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "benchmarks.gpu", "--worker", str(spec)]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)  # torchrun sets its own; a surrounding job's must not leak in
    seen = 0
    t0 = time.time()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        while True:
            rc = proc.poll()
            if out.exists():
                text = out.read_text()
                lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # whole lines only
                for line in lines[seen:]:
                    seen += 1
                    try:
                        on_result(json.loads(line))
                    except Exception:  # noqa: BLE001 - a bad record must not leave the launch running unwatched
                        traceback.print_exc()
            if rc is not None:
                break
            if time.time() - t0 > timeout:
                proc.kill()
                proc.wait()
                rc = 124
                break
            time.sleep(1.0)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    return rc, tail


def _serve_one_batch(loop_module, device: str) -> str:
    """Make ``data.source: synthetic`` serve its first batch from the device every step (benchmark only).

    Generating the crops costs ~0.3 s per 16 images on a CPU core, more than a GPU step: the check would time the
    generator. The first batch is the real generator's, so shapes and values are what the recipe trains on.
    """
    import torch

    real = getattr(loop_module, "SyntheticMultiCrop", None)
    if real is None:
        return "generated every step (seer.train.loop has no SyntheticMultiCrop to replace: may bound img/s)"

    class OneBatch(real):
        _cached = None

        def batch(self, step: int, rank: int, batch_size: int, world_size: int) -> list:
            if self._cached is None:
                dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
                self._cached = [c.to(dev) for c in super().batch(0, rank, batch_size, world_size)]
            return self._cached

    loop_module.SyntheticMultiCrop = OneBatch
    return "one synthetic batch, generated once, served from the device every step"


def _worker(spec_path: str) -> NoReturn:
    """One torchrun rank: train each run of the spec with ``seer.train.loop.pretrain``; rank 0 appends results."""
    import torch
    import torch.distributed as dist

    import seer.train.checkpoint as checkpoint
    from seer.config import batch_per_gpu, load_config
    from seer.distributed.env import destroy_distributed
    from seer.train import loop

    spec = json.loads(Path(spec_path).read_text())
    device = spec["device"]
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())  # before any CUDA call lands on GPU 0
    data_note = _serve_one_batch(loop, device)
    saves: list[float] = []
    real_save = checkpoint.save_checkpoint

    def timed_save(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real_save(*args, **kwargs)
        finally:
            saves.append(time.perf_counter() - t)

    checkpoint.save_checkpoint = timed_save  # the loop imports it from the module at each run

    def emit(record: dict) -> None:
        with open(spec["out"], "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    ok = True
    for run in spec["runs"]:
        saves.clear()
        try:
            cfg = load_config(run["config"], run["overrides"])
            gc.collect()  # the previous run's model and optimizer (FSDP hooks hold reference cycles)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            summary = loop.pretrain(cfg)
            wall = time.perf_counter() - t0
            if device == "cuda":
                peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()],
                                     dtype=torch.float64, device="cuda")  # fmt: skip
            else:
                peaks = torch.tensor([float(loop.peak_memory_bytes(torch.device("cpu")))] * 2, dtype=torch.float64)
            if dist.is_initialized():
                dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
            world = dist.get_world_size() if dist.is_initialized() else 1
            if rank == 0:
                metrics = Path(cfg.run_dir) / "metrics.jsonl"
                records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                emit({"name": run["name"], "ok": True, "world_size": world, "batch_per_gpu": batch_per_gpu(cfg, world),
                      "global_batch": summary["global_batch"], "records": records, "wall_s": wall,
                      "save_s": sum(saves) if saves else None, "peak_allocated_bytes": peaks[0].item(),
                      "peak_reserved_bytes": peaks[1].item(), "loss": summary.get("loss"), "data": data_note,
                      "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), **run.get("meta", {})})  # fmt: skip
            if dist.is_initialized():
                dist.barrier()
            if rank == 0:
                shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a 6 GB RG-128 checkpoint must not pile up
        except Exception as exc:  # noqa: BLE001 - recorded, then this rank stops (torchrun stops the others)
            emit({"name": run["name"], "ok": False, "rank": rank, "error": f"{type(exc).__name__}: {exc}"[:2000],
                  **run.get("meta", {})})  # fmt: skip
            traceback.print_exc()
            ok = False
            break
    destroy_distributed(wait_for_peers=ok)
    # Skip the interpreter's teardown: gloo's threads can abort it ("terminate called without an active exception")
    # after all work is done, which torchrun would report as this rank failing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------
def cpu_checks(report: Report, n_gpus: int, sections: list[str], batch: int) -> bool:
    """Everything that needs no GPU: recipes, ``seer plan`` for both models, test collection, imports."""
    from seer.config import TrainConfig, load_config, validate
    from seer.train.plan import cli_main as plan_cli

    checks = report.payload["cpu_checks"]
    world = max(1, n_gpus)
    tmp = Path(tempfile.gettempdir()) / "seer-gpu-check-plan"
    for recipe in MODELS.values():
        try:
            overrides = train_overrides(recipe, tmp, steps=20, warmup=5, batch_per_gpu=batch, device="cuda")
            validate(load_config(recipe, overrides), world)
            checks[f"config {recipe}"] = {"ok": True, "note": f"loads with the check's overrides at world {world}"}
        except Exception as exc:  # noqa: BLE001 - a check's failure is its result
            checks[f"config {recipe}"] = {"ok": False, "note": f"{type(exc).__name__}: {exc}"}
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                rc = plan_cli(["--config", recipe, "--world-size", str(world), "--json", *overrides])
            p = json.loads(out.getvalue()) if rc == 0 else None
            note = (f"{p['memory_bytes']['total'] / 2**30:.1f} GB per GPU, {p['flops_per_image'] / 1e9:.0f} GFLOP "
                    f"per image" if p else f"exit {rc}")  # fmt: skip
            checks[f"seer plan {recipe}"] = {"ok": rc == 0, "note": note}
        except Exception as exc:  # noqa: BLE001
            checks[f"seer plan {recipe}"] = {"ok": False, "note": f"{type(exc).__name__}: {exc}"}
    has_group = "sync_bn_group" in TrainConfig.__dataclass_fields__
    checks["train.sync_bn_group"] = {"ok": has_group or "syncbn" not in sections, "present": has_group,
                                     "note": "present" if has_group else "not in this seer's config"}  # fmt: skip
    try:
        import torch.distributed.run  # noqa: F401

        checks["torchrun"] = {"ok": True}
    except ImportError as exc:
        checks["torchrun"] = {"ok": False, "note": str(exc)}
    try:
        import faiss

        gpu_build = hasattr(faiss, "GpuIndexFlatIP")
        kind = f"GPU build, {faiss.get_num_gpus()} GPUs" if gpu_build else "CPU build: no GPU kNN comparison"
        checks["faiss"] = {"ok": True, "note": f"faiss {faiss.__version__}, {kind}"}
    except ImportError:
        checks["faiss"] = {"ok": True, "note": "not installed: the kNN section runs torch only"}
    if "tests" in sections:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider"]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        found = re.search(r"(\d+)(?:/\d+)? tests? collected", out.stdout)
        n = int(found.group(1)) if found else 0
        checks["gpu tests collected"] = {"ok": out.returncode == 0 and n > 0, "note": f"{n} tests"}
    report.write()
    return all(v["ok"] for v in checks.values())


def section_tests(report: Report, timeout: float) -> bool:
    s = report.section("tests")
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        t0 = time.perf_counter()
        try:
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            s.update(status="failed", error=f"pytest -m gpu did not finish in {timeout:.0f} s")
            return False
        s["seconds"] = time.perf_counter() - t0
        if not junit.exists():
            s.update(status="failed", error=(out.stdout + out.stderr)[-2000:])
            return False
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failures = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                    if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = out.returncode == 0 and not failures and passed > 0
    s.update(status="passed" if ok else "failed", passed=passed, failed=counts["failures"], errors=counts["errors"],
             skipped=counts["skipped"], failures=failures)  # fmt: skip
    if not ok:
        s["output_tail"] = out.stdout[-3000:]
    return ok


def _plan_for(recipe: str, overrides: list[str], world: int, gpu_mem_gib: float | None) -> dict:
    from seer.config import load_config
    from seer.train.plan import plan

    return plan(load_config(recipe, overrides), world, gpu_mem_gib)


def section_train(report: Report, name: str, runs: list[dict], nproc: int, workdir: Path, *, device: str,
                  warmup: int, timeout: float, gpu: dict) -> bool:  # fmt: skip
    """Launch ``runs`` on ``nproc`` ranks; each result becomes a row of section ``name`` when it arrives."""
    s = report.section(name)
    s["runs"] = []
    mem_gib = (gpu.get("devices") or [{}])[0].get("memory_gib")

    def on_result(res: dict) -> None:
        row = {k: res.get(k) for k in ("name", "ok", "error", "batch_per_gpu", "global_batch", "save_s", "wall_s",
                                       "data", "cudnn_benchmark", "group", "ranks_per_group")}  # fmt: skip
        row["gpus"] = res.get("world_size", nproc)
        if res.get("ok"):
            run = next(r for r in runs if r["name"] == res["name"])
            p = _plan_for(run["config"], run["overrides"], res["world_size"], mem_gib)
            factor = p["flops_per_step_with_recompute"] / p["flops_per_step"]
            row["figures"] = train_figures(res, warmup, p["flops_per_image"], factor, res["world_size"],
                                           gpu.get("peak_tflops"), gpu.get("bf16_mm_tflops"))  # fmt: skip
            row["peak_allocated_gib"] = res["peak_allocated_bytes"] / 2**30
            row["peak_reserved_gib"] = res["peak_reserved_bytes"] / 2**30
            row["plan_total_gib"] = p["memory_bytes"]["total"] / 2**30
            row["plan_allocated_gib"] = (p["memory_bytes"]["total"] - p["memory_bytes"]["overhead"]) / 2**30
            row["measured_over_plan"] = row["peak_allocated_gib"] / row["plan_allocated_gib"]
            row["plan"] = {"fsdp_units_counted": p["config"]["fsdp"], "memory_bytes": p["memory_bytes"],
                           "flops_per_image": p["flops_per_image"]}  # fmt: skip
            row["records"] = res["records"]
            f = row["figures"]
            print(f"[gpu check] {name} {res['name']}: {f['images_per_sec']:.1f} img/s on {row['gpus']} GPU(s), "
                  f"step {f['step_s']:.3f} s, MFU {_pct(f['mfu'])}, peak {row['peak_allocated_gib']:.2f} GiB "
                  f"(plan {row['plan_allocated_gib']:.2f})", flush=True)  # fmt: skip
        else:
            print(f"[gpu check] {name} {res.get('name')}: FAILED {res.get('error')}", flush=True)
        s["runs"].append(row)
        report.write()

    rc, tail = launch_runs(runs, nproc, workdir, device=device, timeout=timeout, on_result=on_result)
    done = {r["name"] for r in s["runs"]}
    for run in runs:
        if run["name"] not in done:
            s["runs"].append({"name": run["name"], "ok": False, "gpus": nproc, **run.get("meta", {}),
                              "error": "not run: the launch ended first"})  # fmt: skip
    # Every run reported its figures: a non-zero exit after that (a crash during teardown) is noted, not failed.
    ok = all(r.get("ok") for r in s["runs"])
    s["status"] = "passed" if ok else "failed"
    if ok and rc != 0:
        s["exit_note"] = f"torchrun exited {rc} after every run had reported"
        s["log_tail"] = tail
    if nproc == 1:
        s["note"] = ("one GPU: FSDP2 on a world of 1 gathers bf16 copies of each unit, which `seer plan` does not "
                     "count at world size 1 (it plans a run without sharding)")  # fmt: skip
    if not ok:
        s["error"] = f"torchrun exit {rc}" + (" (timed out)" if rc == 124 else "")
        s["log_tail"] = tail
    report.write()
    return ok


def section_extract(report: Report, n_images: int, n_files: int, batch: int) -> bool:
    import torch

    import seer
    from benchmarks.extract import make_jpegs

    s = report.section("extract")
    s["rows"] = []
    s["model"] = "regnety_32gf (RG-32), random init, 224 px, avgpool"
    torch.manual_seed(0)
    trunk = seer.build_trunk("regnety_32gf")
    x = torch.randint(0, 256, (n_images, 3, 224, 224), dtype=torch.uint8)
    for amp in (None, "bf16"):
        seer.extract_features(x[: 2 * batch], trunk, device="cuda", batch_size=batch, amp=amp, progress=False)
        t0 = time.perf_counter()
        feats = seer.extract_features(x, trunk, device="cuda", batch_size=batch, amp=amp, progress=False)
        dt = time.perf_counter() - t0
        assert feats.shape[0] == n_images and bool((feats == feats).all()), "non-finite or missing features"
        s["rows"].append({"input": "uint8 tensors", "amp": amp, "images": n_images, "images_per_sec": n_images / dt})
        report.write()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp) / "jpegs", n_files)
        seer.extract_features(paths[:batch], trunk, device="cuda", batch_size=batch, amp="bf16", progress=False)
        t0 = time.perf_counter()
        feats = seer.extract_features(paths, trunk, device="cuda", batch_size=batch, amp="bf16", progress=False)
        dt = time.perf_counter() - t0
        s["rows"].append({"input": "500x375 JPEG files (decoded in workers)", "amp": "bf16", "images": n_files,
                          "images_per_sec": n_files / dt})  # fmt: skip
    del trunk
    torch.cuda.empty_cache()
    s["status"] = "passed"
    report.write()
    return True


def section_knn(report: Report, n_train: int, n_test: int, dim: int, k: int) -> bool:
    import torch

    from seer.evaluation.knn import _faiss_gpus, knn_search

    s = report.section("knn")
    s["rows"] = []
    s["size"] = f"{n_train} x {n_test} x {dim}, k={k}"
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(100, dim, generator=gen) * 4
    xtr = centers[torch.randint(100, (n_train,), generator=gen)] + torch.randn(n_train, dim, generator=gen)
    xte = centers[torch.randint(100, (n_test,), generator=gen)] + torch.randn(n_test, dim, generator=gen)
    flops = 2.0 * n_train * n_test * dim
    backends = ["torch"]
    if _faiss_gpus() > 0:
        backends.append("faiss")
    else:
        s["note"] = "faiss-gpu not installed (pip install 'seer-ssl[gpu]' without faiss-cpu): torch only"
    ref = None
    for backend in backends:
        knn_search(xtr[:20000], xte[:1000], k, backend=backend, device="cuda")  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sims, idx = knn_search(xtr, xte, k, backend=backend, device="cuda")
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        idx = idx.cpu()
        row = {"backend": backend + (" (faiss-gpu)" if backend == "faiss" else " (cuda GEMM)"), "seconds": dt,
               "gflops": flops / dt / 1e9}  # fmt: skip
        if ref is None:
            ref = idx
        else:  # the share of each query's k neighbours both found (ties at the k-th may differ)
            same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ref, idx))
            row["overlap"] = same / ref.numel()
        s["rows"].append(row)
        report.write()
    # Neighbours at the k-th place may swap where two similarities differ by rounding; more than 1% is a fault.
    s["status"] = "passed" if all(r.get("overlap", 1.0) >= 0.99 for r in s["rows"]) else "failed"
    report.write()
    return s["status"] == "passed"


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0],
                                epilog="Exit codes: 0 passed, 1 a section or check failed, 2 bad arguments, "
                                "3 no CUDA GPU (after the CPU-side checks).")  # fmt: skip
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, metavar="SECTION",
                   help=f"sections to run, of {', '.join(SECTIONS)} (default: all)")  # fmt: skip
    p.add_argument("--gpus", type=int, default=0, help="GPUs to use (default: every visible one, at most 8)")
    p.add_argument("--out", type=Path, default=None, help="directory for gpu.json and gpu.md (default: "
                   "benchmarks/results)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=None, help="scratch for run directories and checkpoints "
                   "(default: a temporary directory, removed at the end)")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="timed training steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps, also the log window (default 5)")
    p.add_argument("--batch-per-gpu", type=int, default=16, help="images per GPU (the recipes': 16)")
    p.add_argument("--quick", action="store_true", help="3 + 6 steps, smaller extract and kNN sizes")
    p.add_argument("--cpu-check", action="store_true", help="only the checks that need no GPU; exit 0 if they pass")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one torchrun rank
    args = p.parse_args(argv)
    if args.gpus < 0:
        p.error(f"--gpus must be >= 0, got {args.gpus}")
    if args.warmup < 1 or args.steps < 1 or args.batch_per_gpu < 1:
        p.error("--warmup, --steps and --batch-per-gpu must be >= 1")
    if args.quick:
        args.warmup, args.steps = 3, 6
    if args.steps % args.warmup:  # whole log windows after the warm-up
        args.steps = (args.steps // args.warmup + 1) * args.warmup
    return args


def run(argv: list[str] | None = None) -> int:
    """The check; returns the exit code (see the module docstring)."""
    args = parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    from benchmarks.common import RESULTS_DIR, machine_info

    out_dir = args.out or RESULTS_DIR
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    report = Report(out_dir, plain)
    report.payload["machine"] = machine_info()
    reason = no_gpu_reason()
    import torch

    visible = torch.cuda.device_count() if reason is None else 0
    n_gpus = min(args.gpus or visible, visible, 8) if visible else 0
    t0 = time.perf_counter()
    checks_ok = cpu_checks(report, n_gpus or args.gpus or 1, args.sections, args.batch_per_gpu)
    report.payload["seconds"]["cpu checks"] = time.perf_counter() - t0
    if args.cpu_check:
        report.payload["status"] = "cpu checks passed" if checks_ok else "cpu checks failed"
        report.write()
        print(render(report.payload))
        return 0 if checks_ok else 1
    if reason is not None:
        for name in args.sections:
            report.payload["sections"][name] = {"status": "not run: no CUDA GPU"}
        report.payload["status"] = "no_gpu"
        report.payload["no_gpu"] = reason
        report.write()
        print(render(report.payload))
        print(f"wrote {out_dir / (NAME + '.json')} (CPU-side checks only)", file=sys.stderr)
        print(f"no CUDA GPU: {reason}", file=sys.stderr)
        return NO_GPU_EXIT

    gpu = gpu_versions()
    gpu["devices"] = gpu["devices"][:n_gpus]
    gpu["peak_tflops"], gpu["peak_source"] = gpu_peak_tflops(gpu["devices"][0]["name"])
    gpu["bf16_mm_tflops"] = measure_bf16_mm()
    report.payload["gpu"] = gpu
    report.write()
    results: dict[str, bool] = {}
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="seer-gpu-check-")) if own_workdir else args.workdir
    try:
        for name in args.sections:
            t0 = time.perf_counter()
            try:
                results[name] = _run_section(name, args, report, n_gpus, workdir, gpu)
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                s = report.section(name)
                s.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
                results[name] = False
            report.payload["seconds"][name] = time.perf_counter() - t0
            report.write()
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = checks_ok and all(results.values())
    report.payload["status"] = "passed" if ok else "failed"
    report.write()
    print(render(report.payload))
    print(f"wrote {out_dir / (NAME + '.json')} and {NAME}.md", file=sys.stderr)
    return 0 if ok else 1


def _run_section(name: str, args: argparse.Namespace, report: Report, n_gpus: int, workdir: Path, gpu: dict) -> bool:
    timeout = 300.0 if not args.quick else 200.0
    if name == "tests":
        return section_tests(report, timeout)
    if name == "train":
        runs = [{"name": key, "config": recipe,
                 "overrides": train_overrides(recipe, workdir / f"run_{key}", steps=args.steps, warmup=args.warmup,
                                              batch_per_gpu=args.batch_per_gpu, device="cuda")}
                for key, recipe in MODELS.items()]  # fmt: skip
        return section_train(report, "train", runs, n_gpus, workdir / "train", device="cuda", warmup=args.warmup,
                             timeout=2 * timeout, gpu=gpu)  # fmt: skip
    if name == "syncbn":
        s = report.section("syncbn")
        if n_gpus < 2:
            s["status"] = "skipped: needs 2 or more GPUs"
            return True
        if not report.payload["cpu_checks"]["train.sync_bn_group"]["present"]:
            s["status"] = "skipped: this seer has no train.sync_bn_group"
            return True
        recipe = MODELS[SYNCBN_MODEL]
        runs = []
        for g in syncbn_groups(n_gpus):
            over = train_overrides(recipe, workdir / f"run_bn{g}", steps=args.steps, warmup=args.warmup,
                                   batch_per_gpu=args.batch_per_gpu, device="cuda",
                                   extra=[f"train.sync_bn_group={g}"])  # fmt: skip
            runs.append({"name": f"{SYNCBN_MODEL} sync_bn_group={g}", "config": recipe, "overrides": over,
                         "meta": {"group": g, "ranks_per_group": g or n_gpus}})  # fmt: skip
        return section_train(report, "syncbn", runs, n_gpus, workdir / "syncbn", device="cuda",
                             warmup=args.warmup, timeout=2 * timeout, gpu=gpu)  # fmt: skip
    if name == "extract":
        return section_extract(report, 512 if args.quick else 2048, 128 if args.quick else 512, 128)
    if name == "knn":
        return section_knn(report, *((20000, 2000, 512) if args.quick else (100000, 10000, 1024)), 200)
    raise ValueError(f"unknown section {name!r}")


def main(argv: list[str] | None = None) -> dict:
    """`make bench` entry (run_all lists it only where CUDA is available): raises when the check fails."""
    rc = run(argv)
    if rc != 0:
        raise RuntimeError(f"GPU check failed (exit {rc}): see benchmarks/results/{NAME}.md")
    from benchmarks.common import RESULTS_DIR

    return json.loads((RESULTS_DIR / f"{NAME}.json").read_text())


if __name__ == "__main__":
    sys.exit(run())
