"""Preprocessing parity with the libraries whose checkpoints seer loads (issue 31, item 1).

seer's exact path (``Preprocess(..., exact=True)``, and the default path for images that need none of its
shortcuts) is compared pixel for pixel with the real library's transform, for each convention
(``seer.data.images.CONVENTIONS``): HF's PIL image processor built by ``AutoImageProcessor`` from a
``preprocessor_config.json`` the test writes, timm's ``create_transform(**resolve_data_config(...))`` for a
``pretrained_cfg``, and torchvision's ``Resize`` + ``CenterCrop``. Sizes are odd and even, with odd margins where the
conventions part (torchvision rounds half the margin to even, HF floors it) and where they agree.

The uint8 crops must be equal. The float tensors fed to the model agree to a few float32 ulps, not bit for bit: HF
and timm rescale (HF in float64), cast, then subtract the mean and divide by the std; seer folds all of it into one
float32 multiply-add on the device. The same real number, rounded at different steps.

Stated tolerances, tested here (and in docs/features.md):
- HF's torchvision backend (``backend="torchvision"``, torch's antialiased kernels instead of PIL's): the same crop,
  values within 2 gray levels, mean absolute difference under 0.05; a warp that grows one side and shrinks the other
  (300x400 to 384x384): mean under 0.5 (up to 20 levels on noise).
- seer's fast path on large images (JPEG draft decoding, box pre-reduction) against the exact path: mean absolute
  difference under 2 gray levels and 99% of values within 16 with draft decoding; under 0.5 and within 8 with box
  pre-reduction alone.

Images: noise the test writes (a one-pixel shift of the crop changes it completely) and scikit-image's photos
(skipped without scikit-image), never the network.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_weights import hf_config, randomize_bn

import seer
from seer.data.images import CONVENTIONS, Preprocess, crop_start, load_image, resized_size
from seer.weights import CheckpointError, load_trunk, save_trunk
from seer.weights.formats import hf_preprocess, timm_preprocess

# Odd and even sizes, portrait and landscape, one upscale. For a 224 crop of a 256 short side: (301, 257) and
# (257, 301) have a margin of 75 (torchvision starts at 38, HF at 37), (300, 400) of 117 (both 58), (451, 300) of 160,
# (225, 224) of 33 (both 16).
SIZES = [(301, 257), (257, 301), (300, 400), (451, 300), (256, 256), (225, 224), (640, 481)]
EPS = torch.finfo(torch.float32).eps


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _photos() -> list[np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        return []
    return [data.astronaut(), data.coffee()]


def _images() -> list[tuple[str, Image.Image]]:
    """Every size as noise and as each photo (resized to it)."""
    out = [(f"noise {w}x{h}", _noise((w, h), seed=w * h)) for w, h in SIZES]
    for i, photo in enumerate(_photos()):
        out += [
            (f"photo{i} {w}x{h}", Image.fromarray(photo).resize((w, h), Image.Resampling.BICUBIC)) for w, h in SIZES
        ]
    return out


IMAGES = _images()


def _hwc(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CHW (or 1CHW) library output -> HWC numpy, as seer's uint8 crops are."""
    x = np.asarray(x)
    return (x[0] if x.ndim == 4 else x).transpose(1, 2, 0)


class _Inputs(torch.nn.Module):
    """A "model" that keeps what ``extract_features`` feeds it: the float tensors before the model."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x.mean((2, 3))


def _model_input(img: Image.Image, pp: Preprocess) -> torch.Tensor:
    """The normalized float tensor ``seer.extract_features`` gives the model for ``img`` (``[1, 3, r, r]``)."""
    spy = _Inputs()
    seer.extract_features([img], spy, preprocess=pp, backend="torch")
    return spy.seen[0].contiguous()


def _assert_ulps(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 rounding: a few ulps of the largest value (see the module docstring)."""
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=4 * EPS * float(ref.abs().max()))


