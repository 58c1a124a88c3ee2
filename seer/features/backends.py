"""Inference backends of extraction: the trunk in eager torch, ``torch.compile``, ONNX Runtime or OpenVINO.

Every backend maps model-ready float32 images ``[B, 3, H, W]`` to the pooled features of one layer, ``[B, D]``:

- ``torch``: the trunk's own forward (oneDNN-fused conv + BN + ReLU kernels on CPU): always available;
- ``compile``: ``torch.compile`` (inductor, ``freezing``: weights become constants, BN folded at compile time);
- ``onnxruntime``: the trunk exported once per process (``seer.weights.onnx.export_onnx``) and run by ONNX Runtime's
  CPU execution provider, all graph optimizations on (``pip install 'seer-ssl[onnx]'``);
- ``openvino``: the same ONNX graph compiled by OpenVINO for the CPU, in f32 unless ``amp="bf16"``: OpenVINO would
  otherwise pick bf16 by itself on CPUs with bf16 instructions (``pip install 'seer-ssl[openvino]'``).

``backend="auto"`` (``choose``) keeps ``torch`` where nothing else can pay -- a GPU, a model that is not a
``RegNetTrunk``, fewer than ``AUTO_MIN_IMAGES`` (5000) images, no runtime installed -- and otherwise sets up each
installed CPU runtime, times it against eager torch on a batch of the run's size, and runs the fastest per batch.
``compile`` joins the probe only when asked (``SEER_FEATURES_COMPILE_PROBE=1``): its set-up (tens of seconds on a
few cores) dominates one extraction. ``SEER_FEATURES_BACKEND=<name>`` forces the choice. The
choice and its timings are logged (logger ``seer.features``) and cached per process.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from seer.extras import install_hint, require
from seer.models.pooling import pooled_features
from seer.models.regnet import ConvBN, RegNetTrunk
from seer.progress import heartbeat

__all__ = ["BACKENDS", "AUTO_MIN_IMAGES", "Backend", "BackendChoice", "make_backend", "choose", "installed"]

BACKENDS = ("auto", "torch", "compile", "onnxruntime", "openvino")
RUNTIMES = ("onnxruntime", "openvino")  # need the ONNX graph, run on CPU only
# The probe sets up every installed runtime (an ONNX export and a compile each: about 15 s for a regnety_800mf on 2
# cores, measured by benchmarks/runtimes.py), which the fastest one, 1.5x eager there, pays back after about 5000
# images; below that eager torch is faster overall.
AUTO_MIN_IMAGES = 5000
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # both also need the exporter, onnxscript

log = logging.getLogger("seer.features")


@dataclass
class Backend:
    """One backend ready to run: ``backend(x) -> [B, D]`` float32 on ``x``'s device."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    setup_seconds: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


@dataclass
class BackendChoice:
    """What ``backend="auto"`` chose, and why: ``rule`` names the reason, ``seconds`` the probe's timings."""

    name: str
    rule: str
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"backend": self.name, "rule": self.rule, "seconds": self.seconds}


def installed(name: str) -> bool:
    """Whether backend ``name`` can run here (its package is importable)."""
    if name in ("torch", "compile"):
        return True
    return all(importlib.util.find_spec(m) is not None for m in (_MODULES[name], "onnxscript"))


# ----------------------------------------------------------------------------------------------------------------
# The backends
# ----------------------------------------------------------------------------------------------------------------
_CACHE: dict[tuple, Backend] = {}


def _fingerprint(model: nn.Module) -> tuple:
    # identity and in-place version of every tensor: a cached export or compilation is stale once weights change
    return tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))


