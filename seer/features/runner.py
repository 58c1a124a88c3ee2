"""The model side of extraction: which model, on which device, and batches of uint8 images -> pooled features.

Features come only from the trunk's public feature API (``forward_features``, ``forward_stages(x, until=...)``),
pooled by one function (``pool``, in ``seer.models.pooling``, which the ONNX export shares); on CPU a batch runs in
micro-batches that keep activations allocator-friendly.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seer import hardware
from seer.data.images import Preprocess
from seer.features import backends
from seer.features.inputs import batches
from seer.models.pooling import pool, pooled_features
from seer.models.regnet import RegNetTrunk
from seer.weights import DEFAULT_HUB_MODEL, load_trunk

__all__ = ["DEFAULT_MODEL", "LAYERS", "pool", "pooled_features", "Setup", "make_setup", "eval_mode", "progress_bar",
           "weights_identity", "parameter_digest"]  # fmt: skip

DEFAULT_MODEL = DEFAULT_HUB_MODEL
LAYERS = ("avgpool", "res2", "res3", "res4", "res5")

# ----------------------------------------------------------------------------------------------------------------
# Model and features
# ----------------------------------------------------------------------------------------------------------------
_MODEL_CACHE: dict[tuple, nn.Module] = {}


def _file_stats(folder: Path) -> dict[str, list[int]]:
    """``{name: [size, mtime_ns]}`` of the regular files directly in ``folder``."""
    stats: dict[str, list[int]] = {}
    with contextlib.suppress(OSError):  # a checkpoint rotated away meanwhile: loading it will say so
        for p in sorted(folder.iterdir()):
            st = p.stat()
            if p.is_file():
                stats[p.name] = [st.st_size, st.st_mtime_ns]
    return stats


def weights_identity(path: str | os.PathLike) -> dict | None:
    """What identifies the weights at a local checkpoint path, cheaply (no weight is read, even for a 37 GB file):
    a file's size and modification time; for a pretraining run, its latest checkpoint (name, step) and that
    checkpoint directory's files; for another directory (an HF model), its files. ``None`` if nothing is there
    (a hub id). A resumed extraction compares it (``extract_dataset``), and the model cache is keyed by it."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_dir():
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if (path / "checkpoints").is_dir() or (path / ".metadata").is_file():  # a run, or one of its checkpoints
        # imported here: torch.distributed.checkpoint is loaded only for a run directory
        from seer.train.checkpoint import read_meta, resolve_checkpoint

        try:
            ckpt = resolve_checkpoint(path)
        except FileNotFoundError:
            return {"checkpoint": None}  # no complete checkpoint yet: loading it fails with the reason
        step = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            step = read_meta(ckpt).get("step")
        return {"checkpoint": ckpt.name, "step": step, "files": _file_stats(ckpt)}
    return {"files": _file_stats(path)}


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (parameters and persistent buffers: names, dtypes, shapes and values), for an
    in-memory model or one from the hub (about 0.3 s per GB of weights)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.is_meta or not t.numel():
            continue
        data = t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy()  # the raw bytes, whatever the dtype
        h.update(memoryview(data))
    return h.hexdigest()


