"""Image transforms: SwAV / SEER multi-crop for pretraining (decoding and ``eval_transform`` are ``seer.data.images``).

``MultiCrop`` draws the same augmentations as SwAV's torchvision pipeline (``MultiCrop.torchvision_reference()``
builds that pipeline with the same parameters) -- RandomResizedCrop, horizontal flip, ColorJitter(0.8, 0.8, 0.8, 0.2)
with p 0.8, grayscale p 0.2, PIL Gaussian blur radius U(0.1, 2) with p 0.5, ImageNet normalization -- but computes
them with fewer passes over the pixels:

* bytes are decoded once; when every sampled crop box is at least twice its output size, the JPEG is decoded at
  reduced size (PIL draft mode: DCT scaling) -- pixel values then differ slightly from full decoding + resize;
* each crop is one antialiased bilinear resize of the box straight to the output size (torch's uint8 kernel, the
  Pillow algorithm; values within +-1 of PIL's ``crop().resize()`` on average);
* the whole color jitter (the four operations in their random order, each clamped like torchvision's float ops)
  plus the optional grayscale is one 3D lookup table applied by PIL (``Color3DLUT``, trilinear interpolation of a
  17^3 grid) on large crops, or computed exactly on the pixels of small crops (<= 100x100). The lookup table
  interpolates HSV hue rotation, whose kinks it rounds off: mean error 0.3-1 gray level, rare pixels up to ~25
  (SwAV's PIL pipeline, uint8 after every step, is ~1.5 levels off the float ops on average); contrast takes its
  mean gray value from a 32x32 subsample of the crop;
* only the crops drawn for blur are blurred (the same PIL ``GaussianBlur``);
* flip, uint8 -> float and normalization are fused at the end.

Two speed-ups for small images (the tiny_cpu recipe's 32 px crops), neither changing the random stream:

* ``decode_cache`` (``DecodeCache``): a decode-once cache of small images (decoded size at most
  ``DECODE_CACHE_MAX_ITEM``), keyed by their encoded bytes, capped in bytes per process (``SEER_DECODE_CACHE_MB``,
  default 256; first come, no eviction: a folder past the cap decodes the rest every time). Only images no draft
  decode could apply to are cached, so a hit gives the same pixels as decoding again.
* ``batch_color=True``: crops whose colour operations are computed exactly (small, unblurred) come out as
  ``PendingCrop`` (uint8 pixels + the drawn operations); ``collate_multicrop`` applies the operations, flip and
  normalization to the whole batch in torch (the same float operations, equal to the per-crop numpy path within
  float rounding).

Random numbers come from Python's ``random`` module (reseeded per DataLoader worker by PyTorch); pass
``rng=random.Random(seed)`` for reproducible crops.
"""

from __future__ import annotations

import io
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from seer.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError, decode_image, eval_transform
from seer.data.images import check_decode_size as _check_decode_size
from seer.data.images import finish_decode as _finish
from seer.data.images import open_image as _open
from seer.data.images import swaps_axes as _swaps_axes

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "SWAV_SCALES",
    "ImageDecodeError",
    "DecodeCache",
    "MultiCrop",
    "PendingCrop",
    "collate_multicrop",
    "decode_cache_bytes",
    "decode_image",
    "eval_transform",
    "normalize_uint8",
    "preset_crops",
    "swav_scales",
]

# SwAV's RandomResizedCrop area ranges: the first (large) resolution, then every other one.
SWAV_SCALES = ((0.14, 1.0), (0.05, 0.14))

