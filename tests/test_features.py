"""extract_features / extract_dataset / `seer extract`: inputs of every kind, order, bad input, files on disk."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seer import hardware
from seer.features import (
    FeatureArray,
    ImageError,
    Preprocess,
    cli_main,
    extract_dataset,
    extract_features,
    load_feature_file,
    load_image,
    merge_features,
)
from seer.models.regnet import RegNetCfg, build_trunk
from seer.weights import save_trunk

RES = 32


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(0)
    t = build_trunk(RegNetCfg.from_stages([8, 16, 24, 32], [1, 1, 2, 1], [8, 8, 8, 8])).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in t.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
    t.pretrained_cfg = {"resolution": RES, "crop_pct": 0.875, "interpolation": "bicubic"}
    return t


@pytest.fixture(scope="module")
def model_file(trunk, tmp_path_factory):
    return str(save_trunk(trunk, tmp_path_factory.mktemp("model") / "tiny.safetensors"))


def random_images(n: int, seed: int = 0, size=(48, 36)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)  # smooth-ish content
        out.append(Image.fromarray(base).resize(size, Image.Resampling.BILINEAR))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two class subfolders of PNGs (lossless, so file and in-memory features agree)."""
    root = tmp_path_factory.mktemp("folder")
    paths = []
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir()
        for i, img in enumerate(random_images(7, seed=10 + c)):
            p = root / name / f"{i:02d}.png"
            img.save(p)
            paths.append(str(p))
    return root, paths


# ----------------------------------------------------------------------------------------------------------------
# Input kinds and order
# ----------------------------------------------------------------------------------------------------------------
def test_every_input_kind_gives_the_same_features(trunk, tmp_path):
    imgs = random_images(5)
    ref = extract_features(imgs, trunk)
    assert ref.shape == (5, 32) and ref.dtype == np.float32 and type(ref) is np.ndarray
    paths = []
    for i, img in enumerate(imgs):
        img.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    arrays = [np.asarray(i) for i in imgs]
    tensors = [torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays]
    encoded = [p.read_bytes() for p in paths]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(imgs)

        def __getitem__(self, i):
            return imgs[i], i

    for variant in (
        [str(p) for p in paths],
        paths,
        encoded,
        arrays,
        np.stack(arrays),
        tensors,
        torch.stack(tensors),
        [t.float() / 255 for t in tensors],
        (img for img in imgs),
        DS(),
        tmp_path,  # a folder: its image files, sorted
    ):
        got = extract_features(variant, trunk)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=type(variant).__name__)


