"""Images in, 8-bit RGB out, and the evaluation resize + center crop: one module for extraction, shards and evaluation.

* ``decode_image(bytes)`` and ``load_image(any input)`` decode once, apply the EXIF orientation and convert any mode
  to 8-bit RGB (16-bit images are scaled, not clipped; palettes with transparency go through RGBA).
* A JPEG can be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain when the output needs fewer pixels
  (``draft_jpeg``, PIL's draft mode): much faster, pixel values slightly different from a full decode.
* ``Preprocess`` (uint8 HWC arrays, for extraction) and ``eval_transform`` (normalized float tensors) share one
  geometry, ``resize_crop``: the shorter side to ``resize``, then the centered square; or a warp to the square. Where
  the centered square starts is each library's own arithmetic (``CONVENTIONS``, ``crop_start``): torchvision's and
  timm's ``CenterCrop`` round half the margin to even, HF's image processors floor it.
* ``IMAGENET_MEAN`` / ``IMAGENET_STD``: every SEER checkpoint was trained with them. ``INTERPOLATIONS``: the names
  every option that takes an interpolation accepts.
* Files from strangers: ``read_image_file`` reads regular files only (a FIFO or a ``/dev/zero`` link named ``.jpg``
  is refused without being read) and at most ``max_file_bytes``; ``finish_decode`` refuses, from the header and
  before any pixel is decoded, an image whose decoding would take more than ``max_image_bytes``
  (``seer.data.limits``).
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from seer.data.limits import read_limits

__all__ = [
    "CONVENTIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "ImageDecodeError",
    "ImageFileError",
    "ImageTooLargeError",
    "Preprocess",
    "check_decode_size",
    "check_image_array",
    "check_image_tensor",
    "crop_start",
    "decode_image",
    "draft_jpeg",
    "eval_transform",
    "finish_decode",
    "load_image",
    "open_image",
    "read_image_file",
    "resize_crop",
    "resized_size",
    "swaps_axes",
    "to_rgb",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Whose resize + center-crop arithmetic a checkpoint was evaluated with (``Preprocess.convention``):
#   "torchvision": ``Resize(s)`` + ``CenterCrop(r)``: the long side int(s * long / short), the crop starts at
#                  int(round(margin / 2)) (Python rounds half to even: a margin of 75 starts at 38, of 77 at 38);
#   "timm":        timm's eval transform for crop_mode="center", which *is* torchvision's Resize + CenterCrop with
#                  s = floor(r / crop_pct): the same arithmetic, named for where a checkpoint came from;
#   "hf":          HF's RegNet / ConvNext image processor: s = int(r / crop_pct), the long side as torchvision, the
#                  crop starts at margin // 2 (its PIL backend; int(margin / 2) in its torchvision one): 37 for 75.
# So they differ only where half the margin rounds up to even (margin % 4 == 3); s is floor(r / crop_pct) in all.
CONVENTIONS = ("torchvision", "timm", "hf")

_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can decode (unknown format, truncated, corrupt)."""


class ImageTooLargeError(ImageDecodeError):
    """Decoding the image would take more memory than ``max_image_bytes`` (checked from its header)."""


class ImageFileError(OSError):
    """A path seer refuses to read as an image: not a regular file, or larger than ``max_file_bytes``."""


_MiB = 1 << 20
_FILE_TYPES = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def _mib(n: int) -> str:
    return f"{n / _MiB:.6g} MiB" if n >= _MiB else f"{n} bytes"