# The multi-crop presets, the one table of them: ``MultiCrop.from_preset`` builds one, a config names one
# (``data.multicrop``), and the synthetic source and ``seer plan`` read its runs (``preset_crops``) and scales.
# name -> MultiCrop arguments (counts, sizes, scales, ...); large crops first.
PRESETS: dict[str, dict] = {
    "swav": {"counts": (2, 6), "sizes": (224, 96), "scales": SWAV_SCALES},
    "seer": {"counts": (2, 4), "sizes": (224, 96), "scales": SWAV_SCALES},
    "seer_10b": {"counts": (2, 4), "sizes": (160, 96), "scales": SWAV_SCALES},
    "cpu_tiny": {"counts": (2, 2), "sizes": (64, 32), "scales": SWAV_SCALES},
    # `seer demo` on 32 px synthetic images: crops wide enough to hold the shape that defines the class, and no
    # blur (a radius of 0.1-2 px wipes out 16 px crops).
    "demo": {"counts": (2, 2), "sizes": (32, 16), "scales": ((0.3, 1.0), (0.15, 0.4)), "blur_p": 0.0},
    # The small-image CPU recipe (tiny_cpu, `seer demo`) on 32 px real images: two global crops only (16 px local
    # crops of a 32 px object cost 15 kNN points), half SwAV's brightness and contrast jitter (the trunk standardizes
    # each image, model.cfg.image_norm), SwAV's saturation 0.8 and the widest hue jitter, 0.5 (SwAV: 0.2; +10 kNN
    # points on digits over photos, +3 on glyphs, +1 on digits: a photo background's colours stop identifying the
    # image), no blur, no flip (a mirrored digit or letter is another shape: +15 kNN points on digits). Measured in
    # docs/swav.md; small_flip keeps SwAV's flip for subjects with a mirror symmetry.
    "small": {"counts": (2,), "sizes": (32,), "scales": ((0.35, 1.0),), "blur_p": 0.0, "jitter": (0.4, 0.4, 0.8, 0.5),
              "flip_p": 0.0},
    "small_flip": {"counts": (2,), "sizes": (32,), "scales": ((0.35, 1.0),), "blur_p": 0.0,
                   "jitter": (0.4, 0.4, 0.8, 0.5)},
    # Fine-tuning (configs/finetune): VISSL's fulltune transforms, one RandomResizedCrop and a flip, no color jitter
    # or blur; 384 px is SEER's fine-tuning resolution. finetune_small: the tiny_cpu images (32 px), no flip.
    "finetune_224": {"counts": (1,), "sizes": (224,), "scales": ((0.08, 1.0),), "blur_p": 0.0, "jitter_p": 0.0,
                     "gray_p": 0.0},
    "finetune_384": {"counts": (1,), "sizes": (384,), "scales": ((0.08, 1.0),), "blur_p": 0.0, "jitter_p": 0.0,
                     "gray_p": 0.0},
    "finetune_small": {"counts": (1,), "sizes": (32,), "scales": ((0.35, 1.0),), "blur_p": 0.0, "jitter_p": 0.0,
                       "gray_p": 0.0, "flip_p": 0.0},
}  # fmt: skip


def preset_crops(name: str) -> list[tuple[int, int]]:
    """A multi-crop preset's ``[(count, resolution), ...]`` runs, large crops first."""
    if name not in PRESETS:
        raise ValueError(f"unknown multi-crop preset {name!r}; choose from {sorted(PRESETS)}")
    return [(int(c), int(s)) for c, s in zip(PRESETS[name]["counts"], PRESETS[name]["sizes"])]


def swav_scales(n_groups: int) -> tuple[tuple[float, float], ...]:
    """SwAV's area ranges for ``n_groups`` crop groups (explicit crops, no preset): large first, then small."""
    return tuple(SWAV_SCALES[min(i, 1)] for i in range(n_groups))


_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


# ----------------------------------------------------------------------------------------------------------------
# Color operations on planar float pixels [3, N] in 0..255 (torchvision's float semantics, one clamp per op)
# ----------------------------------------------------------------------------------------------------------------
def _gray(x: np.ndarray) -> np.ndarray:
    return x[0] * _GRAY[0] + x[1] * _GRAY[1] + x[2] * _GRAY[2]


