"""Features of any images with any SEER checkpoint: in memory (``extract_features``) or on disk (``extract_dataset``).

The pipeline is built for throughput: JPEGs are decoded at reduced size when that is enough (PIL draft mode), the
crop is taken during the resize (one PIL call, ``reducing_gap``), images stay uint8 until the whole batch is on the
device, where one fused multiply-add converts and normalizes them; the trunk runs under ``torch.inference_mode``
in channels_last with batch norm folded into the convolutions. Decoding runs in DataLoader workers for large inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from seer import hardware
from seer.data.images import INTERPOLATIONS, Preprocess, check_image_array, check_image_tensor, load_image
from seer.models.regnet import RegNetTrunk
from seer.weights import DEFAULT_HUB_MODEL, load_trunk

__all__ = [
    "DEFAULT_MODEL",
    "Preprocess",
    "FeatureArray",
    "ImageError",
    "extract_features",
    "extract_dataset",
    "merge_features",
    "load_feature_file",
    "load_image",
    "cli_main",
]

DEFAULT_MODEL = DEFAULT_HUB_MODEL
LAYERS = ("avgpool", "res2", "res3", "res4", "res5")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


class ImageError(ValueError):
    """An input that cannot be read as an image (the message names the input)."""


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def _describe(item: Any, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"input #{index} ({type(item).__name__})"


def _list_images(folder: Path) -> list[str]:
    files = [str(p) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def _as_items(images: Any) -> tuple[Sequence | None, Iterable | None]:
    """(a sized sequence of items, or None and an iterable of unknown length)."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        return (_list_images(path) if path.is_dir() else [images]), None
    if isinstance(images, (Image.Image, bytes, bytearray)):
        return [images], None
    if isinstance(images, torch.Tensor):
        if images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError("extract_features: no images (empty tensor batch)")
            check_image_tensor(images[0])
            return images, None
        check_image_tensor(images)
        return [images], None
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError("extract_features: no images (empty array batch)")
            check_image_array(images[0])
            return images, None
        if images.ndim == 1 and images.dtype == object:
            return list(images), None
        check_image_array(images)
        return [images], None
    if isinstance(images, Mapping):
        raise TypeError("extract_features: got a mapping; pass a list, an iterable or a Dataset of images")
    if hasattr(images, "__getitem__") and hasattr(images, "__len__"):
        return images, None
    if isinstance(images, Iterable):
        return None, images
    raise TypeError(f"extract_features: cannot iterate over a {type(images).__name__}")


def _unpack(item: Any) -> tuple[Any, int]:
    """Dataset items may be (image, label) pairs (torchvision style)."""
    if isinstance(item, tuple) and len(item) >= 2 and not isinstance(item[0], (int, float)):
        label = item[1]
        return item[0], int(label) if isinstance(label, (int, np.integer)) else -1
    return item, -1


class _DecodeDataset(torch.utils.data.Dataset):
    """positions -> (position, uint8 HWC array or None, label, error or None); errors are data, not exceptions."""

    def __init__(self, items: Sequence, positions: Sequence[int], preprocess: Preprocess | None):
        self.items, self.positions, self.preprocess = items, positions, preprocess

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple:
        pos = self.positions[i]
        item = None
        try:
            item, label = _unpack(self.items[pos])
            if self.preprocess is None:
                return pos, _raw_tensor(item), label, None
            img = load_image(item, draft=self.preprocess.draft_size())
            return pos, self.preprocess(img), label, None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ImageError) or item is None or not _is_image_data(item):
                raise  # the input itself is wrong (type, shape, dtype): never skipped
            return pos, None, -1, (_describe(item, pos), f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt or unreadable files
            desc = f"input #{pos}" if item is None else _describe(item, pos)  # None: the Dataset itself raised
            return pos, None, -1, (desc, f"{type(exc).__name__}: {exc}")


def _is_image_data(item: Any) -> bool:
    """Inputs whose content (not type) can be bad: files and encoded bytes."""
    return isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview))


def _raw_tensor(item: Any) -> torch.Tensor:
    if not isinstance(item, torch.Tensor) or item.ndim != 3 or item.shape[0] != 3 or not item.is_floating_point():
        raise TypeError("preprocess=False takes model-ready float tensors [3, H, W] (already resized and normalized)")
    if not torch.isfinite(item).all():
        raise ValueError("preprocess=False: the tensor holds non-finite values (NaN or inf); features would be NaN")
    return item


def _collate(batch: list[tuple]) -> tuple:
    ok = [b for b in batch if b[1] is not None]
    errors = [(b[0], *b[3]) for b in batch if b[1] is None]
    if not ok:
        return [], None, [], errors
    first = ok[0][1]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(b[1].shape) for b in ok}
        if len(shapes) > 1:
            raise ValueError(f"preprocess=False: tensors of different shapes in one batch: {sorted(shapes)}")
        images = torch.stack([b[1] for b in ok])
    else:
        images = torch.from_numpy(np.stack([b[1] for b in ok]))  # uint8 [B, H, W, 3]
    return [b[0] for b in ok], images, [b[2] for b in ok], errors


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
_MODEL_CACHE: dict[tuple, nn.Module] = {}


