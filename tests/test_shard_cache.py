"""The shard-sample cache of the training stream (``_TarUnits``, issue 32): later epochs replay a piece's samples
instead of parsing its tar again. The stream must be the same, sample for sample, with the cache on or off, across
epochs and through a resume, and the cache must stay under its cap."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from seer.data.shards import train_loader
from seer.data.shards.read import SkipLog
from seer.data.shards.train import _TarUnits
from seer.data.transforms import DECODE_CACHE_ENV, MultiCrop, collate_multicrop


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path: Path) -> str:
    out = tmp_path / "wds"
    out.mkdir()
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=20, verbose=0) as sink:
        for i in range(60):
            sink.write({"__key__": f"img{i:04d}", "png": _png(i), "cls": str(i % 3).encode()})
    return str(out / "train-{000000..000002}.tar")


def _stream(urls: str, steps: int, **kw) -> tuple[list, list, object]:
    transform = MultiCrop(counts=(2,), sizes=(16,), scales=((0.35, 1.0),), blur_p=0.0, flip_p=0.5, batch_color=True)
    loader = train_loader(urls, transform, batch_size=8, seed=3, shuffle_buffer=20, collate_fn=collate_multicrop,
                          steps_per_epoch=steps, **kw)  # fmt: skip
    keys, crops = [], []
    for (batch, _labels), _ in zip(loader, range(steps)):
        keys.append(list(loader.last_keys))
        crops.append(batch)
    return keys, crops, loader


def test_cache_replays_the_same_stream(shards, monkeypatch):
    monkeypatch.setenv(DECODE_CACHE_ENV, "0")
    keys_off, crops_off, _ = _stream(shards, 30)  # 4 epochs of 7.5 steps
    monkeypatch.setenv(DECODE_CACHE_ENV, "64")
    keys_on, crops_on, _ = _stream(shards, 30)
    assert keys_on == keys_off
    for a, b in zip(crops_off, crops_on):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # every sample once per epoch, with the cache as without
    flat = [k for step in keys_on for k in step]
    assert sorted(flat[:60]) == [f"img{i:04d}" for i in range(60)]


def test_cache_keeps_exact_resume(shards, monkeypatch):
    monkeypatch.setenv(DECODE_CACHE_ENV, "64")
    keys_all, crops_all, _ = _stream(shards, 24)
    _, _, first = _stream(shards, 13)  # stops inside the second epoch, its cache warm
    keys_rest, crops_rest, _ = _stream(shards, 11, position=first.position())
    assert keys_rest == keys_all[13:]
    for a, b in zip(crops_all[13:], crops_rest):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_units_cache_hits_and_cap(shards):
    urls = [shards.replace("{000000..000002}", f"{i:06d}") for i in range(3)]
    units = _TarUnits(urls, 2**20, cache_bytes=2**20)
    skips = SkipLog()
    first = list(units.read(0, 0, 20, skips))
    assert units.cache_used > 0 and len(units._cache) == 1
    units.close()
    again = list(units.read(0, 0, 20, skips))  # served from the cache: no file is opened
    assert [s["__key__"] for s in again] == [s["__key__"] for s in first] and units._open is None
    assert all(a["png"] == b["png"] for a, b in zip(first, again))

    tiny = _TarUnits(urls, 2**20, cache_bytes=1000)  # under one piece's bytes: nothing kept
    list(tiny.read(0, 0, 20, skips))
    assert tiny.cache_used == 0 and not tiny._cache
    off = _TarUnits(urls, 2**20)  # cache_bytes=0: off
    list(off.read(0, 0, 20, skips))
    assert not off._cache


def test_cache_skips_a_short_piece(tmp_path):
    # A shard that ends before its count says (2 samples, read as 3): the piece yields a missing_sample error and is
    # not kept, so every later epoch reports it again, as without the cache.
    path = tmp_path / "short-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.png", _png(0)), ("b.png", _png(1))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    units = _TarUnits([str(path)], 2**20, cache_bytes=2**20)
    for _ in range(2):
        out = list(units.read(0, 0, 3, SkipLog()))
        assert [type(x).__name__ for x in out] == ["dict", "dict", "SampleError"]
        assert not units._cache
    assert len(list(units.read(0, 0, 2, SkipLog()))) == 2 and len(units._cache) == 1  # the whole piece: kept
