"""Multi-crop and evaluation transforms: shapes and value ranges of every preset, the color operations against
torchvision's, statistical equivalence with SwAV's torchvision pipeline, draft decoding, EXIF, bad input."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from seer.data import transforms as tr
from seer.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    ImageDecodeError,
    MultiCrop,
    collate_multicrop,
    decode_image,
    eval_transform,
    normalize_uint8,
)

LO = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
HI = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)


def synthetic_image(width: int = 500, height: int = 375, seed: int = 0) -> Image.Image:
    """Smooth color waves + edges + noise: structure for crops, colors for the jitter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [
            128 + 100 * np.sin(x / 30 + rng.uniform(0, 6)),
            128 + 100 * np.cos(y / 20 + rng.uniform(0, 6)),
            128 + 80 * np.sin((x + y) / 50) * (x > width / 3),
        ],
        axis=-1,
    )
    img += rng.normal(0, 10, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return jpeg_bytes(synthetic_image())


# ----------------------------------------------------------------------------------------------------------------
# Presets: shapes and value ranges
# ----------------------------------------------------------------------------------------------------------------
EXPECTED = {"swav": [224] * 2 + [96] * 6, "seer": [224] * 2 + [96] * 4, "seer_10b": [160] * 2 + [96] * 4,
            "cpu_tiny": [64] * 2 + [32] * 2, "demo": [32] * 2 + [16] * 2, "small": [32] * 2, "small_flip": [32] * 2,
            "finetune_224": [224], "finetune_384": [384], "finetune_small": [32]}  # fmt: skip


def test_every_preset_is_tested():
    assert set(PRESETS) == set(EXPECTED)


@pytest.mark.parametrize("preset", sorted(EXPECTED))
@pytest.mark.parametrize("source", ["bytes", "pil"])
def test_preset_shapes_and_ranges(preset, source, jpeg):
    mc = MultiCrop.from_preset(preset, rng=random.Random(0))
    assert mc.n_crops == len(EXPECTED[preset])
    img = jpeg if source == "bytes" else decode_image(jpeg)
    for _ in range(3):
        crops = mc(img)
        assert [tuple(c.shape) for c in crops] == [(3, s, s) for s in EXPECTED[preset]]
        for c in crops:
            assert c.dtype == torch.float32 and c.is_contiguous() and torch.isfinite(c).all()
            assert (c >= LO - 1e-4).all() and (c <= HI + 1e-4).all()
            assert c.std() > 0.01  # not a constant image


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_uint8_output(preset, jpeg):
    mc = MultiCrop.from_preset(preset, normalize=False, rng=random.Random(1))
    crops = mc(jpeg)
    assert [tuple(c.shape) for c in crops] == [(3, s, s) for s in EXPECTED[preset]]
    assert all(c.dtype == torch.uint8 for c in crops)
    # normalize_uint8 on the device gives what normalize=True gives (up to the uint8 rounding of exact-color crops)
    ref = MultiCrop.from_preset(preset, rng=random.Random(1))(jpeg)
    for u, f in zip(crops, ref):
        torch.testing.assert_close(normalize_uint8(u), f, atol=0.6 / 255 / 0.224 + 1e-5, rtol=0)


def test_reproducible_with_rng(jpeg):
    a = MultiCrop.from_preset("cpu_tiny", rng=random.Random(7))(jpeg)
    b = MultiCrop.from_preset("cpu_tiny", rng=random.Random(7))(jpeg)
    c = MultiCrop.from_preset("cpu_tiny", rng=random.Random(8))(jpeg)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown multi-crop preset"):
        MultiCrop.from_preset("sear")
    with pytest.raises(ValueError, match="same non-zero length"):
        MultiCrop(counts=(2,), sizes=(224, 96), scales=((0.1, 1),))
    with pytest.raises(ValueError, match="scale range"):
        MultiCrop(counts=(1,), sizes=(32,), scales=((0.5, 0.2),))
    with pytest.raises(ValueError, match="blur_p"):
        MultiCrop(blur_p=(0.5,))


def test_plain_crop_equals_resize():
    # no randomness but the (full, square) box: the output is the antialiased bilinear resize of the image
    img = synthetic_image(120, 120)
    mc = MultiCrop((1,), (48,), ((1.0, 1.0),), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0, blur_p=0,
                   normalize=False)  # fmt: skip
    out = mc(img)[0].permute(1, 2, 0).numpy().astype(int)
    ref = np.asarray(img.resize((48, 48), Image.BILINEAR)).astype(int)
    assert np.abs(out - ref).max() <= 2 and np.abs(out - ref).mean() < 0.2
    flipped = MultiCrop((1,), (48,), ((1.0, 1.0),), ratio=(1.0, 1.0), flip_p=1, jitter_p=0, gray_p=0, blur_p=0,
                        normalize=False)(img)[0]  # fmt: skip
    assert torch.equal(flipped, torch.from_numpy(out.astype(np.uint8)).permute(2, 0, 1).flip(-1))


# ----------------------------------------------------------------------------------------------------------------
# Color operations: our float ops == torchvision's float ops; the lookup table is close to them
# ----------------------------------------------------------------------------------------------------------------
TV_OPS = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation,
          "hue": TF.adjust_hue}  # fmt: skip