def _resolve_model(model: Any) -> tuple[nn.Module, bool]:
    """(model, owned): ``owned`` models were loaded here and may be moved freely."""
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, nn.Module):
        return model, False
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        key = (os.fspath(model), path.stat().st_mtime if path.exists() else None)
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()  # one model at a time: SEER trunks are large
            _MODEL_CACHE[key] = load_trunk(model)
        return _MODEL_CACHE[key], True
    raise TypeError(f"model must be None, a checkpoint path / hub id, or an nn.Module, got {type(model).__name__}")


def _forward(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    if isinstance(model, RegNetTrunk):  # in eval + inference_mode it folds BN once and fuses conv post-ops
        if layer in ("avgpool", model.stage_names[-1]):
            return model(x)
        x = x.contiguous(memory_format=torch.channels_last) if model.channels_last else x
        x = model.stem(x)
        for name, stage in zip(model.stage_names, model.stages):
            x = stage(x)
            if name == layer:
                return x.mean((2, 3))
        raise ValueError(f"layer {layer!r} not in {model.stage_names}")
    if layer != "avgpool":
        raise ValueError(f"layer={layer!r} needs a RegNetTrunk; other modules give their output (layer='avgpool')")
    out = model(x)
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.mean((2, 3)) if out.ndim == 4 else out.flatten(1)


class _Runner:
    """Batches of uint8 images -> features on the model's device."""

    def __init__(self, model: nn.Module, device: torch.device, preprocess: Preprocess | None, layer: str,
                 normalize: bool, amp: str | None) -> None:  # fmt: skip
        self.model, self.device, self.layer, self.normalize = model, device, layer, normalize
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

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        micro = self.micro_batch(images)
        if micro < images.shape[0]:
            return torch.cat([self(chunk) for chunk in images.split(micro)])
        if images.dtype == torch.uint8:  # [B, H, W, 3]: permute gives a channels_last view, no copy
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
            x = torch.addcmul(self.shift, x, self.scale)  # (x / 255 - mean) / std in one pass
        else:
            x = images.to(self.device, non_blocking=True).float()
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
        with ctx:
            feats = _forward(self.model, x, self.layer)
        feats = feats.float()
        if self.normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        return feats


def _pick_device(device: Any, model: nn.Module, owned: bool) -> torch.device:
    if device is not None:
        return torch.device(device)
    if not owned:
        p = next(itertools.chain(model.parameters(), model.buffers()), None)
        return p.device if p is not None else torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# extract_features
# ----------------------------------------------------------------------------------------------------------------
class FeatureArray(np.ndarray):
    """The ``on_error="skip"`` result: a float32 ndarray [kept, D] with ``.indices`` (input position of each row)
    and ``.skipped`` (list of ``{"index", "input", "error"}`` for each input that could not be read)."""

    indices: np.ndarray
    skipped: list[dict]

    def __array_finalize__(self, obj: Any) -> None:
        self.indices = getattr(obj, "indices", None)
        self.skipped = getattr(obj, "skipped", [])


@dataclass
class _Setup:
    model: nn.Module
    runner: _Runner
    preprocess: Preprocess | None
    batch_size: int
    num_workers: int


def _setup(model: Any, *, layer: str, batch_size: int | None, device: Any, normalize: bool, amp: str | None,
           preprocess: bool | Preprocess, n_items: int | None, num_workers: int | None,
           needs_decode: bool, overrides: dict) -> _Setup:  # fmt: skip
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    if amp not in (None, "bf16", "fp16", "bfloat16", "float16"):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    net, owned = _resolve_model(model)
    if isinstance(net, RegNetTrunk) and layer != "avgpool" and layer not in net.stage_names:
        raise ValueError(f"layer {layer!r}: this trunk has stages {net.stage_names}")
    dev = _pick_device(device, net, owned)
    if owned or device is not None:
        net.to(dev)
    if isinstance(preprocess, Preprocess):
        pp: Preprocess | None = preprocess
    elif preprocess:
        pp = Preprocess.for_model(net, **overrides)
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
    return _Setup(net, _Runner(net, dev, pp, layer, normalize, amp), pp, batch_size, num_workers)


def _batches(items: Sequence, positions: Sequence[int], setup: _Setup) -> Iterator[tuple]:
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(items, positions, setup.preprocess),
        batch_size=setup.batch_size,
        shuffle=False,
        num_workers=setup.num_workers,
        collate_fn=_collate,
        pin_memory=setup.runner.device.type == "cuda",
        prefetch_factor=4 if setup.num_workers else None,
        persistent_workers=False,
    )
    yield from loader


