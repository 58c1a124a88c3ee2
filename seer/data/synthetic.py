"""Generated images for demos and tests, two generators:

* ``make_dataset`` / ``write_image_folder``: a small labelled dataset with learnable structure ("shapes and
  textures"), written as files for the demo's shards and evaluations;
* ``SyntheticMultiCrop``: procedural images cut straight into multi-crop batches (``data.source: synthetic``),
  a pure function of (seed, sample index), for pretraining runs that need no files.

Each "shapes and textures" class is a shape or texture family (disc, square, triangle, cross, ring, stripes,
checkerboard, dots, ...) drawn at a random position, scale, rotation, phase and contrast polarity over a random
brightness ramp with pixel noise. The class is decided by geometry alone, never by brightness or position, so
raw-pixel kNN is weak (placement and brightness dominate pixel distances: about 47% 1-NN on 10 classes) while a
network that learned the invariances SwAV's augmentations teach (crops, flips, colour jitter) separates the classes.

The default "gray" palette keeps colours near-gray on purpose: with fully random colours ("color" palette) the
per-image colour is the easiest thing two crops of one image share, and a short SwAV run learns colour identity
instead of shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from seer.data.transforms import swav_scales

__all__ = ["CLASSES", "SyntheticMultiCrop", "make_dataset", "make_image", "write_image_folder"]

CLASSES = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "hstripes",
    "vstripes",
    "checker",
    "dots",
    "star",
)


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    c0, c1 = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (xx * math.cos(angle) + yy * math.sin(angle) + 1.5) / 3.0
    return c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple]:
    pts = []
    steps = n * 2 if inner else n
    for i in range(steps):
        rad = r if (inner is None or i % 2 == 0) else r * inner
        a = rot + 2 * math.pi * i / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A mask (mode L) of one class instance at a random position, scale and rotation."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r * 0.8, size - r * 0.8, size=2)
    rot = rng.uniform(0, 2 * math.pi)
    if kind == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=255)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=255)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=0.45), fill=255)
    elif kind == "ring":
        w = max(2, int(r * 0.35))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=w)
    elif kind == "cross":
        w = r * 0.35
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon(
                [(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                 (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)],
                fill=255,
            )  # fmt: skip
    else:  # textures fill the whole image
        period = rng.uniform(0.12, 0.22) * size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        phase = rng.uniform(0, period, size=2)
        if kind == "hstripes":
            on = ((yy + phase[0]) % period) < period / 2
        elif kind == "vstripes":
            on = ((xx + phase[1]) % period) < period / 2
        elif kind == "checker":
            on = (((yy + phase[0]) // (period / 1.4)) + ((xx + phase[1]) // (period / 1.4))) % 2 == 0
        elif kind == "dots":
            dy = ((yy + phase[0]) % period) - period / 2
            dx = ((xx + phase[1]) % period) - period / 2
            on = (dx * dx + dy * dy) < (period * 0.28) ** 2
        else:
            raise ValueError(f"unknown synthetic class {kind!r}; known: {CLASSES}")
        mask = Image.fromarray((on * 255).astype(np.uint8), "L")
    return mask


def make_image(label: int, size: int, rng: np.random.Generator, palette: str = "gray") -> Image.Image:
    """One RGB image of class ``label``.

    ``palette="gray"`` (default): near-gray foreground and background (a faint random tint), so colour carries no
    per-image identity that two crops of one image share -- only geometry does, which is what SwAV must learn.
    ``palette="color"``: fully random colours (a harder, colour-shortcut-prone variant).
    """
    kind = CLASSES[label]
    if palette == "gray":
        g_bg = rng.uniform(40, 215)
        g_fg = g_bg + rng.choice([-1, 1]) * rng.uniform(60, 110)
        if not 0 <= g_fg <= 255:
            g_fg = g_bg - (g_fg - g_bg)
        tint = rng.uniform(-12, 12, size=3)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xx * math.cos(angle) + yy * math.sin(angle) - 0.5) * rng.uniform(-40, 40)
        bg = (g_bg + ramp)[..., None] + tint
        fg = np.full(3, g_fg, dtype=np.float32) + tint
    elif palette == "color":
        bg = _background(rng, size)
        fg = np.array(_random_color(rng), dtype=np.float32)
        # keep foreground and background apart in brightness so shapes stay visible whatever the colours
        if abs(fg.mean() - bg.mean()) < 60:
            fg = np.clip(255 - fg, 0, 255)
    else:
        raise ValueError(f"palette must be 'gray' or 'color', got {palette!r}")
    mask = np.asarray(_draw_shape(kind, size, rng), dtype=np.float32)[..., None] / 255.0
    img = bg * (1 - mask) + fg[None, None] * mask
    img += rng.normal(0, 12, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def make_dataset(n_per_class: int, size: int = 64, seed: int = 0, n_classes: int = len(CLASSES),
                 palette: str = "gray") -> tuple[list[Image.Image], np.ndarray]:  # fmt: skip
    """``n_per_class`` images of each class (interleaved), and their labels."""
    if not 1 <= n_classes <= len(CLASSES):
        raise ValueError(f"n_classes must be in 1..{len(CLASSES)}, got {n_classes}")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n_per_class):
        for label in range(n_classes):
            images.append(make_image(label, size, rng, palette))
            labels.append(label)
    return images, np.asarray(labels, dtype=np.int64)


def write_image_folder(root: str | Path, n_per_class: int, size: int = 64, seed: int = 0,
                       n_classes: int = len(CLASSES), quality: int = 92, palette: str = "gray") -> Path:  # fmt: skip
    """Write ``root/<class>/<index>.jpg`` (ImageFolder layout: class subfolders become labels)."""
    root = Path(root)
    images, labels = make_dataset(n_per_class, size, seed, n_classes, palette)
    for name in CLASSES[:n_classes]:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        img.save(root / CLASSES[label] / f"{i:06d}.jpg", quality=quality)
    return root


# ----------------------------------------------------------------------------------------------------------------
# Multi-crop batches of procedural images, a pure function of (seed, sample index)
# ----------------------------------------------------------------------------------------------------------------
class SyntheticMultiCrop:
    """Deterministic procedural images (``classes`` families of colored blobs and stripes) cut into random resized
    crops. Sample ``n`` depends only on ``(seed, n)``, so any split of a global batch over ranks sees the same data.

    Args:
        shapes: ``[(count, resolution), ...]`` crop runs, large crops first.
        image_size: side of the generated images. classes: number of image families. seed: the data seed.
        scales: RandomResizedCrop area range per run (a multi-crop preset's ``scales``); default SwAV's
            (``seer.data.transforms.swav_scales``).
    """

    def __init__(self, shapes: list[tuple[int, int]], image_size: int = 96, classes: int = 16, seed: int = 0,
                 scales: Sequence[tuple[float, float]] | None = None) -> None:  # fmt: skip
        self.shapes, self.size, self.seed = shapes, image_size, seed
        self.scales = list(swav_scales(len(shapes)) if scales is None else scales)
        if len(self.scales) != len(shapes):
            raise ValueError(f"{len(self.scales)} scale ranges for {len(shapes)} crop runs")
        g = torch.Generator().manual_seed(seed * 7919 + 17)
        grids = torch.rand(classes, 3, 4, 4, generator=g)
        self.bases = F.interpolate(grids, size=(image_size, image_size), mode="bicubic", align_corners=False)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, image_size), torch.linspace(0, 1, image_size), indexing="ij")
        angle, freq = torch.rand(classes, generator=g) * math.pi, 2 + 6 * torch.rand(classes, generator=g)
        for c in range(classes):
            wave = torch.sin(2 * math.pi * freq[c] * (xx * angle[c].cos() + yy * angle[c].sin()))
            self.bases[c] += 0.3 * wave

    def sample(self, index: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        cls = int(torch.randint(len(self.bases), (1,), generator=g))
        img = self.bases[cls].roll(tuple(torch.randint(self.size, (2,), generator=g).tolist()), dims=(1, 2))
        img = img + 0.1 * torch.randn(img.shape, generator=g)
        crops = []
        for (count, res), (lo, hi) in zip(self.shapes, self.scales):
            for _ in range(count):
                area = self.size * self.size * float(lo + (hi - lo) * torch.rand(1, generator=g))
                side = max(2, min(self.size, int(round(math.sqrt(area)))))
                y, x = torch.randint(self.size - side + 1, (2,), generator=g).tolist()
                crop = F.interpolate(img[None, :, y : y + side, x : x + side], size=(res, res), mode="bilinear")[0]
                if bool(torch.rand(1, generator=g) < 0.5):
                    crop = crop.flip(-1)
                crops.append((crop - 0.5) / 0.25)
        return crops

    def batch(self, step: int, rank: int, batch_size: int, world_size: int) -> list[torch.Tensor]:
        """The ``[B, 3, r, r]`` crop tensors of this rank's share of global step ``step``."""
        first = (step * world_size + rank) * batch_size
        samples = [self.sample(first + i) for i in range(batch_size)]
        return [torch.stack(c) for c in zip(*samples)]