def _random_ops(rng: random.Random, gray: bool = False) -> list[tuple[str, float]]:
    ops = [("brightness", rng.uniform(0.2, 1.8)), ("contrast", rng.uniform(0.2, 1.8)),
           ("saturation", rng.uniform(0.2, 1.8)), ("hue", rng.uniform(-0.2, 0.2))]  # fmt: skip
    rng.shuffle(ops)
    return ops + ([("gray", 0.0)] if gray else [])


def test_color_ops_match_torchvision_float_ops():
    crop = np.array(synthetic_image(64, 48, seed=3))
    x = torch.from_numpy(crop).permute(2, 0, 1).float() / 255
    rng = random.Random(0)
    for trial in range(12):
        ops = _random_ops(rng, gray=trial % 3 == 0)
        ours = tr._apply_color_ops(crop.reshape(-1, 3).T.astype(np.float32), ops, 0).reshape(3, 48, 64)
        ref = x
        for name, f in ops:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3) if name == "gray" else TV_OPS[name](ref, f)
        np.testing.assert_allclose(ours / 255, ref.numpy(), atol=2e-4, err_msg=str(ops))


def test_lookup_table_close_to_exact_ops():
    img = synthetic_image(224, 224, seed=4)
    crop = np.asarray(img)
    rng = random.Random(1)
    ours, swav = [], []
    for trial in range(8):
        ops = _random_ops(rng, gray=trial == 0)
        exact = tr._apply_color_ops(crop.reshape(-1, 3).T.astype(np.float32), ops, 0)
        lut = np.asarray(img.filter(tr._color_lut(ops, crop, 17))).reshape(-1, 3).T.astype(np.float32)
        ours.append(np.abs(lut - exact).mean())
        # SwAV's pipeline: the same ops on PIL images (uint8 after every step) deviates from the float ops too
        pil = img
        for name, f in ops:
            pil = pil.convert("L").convert("RGB") if name == "gray" else getattr(T.functional, f"adjust_{name}")(pil, f)
        swav.append(np.abs(np.asarray(pil).reshape(-1, 3).T.astype(np.float32) - exact).mean())
    assert np.mean(ours) < 1.0 and max(ours) < 2.5, ours
    assert np.mean(ours) < np.mean(swav), (ours, swav)  # closer to torchvision's float ops than SwAV's PIL ops


