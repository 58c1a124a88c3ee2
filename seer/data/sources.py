"""Sources for `write_shards`: an image folder, a CSV/TXT file list, or a torchvision-style dataset.

A source is resolved once in the parent process into a `Source` (a list of items plus class names); each item is
turned into a webdataset sample dict (`encode_item`) in a pool worker, so reading and optional re-encoding run in
parallel while the parent only appends bytes to tar files.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

# Extensions accepted when listing a folder (lower case, with the dot).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".gif")
# PIL format -> webdataset member extension. Anything else is re-encoded to JPEG.
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm", "TIFF": "tiff", "GIF": "gif"}
# Member extensions the readers look for, in order.
IMAGE_MEMBER_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "tif", "tiff", "gif", "img")

_PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "image", "image_path", "img", "url")
_LABEL_COLUMNS = ("label", "class", "target", "category", "cls", "class_name", "label_name")


@dataclass
class Source:
    """A resolved source: `items` are `(path, label)` pairs (file sources) or dataset indices."""

    kind: str  # "folder" | "list" | "dataset"
    description: str
    items: list = field(default_factory=list)
    class_names: list[str] | None = None
    dataset: Any = None

    def __len__(self) -> int:
        return len(self.items)


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: str) -> list[str]:
    """All image files under `root`, sorted, following symlinks (as torchvision's ImageFolder does)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_file(f)]
    return found


def folder_source(root: str | os.PathLike) -> Source:
    """Class subfolders become labels (sorted names -> 0..C-1, like ImageFolder); a flat folder is unlabeled (-1)."""
    root = os.fspath(root)
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))
    if subdirs:
        items = [(p, label) for label, name in enumerate(subdirs) for p in _walk_images(os.path.join(root, name))]
        class_names: list[str] | None = subdirs
    else:
        items = [(os.path.join(root, f), -1) for f in sorted(os.listdir(root)) if _is_image_file(f)]
        class_names = None
    if not items:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
    return Source("folder", root, items, class_names)


def _labels_to_ints(raw: list[str | None], where: str) -> tuple[list[int], list[str] | None]:
    """Integer labels stay integers; any other label strings become class names (sorted -> 0..C-1)."""
    given = [r for r in raw if r not in (None, "")]
    try:
        ints = {r: int(r) for r in given}
        return [ints[r] if r not in (None, "") else -1 for r in raw], None
    except ValueError:
        pass
    names = sorted(set(given))
    lookup = {n: i for i, n in enumerate(names)}
    if not names:
        raise ValueError(f"{where}: no labels")
    return [lookup[r] if r not in (None, "") else -1 for r in raw], names


def list_source(list_file: str | os.PathLike) -> Source:
    """A CSV (header with a path column and an optional label column, or `path[,label]` rows) or a TXT file
    (`path` or `path<TAB or space>label` per line; `#` comments). Relative paths are relative to the list file."""
    list_file = os.fspath(list_file)
    base = os.path.dirname(os.path.abspath(list_file))
    paths: list[str] = []
    raw_labels: list[str | None] = []

    def resolve(p: str) -> str:
        p = os.path.expanduser(p.strip())
        return p if os.path.isabs(p) else os.path.join(base, p)

    with open(list_file, newline="", encoding="utf-8") as f:
        if list_file.lower().endswith((".csv", ".tsv")):
            rows = [r for r in csv.reader(f, delimiter="\t" if list_file.lower().endswith(".tsv") else ",") if r]
            header = [c.strip().lower() for c in rows[0]] if rows else []
            if any(c in _PATH_COLUMNS for c in header):
                pcol = next(header.index(c) for c in _PATH_COLUMNS if c in header)
                lcol = next((header.index(c) for c in _LABEL_COLUMNS if c in header), None)
                rows = rows[1:]
            else:
                pcol, lcol = 0, (1 if rows and len(rows[0]) > 1 else None)
            for lineno, row in enumerate(rows, start=2 if header else 1):
                if len(row) <= pcol or not row[pcol].strip():
                    raise ValueError(f"{list_file}: row {lineno} has no path: {row!r}")
                paths.append(resolve(row[pcol]))
                raw_labels.append(row[lcol].strip() if lcol is not None and len(row) > lcol else None)
        else:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if "\t" in line:
                    path, _, label = line.partition("\t")
                elif os.path.exists(resolve(line)) or len(line.split()) == 1:
                    path, label = line, None
                else:
                    path, label = line.rsplit(None, 1)
                paths.append(resolve(path))
                raw_labels.append(label.strip() if label else None)
    if not paths:
        raise ValueError(f"{list_file}: the file list is empty")
    labels, class_names = _labels_to_ints(raw_labels, list_file) if any(raw_labels) else ([-1] * len(paths), None)
    return Source("list", list_file, list(zip(paths, labels)), class_names)


def dataset_source(dataset: Any) -> Source:
    """A torchvision-style dataset (`len(ds)`, `ds[i] -> (image, label)`). Folder datasets without a transform are
    read from their files (bytes kept as they are); others are encoded from the returned images."""
    classes = getattr(dataset, "classes", None)
    class_names = [str(c) for c in classes] if classes is not None else None
    samples = getattr(dataset, "samples", None)
    no_transform = getattr(dataset, "transform", None) is None and getattr(dataset, "transforms", None) is None
    if (
        no_transform
        and isinstance(samples, Sequence)
        and len(samples) == len(dataset)
        and all(isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) for s in samples[:10])
    ):
        return Source("folder", type(dataset).__name__, [(p, int(y)) for p, y in samples], class_names)
    return Source("dataset", type(dataset).__name__, list(range(len(dataset))), class_names, dataset=dataset)


