"""seer.data.images: the one decoder and eval geometry that extraction, shards and evaluation share."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from seer.data import images


def _jpeg(w: int, h: int, exif: bytes | None = None) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), 3)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def test_one_set_of_constants_and_interpolations():
    import seer.data.transforms as transforms
    import seer.features as features
    import seer.weights as weights

    assert transforms.IMAGENET_MEAN is images.IMAGENET_MEAN and transforms.IMAGENET_STD is images.IMAGENET_STD
    assert weights.IMAGENET_MEAN is images.IMAGENET_MEAN
    assert features.Preprocess is images.Preprocess and features.load_image is images.load_image
    assert transforms.decode_image is images.decode_image and transforms.eval_transform is images.eval_transform
    for name in images.INTERPOLATIONS:  # "hamming" included, everywhere
        assert images.Preprocess(interpolation=name).interpolation == name
        assert images.eval_transform(16, interpolation=name)(Image.new("RGB", (20, 30))).shape == (3, 16, 16)


def test_draft_decoding_is_one_path_for_bytes_and_files(tmp_path):
    data = _jpeg(400, 300)
    (tmp_path / "a.jpg").write_bytes(data)
    drafted = images.decode_image(data, draft_size=36)
    assert drafted.size == (50, 38) and drafted.info["seer_extent"] == (50.0, 37.5)  # 1/8, one partial row
    assert images.load_image(tmp_path / "a.jpg", draft=36).size == drafted.size
    assert images.decode_image(data, draft_size=(100, 75)).size == (100, 75)
    # EXIF orientation 6: sizes and the recorded extent are in displayed orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = images.decode_image(_jpeg(400, 300, exif.tobytes()), draft_size=36)
    assert rotated.size == (38, 50) and rotated.info["seer_extent"] == (37.5, 50.0)


def test_preprocess_and_eval_transform_share_the_geometry():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8))
    pp = images.Preprocess(resolution=32, crop_pct=0.8)
    default = pp(img)  # a 2x downscale takes no shortcut: the exact pixels
    exact = np.asarray(images.resize_crop(img, 32, pp.resize_size, exact=True))
    assert default.shape == exact.shape == (32, 32, 3)
    np.testing.assert_array_equal(default, exact)
    for convention in images.CONVENTIONS:
        x = images.eval_transform(32, resize=pp.resize_size, convention=convention)(img)
        mean = torch.tensor(images.IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(images.IMAGENET_STD).view(3, 1, 1)
        back = ((x * std + mean) * 255).round().permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(back, images.Preprocess(32, 0.8, convention=convention)(img))


def test_shortcuts_only_for_large_images_and_never_with_exact():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))  # 400 / 36 > 6: box pre-reduction
    pp = images.Preprocess(resolution=32, crop_pct=0.9)
    exact = images.Preprocess(resolution=32, crop_pct=0.9, exact=True)
    reference = np.asarray(images.resize_crop(img, 32, 35, exact=True))
    np.testing.assert_array_equal(exact(img), reference)
    assert not np.array_equal(pp(img), reference)  # reduced by an integer factor first
    assert pp.draft_size() == 35 and exact.draft_size() is None  # exact: JPEGs decoded in full
    # the JPEG extent of a draft is honoured by both paths
    drafted = images.decode_image(_jpeg(400, 300), draft_size=36)
    assert drafted.info["seer_extent"] == (50.0, 37.5)
    assert pp(drafted).shape == exact(drafted).shape == (32, 32, 3)


def test_preprocess_convention_and_exact_fields():
    assert images.Preprocess().convention == "torchvision" and images.Preprocess().exact is False
    with pytest.raises(ValueError, match=r"Preprocess.convention must be one of \['torchvision', 'timm', 'hf'\]"):
        images.Preprocess(convention="pil")
    with pytest.raises(ValueError, match="Preprocess.exact must be True or False"):
        images.Preprocess(exact=1)
    with pytest.raises(ValueError, match="convention must be one of"):
        images.eval_transform(32, convention="HF")
    trunk = torch.nn.Identity()
    trunk.pretrained_cfg = {"resolution": 160, "convention": "hf", "exact": True}  # exact is the caller's, not a file's
    pp = images.Preprocess.for_model(trunk)
    assert (pp.resolution, pp.convention, pp.exact) == (160, "hf", False)
    assert images.Preprocess.for_model(trunk, exact=True, convention="timm").convention == "timm"


def test_decode_errors_and_modes():
    with pytest.raises(images.ImageDecodeError, match=r"cannot decode image \(3 bytes\)"):
        images.decode_image(b"abc")
    with pytest.raises(TypeError, match="bytes"):
        images.decode_image("a.jpg")
    g16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    out = np.asarray(images.load_image(g16))
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and out.max() == round(55000 * 255 / 65535)
    user = Image.new("L", (5, 4))
    assert images.load_image(user).mode == "RGB" and user.mode == "L"  # the caller's image is left alone