# ----------------------------------------------------------------------------------------------------------------
# Statistical equivalence with SwAV's torchvision pipeline
# ----------------------------------------------------------------------------------------------------------------
def test_crop_boxes_follow_torchvision_distribution():
    rng = random.Random(0)
    torch.manual_seed(0)
    ours, ref = [], []
    img = Image.new("RGB", (500, 375))
    for _ in range(3000):
        top, left, h, w = tr._rrc_box(500, 375, (0.14, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        ours.append((h * w / (500 * 375), math.log(w / h), (left + w / 2) / 500))
        i, j, h, w = T.RandomResizedCrop.get_params(img, (0.14, 1.0), (3 / 4, 4 / 3))
        ref.append((h * w / (500 * 375), math.log(w / h), (j + w / 2) / 500))
    ours, ref = np.array(ours), np.array(ref)
    for k in range(3):
        assert abs(ours[:, k].mean() - ref[:, k].mean()) < 4 * ref[:, k].std() / math.sqrt(3000) + 1e-3
        assert abs(ours[:, k].std() - ref[:, k].std()) < 0.05 * ref[:, k].std() + 1e-3


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _crop_stats(crop: torch.Tensor) -> list[float]:
    """Per-crop statistics the augmentations move: channel means, contrast, colorfulness, sharpness, high-frequency
    share (blur), grayscale."""
    x = (crop * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).numpy()
    chroma = float((x.max(0) - x.min(0)).mean())
    chroma = 0.0 if chroma < 2e-3 else chroma  # grayscale: float noise of either pipeline's normalization -> 0
    lum = x.mean(axis=0)
    d1 = np.abs(np.diff(lum, axis=1)).mean() + np.abs(np.diff(lum, axis=0)).mean()  # sharpness
    d2 = np.abs(np.diff(lum, n=2, axis=1)).mean() + np.abs(np.diff(lum, n=2, axis=0)).mean()
    return [*x.mean(axis=(1, 2)), x.std(), chroma, d1, d2 / (d1 + 1e-6), float(chroma == 0.0)]  # d2/d1: blur


@pytest.mark.slow
def test_pipeline_statistics_match_torchvision_reference():
    # The distributions of per-crop statistics over many crops: ours vs SwAV's PIL + torchvision pipeline. Seeds are
    # fixed, so the outcome is deterministic; the thresholds are ~0.1% false-alarm levels. Checked to catch
    # gray_p 0.2 -> 0.1, jitter_p 0.8 -> 0.5, blur_p 0.5 -> 0.25 and small-crop scales (0.05, 0.14) -> (0.1, 0.3).
    img = synthetic_image(200, 150, seed=5)
    mc = MultiCrop((1, 1), (48, 24), ((0.14, 1.0), (0.05, 0.14)), rng=random.Random(0))
    reference = mc.torchvision_reference()
    random.seed(0)
    torch.manual_seed(0)
    n = 400
    ours = np.array([[_crop_stats(c) for c in mc(img)] for _ in range(n)])  # [n, crop, stat]
    ref = np.array([[_crop_stats(c) for c in reference(img)] for _ in range(n)])
    limit = 1.95 * math.sqrt(2 / n)  # KS critical value at alpha 0.001
    for crop in range(2):
        for k in range(ours.shape[2] - 1):
            d = _ks_distance(ours[:, crop, k], ref[:, crop, k])
            assert d < limit, f"crop {crop} statistic {k}: KS distance {d:.3f} >= {limit:.3f}"
        gray_ours, gray_ref = ours[:, crop, -1].mean(), ref[:, crop, -1].mean()
        se = math.sqrt(2 * 0.2 * 0.8 / n)
        assert abs(gray_ours - gray_ref) < 3.3 * se, (crop, gray_ours, gray_ref)
        assert abs(gray_ours - 0.2) < 3.3 * se / math.sqrt(2)


# ----------------------------------------------------------------------------------------------------------------
# Decoding: draft mode, EXIF, modes, bad input
# ----------------------------------------------------------------------------------------------------------------
def test_draft_decoding_for_large_jpeg():
    big = jpeg_bytes(synthetic_image(1600, 1200, seed=6))
    assert decode_image(big).size == (1600, 1200)
    small = decode_image(big, draft_size=300)
    assert small.size == (400, 300)  # 1/4 scale keeps the shorter side >= 300
    assert decode_image(big, draft_size=(500, 300)).size == (800, 600)
    # multi-crop on a big image: crops whose boxes allow it are cut from a reduced decode, with the same boxes
    kw = dict(counts=(2,), sizes=(32,), scales=((0.3, 0.5),), jitter_p=0, gray_p=0, blur_p=0, flip_p=0)
    drafted = MultiCrop(**kw, draft=True, rng=random.Random(3))(big)
    full = MultiCrop(**kw, draft=False, rng=random.Random(3))(big)
    for a, b in zip(drafted, full):
        assert a.shape == b.shape == (3, 32, 32)
        assert (a - b).abs().mean() < 0.1  # DCT-scaled decode: slightly different pixels, same content


def test_exif_orientation_is_applied(jpeg):
    img = synthetic_image(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = jpeg_bytes(img, exif=exif.tobytes())
    assert decode_image(data).size == (40, 80)
    assert decode_image(data, draft_size=10).size[1] > decode_image(data, draft_size=10).size[0]
    via_tv = tr._decode_jpeg_tensor(data)
    assert via_tv is not None and tuple(via_tv.shape) == (3, 80, 40)
    pil = torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)
    assert (via_tv.float() - pil.float()).abs().mean() < 1.0
    crops = MultiCrop((1,), (16,), ((0.5, 1.0),), rng=random.Random(0))(data)
    assert crops[0].shape == (3, 16, 16)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode):
    img = synthetic_image(64, 48).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("L", "CMYK") else "PNG")
    data = buf.getvalue()
    assert decode_image(data).mode == "RGB"
    crops = MultiCrop.from_preset("cpu_tiny", rng=random.Random(0))(data)
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 2
    assert tuple(eval_transform(32)(data).shape) == (3, 32, 32)


