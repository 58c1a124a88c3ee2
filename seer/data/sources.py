"""Sources for `write_shards`: an image folder, a CSV/TXT file list, or a torchvision-style dataset.

A source is resolved once in the parent process into a `Source` (a list of items plus class names); each item is
turned into a webdataset sample dict (`encode_item`) in a pool worker, so reading and optional re-encoding run in
parallel while the parent only appends bytes to tar files.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

from seer.data.images import check_decode_size, finish_decode, read_image_file

# Extensions accepted when listing a folder (lower case, with the dot).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".gif")
# PIL format -> webdataset member extension. Anything else is re-encoded to JPEG.
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "PPM": "ppm", "TIFF": "tiff", "GIF": "gif"}
# Member extensions the readers look for, in order.
IMAGE_MEMBER_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "tif", "tiff", "gif", "img")

log = logging.getLogger("seer.data")

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


def _dir_key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Link:
    """A symbolic link met during a walk, followed once every real folder is listed; ``items`` then holds what it
    adds (paths, and further links), in place of the link."""

    __slots__ = ("path", "is_dir", "recursive", "items")

    def __init__(self, path: str, is_dir: bool, recursive: bool):
        self.path, self.is_dir, self.recursive = path, is_dir, recursive
        self.items: list[str | _Link] = []


class ImageWalk:
    """Lists the image files under folders, following symbolic links, each folder and each file once.

    Links are followed (users link datasets in), but a folder is entered only the first time it is reached, known
    by its (device, inode): a link loop (``a/up -> ..``) ends, and a folder linked in twice is listed once. A file
    is known by the folder it really lives in and its name, so a symlinked file pointing at a file already listed
    is dropped. Ordinary files cost no system call (a ``stat`` of every file of an ImageNet-sized folder takes
    minutes on NFS or Lustre); only links are resolved. Hard links are entries a user made on purpose and cannot
    loop: they are kept.

    Real locations come first: every top (``add``) is walked without following links, and the links met are followed
    afterwards (``finish``), each in its place in the listing. So a link from one class folder into another, or
    into a folder that is also in the tree, never takes images away from where they really are (nor gives them a
    second label), and without duplicates the order is ``os.walk``'s: a folder's files by name, then its subfolders
    by name, depth first. ``finish`` logs one warning for everything skipped.
    """

    def __init__(self, root: str):
        self.root = root
        self._dirs: dict[tuple[int, int], str] = {}  # every folder entered or reserved -> where it was first
        self._files: dict[tuple[int, int, str], str] = {}  # (folder it really lives in, name) -> path listed
        self._parents: dict[str, tuple[int, int] | None] = {}
        self._links: list[_Link] = []
        self.skipped_dirs: list[tuple[str, str]] = []  # (path reached again, where it was listed first)
        self.skipped_files: list[tuple[str, str]] = []

    def reserve(self, path: str) -> None:
        """Never enter ``path`` (a folder whose own files are not listed, such as the root of class folders)."""
        self._dirs.setdefault(_dir_key(os.stat(path)), path)

    def add(self, top: str, *, recursive: bool = True) -> list[str | _Link]:
        """Walk ``top`` (its links come later, in ``finish``); ``recursive=False``: the files of ``top`` only."""
        out: list[str | _Link] = []
        key = _dir_key(os.stat(top))  # an unreadable top raises: it is the user's own argument
        if self._enter(top, key):
            self._walk(top, key, recursive, out)
        return out

    def _enter(self, path: str, key: tuple[int, int]) -> bool:
        first = self._dirs.setdefault(key, path)
        if first != path:
            self.skipped_dirs.append((path, first))
        return first == path

    def _walk(self, top: str, key: tuple[int, int], recursive: bool, out: list) -> None:
        stack: list[tuple[str, tuple[int, int]] | _Link] = [(top, key)]
        while stack:
            task = stack.pop()
            if isinstance(task, _Link):  # a linked subfolder, in its place
                out.append(task)
                self._links.append(task)
                continue
            path, key = task
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:  # an unreadable subfolder is left out, as os.walk does
                continue
            subdirs: list[tuple[str, tuple[int, int]] | _Link] = []
            for entry in entries:
                try:
                    is_link, is_dir = entry.is_symlink(), entry.is_dir()  # is_dir follows a link
                except OSError:
                    is_link, is_dir = False, False
                if is_dir and not recursive:
                    continue
                if is_link and (is_dir or _is_image_file(entry.name)):
                    link = _Link(entry.path, is_dir, recursive)
                    if is_dir:
                        subdirs.append(link)
                    else:
                        out.append(link)
                        self._links.append(link)
                elif is_dir:
                    try:
                        sub = _dir_key(entry.stat())
                    except OSError:
                        continue
                    if self._enter(entry.path, sub):
                        subdirs.append((entry.path, sub))
                elif _is_image_file(entry.name):
                    self._claim((*key, entry.name), entry.path, out)
            stack += reversed(subdirs)  # a stack: the first subfolder is walked first

    def _claim(self, ident: tuple, path: str, out: list) -> None:
        first = self._files.setdefault(ident, path)
        if first == path:
            out.append(path)
        else:
            self.skipped_files.append((path, first))

    def finish(self) -> None:
        """Follow the links met, in order (links met inside linked folders too), then warn once."""
        i = 0
        while i < len(self._links):  # grows while linked folders are walked
            link = self._links[i]
            i += 1
            if link.is_dir:
                try:
                    key = _dir_key(os.stat(link.path))
                except OSError:
                    continue
                if self._enter(link.path, key):
                    self._walk(link.path, key, link.recursive, link.items)
            else:
                self._claim(self._file_key(link.path), link.path, link.items)
        self._warn()

    def _file_key(self, path: str) -> tuple:
        real = os.path.realpath(path)  # a symlinked file: known by where it really lives
        parent = os.path.dirname(real)
        if parent not in self._parents:
            try:
                self._parents[parent] = _dir_key(os.stat(parent))
            except OSError:
                self._parents[parent] = None
        pkey = self._parents[parent]
        return (*pkey, os.path.basename(real)) if pkey is not None else (real,)

    @staticmethod
    def paths(items: list[str | _Link]) -> list[str]:
        """The paths of a listing from ``add``, links replaced by what they added (after ``finish``)."""
        out: list[str] = []
        stack = list(reversed(items))
        while stack:
            item = stack.pop()
            if isinstance(item, _Link):
                stack += reversed(item.items)
            else:
                out.append(item)
        return out

    def _warn(self) -> None:
        parts = []
        if self.skipped_dirs:
            path, first = self.skipped_dirs[0]
            parts.append(f"{len(self.skipped_dirs)} folder(s) reached a second time (e.g. {path} is {first})")
        if self.skipped_files:
            path, first = self.skipped_files[0]
            parts.append(f"{len(self.skipped_files)} file(s) linked a second time (e.g. {path} is {first})")
        if parts:
            log.warning(
                "%s: symbolic links lead to %s; each is listed once (a link loop, or a dataset linked in twice)",
                self.root,
                " and ".join(parts),
            )


def list_image_files(root: str | os.PathLike, *, recursive: bool = True) -> list[str]:
    """Image files under ``root``, links followed, each folder and file once (see ``ImageWalk``), in ``os.walk``
    order; logs a warning when links led to folders or files already listed."""
    root = os.fspath(root)
    walk = ImageWalk(root)
    found = walk.add(root, recursive=recursive)
    walk.finish()
    return walk.paths(found)


def folder_source(root: str | os.PathLike) -> Source:
    """Class subfolders become labels (sorted names -> 0..C-1, like ImageFolder); a flat folder is unlabeled (-1)."""
    root = os.fspath(root)
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))
    walk = ImageWalk(root)
    if subdirs:
        walk.reserve(root)  # a link back to the root must not list its other folders (or files) under one class
        found = [walk.add(os.path.join(root, name)) for name in subdirs]
        walk.finish()
        items = [(p, label) for label, listing in enumerate(found) for p in walk.paths(listing)]
        class_names: list[str] | None = subdirs
    else:
        listing = walk.add(root, recursive=False)
        walk.finish()
        items = [(p, -1) for p in walk.paths(listing)]
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
        if os.path.exists(path):  # a FIFO, a device, a socket: never opened
            raise ValueError(f"source {path!r} is neither a folder nor a regular file (an image folder or a CSV/TXT "
                             f"file list)")  # fmt: skip
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


def _maybe_downscale(
    data: bytes, max_image_side: int | None, jpeg_quality: int, name: str | None = None
) -> tuple[bytes, str, int, int, bool]:
    """Probe the image (header only) and re-encode it when it is too large or in an unusual format.

    Returns (bytes, extension, width, height, reencoded)."""
    try:
        probe = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ValueError(f"not an image PIL can read ({len(data)} bytes)") from exc
    fmt, (w, h) = probe.format, probe.size
    too_big = max_image_side is not None and max(w, h) > max_image_side
    if fmt in FORMAT_EXT and not too_big:
        # stored as it is, but refused (from the header) when decoding it would take more memory than the cap: a
        # shard should not hold an image that every reader under the same caps skips
        check_decode_size(probe, len(data), name)
        probe.close()
        return data, FORMAT_EXT[fmt], w, h, False
    # The one decoder: refuses an image over the decoded-memory cap before decoding it, keeps the orientation once
    # EXIF is dropped, scales 16-bit images in bounded memory
    img = finish_decode(probe, len(data), name)
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
        data = read_image_file(path)  # regular files only, capped: a FIFO or /dev/zero named .jpg is refused
        data, ext, w, h, reencoded = _maybe_downscale(data, max_image_side, jpeg_quality, path)
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