def _refuse_special(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _FILE_TYPES.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise ImageFileError(f"{path}: {kind}, not a regular file; seer reads only regular files")


def open_regular_file(path: str | os.PathLike) -> IO[bytes]:
    """Open a local file for reading: the one opener of every file seer reads from a user's folder or shard.

    Anything but a regular file (symlinks to one are fine) is refused from its ``stat``, before it is opened: a FIFO
    would block forever, a device such as ``/dev/zero`` never ends. It is opened non-blocking (a FIFO swapped in
    meanwhile cannot block the open) and checked again with ``fstat``.

    Raises:
        FileNotFoundError / OSError: the path cannot be opened. ImageFileError (an OSError): not a regular file.
    """
    name = os.fspath(path)
    _refuse_special(name, os.stat(name))
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _refuse_special(name, os.fstat(fd))
        os.set_blocking(fd, True)
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file: regular files only (symlinks followed), at most ``read_limits().max_file_bytes``.

    A FIFO, a device (a ``/dev/zero`` link named ``.jpg``) or a socket is refused from its ``stat``, before it is
    opened; it is opened non-blocking and checked again with ``fstat`` (it may have been swapped meanwhile), so
    reading never blocks. At most ``max_file_bytes + 1`` bytes are read, whatever the file claims its size is.

    Raises:
        FileNotFoundError / OSError: the path cannot be read. ImageFileError (an OSError): not a regular file, or
        larger than the cap (the message names the file, the cap and ``SEER_MAX_FILE_MB``).
    """
    name = os.fspath(path)
    cap = read_limits().max_file_bytes
    with open_regular_file(name) as f:
        st = os.fstat(f.fileno())

        def too_large(size: str) -> ImageFileError:
            return ImageFileError(
                f"{name}: {size} is over the {_mib(cap)} cap on one image file; raise it with the environment "
                f"variable SEER_MAX_FILE_MB or seer.data.limits.limits(max_file_bytes=...)"
            )

        if st.st_size > cap:
            raise too_large(f"{st.st_size} bytes")
        chunks, total, want = [], 0, st.st_size + 1  # one read for a file that is what it claims to be
        while total <= cap:
            chunk = f.read(min(want, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            want = _MiB  # it grew, or its size lies (/proc): go on in steps
        if total > cap:
            raise too_large(f"more than {cap} bytes")
    return b"".join(chunks)


# PIL's storage per pixel: 1 byte for 1 / L / P, 2 for the 16-bit modes, 4 for every other mode (RGB included).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def check_decode_size(img: Image.Image, nbytes: int | None = None, name: str | None = None) -> None:
    """Refuse an opened, not yet decoded image whose decoding would take more than ``max_image_bytes``.

    The cost is estimated from the header (size and mode, after any JPEG draft): the decoded pixels, one
    intermediate of at most 4 bytes per pixel (an EXIF rotation, RGBA for a transparent palette) and the RGB result
    (PIL stores RGB in 4 bytes per pixel). At the default 1 GiB that is PIL's own pixel limit for an RGB image.

    Raises:
        ImageTooLargeError: over the cap (the message names the image, the cap and ``SEER_MAX_IMAGE_MB``).
    """
    cap = read_limits().max_image_bytes
    width, height = img.size
    need = width * height * (_PIXEL_BYTES.get(img.mode, 4) + 8)
    if need > cap:
        what = name or (f"image ({nbytes} bytes)" if nbytes is not None else "image")
        raise ImageTooLargeError(
            f"{what}: a {width}x{height} {img.mode} image takes about {_mib(need)} to decode, over the "
            f"{_mib(cap)} cap on one decoded image; raise it with the environment variable SEER_MAX_IMAGE_MB or "
            f"seer.data.limits.limits(max_image_bytes=...)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------
def open_image(data: bytes) -> Image.Image:
    """Identify encoded image bytes: the header is read, the pixels are not (``finish_decode`` reads them).

    Raises:
        TypeError: ``data`` is not bytes.
        ImageDecodeError: not an image format PIL knows (or a decompression bomb).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected image bytes, got {type(data).__name__}")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError from plugins, DecompressionBombError
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def swaps_axes(img: Image.Image) -> bool:
    """Whether the EXIF orientation (5..8) transposes the image."""
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        return False


def draft_jpeg(img: Image.Image, size: int | tuple[int, int]) -> None:
    """Let an opened, not yet decoded JPEG decode at 1/2, 1/4 or 1/8 scale (DCT scaling); other formats: no-op.

    Args:
        img: from ``open_image``.
        size: the decoded image keeps its shorter side >= ``size`` (an int), or its (width, height) >= ``size`` (a
            tuple), both in displayed orientation.

    A scaled image may end in a partial row / column of padding: its exact extent (displayed orientation) is kept
    in ``img.info["seer_extent"]``, so that ``resize_crop`` takes the same crop as on a full decode.
    """
    if img.format != "JPEG":
        return
    swap = swaps_axes(img)
    if isinstance(size, int):
        want = (size, size)
    else:
        want = (int(size[1]), int(size[0])) if swap else (int(size[0]), int(size[1]))
    result = img.draft("RGB", want)
    if result is not None and img.size != (result[1][2], result[1][3]):
        extent = (float(result[1][2]), float(result[1][3]))
        img.info["seer_extent"] = extent[::-1] if swap else extent


def finish_decode(img: Image.Image, nbytes: int, name: str | None = None) -> Image.Image:
    """Decode an opened image: pixels read, EXIF orientation applied (in place), 8-bit RGB.

    Raises:
        ImageTooLargeError: decoding would take more than ``max_image_bytes`` (checked before it starts).
        ImageDecodeError: truncated or corrupt pixel data (``nbytes`` and ``name`` are for the message).
    """
    check_decode_size(img, nbytes, name)
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt data
        raise ImageDecodeError(f"cannot decode image ({nbytes} bytes): {exc}") from exc
    return to_rgb(_upright(img, in_place=True))


def decode_image(
    data: bytes, draft_size: int | tuple[int, int] | None = None, *, name: str | None = None
) -> Image.Image:
    """Decode image bytes to an RGB PIL image, EXIF orientation applied.

    Args:
        data: encoded image (JPEG, PNG, WebP, ...).
        draft_size: when given, a JPEG may be decoded at reduced size (see ``draft_jpeg``: the shorter side stays
            >= an int, or (width, height) >= a tuple). Pixel values differ slightly from a full decode + resize.
        name: the file the bytes came from, for error messages.

    Raises:
        TypeError: ``data`` is not bytes.
        ImageDecodeError: the bytes are not a decodable image (ImageTooLargeError: over ``max_image_bytes``).
    """
    img = open_image(data)
    if draft_size:
        draft_jpeg(img, draft_size)
    return finish_decode(img, len(data), name)


def _upright(img: Image.Image, *, in_place: bool) -> Image.Image:
    """The EXIF orientation applied (the image itself is changed only with ``in_place``)."""
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return img
        if in_place:
            ImageOps.exif_transpose(img, in_place=True)
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit images are scaled (not clipped), palettes and alpha resolved."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        return _gray8(img, _scale16).convert("RGB")
    if mode == "F":
        return _gray8(img, lambda a: np.clip(np.rint(a.astype(np.float32, copy=False)), 0, 255)).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette with transparency: resolve through RGBA, as PIL recommends
    return img.convert("RGB")


def _scale16(a: np.ndarray) -> np.ndarray:
    """16-bit values (clipped to 0..65535) -> 0..255, rounded: 65535 -> 255, like a 16-bit -> 8-bit export. uint32
    holds 65535 * 255 + 32767 exactly, so the result equals the int64 arithmetic at half its memory."""
    a = np.clip(a, 0, 65535) if a.dtype.kind == "i" else a
    return (a.astype(np.uint32) * 255 + 32767) // 65535


def _gray8(img: Image.Image, fn: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """A one-band image -> mode L through ``fn`` (values -> 0..255), a few MiB of rows at a time: the whole image
    never exists as a wide numpy array (a small 16-bit PNG took GiBs as int64)."""
    width, height = img.size
    out = np.empty((height, width), np.uint8)
    rows = max(1, (4 * _MiB) // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = fn(np.asarray(img.crop((0, top, width, bottom))))
    return Image.fromarray(out, "L")


def load_image(item: Any, draft: int | tuple[int, int] | None = None) -> Image.Image:
    """An image in any accepted form -> RGB PIL image (EXIF orientation applied).

    Args:
        item: a path, encoded bytes, a PIL image (left unchanged), a numpy array (HW or HWC, uint8 or uint16) or a
            tensor (CHW, uint8 or float in [0, 1]).
        draft: JPEG files and bytes may be decoded at reduced size (see ``decode_image``).

    Raises:
        FileNotFoundError / OSError: an unreadable path; ImageFileError (an OSError): not a regular file or over
        ``max_file_bytes``. ImageDecodeError: undecodable bytes; ImageTooLargeError: over ``max_image_bytes``.
        TypeError / ValueError: arrays and tensors of the wrong type, shape or range.
    """
    if isinstance(item, (str, os.PathLike)):
        # one read (PIL's own file reads go 4 KB at a time), of a regular file, capped
        return decode_image(read_image_file(item), draft, name=os.fspath(item))
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image(item, draft)
    if isinstance(item, Image.Image):
        return to_rgb(_upright(item, in_place=False))
    if isinstance(item, np.ndarray):
        return to_rgb(_array_to_pil(item))
    if isinstance(item, torch.Tensor):
        return to_rgb(_array_to_pil(_tensor_to_hwc(item)))
    raise TypeError(
        f"cannot read a {type(item).__name__} as an image: pass PIL images, file paths, bytes, numpy HWC uint8 "
        f"arrays or CHW tensors"
    )


def check_image_array(arr: np.ndarray, what: str = "array") -> None:
    """Raise ValueError / TypeError unless ``arr`` is an HW or HWC (1, 3 or 4 channels) uint8 / uint16 image."""
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image {what}s must be HW or HWC with 1, 3 or 4 channels, got shape {tuple(arr.shape)}")
    if arr.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"image {what}s must be uint8 (or uint16), got {arr.dtype}")
    if min(arr.shape[:2]) < 1:
        raise ValueError(f"empty image {what} of shape {tuple(arr.shape)}")


def check_image_tensor(t: torch.Tensor) -> None:
    """Raise ValueError / TypeError unless ``t`` is a CHW (1, 3 or 4 channels) uint8 or floating-point image."""
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"image tensors must be CHW (or NCHW) with 1, 3 or 4 channels, got shape {tuple(t.shape)}")
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise TypeError(f"image tensors must be uint8 or floating point in [0, 1], got {t.dtype}")
    if min(t.shape[1:]) < 1:
        raise ValueError(f"empty image tensor of shape {tuple(t.shape)}")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    check_image_array(arr)
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    mode = {2: "L"}.get(arr.ndim) or {3: "RGB", 4: "RGBA"}[arr.shape[2]]
    return Image.fromarray(np.ascontiguousarray(arr), mode)


def _tensor_to_hwc(t: torch.Tensor) -> np.ndarray:
    check_image_tensor(t)
    t = t.detach().cpu()
    if t.is_floating_point():
        lo, hi = float(t.min()), float(t.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # written so that NaN fails too (it would decode as black)
            raise ValueError(
                f"float image tensors must hold values in [0, 1] (got [{lo:.3g}, {hi:.3g}]); for tensors that are "
                f"already resized and normalized, pass preprocess=False"
            )
        t = (t.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
    return t.permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation geometry: resize + center crop, or warp
# ----------------------------------------------------------------------------------------------------------------
# A downscale by 2 * _REDUCING_GAP or more first reduces the image by an integer factor (PIL's ``reducing_gap``):
# the fast path's box pre-reduction. Smaller downscales, upscales and fully decoded images resize exactly.
_REDUCING_GAP = 3.0


def resized_size(width: float, height: float, resize: int) -> tuple[int, int]:
    """(width, height) once the shorter side is ``resize``: the longer one is ``int(resize * long / short)``,
    torchvision's ``Resize`` rule, which timm (through torchvision) and HF (``get_resize_output_image_size``) share."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_start(size: int, crop: int, convention: str = "torchvision") -> int:
    """The first row (or column) of a ``crop`` centered in ``size`` pixels, by ``convention``'s arithmetic.

    torchvision's ``CenterCrop`` (timm's too) starts at ``int(round(margin / 2))``, half the margin rounded to even;
    HF's image processors at ``margin // 2``. They differ by one pixel when the margin is odd and its half rounds up.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    margin = size - crop
    return margin // 2 if convention == "hf" else int(round(margin / 2.0))


def resize_crop(img: Image.Image, resolution: int, resize: int, interpolation: str = "bicubic", *,
                warp: bool = False, exact: bool = False, convention: str = "torchvision") -> Image.Image:  # fmt: skip
    """Resize the shorter side to ``resize`` and take the centered ``resolution`` square, by ``convention``'s
    arithmetic (``resized_size``, ``crop_start``); with ``warp``, squash the image to ``resolution x resolution``.

    The pixels are the reference library's (one PIL resize of the whole image, then the crop: torchvision's
    ``Resize`` + ``CenterCrop`` on a PIL image, timm's eval transform, HF's PIL image processor) bit for bit, except
    where the default takes one of two shortcuts, which move values by a few gray levels (docs/features.md):

    * an image draft-decoded at 1/2 .. 1/8 scale (``draft_jpeg``) is resized from its exact extent;
    * a downscale by 6x or more first reduces the image by an integer factor (``reducing_gap=3``).

    A shortcut resizes only the source box the crop keeps, in one PIL call. ``exact=True`` takes neither (a drafted
    image is still resized from its extent: pass fully decoded images for the reference pixels).
    """
    r = resolution
    resample = INTERPOLATIONS[interpolation]
    extent = img.info.get("seer_extent")
    w, h = extent or img.size
    new_w, new_h = (r, r) if warp else resized_size(w, h, resize)
    left, top = (0, 0) if warp else (crop_start(new_w, r, convention), crop_start(new_h, r, convention))
    sx, sy = w / new_w, h / new_h
    if exact or (extent is None and max(sx, sy) < 2 * _REDUCING_GAP):
        # Pillow may run a boxed resize's two passes in the other order (vertical first), through another uint8
        # intermediate (measured: up to 18 levels on noise, 4 on photos): the whole resize, then the crop, is what
        # the libraries compute.
        whole = img.resize((new_w, new_h), resample, box=(0.0, 0.0, float(w), float(h)) if extent else None)
        return whole if warp else whole.crop((left, top, left + r, top + r))
    box = (left * sx, top * sy, (left + r) * sx, (top + r) * sy)
    return img.resize((r, r), resample, box=box, reducing_gap=_REDUCING_GAP)


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing for extraction: RGB PIL image -> uint8 array ``[resolution, resolution, 3]``.

    Resize (short side to ``floor(resolution / crop_pct)``) + center crop, or warp to a square.
    ``resize_mode="shorter"`` is timm's, torchvision's and HF's (below 384 px) eval transform; ``"warp"`` is HF's
    ConvNext processor at 384 px and above (the image is squashed to ``resolution x resolution``, nothing is
    cropped). ``convention`` ("torchvision", "timm" or "hf": ``CONVENTIONS``) is whose arithmetic places the crop;
    checkpoints bring their own. ``exact=True`` decodes JPEGs in full and never pre-reduces, so that every image gets
    the reference library's pixels; by default large images take ``resize_crop``'s shortcuts. Normalization with
    ``mean`` / ``std`` happens on the device, batched.
    """

    resolution: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    resize_mode: str = "shorter"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    convention: str = "torchvision"
    exact: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise ValueError(f"Preprocess.resolution must be an integer >= 8, got {self.resolution!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"Preprocess.crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Preprocess.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.resize_mode not in ("shorter", "warp"):
            raise ValueError(f"Preprocess.resize_mode must be 'shorter' or 'warp', got {self.resize_mode!r}")
        if not isinstance(self.convention, str) or self.convention not in CONVENTIONS:
            raise ValueError(f"Preprocess.convention must be one of {list(CONVENTIONS)}, got {self.convention!r}")
        if not isinstance(self.exact, bool):
            raise ValueError(f"Preprocess.exact must be True or False, got {self.exact!r}")

    @classmethod
    def for_model(cls, model: torch.nn.Module, **overrides: Any) -> Preprocess:
        """The checkpoint's convention (``model.pretrained_cfg``) with ``overrides`` (None values ignored).

        ``exact`` is the caller's choice (speed against the reference pixels), never a checkpoint's.
        """
        base = dict(getattr(model, "pretrained_cfg", None) or {})
        fields = set(cls.__dataclass_fields__) - {"exact"}
        kwargs = {k: v for k, v in base.items() if k in fields}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        if "resolution" in kwargs:
            kwargs["resolution"] = int(kwargs["resolution"])
        return cls(**kwargs)

    @property
    def resize_size(self) -> int:
        """Short side before the center crop: ``floor(resolution / crop_pct)`` (timm's ``math.floor``, HF's ``int``:
        the same for positive numbers)."""
        return int(math.floor(self.resolution / self.crop_pct))

    def draft_size(self) -> int | None:
        """Smallest side the decoder must deliver for this transform (None with ``exact``: decode in full)."""
        if self.exact:
            return None
        return self.resolution if self.resize_mode == "warp" else self.resize_size

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array [resolution, resolution, 3]."""
        out = resize_crop(img, self.resolution, self.resize_size, self.interpolation,
                          warp=self.resize_mode == "warp", exact=self.exact, convention=self.convention)  # fmt: skip
        return np.asarray(out, dtype=np.uint8)


def eval_transform(
    resolution: int = 224,
    resize: int | None = None,
    interpolation: str = "bicubic",
    crop_pct: float | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    draft: bool = False,
    convention: str = "torchvision",
) -> Callable[[Image.Image | bytes], torch.Tensor]:
    """Resize the shorter side, center crop ``resolution``, normalize: ``(PIL | bytes) -> [3, r, r]`` float32.

    The shorter side becomes ``resize`` if given, else ``floor(resolution / crop_pct)`` (timm's rule;
    ``crop_pct`` defaults to 0.875, i.e. 256 for 224; timm's SEER models use 0.965). The result equals
    torchvision's ``Resize`` + ``CenterCrop`` + ``Normalize`` (``convention="hf"``: HF's crop, see ``crop_start``).
    ``draft=True`` decodes JPEG bytes at reduced size when that keeps the shorter side >= the resize target and takes
    ``resize_crop``'s shortcuts (faster, slightly different pixels).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} not in {sorted(INTERPOLATIONS)}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    if resize is None:
        pct = 0.875 if crop_pct is None else float(crop_pct)
        if not 0 < pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        resize = int(math.floor(resolution / pct))
    if resize < resolution:
        raise ValueError(f"resize {resize} is smaller than the crop {resolution}")
    scale = torch.tensor([1.0 / (255.0 * v) for v in std]).view(3, 1, 1)
    shift = torch.tensor([-m / v for m, v in zip(mean, std)]).view(3, 1, 1)

    def transform(img: Image.Image | bytes) -> torch.Tensor:
        img = to_rgb(img) if isinstance(img, Image.Image) else decode_image(img, draft_size=resize if draft else None)
        img = resize_crop(img, resolution, resize, interpolation, exact=not draft, convention=convention)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        return x.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).add_(shift)

    return transform