def make_backend(name: str, model: nn.Module, layer: str, example: torch.Tensor | None, *,
                 amp: torch.dtype | None = None, threads: int | None = None,
                 progress: bool | None = True) -> Backend:  # fmt: skip
    """Backend ``name`` for ``model``'s ``layer`` features at ``example``'s image size (a full batch; the other
    backends are set up for it and cached per process; "torch" needs none). ``amp``: the autocast / precision dtype.
    ``progress``: the extraction's setting; ``False`` silences the set-up's heartbeat (the ONNX export, the compile).

    Raises:
        ValueError: a backend that cannot run this model, device or precision.
        ImportError: its package is not installed (the message names the extra).
    """
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]} here, got {name!r}")
    if name == "torch":
        return Backend("torch", lambda x: _eager(model, layer, x, amp))
    if not isinstance(model, RegNetTrunk):
        raise ValueError(f"backend={name!r} runs seer's RegNetTrunk only, got {type(model).__name__}; use 'torch'")
    if name in RUNTIMES and example.device.type != "cpu":
        raise ValueError(f"backend={name!r} runs on CPU; the model is on {example.device}: use 'torch' or 'compile'")
    if name in RUNTIMES and amp is not None and not (name == "openvino" and amp == torch.bfloat16):
        raise ValueError(f"backend={name!r} computes in fp32 (openvino also takes amp='bf16'), got amp={amp}")
    if not installed(name):
        for module in (_MODULES[name], "onnxscript"):
            require(module, f"backend={name!r}")  # raises, naming the extra
    threads = threads or torch.get_num_threads()
    key = (name, id(model), _fingerprint(model), layer, tuple(example.shape[1:]), example.device, amp, threads)
    if key not in _CACHE:
        for old in [k for k in _CACHE if k[0] == name]:  # one model per backend: SEER trunks are large
            del _CACHE[old]
        t0 = time.perf_counter()
        if name == "compile":
            run = _compiled(model, layer, example, amp, progress)
        else:
            run = _runtime(name, model, layer, example, amp, threads, progress)
        _CACHE[key] = Backend(name, run, time.perf_counter() - t0)
    return _CACHE[key]


def _eager(model: nn.Module, layer: str, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """The eager forward: ``model``'s pooled ``layer`` features, under autocast when ``amp`` is set."""
    ctx = torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        return pooled_features(model, x, (layer,))[layer]


class _Layer(nn.Module):
    def __init__(self, trunk: RegNetTrunk, layer: str) -> None:
        super().__init__()
        self.trunk, self.layer = trunk, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.trunk, x, (self.layer,))[self.layer]


def _compiled(model: RegNetTrunk, layer: str, example: torch.Tensor, amp: torch.dtype | None,
              progress: bool | None = True) -> Callable:  # fmt: skip
    import torch._inductor.config as inductor_config

    # A copy with the plain conv -> BN path: inductor folds BN into the conv and picks its own (oneDNN) kernels when
    # it freezes the weights; the eager path's hand-fused kernels would only hide the graph from it.
    trunk = copy.deepcopy(model).eval()
    for m in trunk.modules():
        if isinstance(m, ConvBN):
            m.fold_bn = False
    fn = torch.compile(_Layer(trunk, layer), dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(x.device.type, dtype=amp) if amp is not None else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), ctx, inductor_config.patch(freezing=True):
            return fn(x.contiguous()).float()  # one memory format: another would recompile

    with heartbeat(f"extract_features backend='compile': compiling the trunk for {tuple(example.shape)}",
                   enabled=progress):  # fmt: skip
        run(example)  # compile now: the set-up time is measured, and the first batch is not slow
    return run


def _runtime(name: str, model: RegNetTrunk, layer: str, example: torch.Tensor, amp: torch.dtype | None,
             threads: int, progress: bool | None = True) -> Callable:  # fmt: skip
    from seer.weights.onnx import export_onnx

    if example.shape[-2] != example.shape[-1]:
        raise ValueError(f"backend={name!r} exports square inputs; got {tuple(example.shape[-2:])}")
    with tempfile.TemporaryDirectory(prefix="seer-onnx-") as tmp:
        path = export_onnx(model, Path(tmp) / "trunk.onnx", layers=(layer,), resolution=example.shape[-1],
                           check=False, progress=progress)  # fmt: skip
        if name == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

            def run(x: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(session.run(None, {"images": np.ascontiguousarray(x.float().numpy())})[0])

            return run
        import openvino as ov

        hint = "bf16" if amp == torch.bfloat16 else "f32"
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                             "INFERENCE_NUM_THREADS": threads})  # fmt: skip
        request = compiled.create_infer_request()

        def run_ov(x: torch.Tensor) -> torch.Tensor:
            out = request.infer({0: np.ascontiguousarray(x.float().numpy())})
            return torch.from_numpy(np.array(out[compiled.output(0)], dtype=np.float32))

        return run_ov