def test_bad_bytes_raise_clear_errors(jpeg):
    with pytest.raises(ImageDecodeError, match=r"cannot decode image \(9 bytes\)"):
        decode_image(b"not a jpg")
    with pytest.raises(ImageDecodeError, match="truncated"):
        MultiCrop.from_preset("cpu_tiny")(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageDecodeError):
        eval_transform(32)(b"\xff\xd8\xff garbage")
    with pytest.raises(TypeError, match="bytes"):
        decode_image("path.jpg")


# ----------------------------------------------------------------------------------------------------------------
# Collate and evaluation transform
# ----------------------------------------------------------------------------------------------------------------
def test_collate_multicrop(jpeg):
    mc = MultiCrop.from_preset("cpu_tiny", rng=random.Random(0))
    batch = [(mc(jpeg), label) for label in (3, 1, 4)]
    crops, labels = collate_multicrop(batch)
    assert [tuple(c.shape) for c in crops] == [(3, 3, 64, 64)] * 2 + [(3, 3, 32, 32)] * 2
    assert labels.tolist() == [3, 1, 4] and labels.dtype == torch.int64
    assert torch.equal(crops[2][1], batch[1][0][2])
    with pytest.raises(ValueError, match="sample 1 has 3 crops"):
        collate_multicrop([(batch[0][0], 0), (batch[0][0][:3], 0)])


def test_eval_transform_matches_torchvision(jpeg):
    img = decode_image(jpeg)
    ours = eval_transform(224)(img)
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)  # fmt: skip
    assert ours.shape == (3, 224, 224) and ours.is_contiguous()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # timm's rule: resize = floor(resolution / crop_pct); bytes in, same result as PIL in
    ref2 = T.Compose([T.Resize(232, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)  # fmt: skip
    torch.testing.assert_close(eval_transform(224, crop_pct=0.965)(jpeg), ref2, atol=1e-5, rtol=0)
    assert eval_transform(64, resize=80, interpolation="bilinear")(img).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(224, interpolation="cubic")
    with pytest.raises(ValueError, match="smaller than the crop"):
        eval_transform(224, resize=200)


def test_small_image_and_finetune_presets_augment_as_documented():
    assert MultiCrop.from_preset("small").flip_p == 0.0 and MultiCrop.from_preset("small_flip").flip_p == 0.5
    for name in ("finetune_224", "finetune_384", "finetune_small"):
        mc = MultiCrop.from_preset(name)
        assert mc.n_crops == 1 and mc.jitter_p == 0.0 and mc.gray_p == 0.0 and mc.blur_p == (0.0,)