def _hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the HSV hue by ``shift`` turns, keeping value (max) and saturation; the same map as torchvision's.

    Branch-free: the sector of the max channel is selected with 0/1 weights (masked numpy ops are much slower).
    """
    r, g, b = x
    vmax = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    chroma = vmax - vmin
    inv = 1.0 / np.maximum(chroma, 1e-12)  # gray pixels: chroma 0, the output is vmin whatever the hue
    wr = (r == vmax).astype(np.float32)  # red is the max (wins ties, as in torchvision)
    wg = (g == vmax).astype(np.float32)
    wg -= wg * wr
    wb = 1.0 - wr - wg
    h = ((g - b) * wr + (b - r) * wg + (r - g) * wb) * inv  # hue in sextants: [-1, 1] + 2 (green) or 4 (blue)
    h += 2.0 * wg + 4.0 * wb + 6.0 * shift
    h -= 6.0 * np.floor(h * (1.0 / 6.0))  # mod 6 (np.mod is ~100x slower on float32)
    out = np.empty_like(x)
    np.clip(np.abs(h - 3.0) - 1.0, 0.0, 1.0, out=out[0])
    np.clip(2.0 - np.abs(h - 2.0), 0.0, 1.0, out=out[1])
    np.clip(2.0 - np.abs(h - 4.0), 0.0, 1.0, out=out[2])
    out *= chroma
    out += vmin
    return out


def _apply_color_ops(x: np.ndarray, ops: Sequence[tuple[str, float]], stats_from: int) -> np.ndarray:
    """Apply ``ops`` ((name, factor) in order) to planar float pixels ``x`` [3, N] in 0..255.

    Contrast blends with the mean gray value of columns ``stats_from:`` (the crop's pixels or a subsample of them).
    """
    for name, f in ops:
        if name == "brightness":
            x = np.minimum(x * f, 255.0)
        elif name == "contrast":
            mean = float(_gray(x[:, stats_from:]).mean())
            x = np.clip(x * f + (1.0 - f) * mean, 0.0, 255.0)
        elif name == "saturation":
            x = np.clip(x * f + (1.0 - f) * _gray(x), 0.0, 255.0)
        elif name == "hue":
            x = _hue(x, f)
        elif name == "gray":
            x = np.broadcast_to(_gray(x), x.shape).copy()
        else:  # pragma: no cover - internal names only
            raise ValueError(name)
    return x


_GRIDS: dict[int, np.ndarray] = {}


def _lut_grid(size: int) -> np.ndarray:
    """Planar [3, size^3] lattice in 0..255, red fastest (PIL's Color3DLUT table order)."""
    if size not in _GRIDS:
        v = np.linspace(0.0, 255.0, size, dtype=np.float32)
        b, g, r = np.meshgrid(v, v, v, indexing="ij")
        _GRIDS[size] = np.stack([r.ravel(), g.ravel(), b.ravel()])
    return _GRIDS[size]


def _color_lut(ops: Sequence[tuple[str, float]], crop: np.ndarray, size: int) -> ImageFilter.Color3DLUT:
    """The 3D lookup table of ``ops``; contrast statistics come from a ~32x32 subsample of ``crop`` (HWC uint8)."""
    grid = _lut_grid(size)
    step = max(1, min(crop.shape[:2]) // 32)
    sample = crop[::step, ::step].reshape(-1, 3).T.astype(np.float32)
    out = _apply_color_ops(np.concatenate([grid, sample], axis=1), ops, grid.shape[1])[:, : grid.shape[1]]
    return ImageFilter.Color3DLUT(size, np.ascontiguousarray(out.T, dtype=np.float32).ravel() / 255.0)


# ----------------------------------------------------------------------------------------------------------------
# The same colour operations on a batch: float [n, 3, h, w] in 0..255, one factor per image (``batch_color``)
# ----------------------------------------------------------------------------------------------------------------
def _gray_t(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0:1] * _GRAY[0] + x[:, 1:2] * _GRAY[1] + x[:, 2:3] * _GRAY[2]


def _hue_t(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``_hue`` on ``[n, 3, h, w]`` with ``shift`` ``[n, 1, 1, 1]`` (the same branch-free arithmetic)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    vmax = torch.maximum(torch.maximum(r, g), b)
    vmin = torch.minimum(torch.minimum(r, g), b)
    chroma = vmax - vmin
    inv = 1.0 / chroma.clamp_min(1e-12)
    wr = (r == vmax).float()
    wg = (g == vmax).float()
    wg = wg - wg * wr
    wb = 1.0 - wr - wg
    h = ((g - b) * wr + (b - r) * wg + (r - g) * wb) * inv
    h = h + 2.0 * wg + 4.0 * wb + 6.0 * shift
    h = h - 6.0 * torch.floor(h * (1.0 / 6.0))
    out = torch.cat([((h - 3.0).abs() - 1.0).clamp(0.0, 1.0), (2.0 - (h - 2.0).abs()).clamp(0.0, 1.0),
                     (2.0 - (h - 4.0).abs()).clamp(0.0, 1.0)], dim=1)  # fmt: skip
    return out * chroma + vmin


def _color_op_t(x: torch.Tensor, name: str, f: torch.Tensor, f64: list[float]) -> torch.Tensor:
    """One colour operation of ``_apply_color_ops`` on ``[n, 3, h, w]``; ``f`` the factors ``[n, 1, 1, 1]`` float32,
    ``f64`` the same factors as Python floats (contrast's blend term is computed in double, as numpy's path does)."""
    if name == "brightness":
        return torch.clamp_max(x * f, 255.0)
    if name == "contrast":
        means = _gray_t(x).mean(dim=(1, 2, 3)).tolist()
        blend = torch.tensor([(1.0 - v) * m for v, m in zip(f64, means)], dtype=torch.float32).view(-1, 1, 1, 1)
        return (x * f + blend).clamp(0.0, 255.0)
    if name == "saturation":
        rest = torch.tensor([1.0 - v for v in f64], dtype=torch.float32).view(-1, 1, 1, 1)
        return (x * f + rest * _gray_t(x)).clamp(0.0, 255.0)
    if name == "hue":
        return _hue_t(x, f)
    if name == "gray":
        return _gray_t(x).expand_as(x).contiguous()
    raise ValueError(name)  # pragma: no cover - internal names only


class PendingCrop:
    """A resized crop whose colour operations, flip and normalization are still to apply: ``collate_multicrop``
    finishes a batch of them at once (``MultiCrop(batch_color=True)``). ``finish()`` finishes this one alone."""

    __slots__ = ("pixels", "ops", "flip", "norm")

    def __init__(self, pixels: torch.Tensor, ops: tuple, flip: bool, norm: tuple) -> None:
        self.pixels, self.ops, self.flip, self.norm = pixels, ops, flip, norm  # norm: (mean, std, normalize)

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    def finish(self) -> torch.Tensor:
        return finish_pending([self])[0]


def finish_pending(items: Sequence[PendingCrop]) -> torch.Tensor:
    """``[n, 3, h, w]``: the pending crops of one size, their colour operations applied in each crop's drawn order,
    flipped and normalized (float32) or rounded to uint8, as ``MultiCrop._augment`` finishes one crop."""
    # One thread: a few hundred small element-wise ops, where OpenMP's fork/join per op costs more than it saves, and
    # 10-30x more on a loaded machine (measured: 3.4 ms vs 4-96 ms for 64 images of 2 x 32 px crops on 2 shared cores).
    # A DataLoader worker already runs with one; in the training process the loop calls this between steps.
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        return _finish_pending(items)
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _finish_pending(items: Sequence[PendingCrop]) -> torch.Tensor:
    mean, std, normalize = items[0].norm
    x = torch.stack([it.pixels for it in items]).float()
    depth = max((len(it.ops) for it in items), default=0)
    for pos in range(depth):  # the k-th operation of every crop: crops that drew the same one are done together
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            if pos < len(it.ops):
                groups.setdefault(it.ops[pos][0], []).append(i)
        for name, idx in groups.items():
            f64 = [float(items[i].ops[pos][1]) for i in idx]
            f = torch.tensor(f64, dtype=torch.float32).view(-1, 1, 1, 1)
            if len(idx) == len(items):
                x = _color_op_t(x, name, f, f64)
            else:
                index = torch.tensor(idx)
                x[index] = _color_op_t(x[index], name, f, f64)
    flips = [i for i, it in enumerate(items) if it.flip]
    if flips:
        index = torch.tensor(flips)
        x[index] = x[index].flip(-1)
    if not normalize:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    scale = torch.tensor([1.0 / (255.0 * v) for v in std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / v for m, v in zip(mean, std)]).view(1, 3, 1, 1)
    return x.mul_(scale).add_(shift)


# ----------------------------------------------------------------------------------------------------------------
# Decode-once cache
# ----------------------------------------------------------------------------------------------------------------
DECODE_CACHE_ENV = "SEER_DECODE_CACHE_MB"
DEFAULT_DECODE_CACHE_MB = 256.0
# Only small images are cached: the small-image recipes re-decode the same few thousand images every epoch, while a
# large image's decode is amortized over its larger crops and a large folder would fill any cap at once.
DECODE_CACHE_MAX_ITEM = 64 * 1024


def decode_cache_bytes() -> int:
    """The decode-once cache's cap in bytes per process: ``SEER_DECODE_CACHE_MB`` (0 turns it off), default 256."""
    text = os.environ.get(DECODE_CACHE_ENV)
    if text is None or text.strip() == "":
        return int(DEFAULT_DECODE_CACHE_MB * 2**20)
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"environment variable {DECODE_CACHE_ENV}={text!r} is not a number of MiB") from None
    if not (math.isfinite(mb) and mb >= 0):
        raise ValueError(f"environment variable {DECODE_CACHE_ENV}={text!r} must be a finite number of MiB >= 0")
    return int(mb * 2**20)


class DecodeCache:
    """Decoded images by their encoded bytes: ``(pixels [3, H, W] uint8, width, height)``.

    Bounded by ``max_bytes`` (encoded + decoded bytes of every entry) and ``max_item`` (decoded bytes of one image);
    first come, no eviction, so an epoch over a folder past the cap re-decodes the same images every time rather than
    thrashing. Entries are read-only: crops are resized copies of them. Each DataLoader worker holds its own (the
    cache is emptied when pickled).
    """

    def __init__(self, max_bytes: int, max_item: int = DECODE_CACHE_MAX_ITEM) -> None:
        if max_bytes < 0 or max_item < 0:
            raise ValueError(f"DecodeCache: max_bytes {max_bytes} and max_item {max_item} must be >= 0")
        self.max_bytes, self.max_item = int(max_bytes), int(max_item)
        self.used, self.hits, self.misses = 0, 0, 0
        self._items: dict[bytes, tuple[torch.Tensor, int, int]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, data: bytes) -> tuple[torch.Tensor, int, int] | None:
        entry = self._items.get(bytes(data))
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, data: bytes, pixels: torch.Tensor, width: int, height: int) -> bool:
        """Keep ``pixels`` for ``data`` if it fits under both caps; whether it was kept."""
        size = pixels.numel() * pixels.element_size()
        if size > self.max_item or self.used + size + len(data) > self.max_bytes:
            return False
        self._items[bytes(data)] = (pixels, width, height)
        self.used += size + len(data)
        return True

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes, "max_item": self.max_item}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_bytes"], state["max_item"])


# ----------------------------------------------------------------------------------------------------------------
# Multi-crop
# ----------------------------------------------------------------------------------------------------------------
def _rrc_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng) -> tuple:
    """torchvision's RandomResizedCrop.get_params (same distribution), drawn with ``rng``: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _PILRandomGaussianBlur:
    """SwAV's blur: PIL GaussianBlur with radius U(lo, hi), applied with probability p."""

    def __init__(self, p: float, radius: tuple[float, float]) -> None:
        self.p, self.radius = p, radius

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.radius)))