# ----------------------------------------------------------------------------------------------------------------
# backend="auto"
# ----------------------------------------------------------------------------------------------------------------
_CHOICES: dict[tuple, BackendChoice] = {}


def choose(model: nn.Module, layer: str, example: torch.Tensor, *, n_images: int | None,
           amp: torch.dtype | None = None, progress: bool | None = True) -> BackendChoice:  # fmt: skip
    """The backend ``backend="auto"`` runs for ``n_images`` images like ``example`` (a full batch), and why.
    ``progress``: as for ``make_backend`` (the probe sets the runtimes up)."""
    forced = os.environ.get("SEER_FEATURES_BACKEND")
    if forced:
        if forced not in BACKENDS[1:]:
            raise ValueError(f"SEER_FEATURES_BACKEND={forced!r}: choose one of {BACKENDS[1:]}")
        return BackendChoice(forced, "forced by SEER_FEATURES_BACKEND")
    if example.device.type != "cpu":
        return BackendChoice("torch", f"device {example.device.type}: the runtimes here are CPU ones")
    if not isinstance(model, RegNetTrunk):
        return BackendChoice("torch", f"{type(model).__name__} is not a seer RegNetTrunk")
    if n_images is None:
        return BackendChoice("torch", "an iterable of unknown length: set-up may not pay back")
    if n_images < AUTO_MIN_IMAGES:
        return BackendChoice("torch", f"{n_images} images < {AUTO_MIN_IMAGES}: set-up would not pay back")
    candidates = [name for name in RUNTIMES if installed(name) and not (amp is not None and name == "onnxruntime")]
    if os.environ.get("SEER_FEATURES_COMPILE_PROBE") == "1":
        candidates.append("compile")
    if not candidates:
        hints = " or ".join(install_hint(m) for m in RUNTIMES)
        return BackendChoice("torch", f"no other runtime installed ({hints})")
    key = (id(model), _fingerprint(model), layer, tuple(example.shape), amp, torch.get_num_threads())
    if key not in _CHOICES:
        _CHOICES.clear()
        _CHOICES[key] = _probe(model, layer, example, amp, ["torch", *candidates], progress)
        choice = _CHOICES[key]
        log.info("extract_features backend=auto: %s (%s; %s)", choice.name, choice.rule,
                 ", ".join(f"{k} {v['batch_s'] * 1e3:.1f} ms/batch + {v['setup_s']:.1f} s set-up"
                           for k, v in choice.seconds.items()))  # fmt: skip
    return _CHOICES[key]


def _probe(model: RegNetTrunk, layer: str, example: torch.Tensor, amp: torch.dtype | None,
           names: list[str], progress: bool | None = True) -> BackendChoice:  # fmt: skip
    """Time each backend on ``example`` (best of 3 after a warm-up); the fastest per batch wins."""
    seconds: dict[str, dict] = {}
    for name in names:
        try:
            backend = make_backend(name, model, layer, example, amp=amp, progress=progress)
        except (ImportError, ValueError, RuntimeError) as exc:  # a runtime that cannot take this model is skipped
            log.warning("extract_features backend=auto: %s unavailable (%s)", name, exc)
            continue
        with torch.inference_mode():
            backend(example)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                backend(example)
                times.append(time.perf_counter() - t0)
        # the torch path pays no set-up; the others were just set up by this probe, so only the rest of the run counts
        seconds[name] = {"batch_s": min(times), "setup_s": backend.setup_seconds}
    best = min(seconds, key=lambda k: seconds[k]["batch_s"])
    rule = f"fastest per batch of {example.shape[0]} measured here"
    return BackendChoice(best, rule, seconds)
