"""Inputs of every kind -> batches of uint8 images: lists, iterables, Datasets, folders, tensors and arrays, decoded
(in DataLoader workers when that pays) with unreadable images reported as data rather than raised mid-batch."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from seer.data.images import Preprocess, check_image_array, check_image_tensor, load_image
from seer.data.sources import IMAGE_EXTENSIONS, list_image_files

__all__ = ["ImageError", "as_items", "unpack", "is_image_data", "batches"]


class ImageError(ValueError):
    """An input that cannot be read as an image (the message names the input)."""


def _describe(item: Any, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"input #{index} ({type(item).__name__})"


def _list_images(folder: Path) -> list[str]:
    """Every image under ``folder``, recursively, in path order; links followed, each folder and file once."""
    files = sorted(list_image_files(folder), key=Path)  # the order of the sorted rglob this listing used to be
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def as_items(images: Any) -> tuple[Sequence | None, Iterable | None]:
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


def unpack(item: Any) -> tuple[Any, int]:
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
            item, label = unpack(self.items[pos])
            if self.preprocess is None:
                return pos, _raw_tensor(item), label, None
            img = load_image(item, draft=self.preprocess.draft_size())
            return pos, self.preprocess(img), label, None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ImageError) or item is None or not is_image_data(item):
                raise  # the input itself is wrong (type, shape, dtype): never skipped
            return pos, None, -1, (_describe(item, pos), f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt or unreadable files
            desc = f"input #{pos}" if item is None else _describe(item, pos)  # None: the Dataset itself raised
            return pos, None, -1, (desc, f"{type(exc).__name__}: {exc}")


def is_image_data(item: Any) -> bool:
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


def batches(items: Sequence, positions: Sequence[int], preprocess: Preprocess | None, *, batch_size: int,
            num_workers: int, pin_memory: bool) -> Iterator[tuple]:  # fmt: skip
    """``(positions, images, labels, errors)`` per batch of ``items[p] for p in positions``, in order.

    ``images`` is uint8 ``[B, H, W, 3]`` (or the raw float tensors stacked when ``preprocess`` is None), ``None``
    when no item of the batch could be read; ``errors`` lists ``(position, description, error)`` of the others.
    """
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(items, positions, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    yield from loader
