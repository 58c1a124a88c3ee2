"""The small-image speed-ups of ``MultiCrop`` (issue 32): colour operations batched in ``collate_multicrop``
(``batch_color``) and the decode-once cache (``DecodeCache``). Neither may change the random draws, and both must
give the pixels of the plain per-crop path."""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from seer.data import transforms as tr
from seer.data.transforms import DecodeCache, MultiCrop, PendingCrop, collate_multicrop, decode_cache_bytes


def _png(seed: int, size: int = 32, gray: bool = False) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    if gray:  # r == g == b: the hue rotation's ties and zero chroma
        a[:] = a[:, :, :1]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(seed: int, size: int) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


IMAGES = [_png(i, gray=i % 5 == 0) for i in range(24)]


def _batches(preset: str, batch_color: bool, decode_cache: int, images=IMAGES, **kw) -> tuple[list, float]:
    """Two passes over ``images`` (the second one hits the cache), collated; the rng's next draw after them."""
    rng = random.Random(7)
    mc = MultiCrop.from_preset(preset, rng=rng, batch_color=batch_color, decode_cache=decode_cache, **kw)
    out = [collate_multicrop([(mc(x), i) for i, x in enumerate(images)])[0] for _ in range(2)]
    return out, rng.random()


@pytest.mark.parametrize("preset", ["small", "small_flip", "demo", "cpu_tiny"])
def test_batched_colour_equals_per_crop_path(preset):
    # cpu_tiny blurs half its crops: those are finished per crop, the rest batched, in one collated tensor
    plain, next_plain = _batches(preset, batch_color=False, decode_cache=0)
    batched, next_batched = _batches(preset, batch_color=True, decode_cache=0)
    assert next_plain == next_batched  # the same random draws, in the same order
    for a_pass, b_pass in zip(plain, batched):
        for a, b in zip(a_pass, b_pass):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
            assert b.is_contiguous()
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_batched_colour_uint8_output():
    plain, _ = _batches("small_flip", batch_color=False, decode_cache=0, normalize=False)
    batched, _ = _batches("small_flip", batch_color=True, decode_cache=0, normalize=False)
    for a, b in zip(plain[0], batched[0]):
        assert b.dtype == torch.uint8
        assert (a.int() - b.int()).abs().max() <= 1  # rounding of values within float error of .5


def test_pending_crops_only_with_batch_color():
    mc = MultiCrop.from_preset("small", rng=random.Random(0), decode_cache=0)
    assert all(isinstance(c, torch.Tensor) for c in mc(IMAGES[1]))  # the default: finished tensors
    mc = MultiCrop.from_preset("small", rng=random.Random(0), decode_cache=0, batch_color=True)
    crops = mc(IMAGES[1])
    assert all(isinstance(c, PendingCrop) for c in crops)
    threads = torch.get_num_threads()
    single = crops[0].finish()  # computed on one thread, the process's thread count restored
    assert single.shape == (3, 32, 32) and single.dtype == torch.float32
    assert torch.get_num_threads() == threads


def test_batched_ops_follow_each_crops_order():
    # Two crops with the same two operations in opposite orders: brightness then saturation differs from the reverse
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8))
    norm = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), True)  # identity normalization: values in 0..255
    ops_a = (("brightness", 1.4), ("saturation", 0.3))
    out = tr.finish_pending([PendingCrop(pixels, ops_a, False, norm), PendingCrop(pixels, ops_a[::-1], True, norm)])
    planar = pixels.reshape(3, -1).numpy().astype(np.float32)
    want_a = tr._apply_color_ops(planar, ops_a, 0).reshape(3, 8, 8)
    want_b = tr._apply_color_ops(planar, ops_a[::-1], 0).reshape(3, 8, 8)[:, :, ::-1]
    torch.testing.assert_close(out[0], torch.from_numpy(want_a), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1], torch.from_numpy(want_b.copy()), atol=1e-3, rtol=0)
    assert (out[0] - out[1].flip(-1)).abs().max() > 1.0  # the order matters for these two


def test_decode_cache_gives_the_decoded_pixels():
    plain, next_plain = _batches("small", batch_color=True, decode_cache=0)
    cached, next_cached = _batches("small", batch_color=True, decode_cache=2**20)
    assert next_plain == next_cached
    for a_pass, b_pass in zip(plain, cached):
        for a, b in zip(a_pass, b_pass):
            assert torch.equal(a, b)


def test_decode_cache_hits_and_caps():
    mc = MultiCrop.from_preset("small", rng=random.Random(0), decode_cache=2**20)
    for _ in range(3):
        for x in IMAGES[:4]:
            mc(x)
    assert (len(mc.cache), mc.cache.misses, mc.cache.hits) == (4, 4, 8)
    assert mc.cache.used == sum(32 * 32 * 3 + len(x) for x in IMAGES[:4])

    small = MultiCrop.from_preset("small", rng=random.Random(0), decode_cache=2 * (32 * 32 * 3 + 200))
    for x in IMAGES:
        small(x)
    assert 0 < len(small.cache) <= 2 and small.cache.used <= small.cache.max_bytes  # first come, then full

    cache = DecodeCache(2**20, max_item=1000)  # one 32 px RGB image is 3,072 bytes: over the per-image cap
    assert not cache.put(b"x", torch.zeros(3, 32, 32, dtype=torch.uint8), 32, 32) and len(cache) == 0
    assert MultiCrop.from_preset("small", decode_cache=0).cache is None


def test_decode_cache_skips_images_a_draft_decode_could_shrink():
    # A 96 px JPEG under 32 px crops may be decoded at reduced size (its box >= 2x the output): never cached, so a
    # hit can never stand for a differently decoded image. A 40 px one can't be: cached.
    mc = MultiCrop.from_preset("small", rng=random.Random(0), decode_cache=2**20)
    mc(_jpeg(0, 96))
    assert len(mc.cache) == 0
    mc(_jpeg(1, 40))
    assert len(mc.cache) == 1


def test_decode_cache_is_emptied_when_pickled():
    mc = MultiCrop.from_preset("small", rng=None, decode_cache=2**20)
    mc(IMAGES[0])
    copy = pickle.loads(pickle.dumps(mc))  # a DataLoader worker's copy starts empty, with the same caps
    assert len(copy.cache) == 0 and copy.cache.max_bytes == 2**20 and len(mc.cache) == 1


def test_decode_cache_env(monkeypatch):
    monkeypatch.delenv(tr.DECODE_CACHE_ENV, raising=False)
    assert decode_cache_bytes() == 256 * 2**20
    monkeypatch.setenv(tr.DECODE_CACHE_ENV, "1.5")
    assert decode_cache_bytes() == int(1.5 * 2**20)
    assert MultiCrop.from_preset("small").cache.max_bytes == int(1.5 * 2**20)
    monkeypatch.setenv(tr.DECODE_CACHE_ENV, "0")
    assert MultiCrop.from_preset("small").cache is None
    for bad in ("lots", "-1", "inf"):
        monkeypatch.setenv(tr.DECODE_CACHE_ENV, bad)
        with pytest.raises(ValueError, match="SEER_DECODE_CACHE_MB"):
            decode_cache_bytes()