def _check_exact(pp: Preprocess, reference, what: str) -> None:
    """``pp`` (default and ``exact=True``) gives ``reference(img)``'s uint8 crop on every image, bit for bit."""
    exact = replace(pp, exact=True)
    for name, img in IMAGES:
        ref = reference(img)
        got = exact(img)
        assert got.shape == ref.shape == (pp.resolution, pp.resolution, 3), (what, name)
        np.testing.assert_array_equal(got, ref, err_msg=f"{what}: {name}")
        np.testing.assert_array_equal(pp(img), got, err_msg=f"{what}, default path: {name}")  # no shortcut taken


# ----------------------------------------------------------------------------------------------------------------
# The arithmetic itself
# ----------------------------------------------------------------------------------------------------------------
def test_the_conventions_part_exactly_where_half_the_margin_rounds_up():
    assert crop_start(299, 224, "torchvision") == crop_start(299, 224, "timm") == 38  # 37.5 -> 38 (even)
    assert crop_start(299, 224, "hf") == 37  # 75 // 2
    assert {crop_start(341, 224, c) for c in CONVENTIONS} == {58}  # 58.5 rounds to even: 58
    assert {crop_start(256, 224, c) for c in CONVENTIONS} == {16}
    assert resized_size(301, 257, 256) == (299, 256) and resized_size(257, 301, 256) == (256, 299)
    with pytest.raises(ValueError, match="convention must be one of"):
        crop_start(299, 224, "pil")
    margins = [n - 224 for w, h in SIZES for n in resized_size(w, h, 256)]
    for m in margins:  # torchvision starts one pixel further than HF where half the margin rounds up to even
        assert crop_start(224 + m, 224, "hf") == m // 2
        assert crop_start(224 + m, 224, "torchvision") == m // 2 + (m % 4 == 3)
    # the test sizes hold both kinds of odd margin, so each parity test below tells the conventions apart
    assert any(m % 4 == 3 for m in margins) and any(m % 4 == 1 for m in margins)
    img = _noise((301, 257))
    hf, tv = Preprocess(convention="hf")(img), Preprocess(convention="torchvision")(img)
    np.testing.assert_array_equal(hf[:, 1:], tv[:, :-1])  # the same crop, one column apart
    assert not np.array_equal(hf, tv)


# ----------------------------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------------------------
TV_CASES = [(224, 0.875, "bilinear"), (224, 0.965, "bicubic"), (96, 0.9, "bicubic"), (384, 1.0, "bilinear")]


@pytest.mark.parametrize("resolution,crop_pct,interpolation", TV_CASES)
def test_torchvision_resize_center_crop_pixel_for_pixel(resolution, crop_pct, interpolation):
    T = pytest.importorskip("torchvision.transforms")
    pp = Preprocess(resolution, crop_pct, interpolation, convention="torchvision")
    assert pp.resize_size == math.floor(resolution / crop_pct)
    tv = T.Compose([T.Resize(pp.resize_size, interpolation=T.InterpolationMode(interpolation)),
                    T.CenterCrop(resolution), T.PILToTensor()])  # fmt: skip
    _check_exact(pp, lambda img: _hwc(tv(img)), "torchvision")


