"""``extract_features``: features of images in memory, as one float32 array in input order.

The pipeline is built for throughput: JPEGs are decoded at reduced size when that is enough (PIL draft mode), the
crop is taken during the resize (one PIL call, ``reducing_gap``), images stay uint8 until the whole batch is on the
device, where one fused multiply-add converts and normalizes them; the trunk runs under ``torch.inference_mode``
in channels_last with batch norm folded into the convolutions. Decoding runs in DataLoader workers for large inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from seer.data.images import Preprocess
from seer.features.inputs import ImageError, as_items, is_image_data, unpack
from seer.features.runner import eval_mode, make_setup, progress_bar

__all__ = ["FeatureArray", "extract_features"]


class FeatureArray(np.ndarray):
    """The ``on_error="skip"`` result: a float32 ndarray [kept, D] with ``.indices`` (input position of each row)
    and ``.skipped`` (list of ``{"index", "input", "error"}`` for each input that could not be read)."""

    indices: np.ndarray
    skipped: list[dict]

    def __array_finalize__(self, obj: Any) -> None:
        self.indices = getattr(obj, "indices", None)
        self.skipped = getattr(obj, "skipped", [])


def extract_features(images: Any, model: Any = None, *, layer: str = "avgpool", batch_size: int | None = None,
                     device: Any = None, normalize: bool = False, progress: bool | None = None,
                     on_error: str = "raise", amp: str | None = None, num_workers: int | None = None,
                     preprocess: bool | Preprocess = True, resolution: int | None = None,
                     crop_pct: float | None = None, interpolation: str | None = None,
                     resize_mode: str | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, backend: str = "auto",
                     exact: bool = False) -> np.ndarray:  # fmt: skip
    """Features of images with a SEER trunk, as numpy float32 ``[N, D]`` in input order.

    Args:
        images: a list (or any iterable, or a ``Dataset``) of PIL images, file paths, encoded bytes, numpy HWC
            uint8 arrays or CHW tensors (uint8, or float in [0, 1]); an NCHW tensor or NHWC array; a folder path
            (its image files, sorted). Dataset items may be ``(image, label)`` pairs.
        model: a trunk, a checkpoint path, an HF hub id or the name of released SEER weights (``"seer-rg32"``;
            ``seer models`` lists them): anything ``seer.load_trunk`` reads; or ``None`` for ``DEFAULT_MODEL``
            (``facebook/regnet-y-320-seer``: downloaded once, needs network or the HF cache).
        layer: "avgpool" (the pooled last stage) or "res2".."res5" (that stage, globally average-pooled).
        batch_size: images per forward (default 32 on CPU, 64 on GPU).
        device: default: CUDA when available for models loaded here; a given module's own device.
        normalize: L2-normalize each feature vector.
        progress: a tqdm bar; ``None`` shows it for 512 images or more (and for iterables of unknown length).
            ``False`` also silences the heartbeat line of a backend's set-up (the ONNX export, the compile).
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
        exact: decode JPEGs in full and resize every image whole, as timm / torchvision / HF do, for their pixels
            exactly (``Preprocess.for_model(trunk, exact=True)``; with a ``Preprocess`` given, that one with
            ``exact=True``). By default a JPEG at least twice the resize target is draft-decoded at 1/2-1/8 scale and
            a large downscale is box pre-reduced: faster, pixels a few gray levels off (docs/features.md, "Exact or
            fast").
        backend: "torch" (eager), "compile" (``torch.compile``, inductor with frozen weights), "onnxruntime" or
            "openvino" (CPU; the trunk exported to ONNX once per process; extras ``seer-ssl[onnx]`` /
            ``[openvino]``), or "auto": eager torch for fewer than 5000 images, on GPU, for non-seer models or with
            no runtime installed, else the fastest per batch in a short probe on this machine (logged on logger
            ``seer.features``; ``SEER_FEATURES_BACKEND`` forces one). Every backend computes in fp32 within 1e-4
            of eager torch; ``amp`` stays opt-in.

    Returns:
        float32 array ``[N, D]`` (a ``FeatureArray`` when ``on_error="skip"``).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    items, iterable = as_items(images)
    if items is not None and len(items) == 0:
        raise ValueError("extract_features: no images (empty input)")
    needs_decode = items is None or any(is_image_data(unpack(items[i])[0]) for i in range(min(len(items), 4)))
    overrides = dict(resolution=resolution, crop_pct=crop_pct, interpolation=interpolation, resize_mode=resize_mode,
                     mean=mean, std=std)  # fmt: skip
    setup = make_setup(model, layer=layer, batch_size=batch_size, device=device, normalize=normalize, amp=amp,
                        preprocess=preprocess, n_items=None if items is None else len(items), num_workers=num_workers,
                        needs_decode=needs_decode, overrides=overrides, backend=backend, exact=exact,
                        progress=progress)  # fmt: skip
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

    with eval_mode(setup.model), progress_bar(None if items is None else len(items), progress, "features") as bar:
        if items is not None:
            for batch in setup.batches(items, range(len(items))):
                consume(batch, bar)
        else:
            offset = 0
            for chunk in _iter_chunks(iterable, setup.batch_size * 8):
                sub = setup.num_workers if len(chunk) > 4 * setup.batch_size else 0
                setup_chunk = dataclasses.replace(setup, num_workers=sub)
                positions = [offset + i for i in range(len(chunk))]
                for batch in setup_chunk.batches(_Offset(chunk, offset), positions):
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


def _iter_chunks(iterable: Iterable, size: int) -> Iterator[list]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