def test_matches_the_trunk_on_torchvision_preprocessing(trunk):
    """Crop geometry and normalization: our one-call resize+crop equals torchvision's Resize + CenterCrop."""
    from torchvision import transforms

    imgs = random_images(4, size=(96, 64))
    tv = transforms.Compose([
        transforms.Resize(int(RES / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(RES),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    x = torch.stack([tv(i) for i in imgs])
    pixels = np.stack([Preprocess(resolution=RES)(i) for i in imgs]).astype(np.float32)
    tv_pixels = np.stack([np.asarray(transforms.CenterCrop(RES)(transforms.Resize(36, interpolation=3)(i)))
                          for i in imgs]).astype(np.float32)  # fmt: skip
    assert np.abs(pixels - tv_pixels).mean() < 2.0  # resampling rounding only (0..255 scale)
    with torch.no_grad():
        expected = trunk(x).numpy()
    got = extract_features(imgs, trunk)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.03


def test_order_is_kept_with_workers_and_small_batches(trunk, folder):
    _, paths = folder
    ref = extract_features(paths, trunk, batch_size=64, num_workers=0)
    got = extract_features(paths, trunk, batch_size=3, num_workers=2)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # each row is its own image's features
    np.testing.assert_allclose(extract_features(paths[5], trunk)[0], ref[5], rtol=1e-5, atol=1e-6)


def test_layers_and_normalize(trunk):
    imgs = random_images(3)
    dims = {layer: extract_features(imgs, trunk, layer=layer).shape[1] for layer in ("res2", "res3", "res4", "res5")}
    assert dims == {"res2": 8, "res3": 16, "res4": 24, "res5": 32}
    np.testing.assert_allclose(extract_features(imgs, trunk, layer="res5"), extract_features(imgs, trunk), rtol=1e-6)
    x = torch.randn(3, 3, RES, RES)
    with torch.no_grad():
        res3 = trunk.forward_stages(x)["res3"].mean((2, 3)).numpy()
    np.testing.assert_allclose(extract_features(x, trunk, layer="res3", preprocess=False), res3, rtol=1e-5, atol=1e-6)
    normed = extract_features(imgs, trunk, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="layer must be one of"):
        extract_features(imgs, trunk, layer="res7")


def test_amp_bf16_on_cpu_gives_close_float32_features(trunk, fused_conv_spy):
    """Where oneDNN has bf16 kernels (forced, on any CPU) amp="bf16" runs the trunk's convs in bf16."""
    imgs = random_images(4)
    ref = extract_features(imgs, trunk)
    with hardware.force("cpu_bf16", True):
        out = extract_features(imgs, trunk, amp="bf16")
    assert torch.bfloat16 in fused_conv_spy
    assert out.dtype == np.float32 and out.shape == ref.shape and np.isfinite(out).all()
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.999
    assert not np.array_equal(out, ref)  # the bf16 path really ran (fp32 convs would give identical features)


def test_amp_bf16_on_a_cpu_without_onednn_bf16_runs_fp32_with_one_warning(trunk, fused_conv_spy):
    """Where oneDNN has no bf16 kernels (forced, on any CPU) amp="bf16" still works: fp32, and one line says why."""
    imgs = random_images(4)
    ref = extract_features(imgs, trunk)
    hardware._WARNED.clear()
    with hardware.force("cpu_bf16", False):
        with pytest.warns(RuntimeWarning, match="no oneDNN bf16 kernels.*running in fp32"):
            out = extract_features(imgs, trunk, amp="bf16")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process, not once per call
            again = extract_features(imgs, trunk, amp="bf16")
    assert set(fused_conv_spy) == {torch.float32}
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(again, ref)


def test_cpu_micro_batches_give_the_same_features(trunk, monkeypatch):
    """Large batches run in micro-batches on CPU (allocator-friendly); the features do not change."""
    from seer.features.runner import _Runner

    imgs = random_images(7)
    ref = extract_features(imgs, trunk)
    monkeypatch.setattr(_Runner, "micro_batch", lambda self, images: 2)
    np.testing.assert_allclose(extract_features(imgs, trunk), ref, rtol=1e-5, atol=1e-6)
    big = build_trunk("regnety_800mf", device="meta")
    monkeypatch.undo()
    runner = _Runner(big, torch.device("cpu"), Preprocess(), "avgpool", False, None)
    assert runner.micro_batch(torch.zeros(32, 224, 224, 3, dtype=torch.uint8)) == 9  # 64 x 112 x 112 fp32 < 30 MB


def test_inference_forward_equals_the_trunk_at_every_layer(trunk, monkeypatch):
    """Extraction (BN folded once and cached by the trunk, fused post-ops) computes what the trunk computes, at
    every layer, and so does a trunk too big to cache its folded weights."""
    import seer.models.regnet as R

    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        stages = trunk.forward_stages(x)
        np.testing.assert_allclose(extract_features(x, trunk, preprocess=False), trunk(x).numpy(), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
        for layer in ("res2", "res3", "res4"):
            expected = stages[layer].mean((2, 3)).numpy()
            got = extract_features(x, trunk, preprocess=False, layer=layer)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    ref = extract_features(x, trunk, preprocess=False)
    monkeypatch.setattr(R, "FOLD_CACHE_MAX_BYTES", 0)  # too big to cache: the trunk folds on the fly
    big = build_trunk(trunk.cfg).eval()
    big.load_state_dict(trunk.state_dict())
    assert not any(getattr(m, "cache_fold", False) for m in big.modules())
    np.testing.assert_allclose(extract_features(x, big, preprocess=False), ref, rtol=1e-5, atol=1e-6)


def test_pooled_features_use_the_trunk_feature_api_and_stop_early(trunk):
    """One pooling for every layer; a stage layer runs the trunk only up to that stage."""
    from seer.features import pool, pooled_features

    x = torch.randn(2, 3, 40, 40)
    ran = []
    hooks = [stage.blocks[0].register_forward_hook(lambda *_, n=name: ran.append(n))
             for name, stage in zip(trunk.stage_names, trunk.stages)]  # fmt: skip
    try:
        with torch.no_grad():
            stages = trunk.forward_stages(x)
            ran.clear()
            got = pooled_features(trunk, x, ("res3", "avgpool"))
            assert ran == ["res2", "res3", "res4", "res5"]  # avgpool needs the last stage: one pass for both
            ran.clear()
            extract_features(x, trunk, preprocess=False, layer="res3")
            assert ran == ["res2", "res3"]  # res4 and res5 are never computed
        torch.testing.assert_close(got["res3"], pool(stages["res3"]))
        torch.testing.assert_close(got["avgpool"], trunk(x), rtol=1e-5, atol=1e-6)
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match="res9"):
        pooled_features(trunk, x, ("res9",))


def test_preprocess_false_takes_model_ready_tensors(trunk):
    x = torch.randn(4, 3, 40, 40)
    with torch.no_grad():
        expected = trunk(x).numpy()
    np.testing.assert_allclose(extract_features(x, trunk, preprocess=False), expected, rtol=1e-5, atol=1e-6)


def test_preprocessing_follows_the_checkpoint_and_overrides(trunk, model_file):
    assert Preprocess.for_model(trunk).resolution == RES
    assert Preprocess.for_model(trunk, resolution=40, crop_pct=1.0).resize_size == 40
    imgs = random_images(2)
    a = extract_features(imgs, model_file)  # the file records its preprocessing (32 px)
    np.testing.assert_allclose(a, extract_features(imgs, trunk), rtol=1e-5, atol=1e-6)
    b = extract_features(imgs, model_file, resolution=64)
    assert not np.allclose(a, b)
    warp = Preprocess(resolution=RES, resize_mode="warp")(imgs[0])
    assert warp.shape == (RES, RES, 3)


def test_user_model_mode_and_device_are_left_alone(trunk):
    trunk.train()
    try:
        extract_features(random_images(2), trunk)
        assert trunk.training
    finally:
        trunk.eval()


def test_other_modules_work_with_avgpool():
    timm = pytest.importorskip("timm")
    m = timm.create_model("regnety_002", pretrained=False, num_classes=0).eval()
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        expected = m(x).numpy()
    np.testing.assert_allclose(extract_features(x, m, preprocess=False), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Image modes
# ----------------------------------------------------------------------------------------------------------------
def _png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def test_grayscale_rgba_palette_16bit_exif_give_correct_rgb(trunk):
    rgb = random_images(1, size=(40, 30))[0]
    gray8 = rgb.convert("L")
    # grayscale -> three equal channels
    np.testing.assert_array_equal(np.asarray(load_image(gray8)), np.repeat(np.asarray(gray8)[..., None], 3, axis=2))
    # RGBA (opaque) -> the RGB pixels
    rgba = rgb.copy()
    rgba.putalpha(255)
    np.testing.assert_array_equal(np.asarray(load_image(_png_bytes(rgba))), np.asarray(rgb))
    # palette -> its colors
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    np.testing.assert_array_equal(np.asarray(load_image(_png_bytes(pal))), np.asarray(pal.convert("RGB")))
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    assert load_image(_png_bytes(pal_t, transparency=0)).mode == "RGB"
    # 16-bit grayscale PNG: scaled to 8 bits, not clipped (PIL's own convert would saturate everything > 255)
    g16 = np.asarray(gray8).astype(np.uint16) * 257
    png16 = _png_bytes(Image.fromarray(g16))
    assert Image.open(io.BytesIO(png16)).mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(load_image(png16))[..., 0], np.asarray(gray8))
    np.testing.assert_array_equal(np.asarray(load_image(g16))[..., 0], np.asarray(gray8))  # uint16 arrays too
    # EXIF orientation 6 (rotate 90 CW to display): stored rotated, loaded upright
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = rgb.transpose(Image.Transpose.ROTATE_90)
    upright = load_image(_png_bytes(stored, exif=exif.tobytes()))
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(rgb))
    # and the features agree
    ref = extract_features([rgb, gray8.convert("RGB")], trunk)
    got = extract_features([_png_bytes(stored, exif=exif.tobytes()), png16], trunk)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_jpeg_draft_decoding_stays_close(tmp_path):
    """A 400x300 JPEG for a 32 px crop is decoded at 1/8 scale (DCT domain); pixels stay close to a full decode."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((400, 300), 3)
    smooth.save(tmp_path / "big.jpg", quality=95)
    pp = Preprocess(resolution=RES)
    drafted = load_image(tmp_path / "big.jpg", draft=pp.draft_size())
    assert drafted.size == (50, 38)  # decoded at 1/8
    full = pp(load_image(tmp_path / "big.jpg")).astype(np.float32)
    assert np.abs(pp(drafted).astype(np.float32) - full).mean() < 2.5  # on the 0..255 scale


def test_exact_is_the_exact_preprocess_and_differs_where_the_jpeg_is_drafted(trunk, model_file, tmp_path, capsys):
    """``exact=True`` (and `seer extract --exact`) is ``preprocess=Preprocess.for_model(trunk, exact=True)``; on a
    JPEG the default path draft-decodes (400x300 for a 32 px crop: 1/8 scale) its features differ."""
    rng = np.random.default_rng(1)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((400, 300), 3)
    path = tmp_path / "big.jpg"
    smooth.save(path, quality=95)
    assert load_image(path, draft=Preprocess.for_model(trunk).draft_size()).size == (50, 38)  # drafting applies
    exact = extract_features([path], trunk, exact=True)
    np.testing.assert_array_equal(
        exact, extract_features([path], trunk, preprocess=Preprocess.for_model(trunk, exact=True))
    )
    fast = extract_features([path], trunk)
    assert not np.allclose(fast, exact, rtol=1e-3, atol=1e-4), np.abs(fast - exact).max()
    # a Preprocess given with exact=True: that one, exact
    np.testing.assert_array_equal(extract_features([path], trunk, preprocess=Preprocess.for_model(trunk), exact=True),
                                  exact)  # fmt: skip
    with pytest.raises(ValueError, match="preprocess=False"):
        extract_features(torch.zeros(1, 3, RES, RES), trunk, preprocess=False, exact=True)
    with pytest.raises(ValueError, match="exact must be True or False"):
        extract_features([path], trunk, exact="yes")

    # extract_dataset and `seer extract --exact`: the same features; exact is a setting a resume must repeat
    listing = tmp_path / "files.txt"
    listing.write_text(f"{path}\n")
    for flags, out, want in (([], "fast", fast), (["--exact"], "exact", exact)):
        argv = [str(listing), str(tmp_path / out), "--model", model_file, "--dtype", "float32", "--no-progress", *flags]
        assert cli_main(argv) == 0, capsys.readouterr().err
        np.testing.assert_allclose(load_feature_file(tmp_path / out)["features"], want, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "exact" / "meta.json").read_text())["preprocess"]["exact"] is True
    capsys.readouterr()
    assert cli_main([str(listing), str(tmp_path / "fast"), "--model", model_file, "--exact"]) == 2
    assert "preprocess" in capsys.readouterr().err
    summary = extract_dataset([str(path)], tmp_path / "api", trunk, exact=True, dtype="float32", progress=False)
    assert summary["merged"]
    np.testing.assert_allclose(load_feature_file(tmp_path / "api")["features"], exact, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def test_corrupt_image_raises_naming_the_file_or_is_skipped(trunk, folder, tmp_path):
    _, paths = folder
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(paths[0]).read_bytes()[:60])
    inputs = [paths[0], str(bad), paths[1], str(truncated), str(tmp_path / "missing.png"), paths[2]]
    with pytest.raises(ImageError, match="broken.jpg"):
        extract_features(inputs, trunk)
    out = extract_features(inputs, trunk, on_error="skip")
    assert isinstance(out, FeatureArray) and out.shape == (3, 32)
    assert out.indices.tolist() == [0, 2, 5]
    assert [s["index"] for s in out.skipped] == [1, 3, 4]
    assert [Path(s["input"]).name for s in out.skipped] == ["broken.jpg", "truncated.png", "missing.png"]
    np.testing.assert_allclose(np.asarray(out), extract_features([paths[0], paths[1], paths[2]], trunk), rtol=1e-5)


def test_clear_errors_for_wrong_inputs(trunk):
    with pytest.raises(ValueError, match="empty input"):
        extract_features([], trunk)
    with pytest.raises(ValueError, match="empty input"):
        extract_features(iter([]), trunk)
    with pytest.raises(ValueError, match="empty tensor batch"):
        extract_features(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), trunk)
    with pytest.raises(ValueError, match=r"CHW .* got shape \(8, 8\)"):
        extract_features([torch.zeros(8, 8, dtype=torch.uint8)], trunk)
    with pytest.raises(ValueError, match=r"got shape \(5, 8, 8\)"):
        extract_features(torch.zeros(5, 8, 8, dtype=torch.uint8), trunk)
    with pytest.raises(TypeError, match="int32"):
        extract_features([torch.zeros(3, 8, 8, dtype=torch.int32)], trunk)
    with pytest.raises(TypeError, match="float64|uint8"):
        extract_features([np.zeros((8, 8, 3), dtype=np.float64)], trunk)
    with pytest.raises(ValueError, match="preprocess=False"):
        extract_features([torch.randn(3, 8, 8)], trunk)
    with pytest.raises(TypeError, match="cannot read a dict"):
        extract_features([{"image": 1}], trunk)
    with pytest.raises(TypeError, match="cannot iterate over a int"):
        extract_features(42, trunk)
    with pytest.raises(ValueError, match="on_error"):
        extract_features(random_images(1), trunk, on_error="ignore")
    with pytest.raises(TypeError, match="model must be"):
        extract_features(random_images(1), model=3)


def test_unknown_checkpoint_format_is_a_clear_error(tmp_path):
    from seer.weights import CheckpointError

    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        extract_features(random_images(1), model=str(tmp_path / "other.pth"))


def test_default_model_offline_is_a_clear_error(tmp_path):
    code = (
        "import numpy as np, seer\n"
        "try:\n    seer.extract_features([np.zeros((8, 8, 3), np.uint8)])\n"
        "except Exception as e:\n    print('ERR', type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR CheckpointError" in out.stdout and "facebook/regnet-y-320-seer" in out.stdout, out.stdout + out.stderr
    assert "local directory" in out.stdout


# ----------------------------------------------------------------------------------------------------------------
# Dataset-scale features on disk
# ----------------------------------------------------------------------------------------------------------------
def test_two_ranks_every_sample_once_in_order(trunk, folder, tmp_path):
    root, paths = folder
    ref = extract_features(paths, trunk)
    out = tmp_path / "feats"
    s0 = extract_dataset(root, out, trunk, rank=0, world_size=2, chunk_size=3, dtype="float32", num_workers=0)
    assert "merged" not in s0 and not (out / "features.npy").exists()
    s1 = extract_dataset(root, out, trunk, rank=1, world_size=2, chunk_size=3, dtype="float32", num_workers=0)
    assert s1["merged"]["rows"] == len(paths)
    got = load_feature_file(out)
    np.testing.assert_allclose(got["features"], ref, rtol=1e-5, atol=1e-6)
    assert got["indices"].tolist() == list(range(len(paths)))
    assert got["labels"].tolist() == [0] * 7 + [1] * 7
    assert got["inputs"] == paths and got["class_names"] == ["cat", "dog"]
    assert np.load(out / "features.npy", mmap_mode="r").shape == (14, 32)  # plain .npy, faiss/numpy-readable
    assert not list(out.rglob("*.tmp"))


def test_resume_recomputes_only_missing_chunks(trunk, folder, tmp_path):
    root, paths = folder
    out = tmp_path / "feats"
    extract_dataset(root, out, trunk, chunk_size=4, num_workers=0)
    chunks = sorted((out / "chunks").glob("*.npz"))
    assert len(chunks) == 4
    stamps = {p: p.stat().st_mtime_ns for p in chunks}
    chunks[2].unlink()  # an interrupted run: one chunk never written
    (out / "chunks" / "r00000.done.json").unlink()
    summary = extract_dataset(root, out, trunk, chunk_size=4, num_workers=0)
    assert summary["chunks_written"] == 1
    assert all(p.stat().st_mtime_ns == stamps[p] for p in chunks if p != chunks[2])
    got = load_feature_file(out, mmap=False)
    np.testing.assert_allclose(got["features"].astype(np.float32), extract_features(paths, trunk), rtol=2e-3, atol=2e-3)
    assert got["features"].dtype == np.float16
    with pytest.raises(ValueError, match="different run.*layer"):
        extract_dataset(root, out, trunk, chunk_size=4, layer="res3")


def test_dataset_skips_corrupt_and_safetensors_format(trunk, folder, tmp_path):
    _, paths = folder
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\t{i % 3}\n" for i, p in enumerate([paths[0], str(bad), paths[1]])))
    out = tmp_path / "feats"
    extract_dataset(listing, out, trunk, format="safetensors", num_workers=0)
    got = load_feature_file(out)
    assert got["features"].shape == (2, 32) and got["indices"].tolist() == [0, 2]
    assert got["labels"].tolist() == [0, 2]
    assert [s["index"] for s in got["skipped"]] == [1] and "bad.png" in got["skipped"][0]["input"]
    from safetensors.numpy import load_file

    assert set(load_file(str(out / "features.safetensors"))) == {"features", "indices", "labels"}


def test_merge_checks_coverage(trunk, folder, tmp_path):
    root, _ = folder
    out = tmp_path / "feats"
    extract_dataset(root, out, trunk, world_size=2, rank=0, chunk_size=4, num_workers=0)
    with pytest.raises(RuntimeError, match=r"ranks \[1\]"):
        merge_features(out)
    with pytest.raises(RuntimeError, match="not been merged"):
        load_feature_file(out)


def test_shards_two_ranks(trunk, folder, tmp_path):
    from seer.data.shards import write_shards

    root, paths = folder
    write_shards(root, tmp_path / "shards", max_samples_per_shard=4, progress=False, workers=1)
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    assert len(urls) >= 2
    out = tmp_path / "feats"
    for rank in (0, 1):
        extract_dataset(urls, out, trunk, rank=rank, world_size=2, chunk_size=3, dtype="float32", num_workers=0)
    got = load_feature_file(out)
    assert got["indices"].tolist() == list(range(len(paths)))
    assert got["labels"].tolist() == [0] * 7 + [1] * 7
    np.testing.assert_allclose(got["features"], extract_features(paths, trunk), rtol=1e-4, atol=1e-5)


def test_cli_folder_and_file_list(model_file, folder, tmp_path, capsys):
    root, paths = folder
    assert cli_main([str(root), str(tmp_path / "a"), "--model", model_file, "--chunk-size", "5", "--no-progress"]) == 0
    a = load_feature_file(tmp_path / "a")
    assert a["features"].shape == (14, 32) and a["inputs"] == paths
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(paths[:3]) + "\n")
    args = [str(listing), str(tmp_path / "b"), "--model", model_file, "--dtype", "float32", "--no-progress"]
    assert cli_main(args) == 0
    b = load_feature_file(tmp_path / "b")
    assert b["labels"].tolist() == [-1, -1, -1]
    np.testing.assert_allclose(b["features"], a["features"][:3].astype(np.float32), rtol=2e-3, atol=2e-3)
    assert cli_main([str(tmp_path / "nothing"), str(tmp_path / "c"), "--model", model_file]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_cli_two_processes(model_file, folder, tmp_path):
    root, paths = folder
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "seer.cli", "extract", str(root), str(out), "--model", model_file, "--world-size",
           "2", "--chunk-size", "3", "--dtype", "float32", "--workers", "0", "--no-progress"]  # fmt: skip
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()
    assert "merged" in json.loads((out / "meta.json").read_text())  # the last rank to finish merged
    got = load_feature_file(out)
    assert got["indices"].tolist() == list(range(len(paths))) and got["inputs"] == paths


@pytest.mark.gpu
def test_cuda_autocast(trunk):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    imgs = random_images(8)
    ref = extract_features(imgs, trunk, device="cpu")
    for amp in (None, "bf16", "fp16"):
        got = extract_features(imgs, trunk, device="cuda", amp=amp)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < (1e-4 if amp is None else 3e-2)
    trunk.cpu()