def _iter_chunks(iterable: Iterable, size: int) -> Iterator[list]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _progress(total: int | None, progress: bool | None, desc: str):
    from tqdm.auto import tqdm

    show = progress if progress is not None else (total is None or total >= 512)
    return tqdm(total=total, disable=not show, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr)


def extract_features(images: Any, model: Any = None, *, layer: str = "avgpool", batch_size: int | None = None,
                     device: Any = None, normalize: bool = False, progress: bool | None = None,
                     on_error: str = "raise", amp: str | None = None, num_workers: int | None = None,
                     preprocess: bool | Preprocess = True, resolution: int | None = None,
                     crop_pct: float | None = None, interpolation: str | None = None,
                     resize_mode: str | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> np.ndarray:  # fmt: skip
    """Features of images with a SEER trunk, as numpy float32 ``[N, D]`` in input order.

    Args:
        images: a list (or any iterable, or a ``Dataset``) of PIL images, file paths, encoded bytes, numpy HWC
            uint8 arrays or CHW tensors (uint8, or float in [0, 1]); an NCHW tensor or NHWC array; a folder path
            (its image files, sorted). Dataset items may be ``(image, label)`` pairs.
        model: a trunk, a checkpoint path or HF hub id (anything ``seer.load_trunk`` reads), or ``None`` for
            ``DEFAULT_MODEL`` (``facebook/regnet-y-320-seer``: downloaded once, needs network or the HF cache).
        layer: "avgpool" (the pooled last stage) or "res2".."res5" (that stage, globally average-pooled).
        batch_size: images per forward (default 32 on CPU, 64 on GPU).
        device: default: CUDA when available for models loaded here; a given module's own device.
        normalize: L2-normalize each feature vector.
        progress: a tqdm bar; ``None`` shows it for 512 images or more (and for iterables of unknown length).
        on_error: "raise" (a corrupt / unreadable image raises ``ImageError`` naming it) or "skip" (the result
            is a ``FeatureArray`` without those rows: ``.indices`` are the input positions of the rows,
            ``.skipped`` lists the skipped inputs and why). Wrong input types, shapes and dtypes always raise.
        amp: "bf16" or "fp16" autocast: pays on CUDA, and bf16 on CPUs with AMX (measured 2.6-3x fp32 there);
            bf16 is slower than fp32 on CPUs without AMX. Features come back float32 either way.
        num_workers: decoding processes (default: half the cores, at most 8, for 128+ files on 4+ cores; else none).
        preprocess: ``True`` (the checkpoint's convention, overridable below), a ``Preprocess``, or ``False`` for
            float tensors that are already resized and normalized.
        resolution, crop_pct, interpolation, resize_mode, mean, std: override the preprocessing (defaults come from
            the checkpoint: 224 px / crop 0.965 / bicubic for timm SEER weights, the HF processor's settings --
            384 px warp for the hub SEER models -- for HF ones; see docs/features.md).

    Returns:
        float32 array ``[N, D]`` (a ``FeatureArray`` when ``on_error="skip"``).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    items, iterable = _as_items(images)
    if items is not None and len(items) == 0:
        raise ValueError("extract_features: no images (empty input)")
    needs_decode = items is None or any(_is_image_data(_unpack(items[i])[0]) for i in range(min(len(items), 4)))
    overrides = dict(resolution=resolution, crop_pct=crop_pct, interpolation=interpolation, resize_mode=resize_mode,
                     mean=mean, std=std)  # fmt: skip
    setup = _setup(model, layer=layer, batch_size=batch_size, device=device, normalize=normalize, amp=amp,
                   preprocess=preprocess, n_items=None if items is None else len(items), num_workers=num_workers,
                   needs_decode=needs_decode, overrides=overrides)  # fmt: skip
    feats: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[dict] = []

    def consume(batch: tuple, bar) -> None:
        positions, imgs, _, errors = batch
        for pos, desc, err in errors:
            if on_error == "raise":
                raise ImageError(f"cannot read image {desc}: {err}")
            skipped.append({"index": pos, "input": desc, "error": err})
        if imgs is not None:
            feats.append(setup.runner(imgs).cpu().numpy())
            kept.extend(positions)
        bar.update(len(positions) + len(errors))

    with _eval_mode(setup.model), _progress(None if items is None else len(items), progress, "features") as bar:
        if items is not None:
            for batch in _batches(items, range(len(items)), setup):
                consume(batch, bar)
        else:
            offset = 0
            for chunk in _iter_chunks(iterable, setup.batch_size * 8):
                sub = setup.num_workers if len(chunk) > 4 * setup.batch_size else 0
                setup_chunk = _Setup(setup.model, setup.runner, setup.preprocess, setup.batch_size, sub)
                positions = [offset + i for i in range(len(chunk))]
                for batch in _batches(_Offset(chunk, offset), positions, setup_chunk):
                    consume(batch, bar)
                offset += len(chunk)
            if offset == 0:
                raise ValueError("extract_features: no images (empty input)")
    if not feats:
        raise ImageError(f"none of the {len(skipped)} inputs could be read; first error: {skipped[0]['error']}")
    out = np.concatenate(feats).astype(np.float32, copy=False)
    if on_error == "skip":
        result = out.view(FeatureArray)
        result.indices = np.asarray(kept, dtype=np.int64)
        result.skipped = skipped
        return result
    return out


class _Offset:
    """A chunk of an iterable, indexed by global position."""

    def __init__(self, chunk: list, offset: int):
        self.chunk, self.offset = chunk, offset

    def __getitem__(self, pos: int) -> Any:
        return self.chunk[pos - self.offset]

    def __len__(self) -> int:
        return len(self.chunk)


# ----------------------------------------------------------------------------------------------------------------
# Dataset-scale features on disk
# ----------------------------------------------------------------------------------------------------------------
# Layout of an output directory (every file is written under a temporary name, then renamed):
#   meta.json                      settings; gets a "merged" entry once the final files below are complete
#   chunks/r00000_c000000.npz      one rank's chunk: features, indices, labels, inputs, skipped_*
#   chunks/r00000.done.json        the rank finished
#   features.npy  (or features.safetensors)   [rows, D], in input order (np.load(..., mmap_mode="r"), faiss)
#   indices.npy   labels.npy   inputs.txt   skipped.json
CHUNKS = "chunks"
_SETTING_KEYS = ("model", "layer", "normalize", "dtype", "preprocess", "source", "n_inputs", "world_size",
                 "chunk_size", "format")  # fmt: skip


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str), binary=False)


def _is_shards(source: Any) -> bool:
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        if os.path.isdir(s) or s.lower().endswith((".csv", ".tsv", ".txt", ".lst", ".list")):
            return False
        return s.endswith(".tar") or "{" in s or "::" in s or s.startswith(("pipe:", "http://", "https://"))
    return (
        isinstance(source, (list, tuple))
        and bool(source)
        and all(isinstance(u, (str, os.PathLike)) and os.fspath(u).endswith(".tar") for u in source)
    )


@dataclass
class _Source:
    items: Sequence
    names: Callable[[int], str]
    description: str
    class_names: list[str] | None = None


def _resolve_items(source: Any) -> _Source:
    """A folder (class subfolders -> labels), a CSV/TXT file list, a Dataset, or a list of images."""
    if isinstance(source, (str, os.PathLike)):
        from seer.data.sources import resolve_source

        src = resolve_source(source)
        items = src.items  # (path, label) pairs
        return _Source(items, lambda i: items[i][0], f"{src.kind}:{src.description}", src.class_names)
    seq, iterable = _as_items(source)
    if seq is None:
        seq = list(iterable)
    if len(seq) == 0:
        raise ValueError("extract_dataset: no images (empty input)")
    first = _unpack(seq[0])[0]
    if isinstance(first, (str, os.PathLike)):
        return _Source(seq, lambda i: os.fspath(_unpack(seq[i])[0]), f"list of {len(seq)} paths")
    classes = getattr(source, "classes", None)
    return _Source(seq, lambda i: f"#{i}", f"{type(source).__name__} of {len(seq)}",
                   [str(c) for c in classes] if classes is not None else None)  # fmt: skip


def _chunk_path(out: Path, rank: int, k: int) -> Path:
    return out / CHUNKS / f"r{rank:05d}_c{k:06d}.npz"


def _save_chunk(path: Path, feats: np.ndarray, indices: list[int], labels: list[int], inputs: list[str],
                skipped: list[dict]) -> None:  # fmt: skip
    arrays = {
        "features": feats,
        "indices": np.asarray(indices, dtype=np.int64),
        "labels": np.asarray(labels, dtype=np.int64),
        "inputs": np.asarray(inputs, dtype=np.str_),
        "skipped_indices": np.asarray([s["index"] for s in skipped], dtype=np.int64),
        "skipped_inputs": np.asarray([s["input"] for s in skipped], dtype=np.str_),
        "skipped_errors": np.asarray([s["error"] for s in skipped], dtype=np.str_),
    }
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def _check_meta(out: Path, settings: dict, overwrite: bool) -> None:
    meta_path = out / "meta.json"
    if meta_path.is_file() and not overwrite:
        old = json.loads(meta_path.read_text())
        diff = [
            k for k in _SETTING_KEYS if json.dumps(old.get(k), default=str) != json.dumps(settings.get(k), default=str)
        ]
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(
                f"{out} holds features of a different run ({details}); use another directory or overwrite=True"
            )
        return
    _write_json(meta_path, settings)


def _model_name(model: Any) -> str:
    if model is None:
        return DEFAULT_MODEL
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    cfg = getattr(model, "cfg", None)
    return f"{type(model).__name__}({cfg.to_dict() if hasattr(cfg, 'to_dict') else ''})"


def extract_dataset(source: Any, out_dir: str | os.PathLike, model: Any = None, *, rank: int = 0,
                    world_size: int = 1, layer: str = "avgpool", batch_size: int | None = None, device: Any = None,
                    normalize: bool = False, dtype: str = "float16", chunk_size: int = 4096,
                    num_workers: int | None = None, on_error: str = "skip", merge: bool | str = "auto",
                    format: str = "npy", progress: bool | None = None, amp: str | None = None,
                    overwrite: bool = False, **preprocess: Any) -> dict:  # fmt: skip
    """Features of a whole dataset written to ``out_dir`` in chunks: resumable, atomic, rank-sharded.

    Every rank runs this with its own ``rank`` (of ``world_size``, passed explicitly: nothing here talks to
    torch.distributed). Rank ``r`` handles the ``r``-th contiguous slice of the inputs (shards: the ``r``-th share
    of the shard files) and writes chunks of ``chunk_size`` rows; a rerun skips the chunks already on disk. When
    the last rank finishes (``merge="auto"``), or when ``merge_features(out_dir)`` is called, the chunks are merged
    into plain ``.npy`` files in input order (see ``load_feature_file``).

    Args:
        source: an image folder (class subfolders -> labels), a CSV/TXT file list (``path[,label]``), webdataset
            shards (a ``.tar`` path, brace pattern or list of ``.tar`` files), a Dataset of ``(image, label)``,
            or a list of images / paths.
        out_dir: output directory.
        model, layer, batch_size, device, normalize, amp, num_workers, progress: as ``extract_features``.
        dtype: "float16" (half the disk, what kNN / linear probes need) or "float32".
        on_error: "skip" (record unreadable inputs in ``skipped.json``) or "raise".
        merge: "auto" (merge when every rank is done), True (this rank merges: all must be done), False.
        format: "npy" or "safetensors" for the merged features file.
        overwrite: start over (this rank's chunks and the merged files are removed).
        **preprocess: resolution, crop_pct, interpolation, resize_mode, mean, std overrides.

    Returns:
        A summary dict: rows written by this rank, skipped inputs, chunks, and the merge result if merged.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if format not in ("npy", "safetensors"):
        raise ValueError(f"format must be 'npy' or 'safetensors', got {format!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    unknown = set(preprocess) - {"resolution", "crop_pct", "interpolation", "resize_mode", "mean", "std"}
    if unknown:
        raise TypeError(f"extract_dataset: unknown keyword argument(s) {sorted(unknown)}")
    out = Path(out_dir).expanduser()
    (out / CHUNKS).mkdir(parents=True, exist_ok=True)
    if overwrite:
        for p in (out / CHUNKS).glob(f"r{rank:05d}*"):
            p.unlink()
        for name in ("features.npy", "features.safetensors", "indices.npy", "labels.npy", "inputs.txt",
                     "skipped.json"):  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
    shards = _is_shards(source)
    src = None if shards else _resolve_items(source)
    setup = _setup(model, layer=layer, batch_size=batch_size, device=device, normalize=normalize, amp=amp,
                   preprocess=True, n_items=None if src is None else len(src.items), num_workers=num_workers,
                   needs_decode=True, overrides=preprocess)  # fmt: skip
    settings = {
        "model": _model_name(model),
        "layer": layer,
        "normalize": normalize,
        "dtype": dtype,
        "preprocess": asdict(setup.preprocess),
        "source": f"shards:{source}" if shards else src.description,
        "n_inputs": None if src is None else len(src.items),
        "world_size": world_size,
        "chunk_size": chunk_size,
        "format": format,
        "class_names": None if src is None else src.class_names,
    }
    settings["preprocess"]["mean"] = list(settings["preprocess"]["mean"])
    settings["preprocess"]["std"] = list(settings["preprocess"]["std"])
    _check_meta(out, settings, overwrite)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    t0 = time.time()
    with _eval_mode(setup.model):
        if shards:
            summary = _extract_shards(source, out, setup, rank, world_size, chunk_size, np_dtype, on_error, progress)
        else:
            summary = _extract_items(src, out, setup, rank, world_size, chunk_size, np_dtype, on_error, progress)
    summary.update(rank=rank, world_size=world_size, seconds=round(time.time() - t0, 3))
    _write_json(out / CHUNKS / f"r{rank:05d}.done.json", summary)
    all_done = all((out / CHUNKS / f"r{r:05d}.done.json").is_file() for r in range(world_size))
    if merge is True and not all_done:
        missing = [r for r in range(world_size) if not (out / CHUNKS / f"r{r:05d}.done.json").is_file()]
        raise RuntimeError(f"{out}: cannot merge yet, ranks {missing} are not done")
    if merge is True or (merge == "auto" and all_done):
        summary["merged"] = merge_features(out, _lock=merge == "auto")
    return summary


def _extract_items(src: _Source, out: Path, setup: _Setup, rank: int, world_size: int, chunk_size: int,
                   np_dtype: Any, on_error: str, progress: bool | None) -> dict:  # fmt: skip
    n = len(src.items)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    starts = list(range(lo, hi, chunk_size))
    todo = [(k, s) for k, s in enumerate(starts) if not _chunk_path(out, rank, k).is_file()]
    rows = skipped_total = 0
    with _progress(sum(min(s + chunk_size, hi) - s for _, s in todo), progress, f"rank {rank}") as bar:
        for k, start in todo:
            positions = range(start, min(start + chunk_size, hi))
            feats, idx, labels, skipped = [], [], [], []
            for pos_list, imgs, labs, errors in _batches(src.items, positions, setup):
                for pos, desc, err in errors:
                    if on_error == "raise":
                        raise ImageError(f"cannot read image {desc}: {err}")
                    skipped.append({"index": pos, "input": desc, "error": err})
                if imgs is not None:
                    feats.append(setup.runner(imgs).cpu().numpy().astype(np_dtype))
                    idx += pos_list
                    labels += labs
                bar.update(len(pos_list) + len(errors))
            dim = feats[0].shape[1] if feats else 0
            arr = np.concatenate(feats) if feats else np.zeros((0, dim), np_dtype)
            _save_chunk(_chunk_path(out, rank, k), arr, idx, labels, [src.names(i) for i in idx], skipped)
            rows += len(idx)
            skipped_total += len(skipped)
    return {"chunks": len(starts), "chunks_written": len(todo), "rows_written": rows, "skipped": skipped_total,
            "range": [lo, hi]}  # fmt: skip


class _ShardTransform:
    """Encoded bytes from a shard -> uint8 HWC array (runs in the eval_loader workers)."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, data: bytes) -> np.ndarray:
        # a writable copy: the loader's default_collate turns it into a tensor
        return np.array(self.preprocess(load_image(bytes(data), draft=self.preprocess.draft_size())))


def _extract_shards(urls: Any, out: Path, setup: _Setup, rank: int, world_size: int, chunk_size: int,
                    np_dtype: Any, on_error: str, progress: bool | None) -> dict:  # fmt: skip
    try:
        from seer.data.shards import eval_loader
    except ImportError as exc:  # pragma: no cover - the module ships with seer
        raise RuntimeError(f"reading shards needs seer.data.shards.eval_loader ({exc})") from exc
    # Resume: the keys already in this rank's chunks are not computed again.
    done_keys: set[str] = set()
    existing = sorted((out / CHUNKS).glob(f"r{rank:05d}_c*.npz"))
    for path in existing:
        with np.load(path) as z:
            done_keys.update(z["inputs"].tolist())
    k = len(existing)
    urls = [os.fspath(u) for u in urls] if isinstance(urls, (list, tuple)) else os.fspath(urls)
    loader = eval_loader(urls, _ShardTransform(setup.preprocess),
                         batch_size=setup.batch_size, rank=rank, world_size=world_size,
                         num_workers=setup.num_workers, decode="bytes", require_label=False)  # fmt: skip
    feats: list[np.ndarray] = []
    idx: list[int] = []
    labels: list[int] = []
    keys: list[str] = []
    rows = 0

    def flush() -> None:
        nonlocal k, feats, idx, labels, keys, rows
        if not idx:
            return
        _save_chunk(_chunk_path(out, rank, k), np.concatenate(feats), idx, labels, keys, [])
        rows += len(idx)
        k += 1
        feats, idx, labels, keys = [], [], [], []

    with _progress(None, progress, f"rank {rank}") as bar:
        for images, labs, batch_keys, indices in loader:
            keep = [i for i, key in enumerate(batch_keys) if key not in done_keys]
            bar.update(len(batch_keys))
            if not keep:
                continue
            images = images if len(keep) == len(batch_keys) else images[keep]
            feats.append(setup.runner(images).cpu().numpy().astype(np_dtype))
            idx += [int(indices[i]) for i in keep]
            labels += [int(labs[i]) for i in keep]
            keys += [str(batch_keys[i]) for i in keep]
            if len(idx) >= chunk_size:
                flush()
        flush()
    skipped = [{"index": -1, "input": r.get("key") or r.get("url"), "error": f"{r.get('kind')}: {r.get('error')}"}
               for r in getattr(loader, "skipped", [])]  # fmt: skip
    if skipped and on_error == "raise":
        raise ImageError(f"cannot read {len(skipped)} shard sample(s); first: {skipped[0]['input']}: "
                         f"{skipped[0]['error']}")  # fmt: skip
    if skipped:
        _write_json(out / CHUNKS / f"r{rank:05d}.skipped.json", skipped)
    return {"chunks": k, "rows_written": rows, "skipped": len(skipped)}


def merge_features(out_dir: str | os.PathLike, *, _lock: bool = False) -> dict:
    """Merge every rank's chunks into ``features.npy`` / ``indices.npy`` / ``labels.npy`` / ``inputs.txt`` in input
    order (each input exactly once, checked), plus ``skipped.json``; ``meta.json`` records the merge last."""
    out = Path(out_dir)
    meta = json.loads((out / "meta.json").read_text())
    world_size = int(meta["world_size"])
    missing = [r for r in range(world_size) if not (out / CHUNKS / f"r{r:05d}.done.json").is_file()]
    if missing:
        raise RuntimeError(f"{out}: ranks {missing} have not finished; run them (same settings) before merging")
    lock = out / ".merge.lock"
    if _lock:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return {"merged_by": "another rank"}
    try:
        return _merge(out, meta, world_size)
    finally:
        if _lock:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _merge(out: Path, meta: dict, world_size: int) -> dict:
    paths = sorted((out / CHUNKS).glob("r*_c*.npz"))
    indices, labels, inputs, skipped = [], [], [], []
    dim, dtype = None, np.dtype(meta["dtype"])
    for path in paths:
        with np.load(path) as z:
            indices.append(z["indices"])
            labels.append(z["labels"])
            inputs += z["inputs"].tolist()
            if len(z["indices"]):
                dim = z["features"].shape[1]
            skipped += [{"index": int(i), "input": str(s), "error": str(e)}
                        for i, s, e in zip(z["skipped_indices"], z["skipped_inputs"], z["skipped_errors"])]  # fmt: skip
    for r in range(world_size):
        extra = out / CHUNKS / f"r{r:05d}.skipped.json"
        if extra.is_file():
            skipped += json.loads(extra.read_text())
    all_idx = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if dim is None:
        raise RuntimeError(f"{out}: no features in any chunk ({len(skipped)} inputs skipped)")
    # Order: by input index when every row has one (files, datasets, shards written by seer), else as written.
    ordered = bool(len(all_idx)) and int(all_idx.min()) >= 0
    order = np.argsort(all_idx, kind="stable") if ordered else np.arange(len(all_idx))
    if ordered:
        dup = np.flatnonzero(np.diff(all_idx[order]) == 0)
        if len(dup):
            raise RuntimeError(f"{out}: input {int(all_idx[order][dup[0]])} appears in more than one chunk")
    n_inputs = meta.get("n_inputs")
    if n_inputs is not None:
        covered = np.zeros(n_inputs, dtype=np.int64)
        np.add.at(covered, all_idx, 1)
        np.add.at(covered, np.asarray([s["index"] for s in skipped], dtype=np.int64), 1)
        bad = np.flatnonzero(covered != 1)
        if len(bad):
            raise RuntimeError(f"{out}: inputs {bad[:10].tolist()} are covered {covered[bad[:10]].tolist()} times")
    dest = np.empty(len(order), dtype=np.int64)
    dest[order] = np.arange(len(order))
    rows = len(order)
    if meta["format"] == "npy":
        fd, tmp = tempfile.mkstemp(prefix=".features.npy.", suffix=".tmp", dir=out)
        os.close(fd)
        try:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, dim))
            offset = 0
            for path in paths:  # chunk by chunk: the merged array never has to fit in memory
                with np.load(path) as z:
                    n = len(z["indices"])
                    if n:
                        mm[dest[offset : offset + n]] = z["features"]
                    offset += n
            mm.flush()
            del mm
            os.replace(tmp, out / "features.npy")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    else:
        feats = np.empty((rows, dim), dtype=dtype)
        offset = 0
        for path in paths:
            with np.load(path) as z:
                n = len(z["indices"])
                if n:
                    feats[dest[offset : offset + n]] = z["features"]
                offset += n
        tensors = {"features": feats, "indices": all_idx[order], "labels": all_labels[order]}
        _atomic_write(out / "features.safetensors", lambda f: f.write(_safetensors_bytes(tensors)))
    _atomic_write(out / "indices.npy", lambda f: np.save(f, all_idx[order]))
    _atomic_write(out / "labels.npy", lambda f: np.save(f, all_labels[order]))
    sorted_inputs = [inputs[i] for i in order]
    _atomic_write(out / "inputs.txt", lambda f: f.write("".join(f"{s}\n" for s in sorted_inputs)), binary=False)
    _write_json(out / "skipped.json", sorted(skipped, key=lambda s: s["index"]))
    merged = {"rows": rows, "dim": int(dim), "skipped": len(skipped), "ordered_by_index": ordered,
              "files": ["features.npy" if meta["format"] == "npy" else "features.safetensors", "indices.npy",
                        "labels.npy", "inputs.txt", "skipped.json"]}  # fmt: skip
    _write_json(out / "meta.json", {**meta, "merged": merged})
    return merged


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "seer-features"})


def load_feature_file(path: str | os.PathLike, *, mmap: bool = True) -> dict:
    """Read features written by ``extract_dataset`` / ``seer extract``.

    Args:
        path: the output directory, or its ``features.npy`` / ``features.safetensors``.
        mmap: memory-map ``features.npy`` instead of reading it (for arrays larger than memory).

    Returns:
        ``{"features": [N, D], "labels": [N] (-1 = none), "indices": [N] input positions, "inputs": list of N
        paths / keys, "skipped": [...], "class_names": [...] | None, "meta": {...}}``.
    """
    path = Path(path).expanduser()
    out = path if path.is_dir() else path.parent
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{out}: no meta.json (not a seer features directory)")
    meta = json.loads(meta_path.read_text())
    if "merged" not in meta:
        raise RuntimeError(f"{out}: the chunks have not been merged yet; run seer.features.merge_features({out!s})")
    result: dict[str, Any] = {"meta": meta, "class_names": meta.get("class_names")}
    st = out / "features.safetensors"
    if (path.is_dir() and meta["format"] == "safetensors") or path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        result.update(load_file(str(st)))
    else:
        result["features"] = np.load(out / "features.npy", mmap_mode="r" if mmap else None)
        result["indices"] = np.load(out / "indices.npy")
        result["labels"] = np.load(out / "labels.npy")
    result["inputs"] = (out / "inputs.txt").read_text().splitlines()
    result["skipped"] = json.loads((out / "skipped.json").read_text())
    return result


# ----------------------------------------------------------------------------------------------------------------
# `seer extract`
# ----------------------------------------------------------------------------------------------------------------
def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def cli_main(argv: Sequence[str] | None = None) -> int:
    """`seer extract SOURCE OUT_DIR [options]`: features of a folder, file list or shards to files on disk."""
    p = argparse.ArgumentParser(
        prog="seer extract",
        description="Extract features of an image folder (class subfolders -> labels), a CSV/TXT file list "
        "(path[,label]) or webdataset shards into OUT_DIR: features.npy (or .safetensors), labels.npy, indices.npy, "
        "inputs.txt. Resumable: rerun the same command after an interruption. Multi-process: run one command per "
        "rank with --rank/--world-size (defaults from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS); the last rank "
        "to finish merges.",
    )
    p.add_argument("source", help="image folder, .csv/.txt file list, or shards (.tar, brace pattern)")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--model", default=None, help=f"checkpoint path or HF hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--layer", default="avgpool", choices=LAYERS)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast dtype (CUDA)")
    p.add_argument("--normalize", action="store_true", help="L2-normalize the features")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored feature dtype")
    p.add_argument("--format", default="npy", choices=["npy", "safetensors"], help="merged features file format")
    p.add_argument("--chunk-size", type=int, default=4096, help="rows per chunk (the unit of resumption)")
    p.add_argument("--workers", type=int, default=None, help="decoding worker processes")
    p.add_argument("--rank", type=int, default=_env_int("RANK", "SLURM_PROCID", default=0))
    p.add_argument("--world-size", type=int, default=_env_int("WORLD_SIZE", "SLURM_NTASKS", default=1))
    p.add_argument("--no-merge", action="store_true", help="do not merge (run `--merge-only` later)")
    p.add_argument("--merge-only", action="store_true", help="only merge the chunks already written")
    p.add_argument("--on-error", default="skip", choices=["skip", "raise"], help="unreadable images")
    p.add_argument("--overwrite", action="store_true", help="start over in OUT_DIR")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--interpolation", default=None, choices=sorted(INTERPOLATIONS))
    p.add_argument("--resize-mode", default=None, choices=["shorter", "warp"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.merge_only:
            merged = merge_features(args.out_dir)
            print(json.dumps({"merged": merged}))
            return 0
        summary = extract_dataset(
            args.source, args.out_dir, args.model, rank=args.rank, world_size=args.world_size, layer=args.layer,
            batch_size=args.batch_size, device=args.device, normalize=args.normalize, dtype=args.dtype,
            chunk_size=args.chunk_size, num_workers=args.workers, on_error=args.on_error,
            merge=False if args.no_merge else "auto", format=args.format,
            progress=False if args.no_progress else None, amp=args.amp, overwrite=args.overwrite,
            **{k: v for k, v in (("resolution", args.resolution), ("crop_pct", args.crop_pct),
                                 ("interpolation", args.interpolation), ("resize_mode", args.resize_mode))
               if v is not None},
        )  # fmt: skip
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"seer extract: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str))
    return 0
