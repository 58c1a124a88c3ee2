"""Small labeled real-image tasks built from images the dependencies ship: nothing is downloaded.

Each task places a real object (a handwritten digit from scikit-learn, a glyph of a real font) at a random position
and scale on a canvas (a dark plain one, or a patch of one of scikit-learn's sample photos), so raw pixels are a fair
baseline rather than a trivial one, and returns PIL images with their labels. ``write_task(name, root)`` writes
``root/train/<class>/*.png`` and ``root/test/<class>/*.png`` (ImageFolder layout), which
``seer pretrain data.source=images`` and ``seer.extract_features`` read directly.

    digits   scikit-learn's 1797 handwritten digits (8x8, 17 gray levels), 10 classes; train and test split the
             writers' digits, never the same digit image in both
    glyphs   the letters A-J rendered in the DejaVu fonts matplotlib ships (sans, serif, mono; regular, bold,
             oblique), 10 classes; test uses fonts never seen in train
    digits_on_photos  the digits over patches of scikit-learn's sample photos (china.jpg, flower.jpg), in white or
             black, whichever contrasts
    printed_digits  the digits 0-9 rendered in matplotlib's DejaVu, STIX and Computer Modern fonts (serif, sans,
             typewriter, italic, bold); test uses fonts never seen in train
    textures  patches (24-128 px, any quarter-turn, random gain and contrast) of ten of scikit-image's bundled photos
             of surfaces (brick, grass, gravel, coins, moon, Hubble deep field, immunohistochemistry, text, page,
             cells), in gray: which surface is it? Train patches come from the left 60% of each photo, test patches
             from the right 40%. Needs scikit-image.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["TASKS", "make_task", "write_task"]


@functools.cache
def _sample_photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def _photo_patch(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square patch (1-4 canvas sides wide) of one of scikit-learn's sample photos, ``[size, size, 3]``."""
    photos = _sample_photos()
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(size, 4 * size))
    y, x = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
    patch = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(patch, np.float32)


def _place(obj: Image.Image, size: int, rng: np.random.Generator, background: str = "plain",
           min_scale: float = 0.45) -> Image.Image:  # fmt: skip
    """``obj`` (grayscale, object bright on black) resized to a random fraction of the canvas, at a random position,
    over a ``background`` with noise, returned as RGB.

    ``"plain"``: a dark gray with a slight random tint, the object light; ``"photo"``: a darkened photo patch, the
    object white (or black on a bright patch).
    """
    scale = rng.uniform(min_scale, 0.95)
    side = max(4, int(round(size * scale)))
    w, h = obj.size
    ratio = side / max(w, h)
    obj = obj.resize((max(1, int(round(w * ratio))), max(1, int(round(h * ratio)))), Image.Resampling.BICUBIC)
    x = int(rng.integers(0, size - obj.width + 1))
    y = int(rng.integers(0, size - obj.height + 1))
    mask = np.zeros((size, size, 1), np.float32)
    mask[y : y + obj.height, x : x + obj.width, 0] = np.asarray(obj, np.float32) / 255.0
    if background == "plain":
        bg = np.full((size, size, 3), rng.uniform(0, 80)) + rng.uniform(-10, 10, 3)
        fg = rng.uniform(170, 255) + rng.uniform(-20, 20, 3)
    elif background == "photo":
        bg = _photo_patch(size, rng) * 0.6
        fg = np.full(3, 255.0 if bg.mean() < 110 else 0.0)
    else:
        raise ValueError(f"background must be 'plain' or 'photo', got {background!r}")
    img = bg * (1 - mask) + fg * mask
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _digits(n_train: int, n_test: int, size: int, seed: int, background: str = "plain"):
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    split = int(len(order) * 0.7)  # train / test split over the source digits: no digit image is in both
    parts = {"train": order[:split], "test": order[split:]}
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        idx = parts[part][rng.integers(0, len(parts[part]), n)]
        images = []
        for i in idx:
            digit = Image.fromarray((data.images[i] * (255 / 16)).astype(np.uint8), "L")
            digit = digit.resize((24, 24), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(0.6))
            images.append(_place(digit, size, rng, background))
        out[part] = (images, data.target[idx].astype(np.int64))
    return out, [str(d) for d in range(10)]