class MultiCrop:
    """SwAV multi-crop: ``counts[g]`` random resized crops of ``sizes[g]`` pixels for each group g (large first).

    ``MultiCrop.from_preset("seer")(img)`` returns 6 tensors: 2 of ``[3, 224, 224]`` then 4 of ``[3, 96, 96]``,
    float32 normalized with ImageNet statistics (``normalize=False``: uint8 ``[3, h, w]``, to normalize on the device
    with ``normalize_uint8``).

    Args:
        counts, sizes, scales: crops per group, their output side and RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio range.
        flip_p: horizontal flip probability.
        jitter: ColorJitter (brightness, contrast, saturation, hue) strengths; SwAV's (0.8, 0.8, 0.8, 0.2).
        jitter_p: probability of the color jitter (0.8). gray_p: probability of grayscale (0.2).
        blur_p: Gaussian blur probability, one value for every crop or one per group (SwAV: 0.5 on every crop).
        blur_radius: PIL GaussianBlur radius range (0.1, 2.0).
        mean, std: normalization statistics. normalize: return float32 normalized (True) or uint8 (False).
        draft: decode JPEG bytes at reduced size when every crop box allows it (see ``decode_image``).
        lut_size: lattice size of the color lookup table for crops larger than ``exact_color_max`` pixels.
        exact_color_max: crops with at most this many pixels get exact per-pixel color operations.
        rng: a ``random.Random`` (default: the ``random`` module, reseeded in each DataLoader worker).
        decode_cache: the decode-once cache's cap in bytes (``DecodeCache``); None: ``SEER_DECODE_CACHE_MB``
            (default 256 MiB), 0: off.
        batch_color: return ``PendingCrop`` for the crops whose colour operations are exact (small, unblurred):
            ``collate_multicrop`` finishes them a batch at a time. Same random draws and, within float rounding,
            the same pixels; off by default, since a caller of ``MultiCrop`` alone expects tensors.
    """

    def __init__(
        self,
        counts: Sequence[int] = (2, 6),
        sizes: Sequence[int] = (224, 96),
        scales: Sequence[tuple[float, float]] = SWAV_SCALES,
        *,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float | Sequence[float] = 0.5,
        blur_radius: tuple[float, float] = (0.1, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        normalize: bool = True,
        draft: bool = True,
        lut_size: int = 17,
        exact_color_max: int = 100 * 100,
        rng: random.Random | None = None,
        decode_cache: int | None = None,
        batch_color: bool = False,
    ) -> None:
        if not (len(counts) == len(sizes) == len(scales)) or not counts:
            raise ValueError(f"counts {counts}, sizes {sizes} and scales {scales} must have the same non-zero length")
        if any(c < 0 for c in counts) or any(s < 1 for s in sizes) or sum(counts) < 1:
            raise ValueError(f"counts must be >= 0 with at least one crop and sizes >= 1, got {counts}, {sizes}")
        for lo_hi in scales:
            if not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                raise ValueError(f"scale range {tuple(lo_hi)} must satisfy 0 < lo <= hi <= 1")
        blur = [float(blur_p)] * len(counts) if isinstance(blur_p, (int, float)) else [float(p) for p in blur_p]
        if len(blur) != len(counts):
            raise ValueError(f"blur_p has {len(blur)} values for {len(counts)} crop groups")
        self.counts, self.sizes = tuple(int(c) for c in counts), tuple(int(s) for s in sizes)
        self.scales = tuple((float(lo), float(hi)) for lo, hi in scales)
        self.ratio, self.flip_p, self.jitter, self.jitter_p = tuple(ratio), flip_p, tuple(jitter), jitter_p
        self.gray_p, self.blur_p, self.blur_radius = gray_p, tuple(blur), tuple(blur_radius)
        self.mean, self.std, self.normalize, self.draft = tuple(mean), tuple(std), normalize, draft
        self.lut_size, self.exact_color_max = lut_size, exact_color_max
        # None -> the `random` module at call time: a module cannot be pickled into spawn/forkserver DataLoader
        # workers, and each worker's `random` is reseeded by torch anyway.
        self.rng = rng
        # per crop: (size, scale range, blur probability)
        self.plan = [(s, sc, p) for c, s, sc, p in zip(self.counts, self.sizes, self.scales, blur) for _ in range(c)]
        self._scale = torch.tensor([1.0 / (255.0 * v) for v in std]).view(3, 1, 1)
        self._shift = torch.tensor([-m / v for m, v in zip(mean, std)]).view(3, 1, 1)
        cap = decode_cache_bytes() if decode_cache is None else int(decode_cache)
        self.cache = DecodeCache(cap) if cap > 0 else None
        self.batch_color = bool(batch_color)
        self._norm = (self.mean, self.std, self.normalize)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MultiCrop:
        """``"swav"`` (2x224 + 6x96), ``"seer"`` (2x224 + 4x96), ``"seer_10b"`` (2x160 + 4x96), ``"cpu_tiny"``
        (2x64 + 2x32); keyword arguments override any constructor argument."""
        if name not in PRESETS:
            raise ValueError(f"unknown multi-crop preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def n_crops(self) -> int:
        return len(self.plan)

    def __repr__(self) -> str:
        groups = " + ".join(f"{c}x{s}" for c, s in zip(self.counts, self.sizes))
        return f"MultiCrop({groups}, scales={self.scales}, blur_p={self.blur_p}, normalize={self.normalize})"

    # -- the transform --------------------------------------------------------------------------------------------
    def __call__(self, img: Image.Image | bytes) -> list[torch.Tensor | PendingCrop]:
        rng = self.rng if self.rng is not None else random
        if isinstance(img, Image.Image):
            pil = img if img.mode == "RGB" else img.convert("RGB")
            boxes = [_rrc_box(*pil.size, sc, self.ratio, rng) for _, sc, _ in self.plan]
            full, factor = torch.from_numpy(np.array(pil)).permute(2, 0, 1), (1.0, 1.0)
        else:
            full, boxes, factor = self._decode_for_boxes(img, rng)
        # [1, 3, H, W] uint8 in channels_last memory: torch's uint8 antialiased resize is fastest there, and the crops
        # come out as HWC arrays for PIL without a copy
        full = full.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        height, width = full.shape[-2:]
        crops = []
        for (size, _, blur_p), (top, left, h, w) in zip(self.plan, boxes):
            if factor != (1.0, 1.0):  # box drawn on the full-size image, decoded at reduced size
                top, h = _scale_span(top, h, factor[1], height)
                left, w = _scale_span(left, w, factor[0], width)
            region = full[:, :, top : top + h, left : left + w]
            crop = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            crops.append(self._augment(crop[0], blur_p, rng))
        return crops

    def _decode_for_boxes(self, data: bytes, rng) -> tuple[torch.Tensor, list[tuple], tuple[float, float]]:
        """Draw the crop boxes on the header's size, then decode at the smallest JPEG scale every box allows.

        Returns the decoded ``[3, H, W]`` uint8 image, the boxes and the decoded / header size ratios.
        """
        cached = self.cache.get(data) if self.cache is not None else None
        if cached is not None:  # the same boxes from the same header size; the pixels a full decode gives
            full, width, height = cached
            return full, [_rrc_box(width, height, sc, self.ratio, rng) for _, sc, _ in self.plan], (1.0, 1.0)
        img = _open(data)
        width, height = img.size
        swap = _swaps_axes(img)
        if swap:
            width, height = height, width
        boxes = [_rrc_box(width, height, sc, self.ratio, rng) for _, sc, _ in self.plan]
        # Cacheable when no draft decode can ever apply: every box of the largest crop size is then under twice it.
        cacheable = self.cache is not None and (
            img.format != "JPEG" or not self.draft or min(width, height) < 2 * max(self.sizes)
        )
        if img.format == "JPEG":
            room = min(min(w, h) / size for (size, _, _), (_, _, h, w) in zip(self.plan, boxes))
            if self.draft and room >= 2.0:
                want = (math.ceil(width / room), math.ceil(height / room))
                img.draft("RGB", want[::-1] if swap else want)
            else:  # full-size JPEG: libjpeg-turbo straight into a tensor (no PIL -> numpy copy)
                _check_decode_size(img, len(data))  # before any decoder allocates the pixels
                full = _decode_jpeg_tensor(data)
                if full is not None and tuple(full.shape[-2:]) == (height, width):
                    if cacheable:
                        self.cache.put(data, full, width, height)
                    return full, boxes, (1.0, 1.0)
        pil = _finish(img, len(data))
        full = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        if cacheable and pil.size == (width, height):
            self.cache.put(data, full, width, height)
        return full, boxes, (pil.size[0] / width, pil.size[1] / height)

    def _augment(self, crop: torch.Tensor, blur_p: float, rng) -> torch.Tensor | PendingCrop:
        """Flip, color, blur and normalize one resized crop (``[3, h, w]`` uint8 tensor)."""
        ops: list[tuple[str, float]] = []
        if rng.random() < self.jitter_p:
            b, c, s, h = self.jitter
            order = [
                ("brightness", rng.uniform(max(0.0, 1 - b), 1 + b)) if b else None,
                ("contrast", rng.uniform(max(0.0, 1 - c), 1 + c)) if c else None,
                ("saturation", rng.uniform(max(0.0, 1 - s), 1 + s)) if s else None,
                ("hue", rng.uniform(-h, h)) if h else None,
            ]
            rng.shuffle(order)
            ops = [op for op in order if op is not None]
        if rng.random() < self.gray_p:
            ops.append(("gray", 0.0))
        flip = rng.random() < self.flip_p
        radius = rng.uniform(*self.blur_radius) if rng.random() < blur_p else None
        _, height, width = crop.shape
        if self.batch_color and radius is None and (not ops or height * width <= self.exact_color_max):
            return PendingCrop(crop, tuple(ops), flip, self._norm)
        if not ops and radius is None:
            return self._finish(crop, flip)

        if ops and height * width <= self.exact_color_max:  # small crop: exact per-pixel ops, no lookup table
            planar = crop.permute(1, 2, 0).numpy().reshape(-1, 3).T.astype(np.float32, order="C")
            x = _apply_color_ops(planar, ops, 0)
            if radius is None:
                return self._finish(torch.from_numpy(x).view(3, height, width), flip)
            hwc = np.rint(x.T).astype(np.uint8).reshape(height, width, 3)
            ops = []
        else:
            hwc = crop.permute(1, 2, 0).contiguous().numpy()
        pil = Image.fromarray(hwc)
        if ops == [("gray", 0.0)]:
            pil = pil.convert("L").convert("RGB")
        elif ops:
            pil = pil.filter(_color_lut(ops, hwc, self.lut_size))
        if radius is not None:
            pil = pil.filter(ImageFilter.GaussianBlur(radius=radius))
        return self._finish(torch.from_numpy(np.array(pil)).permute(2, 0, 1), flip)

    def _finish(self, x: torch.Tensor, flip: bool) -> torch.Tensor:
        """``[3, h, w]`` uint8, or float in 0..255 -> contiguous float32 normalized (or uint8 with normalize=False)."""
        if flip:
            x = x.flip(-1)
        if not self.normalize:
            return x.contiguous() if x.dtype == torch.uint8 else x.round().clamp(0, 255).to(torch.uint8)
        out = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        return out.mul_(self._scale).add_(self._shift)

    # -- the plain reference ----------------------------------------------------------------------------------------
    def torchvision_reference(self) -> Callable[[Image.Image | bytes], list[torch.Tensor]]:
        """SwAV's own pipeline (PIL + torchvision.transforms, one Compose per crop) with this object's parameters.

        The statistical reference ``MultiCrop`` is compared against (tests, ``benchmarks/multicrop.py``).
        """
        import torchvision.transforms as T

        b, c, s, h = self.jitter
        per_crop = []
        for size, scale, blur_p in self.plan:
            per_crop.append(
                T.Compose(
                    [
                        T.RandomResizedCrop(size, scale=scale, ratio=self.ratio),
                        T.RandomHorizontalFlip(p=self.flip_p),
                        T.RandomApply([T.ColorJitter(b, c, s, h)], p=self.jitter_p),
                        T.RandomGrayscale(p=self.gray_p),
                        _PILRandomGaussianBlur(blur_p, self.blur_radius),
                        T.ToTensor(),
                        T.Normalize(mean=self.mean, std=self.std),
                    ]
                )
            )

        def reference(img: Image.Image | bytes) -> list[torch.Tensor]:
            if not isinstance(img, Image.Image):
                img = Image.open(io.BytesIO(img)).convert("RGB")
            return [t(img) for t in per_crop]

        return reference


def _decode_jpeg_tensor(data: bytes) -> torch.Tensor | None:
    """``[3, H, W]`` uint8 RGB via torchvision's libjpeg-turbo decoder, EXIF orientation applied; None if it fails."""
    try:
        # torchvision 0.29 deprecates its decoders (for torchcodec); if they go, PIL decodes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception:  # unusual JPEG flavours: PIL decodes them (and reports errors clearly)
        return None


def _scale_span(start: int, length: int, factor: float, limit: int) -> tuple[int, int]:
    """A box edge drawn at full size, in the coordinates of an image decoded ``factor`` times smaller (clamped)."""
    lo = min(max(int(round(start * factor)), 0), limit - 1)
    hi = min(max(int(round((start + length) * factor)), lo + 1), limit)
    return lo, hi - lo


def collate_multicrop(batch: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``[(crops, label), ...]`` -> (``[B, 3, h, w]`` per crop index, labels ``[B]`` int64)."""
    if not batch:
        raise ValueError("collate_multicrop: empty batch")
    n = len(batch[0][0])
    for i, (crops, _) in enumerate(batch):
        if len(crops) != n:
            raise ValueError(f"collate_multicrop: sample {i} has {len(crops)} crops, sample 0 has {n}")
    crops = [_stack([sample[0][k] for sample in batch]) for k in range(n)]
    labels = torch.as_tensor([int(label) for _, label in batch], dtype=torch.int64)
    return crops, labels


def _stack(items: list) -> torch.Tensor:
    """One crop index of a batch: tensors stacked, ``PendingCrop`` finished together (``batch_color``)."""
    pending = [i for i, x in enumerate(items) if isinstance(x, PendingCrop)]
    if not pending:
        return torch.stack(items)
    done = finish_pending([items[i] for i in pending])
    if len(pending) == len(items):
        return done
    out = [None] * len(items)
    for j, i in enumerate(pending):
        out[i] = done[j]
    return torch.stack([x if o is None else o for x, o in zip(items, out)])


def normalize_uint8(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """``[..., 3, h, w]`` uint8 -> normalized float (for ``MultiCrop(normalize=False)`` batches, on the device)."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(3, 1, 1) * 255.0
    return ((x.float() - m) / s).to(dtype)