# ----------------------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------------------
TIMM_CFGS = {
    "seer feature weights": {"input_size": (3, 224, 224), "crop_pct": 0.965, "interpolation": "bicubic",
                             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "pycls": {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear"},
    "test size": {"input_size": (3, 96, 96), "test_input_size": (3, 128, 128), "crop_pct": 0.9, "test_crop_pct": 0.95,
                  "interpolation": "bicubic", "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)},
    "seer_ft_in1k": {"input_size": (3, 384, 384), "crop_pct": 1.0, "interpolation": "bicubic"},
    "squash": {"input_size": (3, 160, 160), "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear"},
}  # fmt: skip


@pytest.mark.parametrize("cfg", list(TIMM_CFGS.values()), ids=list(TIMM_CFGS))
def test_timm_eval_transform_pixel_for_pixel(cfg):
    timm_data = pytest.importorskip("timm.data")
    # timm's validate.py evaluates at the test size: seer reads a pretrained_cfg the same way
    data_config = timm_data.resolve_data_config({}, pretrained_cfg=cfg, use_test_size=True)
    pre = timm_preprocess(cfg)
    assert pre["convention"] == "timm" and pre["resolution"] == data_config["input_size"][-1]
    pp = Preprocess(**pre)
    as_uint8 = timm_data.create_transform(**data_config, use_prefetcher=True)  # stops before ToTensor / Normalize
    _check_exact(pp, lambda img: _hwc(as_uint8(img)), f"timm {cfg}")
    normalized = timm_data.create_transform(**data_config)
    for _, img in IMAGES[:3]:
        _assert_ulps(_model_input(img, pp), normalized(img)[None])


def test_timm_crops_seer_cannot_reproduce_are_refused():
    with pytest.raises(CheckpointError, match="cfg: crop_mode: expected 'center'.*got the string 'border'"):
        timm_preprocess({"crop_mode": "border"}, where="cfg")
    with pytest.raises(CheckpointError, match="crop_mode: expected .*got the string 'squash'"):
        timm_preprocess({"crop_mode": "squash", "crop_pct": 0.9})
    with pytest.raises(CheckpointError, match="input_size: expected a square input"):
        timm_preprocess({"input_size": [3, 224, 288]})


# ----------------------------------------------------------------------------------------------------------------
# HF
# ----------------------------------------------------------------------------------------------------------------
HF_CFGS = {
    "regnet hub style": {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3,
                         "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    "legacy int size, bilinear": {"size": 224, "crop_pct": 0.965, "resample": 2},
    "96 px, no normalization": {"size": {"shortest_edge": 96}, "crop_pct": 0.9, "do_normalize": False},
    "the processor's defaults (384, warp)": {},
    "384 bilinear, no rescale": {"size": {"shortest_edge": 384}, "resample": 2, "do_rescale": False},
    "a null flag reads false": {"size": {"shortest_edge": 160}, "resample": 2, "do_normalize": None},
}  # fmt: skip


def _hf_processor(directory: Path, config: dict | None = None, backend: str = "pil"):
    """``AutoImageProcessor`` for ``directory``, after writing ``config`` as its ``preprocessor_config.json``."""
    transformers = pytest.importorskip("transformers")
    if config is not None:
        (directory / "preprocessor_config.json").write_text(
            json.dumps({"image_processor_type": "ConvNextImageProcessor", **config})
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if int(transformers.__version__.split(".")[0]) >= 5:
            return transformers.AutoImageProcessor.from_pretrained(directory, backend=backend)
        return transformers.AutoImageProcessor.from_pretrained(directory, use_fast=backend == "torchvision")


def _hf_uint8(processor, img: Image.Image) -> np.ndarray:
    return _hwc(processor(img, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("config", list(HF_CFGS.values()), ids=list(HF_CFGS))
def test_hf_image_processor_pil_backend_pixel_for_pixel(tmp_path, config):
    processor = _hf_processor(tmp_path, config)
    pre = hf_preprocess(json.loads((tmp_path / "preprocessor_config.json").read_text()))
    assert pre["convention"] == "hf"
    pp = Preprocess(**pre)
    _check_exact(pp, lambda img: _hf_uint8(processor, img), f"HF {config}")
    for _, img in IMAGES[:3]:  # normalization (and do_rescale / do_normalize folded into mean / std) as HF's
        _assert_ulps(_model_input(img, pp), processor(img, return_tensors="pt")["pixel_values"])


def test_hf_steps_seer_cannot_reproduce_are_refused():
    with pytest.raises(CheckpointError, match="p.json: do_resize: expected true"):
        hf_preprocess({"do_resize": False}, where="p.json")
    with pytest.raises(CheckpointError, match="do_center_crop: expected false or absent"):
        hf_preprocess({"do_center_crop": True, "crop_size": {"height": 200, "width": 200}})
    with pytest.raises(CheckpointError, match="do_normalize: expected true or false, got"):
        hf_preprocess({"do_normalize": "yes"})
    with pytest.raises(CheckpointError, match="rescale_factor: expected a number in"):
        hf_preprocess({"rescale_factor": 0})


def test_hf_torchvision_backend_within_the_stated_tolerance(tmp_path):
    """HF's torchvision backend crops where the PIL one does (``int(margin / 2)``) but resizes with torch's kernels:
    within 2 gray levels (mean under 0.05) where both sides shrink or both grow; a warp that grows one side and shrinks
    the other goes through other torch kernels: mean under 0.5 (up to 20 levels on noise)."""
    pytest.importorskip("torchvision")
    for config in (HF_CFGS["regnet hub style"], HF_CFGS["the processor's defaults (384, warp)"]):
        processor = _hf_processor(tmp_path, config, backend="torchvision")
        name = type(processor).__name__  # transformers 4: ConvNextImageProcessorFast, without a `backend`
        if getattr(processor, "backend", "torchvision" if name.endswith("Fast") else "pil") != "torchvision":
            pytest.skip("this transformers has no torchvision backend for ConvNext")
        pp = Preprocess(**hf_preprocess(json.loads((tmp_path / "preprocessor_config.json").read_text())), exact=True)
        for name, img in IMAGES:
            diff = np.abs(_hf_uint8(processor, img).astype(np.int16) - pp(img).astype(np.int16))
            mixed = pp.resize_mode == "warp" and len({side < pp.resolution for side in img.size}) == 2
            what = (config, name, int(diff.max()), float(diff.mean()))
            assert diff.mean() < 0.5 if mixed else diff.max() <= 2 and diff.mean() < 0.05, what


# ----------------------------------------------------------------------------------------------------------------
# seer's fast path: JPEG draft decoding and box pre-reduction on large images
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def large() -> list[tuple[str, tuple[int, int], bytes]]:
    """scikit-image's photos, upscaled and encoded: JPEGs the draft decodes at reduced scale (601x513 is the worst
    case: 1/2 scale leaves almost no resize for a 256 short side) and a PNG only box pre-reduction shortens."""
    photos = _photos()
    if not photos:
        pytest.skip("scikit-image's photos are the test images (natural content is what the bound is for)")
    out = []
    files = [((601, 513), "JPEG"), ((1600, 1200), "JPEG"), ((777, 3001), "JPEG"), ((2401, 1799), "PNG")]
    for photo in photos:
        for size, fmt in files:
            options = {"quality": 90} if fmt == "JPEG" else {"compress_level": 1}
            buf = io.BytesIO()
            Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC).save(buf, fmt, **options)
            out.append((fmt, size, buf.getvalue()))
    return out


FAST_CASES = {"224": Preprocess(224, 0.875), "224 bilinear": Preprocess(224, 0.965, "bilinear"),
              "384 warp": Preprocess(384, 1.0, resize_mode="warp")}  # fmt: skip


@pytest.mark.parametrize("pp", list(FAST_CASES.values()), ids=list(FAST_CASES))
def test_fast_path_within_the_stated_tolerance(large, pp):
    """What extraction does by default (``pp``: draft decoding, box pre-reduction) against ``exact=True``."""
    exact = replace(pp, exact=True)
    assert exact.draft_size() is None
    for fmt, size, data in large:
        drafted = load_image(data, draft=pp.draft_size())  # what seer.features.inputs decodes
        diff = np.abs(pp(drafted).astype(np.int16) - exact(load_image(data)).astype(np.int16))
        what = (fmt, size, int(diff.max()), float(diff.mean()))
        if fmt == "JPEG":
            assert diff.mean() < 2 and np.percentile(diff, 99) <= 16, what
            assert drafted.size[0] < size[0] or pp.draft_size() > min(size) // 2, what  # drafted where it can be
        else:  # box pre-reduction alone: a downscale of 6x or more
            assert drafted.size == size and 0 < diff.max() <= 8 and diff.mean() < 0.5, what


# ----------------------------------------------------------------------------------------------------------------
# End to end, and the convention travelling with the checkpoint
# ----------------------------------------------------------------------------------------------------------------
def _hf_dir(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    """Random RegNet weights saved by the real library, and the processor file a RegNet hub checkpoint has (224)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = randomize_bn(transformers.RegNetModel(hf_config()))
    model.save_pretrained(tmp_path / "hf")
    _hf_processor(tmp_path / "hf", HF_CFGS["regnet hub style"])
    return model, tmp_path / "hf"


def test_extract_features_equals_hf_processor_and_model(tmp_path):
    """Files in, features out: seer against ``AutoImageProcessor`` + ``RegNetModel`` (random weights saved by HF)."""
    model, hf_dir = _hf_dir(tmp_path)
    processor = _hf_processor(hf_dir)
    photos = _photos()
    # 301x257: short side 257 -> 256, long 299, a margin of 75, where the conventions part. 300x400: a portrait,
    # where PIL's boxed one-call resize runs its passes in the other order (the old default: 1e-3 off here).
    files = []
    for size in [(301, 257), (300, 400)]:
        img = Image.fromarray(photos[0]).resize(size, Image.Resampling.BICUBIC) if photos else _noise(size)
        img.save(tmp_path / f"{size[0]}x{size[1]}.png")
        files.append(str(tmp_path / f"{size[0]}x{size[1]}.png"))
    with torch.no_grad():
        ref = torch.cat(
            [model(**processor(Image.open(f), return_tensors="pt")).pooler_output.flatten(1) for f in files]
        )
    ours = torch.from_numpy(seer.extract_features(files, str(hf_dir)))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    # the crop seer took before (torchvision's rounding) is visibly another input
    trunk = load_trunk(hf_dir)
    before = seer.extract_features(files[0], trunk, preprocess=Preprocess.for_model(trunk, convention="torchvision"))
    assert float((torch.from_numpy(before) - ref[:1]).abs().max()) > 100 * 1e-5 * float(ref.abs().max())


def test_the_convention_survives_save_and_load(tmp_path):
    _, hf_dir = _hf_dir(tmp_path)
    trunk = load_trunk(hf_dir)
    assert trunk.pretrained_cfg["convention"] == "hf" and Preprocess.for_model(trunk).convention == "hf"
    # a seer checkpoint records it, and reads it back
    back = load_trunk(save_trunk(trunk, tmp_path / "t.safetensors"))
    assert back.pretrained_cfg["convention"] == "hf" and Preprocess.for_model(back).convention == "hf"
    # a record written before the key existed still loads: seer's own arithmetic, torchvision's, as it always was
    old = load_trunk(save_trunk(trunk, tmp_path / "old.safetensors", preprocess={"resolution": 160, "crop_pct": 0.9}))
    assert old.pretrained_cfg["convention"] == "torchvision" and old.pretrained_cfg["resolution"] == 160
    # each format's own
    assert load_trunk(save_trunk(trunk, tmp_path / "regnety_032.pth", format="timm")).pretrained_cfg[
        "convention"] == "timm"  # fmt: skip
    assert load_trunk(save_trunk(trunk, tmp_path / "tv.pth", format="torchvision")).pretrained_cfg[
        "convention"] == "torchvision"  # fmt: skip
    # an HF export's processor file gives HF's processor seer's pixels
    exported = save_trunk(trunk, tmp_path / "export", format="hf")
    pp = Preprocess.for_model(load_trunk(exported))
    assert pp.convention == "hf"
    processor = _hf_processor(exported)
    for name, img in IMAGES[:4]:
        np.testing.assert_array_equal(pp(img), _hf_uint8(processor, img), err_msg=name)
    # a convention seer does not know is an error naming the key
    save_trunk(trunk, tmp_path / "bad.safetensors", preprocess={"convention": "pil"})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: 'preprocess' metadata: convention: expected one of"):
        load_trunk(tmp_path / "bad.safetensors")