def _font_files(families: tuple[str, ...] = ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono")) -> list[str]:
    """The matplotlib-shipped font files of ``families`` (every style of each that exists)."""
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    styles = ["", "-Bold", "-Oblique", "-Italic", "-BoldOblique", "-BoldItalic", "Bol", "BolIta", "Italic"]
    return sorted({str(p) for n in families for s in styles if (p := root / f"{n}{s}.ttf").is_file()})


def _rendered(n_train: int, n_test: int, size: int, seed: int, chars: str, fonts: list[str]):
    """``chars`` rendered in ``fonts`` (a quarter of the fonts, at least 2, only in test), rotated +-15 degrees."""
    rng = np.random.default_rng(seed)
    if len(fonts) < 4:
        raise RuntimeError("the rendered-glyph tasks need matplotlib's fonts (pip install matplotlib)")
    order = rng.permutation(len(fonts))
    test_fonts = [fonts[i] for i in order[: max(2, len(fonts) // 4)]]  # fonts never seen in train
    train_fonts = [fonts[i] for i in order[len(test_fonts) :]]
    out = {}
    for part, n, pool in (("train", n_train, train_fonts), ("test", n_test, test_fonts)):
        images, labels = [], []
        for _ in range(n):
            label = int(rng.integers(len(chars)))
            font = ImageFont.truetype(pool[int(rng.integers(len(pool)))], 48)
            canvas = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(canvas).text((32, 32), chars[label], fill=255, font=font, anchor="mm")
            canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BICUBIC)
            box = canvas.getbbox() or (0, 0, 64, 64)
            images.append(_place(canvas.crop(box), size, rng))
            labels.append(label)
        out[part] = (images, np.asarray(labels, np.int64))
    return out, list(chars)


def _glyphs(n_train: int, n_test: int, size: int, seed: int):
    return _rendered(n_train, n_test, size, seed, "ABCDEFGHIJ", _font_files())


def _printed_digits(n_train: int, n_test: int, size: int, seed: int):
    # Computer Modern and STIX besides DejaVu: serif, sans, typewriter and italic digits of other designs
    fonts = _font_files(("DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "STIXGeneral", "cmr10", "cmb10", "cmss10",
                         "cmtt10", "cmti10"))  # fmt: skip
    return _rendered(n_train, n_test, size, seed, "0123456789", fonts)


def _digits_on_photos(n_train: int, n_test: int, size: int, seed: int):
    return _digits(n_train, n_test, size, seed, background="photo")


# scikit-image's bundled photos of surfaces: materials, microscopy, astronomy and print
_TEXTURES = ("brick", "grass", "gravel", "coins", "moon", "hubble_deep_field", "immunohistochemistry", "text", "page",
             "cell")  # fmt: skip


def _textures(n_train: int, n_test: int, size: int, seed: int):
    try:
        import skimage.data
    except ImportError as e:
        raise RuntimeError("the textures task needs scikit-image's bundled photos (pip install scikit-image)") from e
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("L"), np.float32) for n in _TEXTURES]
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        images, labels = [], []
        for _ in range(n):
            label = int(rng.integers(len(photos)))
            photo = photos[label]
            # train patches come from the left 60% of each photo, test patches from the right 40%: no shared pixels
            cut = int(photo.shape[1] * 0.6)
            region = photo[:, :cut] if part == "train" else photo[:, cut:]
            side = int(rng.integers(24, min(128, *region.shape) + 1))
            y = int(rng.integers(0, region.shape[0] - side + 1))
            x = int(rng.integers(0, region.shape[1] - side + 1))
            patch = np.rot90(region[y : y + side, x : x + side], int(rng.integers(4)))
            patch = Image.fromarray(patch.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
            # a random gain and contrast, so a photo's mean brightness alone does not name it
            a = np.asarray(patch, np.float32)
            a = (a - a.mean()) * rng.uniform(0.6, 1.4) + a.mean() * rng.uniform(0.6, 1.4) + rng.normal(0, 4, a.shape)
            images.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB"))
            labels.append(label)
        out[part] = (images, np.asarray(labels, np.int64))
    return out, list(_TEXTURES)


TASKS: dict[str, Callable] = {
    "digits": _digits,
    "glyphs": _glyphs,
    "digits_on_photos": _digits_on_photos,
    "printed_digits": _printed_digits,
    "textures": _textures,
}


def make_task(name: str, n_train: int = 2000, n_test: int = 500, size: int = 32, seed: int = 0) -> dict:
    """``{"train": (images, labels), "test": (images, labels), "classes": [...]}`` of task ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    parts, classes = TASKS[name](n_train, n_test, size, seed)
    return {**parts, "classes": classes}


def write_task(name: str, root: str | os.PathLike, **kwargs) -> dict:
    """Write task ``name`` as ``root/{train,test}/<class>/<index>.png``; returns the file lists and labels."""
    task = make_task(name, **kwargs)
    root = Path(root)
    files = {}
    for part in ("train", "test"):
        images, labels = task[part]
        paths = []
        for i, (img, y) in enumerate(zip(images, labels)):
            d = root / part / task["classes"][y]
            d.mkdir(parents=True, exist_ok=True)
            paths.append(d / f"{i:06d}.png")
            img.save(paths[-1])
        files[part] = (paths, labels)
    return {"root": root, "files": files, "classes": task["classes"]}