def _resolve_model(model: Any) -> tuple[nn.Module, bool, dict | None]:
    """(model, owned, identity): ``owned`` models were loaded here and may be moved freely; ``identity`` is the
    ``weights_identity`` of a local path, taken before it was read."""
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, nn.Module):
        return model, False, None
    if isinstance(model, (str, os.PathLike)):
        identity = weights_identity(model)
        # Keyed by what the weights are, not only the path: a run's new checkpoint is a new model.
        key = (os.fspath(model), repr(identity))
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # one model at a time: SEER trunks are large
            _MODEL_CACHE[key] = load_trunk(model)
        return _MODEL_CACHE[key], True, identity
    raise TypeError(f"model must be None, a checkpoint path / hub id, or an nn.Module, got {type(model).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Batches -> features
# ----------------------------------------------------------------------------------------------------------------
class _Runner:
    """Batches of uint8 images -> features on the model's device."""

    def __init__(self, model: nn.Module, device: torch.device, preprocess: Preprocess | None, layer: str,
                 normalize: bool, amp: str | None, backend: str = "torch", batch_size: int = 32,
                 n_items: int | None = None, progress: bool | None = True) -> None:  # fmt: skip
        self.model, self.device, self.layer, self.normalize = model, device, layer, normalize
        self.progress = progress  # the extraction's setting: False silences the backend set-up's heartbeat too
        self.backend_name, self.batch_size, self.n_items = backend, batch_size, n_items
        self.backend: backends.Backend | None = None  # resolved at the first batch, when the image size is known
        self.choice: backends.BackendChoice | None = None
        self.amp = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                    "bfloat16": torch.bfloat16}[amp]  # fmt: skip
        if device.type == "cpu":
            # bf16 / fp16 only where oneDNN has kernels for it; elsewhere fp32 (one warning line says why), which
            # is also the faster choice there.
            self.amp = hardware.cpu_amp_dtype(self.amp, what="extract_features")
        if preprocess is not None:
            std = torch.tensor(preprocess.std, dtype=torch.float32, device=device) * 255
            mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=device) * 255
            self.scale = (1.0 / std).view(1, 3, 1, 1)
            self.shift = (-mean / std).view(1, 3, 1, 1)

    def micro_batch(self, images: torch.Tensor) -> int:
        """Images per forward on CPU: keep the largest activation under glibc's 32 MB mmap threshold.

        Larger tensors are mmap-ed and unmapped at every allocation, so each forward page-faults its activations
        in again (~20% of the time of a RegNetY-800MF forward at batch 32); below it, freed memory is reused.
        """
        if self.device.type != "cpu" or not isinstance(self.model, RegNetTrunk) or images.ndim != 4:
            return images.shape[0]
        h, w = (images.shape[1], images.shape[2]) if images.dtype == torch.uint8 else images.shape[2:]

        def area(k: int) -> int:  # spatial size after k stride-2 steps
            return -(-h // 2**k) * -(-w // 2**k)

        # The stem output, and each stage's first 1x1 conv, which still runs at the previous stage's resolution.
        mids = [int(round(width * self.model.cfg.bottleneck)) for width in self.model.widths]
        per_image = 4 * max([self.model.cfg.stem_width * area(1)] + [m * area(i + 1) for i, m in enumerate(mids)])
        return max(1, min(images.shape[0], (30 << 20) // max(per_image, 1)))

    def _resolve(self, images: torch.Tensor) -> backends.Backend:
        """The backend for these images, chosen and set up once (at the first batch: the image size is known)."""
        if self.backend is None:
            name = self.backend_name
            self.choice = backends.BackendChoice(name, "requested")
            example = None
            if name != "torch":
                h, w = (images.shape[1], images.shape[2]) if images.dtype == torch.uint8 else images.shape[2:]
                example = torch.zeros(self.batch_size, 3, h, w, device=self.device)
            if name == "auto":
                self.choice = backends.choose(self.model, self.layer, example, n_images=self.n_items, amp=self.amp,
                                              progress=self.progress)  # fmt: skip
                name = self.choice.name
            self.backend = backends.make_backend(name, self.model, self.layer, example, amp=self.amp,
                                                 progress=self.progress)  # fmt: skip
        return self.backend

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        backend = self._resolve(images)
        # the eager trunk runs CPU micro-batches; the runtimes manage their own memory
        micro = self.micro_batch(images) if backend.name == "torch" else images.shape[0]
        if micro < images.shape[0]:
            return torch.cat([self(chunk) for chunk in images.split(micro)])
        if images.dtype == torch.uint8:  # [B, H, W, 3]: permute gives a channels_last view, no copy
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            x = torch.addcmul(self.shift, x, self.scale)  # (x / 255 - mean) / std in one pass
        else:
            x = images.to(self.device, non_blocking=True).float()
        feats = backend(x).float()
        if self.normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats


def _pick_device(device: Any, model: nn.Module, owned: bool) -> torch.device:
    if device is not None:
        return hardware.resolve_device(device, what="device")
    if not owned:
        p = next(itertools.chain(model.parameters(), model.buffers()), None)
        return p.device if p is not None else torch.device("cpu")
    return hardware.resolve_device("auto")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class Setup:
    """One extraction's model, runner, preprocessing and batching."""

    model: nn.Module
    runner: _Runner
    preprocess: Preprocess | None
    batch_size: int
    num_workers: int
    weights: dict | None = None  # ``weights_identity`` of a model read from a local path, as it was read

    def batches(self, items: Sequence, positions: Sequence[int]) -> Iterator[tuple]:
        """Decoded batches of ``items`` at ``positions`` (see ``seer.features.inputs.batches``)."""
        return batches(items, positions, self.preprocess, batch_size=self.batch_size, num_workers=self.num_workers,
                       pin_memory=self.runner.device.type == "cuda")  # fmt: skip


def make_setup(model: Any, *, layer: str, batch_size: int | None, device: Any, normalize: bool, amp: str | None,
               preprocess: bool | Preprocess, n_items: int | None, num_workers: int | None,
               needs_decode: bool, overrides: dict, backend: str = "torch", exact: bool = False,
               progress: bool | None = True) -> Setup:  # fmt: skip
    """Resolve and check what ``extract_features`` / ``extract_dataset`` were given (see their arguments)."""
    if not isinstance(exact, bool):
        raise ValueError(f"exact must be True or False, got {exact!r}")
    if exact and preprocess is False:
        raise ValueError("exact=True sets how images are decoded and resized; preprocess=False decodes nothing")
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    if backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
    if amp not in (None, "bf16", "fp16", "bfloat16", "float16"):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    net, owned, identity = _resolve_model(model)
    if isinstance(net, RegNetTrunk) and layer != "avgpool" and layer not in net.stage_names:
        raise ValueError(f"layer {layer!r}: this trunk has stages {net.stage_names}")
    dev = _pick_device(device, net, owned)
    if owned or device is not None:
        net.to(dev)
    if isinstance(preprocess, Preprocess):
        pp: Preprocess | None = replace(preprocess, exact=True) if exact else preprocess
    elif preprocess:
        pp = Preprocess.for_model(net, **overrides, exact=exact)
    else:
        pp = None
    if batch_size is None:
        batch_size = 64 if dev.type == "cuda" else 32
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is None:
        # Decoding in worker processes pays off once there are a few batches of files to decode and cores to spare:
        # on 2-3 cores a worker only competes with the model's threads (measured slower on 2 cores).
        big = n_items is not None and n_items >= 4 * batch_size
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_workers = min(8, cores // 2) if (big and needs_decode and cores >= 4) else 0
    runner = _Runner(net, dev, pp, layer, normalize, amp, backend=backend, batch_size=batch_size, n_items=n_items,
                     progress=progress)  # fmt: skip
    return Setup(net, runner, pp, batch_size, num_workers, identity)


def progress_bar(total: int | None, progress: bool | None, desc: str):
    """Progress on stderr (``seer.progress``); ``progress=None`` shows it for 512 images or more, and unknown totals."""
    from seer.progress import progress as _progress

    show = progress if progress is not None else (total is None or total >= 512)
    return _progress(total, desc, "img", enabled=show)