def resolve_source(source: Any) -> Source:
    """Dispatch on the kind of source (see `write_shards`)."""
    if isinstance(source, Source):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(source))
        if os.path.isdir(path):
            return folder_source(path)
        if os.path.isfile(path):
            if path.lower().endswith((".csv", ".tsv", ".txt", ".lst", ".list")):
                return list_source(path)
            raise ValueError(f"{path!r}: a source file must be a .csv, .tsv or .txt file list")
        raise FileNotFoundError(f"source {path!r} does not exist (expected an image folder or a CSV/TXT file list)")
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return dataset_source(source)
    raise TypeError(f"cannot write shards from a {type(source).__name__}: pass a folder, a file list or a dataset")


# --------------------------------------------------------------------------------------------------------------------
# Per-item encoding (runs in pool workers)


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        import numpy as np

        if isinstance(image, np.ndarray):
            return Image.fromarray(image)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    import torch

    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(image)
    raise TypeError(f"dataset returned an image of type {type(image).__name__}; expected PIL, numpy, tensor or bytes")


def _encode_pil(img: Image.Image, image_format: str | None, jpeg_quality: int) -> tuple[bytes, str]:
    """Encode a decoded image. Auto format: lossless PNG for small images (CIFAR-like), JPEG otherwise."""
    fmt = (image_format or ("png" if max(img.size) <= 256 else "jpeg")).lower()
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        img = img.convert("RGB")
        img.save(buf, format="JPEG", quality=jpeg_quality)
        return buf.getvalue(), "jpg"
    if fmt == "png":
        if img.mode not in ("RGB", "RGBA", "L", "LA", "I", "I;16", "P", "1"):
            img = img.convert("RGB")
        img.save(buf, format="PNG")
        return buf.getvalue(), "png"
    if fmt == "webp":
        img.save(buf, format="WEBP", quality=jpeg_quality)
        return buf.getvalue(), "webp"
    raise ValueError(f"unknown image_format {image_format!r} (use jpeg, png or webp)")


def _maybe_downscale(data: bytes, max_image_side: int | None, jpeg_quality: int) -> tuple[bytes, str, int, int, bool]:
    """Probe the image (header only) and re-encode it when it is too large or in an unusual format.

    Returns (bytes, extension, width, height, reencoded)."""
    try:
        probe = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ValueError(f"not an image PIL can read ({len(data)} bytes)") from exc
    with probe:
        fmt, (w, h) = probe.format, probe.size
        too_big = max_image_side is not None and max(w, h) > max_image_side
        if fmt in FORMAT_EXT and not too_big:
            return data, FORMAT_EXT[fmt], w, h, False
        img = ImageOps.exif_transpose(probe.convert("RGB"))  # keep the orientation once EXIF is dropped
    if too_big:
        img.thumbnail((max_image_side, max_image_side), Image.Resampling.BICUBIC, reducing_gap=3.0)
    out, ext = _encode_pil(img, "jpeg", jpeg_quality)
    return out, ext, img.width, img.height, True


def encode_item(
    source: Source,
    position: int,
    *,
    max_image_side: int | None = None,
    jpeg_quality: int = 90,
    image_format: str | None = None,
) -> dict:
    """The webdataset sample for `source.items[position]`: `{__key__, <img ext>: bytes, cls: bytes, json: bytes}`.

    The key is the zero-padded source index (unique, stable under shuffling, no dots). Raises on unreadable input;
    the caller records the error and skips the item."""
    import json

    item = source.items[position]
    path: str | None = None
    if source.kind == "dataset":
        image, label = source.dataset[item]
        if isinstance(image, (bytes, bytearray)):
            data, ext, w, h, reencoded = _maybe_downscale(bytes(image), max_image_side, jpeg_quality)
        else:
            img = _to_pil(image)
            if max_image_side is not None and max(img.size) > max_image_side:
                img = img.copy()
                img.thumbnail((max_image_side, max_image_side), Image.Resampling.BICUBIC, reducing_gap=3.0)
            data, ext = _encode_pil(img, image_format, jpeg_quality)
            (w, h), reencoded = img.size, True
    else:
        path, label = item
        with open(path, "rb") as f:
            data = f.read()
        data, ext, w, h, reencoded = _maybe_downscale(data, max_image_side, jpeg_quality)
    try:
        label = -1 if label is None else int(label)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"item {position}: label {label!r} is not an integer") from exc
    meta: dict[str, Any] = {"index": position, "label": label, "width": w, "height": h}
    if path is not None:
        meta["path"] = path
    if source.class_names is not None and 0 <= label < len(source.class_names):
        meta["class"] = source.class_names[label]
    if reencoded:
        meta["reencoded"] = True
    return {
        "__key__": f"{position:010d}",
        ext: data,
        "cls": str(label).encode("ascii"),
        "json": json.dumps(meta).encode("utf-8"),
    }


def item_description(source: Source, position: int) -> str:
    """A short name for an item in error messages."""
    if source.kind == "dataset":
        return f"{source.description}[{source.items[position]}]"
    return str(source.items[position][0])
