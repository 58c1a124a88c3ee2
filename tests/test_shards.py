"""Tests for seer.data.shards: writing (folder, lists, datasets, atomicity), URL expansion, the training and
evaluation streams, and every kind of bad data."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from seer.data.shards import (
    eval_loader,
    expand_urls,
    make_nodesplitter,
    read_index,
    train_loader,
    write_shards,
)

# --------------------------------------------------------------------------------------------------------------------
# helpers


def _jpeg(rng: np.random.Generator, h: int = 24, w: int = 32, value: int | None = None) -> bytes:
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A trivial transform: fixed-size float tensor (multi-crop is tested with the transforms module)."""
    arr = np.asarray(img.resize((16, 16)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def mean_value(img: Image.Image) -> torch.Tensor:
    """Identifies the image by its mean pixel value (images are written as flat colours)."""
    return torch.tensor(float(np.asarray(img).mean()))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes x 7 JPEGs + 1 PNG, plus a stray text file and a corrupt .jpg that the writer must skip."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i in range(7):
            (root / name / f"img{i}.jpg").write_bytes(_jpeg(rng, 24 + i, 30 + c))
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / name / "extra.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    return root


def _members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tf:
        return tf.getnames()


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


def _sample(key: str, rng, label: int | None = 0, image: bytes | None = None, ext: str = "jpg") -> dict:
    s = {"__key__": key, ext: image if image is not None else _jpeg(rng)}
    if label is not None:
        s["cls"] = str(label).encode()
    return s


# --------------------------------------------------------------------------------------------------------------------
# writing


def test_write_folder_index_and_members(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    index = write_shards(image_folder, out, max_samples_per_shard=5, progress=False)
    assert index["total"] == 24 and index["class_names"] == ["cat", "dog", "eel"]
    assert index["num_skipped"] == 1 and index["skipped"][0]["source"].endswith("broken.jpg")
    assert [s["samples"] for s in index["shards"]] == [5, 5, 5, 5, 4]
    assert index["pattern"] == "data-{000000..000004}.tar"
    # and the marker that makes the directory a seer shards output (seer.io.prepare_output_dir)
    assert sorted(p.name for p in out.iterdir()) == [
        ".seer-output.json",
        *(f"data-{i:06d}.tar" for i in range(5)),
        "index.json",
    ]
    assert json.loads((out / "index.json").read_text())["total"] == 24
    names = _members(out / "data-000000.tar")
    assert names[:4] == ["0000000000.cls", "0000000000.json", "0000000000.png", "0000000001.cls"]  # extra.png first
    # bytes are stored as they are, with the label and the source path
    with tarfile.open(out / "data-000000.tar") as tf:
        assert tf.extractfile("0000000001.jpg").read() == (image_folder / "cat" / "img0.jpg").read_bytes()
        meta = json.loads(tf.extractfile("0000000001.json").read())
    assert meta["path"].endswith("cat/img0.jpg") and meta["label"] == 0 and meta["class"] == "cat"
    assert meta["index"] == 1 and (meta["width"], meta["height"]) == (30, 24)


def test_write_refuses_nonempty_and_overwrite_removes_stale(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    write_shards(image_folder, out, max_samples_per_shard=3, progress=False)
    assert len(list(out.glob("*.tar"))) == 8
    # a previous write_shards output (marked) is replaced without overwrite=True; its stale shards go
    write_shards(image_folder, out, max_samples_per_shard=6, progress=False)
    assert len(list(out.glob("*.tar"))) == 4
    (out / "README").write_text("keep me")  # now it also holds a file of the user's
    with pytest.raises(FileExistsError, match="not empty"):
        write_shards(image_folder, out, progress=False)
    index = write_shards(image_folder, out, max_samples_per_shard=100, overwrite=True, progress=False)
    assert index["num_shards"] == 1
    assert sorted(p.name for p in out.iterdir()) == [".seer-output.json", "README", "data-000000.tar", "index.json"]
    assert (out / "README").read_text() == "keep me"


def test_write_max_bytes_and_shuffle(image_folder: Path, tmp_path: Path) -> None:
    index = write_shards(image_folder, tmp_path / "a", max_bytes_per_shard=4000, progress=False)
    assert index["num_shards"] > 2 and index["total"] == 24
    shuffled = write_shards(image_folder, tmp_path / "b", shuffle=True, seed=3, progress=False)
    keys = [n.split(".")[0] for n in _members(tmp_path / "b" / "data-000000.tar")[::3]]
    assert sorted(keys) != keys and len(set(keys)) == 24  # shuffled order, keys still the source indices
    assert shuffled["shuffled"] is True


def test_parallel_workers_write_identical_shards(image_folder: Path, tmp_path: Path) -> None:
    write_shards(image_folder, tmp_path / "w1", max_samples_per_shard=10, workers=1, progress=False)
    write_shards(image_folder, tmp_path / "w2", max_samples_per_shard=10, workers=2, progress=False)
    for i in range(3):
        name = f"data-{i:06d}.tar"
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_write_file_lists(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(4):
        (img_dir / f"{i}.jpg").write_bytes(_jpeg(rng))
    (tmp_path / "list.csv").write_text("filepath,label\n" + "".join(f"imgs/{i}.jpg,{'ab'[i % 2]}\n" for i in range(4)))
    index = write_shards(tmp_path / "list.csv", tmp_path / "csv", progress=False)
    assert index["class_names"] == ["a", "b"] and index["total"] == 4
    (tmp_path / "list.txt").write_text("# comment\n\nimgs/0.jpg 5\n")
    index = write_shards(tmp_path / "list.txt", tmp_path / "txt", progress=False)
    assert index["total"] == 1 and index["class_names"] is None
    with tarfile.open(tmp_path / "txt" / "data-000000.tar") as tf:
        assert tf.extractfile("0000000000.cls").read() == b"5"
    (tmp_path / "nolabels.txt").write_text("imgs/1.jpg\nimgs/2.jpg\n")
    write_shards(tmp_path / "nolabels.txt", tmp_path / "nl", progress=False)
    batches = list(eval_loader(tmp_path / "nl", to_tensor, batch_size=8))
    assert batches[0][1].tolist() == [-1, -1]  # unlabeled lists are written with label -1
    (tmp_path / "missing.csv").write_text("imgs/0.jpg,1\nimgs/404.jpg,2\n")
    index = write_shards(tmp_path / "missing.csv", tmp_path / "miss", progress=False)
    assert index["total"] == 1 and "404.jpg" in index["skipped"][0]["source"]


def test_write_torchvision_datasets(image_folder: Path, tmp_path: Path) -> None:
    from torchvision.datasets import FakeData, ImageFolder

    fake = FakeData(size=6, image_size=(3, 20, 28), num_classes=3, random_offset=0)
    index = write_shards(fake, tmp_path / "fake", progress=False)
    assert index["total"] == 6 and index["source_kind"] == "dataset"
    assert all(n.split(".")[1] in ("cls", "png", "json") for n in _members(tmp_path / "fake" / "data-000000.tar"))
    images, labels, keys, indices = next(
        iter(eval_loader(tmp_path / "fake", None, batch_size=6, collate_fn=lambda b: tuple(zip(*b))))
    )
    assert [np.asarray(im).tolist() for im in images] == [np.asarray(fake[i][0]).tolist() for i in range(6)]
    assert list(labels) == [int(fake[i][1]) for i in range(6)] and list(indices) == list(range(6))

    folder = ImageFolder(image_folder, is_valid_file=lambda p: not p.endswith("broken.jpg"))
    index = write_shards(folder, tmp_path / "folder", progress=False)
    assert index["source_kind"] == "folder" and index["class_names"] == ["cat", "dog", "eel"] and index["total"] == 24


def test_max_image_side_downscales(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    Image.fromarray(np.zeros((300, 200, 3), np.uint8)).save(root / "big.png")
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(root / "small.png")
    write_shards(root, tmp_path / "out", max_image_side=64, progress=False)
    with tarfile.open(tmp_path / "out" / "data-000000.tar") as tf:
        big = Image.open(io.BytesIO(tf.extractfile("0000000000.jpg").read()))
        assert max(big.size) == 64 and json.loads(tf.extractfile("0000000000.json").read())["reencoded"]
        assert tf.extractfile("0000000001.png").read() == (root / "small.png").read_bytes()


class _Interrupting(torch.utils.data.Dataset):
    def __init__(self, n: int, stop_at: int):
        self.n, self.stop_at, self.rng = n, stop_at, np.random.default_rng(0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.stop_at:
            raise KeyboardInterrupt
        return Image.fromarray(np.full((8, 8, 3), i, np.uint8)), i % 2


def test_interrupted_write_leaves_no_partial_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_shards(_Interrupting(20, stop_at=13), out, max_samples_per_shard=5, progress=False)
    # the two finished shards are complete and final; the third (3 samples in) was discarded; no index
    # (and the marker, which lists them: the next write_shards replaces this output without overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".seer-output.json", "data-000000.tar", "data-000001.tar"]
    for p in out.glob("*.tar"):
        assert len(_members(p)) == 15
    with pytest.raises(FileNotFoundError, match="no index.json"):
        expand_urls(out)


def test_write_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        write_shards(tmp_path / "does-not-exist", tmp_path / "o", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        write_shards(tmp_path / "empty", tmp_path / "o", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable image"):
        write_shards(tmp_path / "bad", tmp_path / "o2", progress=False)
    assert not list((tmp_path / "o2").iterdir())


def test_cli(image_folder: Path, tmp_path: Path, capsys) -> None:
    from seer.cli import main

    assert (
        main(
            ["shards", str(image_folder), str(tmp_path / "o"), "--max-samples", "10", "--workers", "2", "--no-progress"]
        )
        == 0
    )
    assert "wrote 24 samples in 3 shards" in capsys.readouterr().out
    # its own previous output is replaced; a directory that also holds a file of the user's is refused
    assert main(["shards", str(image_folder), str(tmp_path / "o"), "--no-progress"]) == 0
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert main(["shards", str(image_folder), str(tmp_path / "o"), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["shards", f"tv:ImageFolder:{image_folder}", str(tmp_path / "tv"), "--no-progress"]) == 0
    assert read_index(tmp_path / "tv")["class_names"] == ["cat", "dog", "eel"]


# --------------------------------------------------------------------------------------------------------------------
# URLs


def test_expand_urls(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    write_shards(image_folder, out, max_samples_per_shard=5, progress=False)
    names = [str(out / f"data-{i:06d}.tar") for i in range(5)]
    assert expand_urls(str(out / "data-{000000..000004}.tar")) == names
    assert expand_urls(str(out / "data-*.tar")) == names
    assert expand_urls(out) == names == expand_urls(out / "index.json") == read_index(out)["urls"]
    assert expand_urls(f"file://{out}/data-{{000000..000001}}.tar") == names[:2]
    assert expand_urls([names[0], str(out / "data-00000[34].tar")]) == [names[0], names[3], names[4]]
    assert expand_urls(f"{names[0]}::{names[1]}") == names[:2]
    assert expand_urls("pipe:cat /x/data-{0..2}.tar") == [f"pipe:cat /x/data-{i}.tar" for i in range(3)]
    assert expand_urls("https://host/d-{00..01}.tar") == ["https://host/d-00.tar", "https://host/d-01.tar"]
    pattern = str(tmp_path / "nothing-{000..009}.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_urls(pattern)
    with pytest.raises(FileNotFoundError, match=r"data-\*\.tiff"):
        expand_urls(str(out / "data-*.tiff"))
    with pytest.raises(FileNotFoundError, match="2 file.s. do not exist"):
        expand_urls(str(out / "data-{000003..000006}.tar"))
    with pytest.raises(FileNotFoundError, match="missing-pattern"):
        train_loader(str(tmp_path / "missing-pattern-{0..3}.tar"), to_tensor, batch_size=2, steps_per_epoch=1)
    with pytest.raises(FileNotFoundError, match="missing-eval"):
        eval_loader(str(tmp_path / "missing-eval.tar"), to_tensor, batch_size=2)


def test_pipe_urls_stream(image_folder: Path, tmp_path: Path) -> None:
    write_shards(image_folder, tmp_path / "s", max_samples_per_shard=10, progress=False)
    urls = f"pipe:cat {tmp_path}/s/data-{{000000..000002}}.tar"
    keys = [k for _, _, ks, _ in eval_loader(urls, to_tensor, batch_size=7) for k in ks]
    assert len(keys) == 24 == len(set(keys))
    failing = eval_loader(["pipe:false", f"pipe:cat {tmp_path}/nothing.tar"], to_tensor, batch_size=4)
    assert list(failing) == [] and failing.stats["by_kind"] == {"unreadable_shard": 2}


# --------------------------------------------------------------------------------------------------------------------
# streams


@pytest.fixture
def colour_shards(tmp_path: Path) -> str:
    """60 flat-colour images (value = 2 * index) in uneven shards: 25, 20, 10, 4, 1."""
    rng = np.random.default_rng(0)
    out, start = tmp_path / "colour", 0
    out.mkdir()
    for s, n in enumerate([25, 20, 10, 4, 1]):
        samples = []
        for i in range(start, start + n):
            sample = _sample(f"{i:010d}", rng, label=i % 3, image=_jpeg(rng, 8, 8, value=2 * i))
            sample["json"] = json.dumps({"index": i}).encode()
            samples.append(sample)
        _write_tar(out / f"data-{s:06d}.tar", samples)
        start += n
    return str(out / "data-*.tar")  # hand-made shards have no index.json: read them through a pattern


def _train_values(urls, **kw) -> list[list[float]]:
    loader = train_loader(urls, mean_value, batch_size=4, steps_per_epoch=6, shuffle_buffer=20, **kw)
    return [[round(v) for v in x.tolist()] for x, _ in loader]


def test_train_stream_equal_steps_and_reproducible(colour_shards: str) -> None:
    urls = colour_shards
    a = _train_values(urls, seed=1)
    assert len(a) == 6 and all(len(b) == 4 for b in a)
    assert _train_values(urls, seed=1) == a  # same seed, same stream
    assert _train_values(urls, seed=2) != a
    resumed = _train_values(urls, seed=1, start_step=6)
    assert resumed != a and _train_values(urls, seed=1, start_step=6) == resumed  # resumed: reproducible, new data
    assert _train_values(urls, seed=1, num_workers=2) == _train_values(urls, seed=1, num_workers=2)
    for r in range(3):  # every rank of an uneven split gets exactly the step count
        assert len(_train_values(urls, seed=1, rank=r, world_size=3, num_workers=2)) == 6


def random_draws(img: Image.Image) -> torch.Tensor:
    """A stand-in for random augmentations: draws from the torch and python RNGs."""
    import random

    return torch.tensor([torch.rand(()).item(), random.random()])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmentation_rngs_reproducible_and_distinct_per_worker(colour_shards: str, num_workers: int) -> None:
    def draws(**kw) -> list[float]:
        loader = train_loader(colour_shards, random_draws, batch_size=4, steps_per_epoch=4, num_workers=num_workers,
                              seed=3, **kw)  # fmt: skip
        return [v for x, _ in loader for v in x.flatten().tolist()]

    first = draws()
    assert draws() == first  # same (seed, rank, worker, step): same augmentations
    assert len(set(first)) == len(first)  # no two samples (or workers) share random draws
    assert set(draws(start_step=4)).isdisjoint(first)


def test_train_loader_passes_continue_and_keep_caller_rng(colour_shards: str) -> None:
    loader = train_loader(colour_shards, mean_value, batch_size=5, steps_per_epoch=3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = [x.tolist() for x, _ in loader]
    assert torch.equal(torch.rand(3), expected)  # num_workers=0 does not disturb the caller's RNG
    second = [x.tolist() for x, _ in loader]
    assert len(loader) == 3 and loader.step == 6 and first != second
    assert loader.stats["batches"] == 6 and loader.stats["samples"] == 30


def test_train_multicrop_style_collation(colour_shards: str) -> None:
    def two_crops(img: Image.Image) -> list[torch.Tensor]:
        return [to_tensor(img), to_tensor(img)[:, :8, :8]]

    crops, labels = next(iter(train_loader(colour_shards, two_crops, batch_size=4, steps_per_epoch=1)))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16), (4, 3, 8, 8)] and labels.shape == (4,)


def test_eval_stream_each_key_once_with_index_and_label(colour_shards: str) -> None:
    seen = {}
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            for images, labels, keys, indices in eval_loader(
                colour_shards, mean_value, batch_size=7, rank=rank, world_size=world_size, num_workers=2
            ):
                for v, y, k, i in zip(images.tolist(), labels.tolist(), keys, indices.tolist()):
                    seen.setdefault(world_size, []).append(k)
                    assert int(k) == i and y == i % 3 and abs(v - 2 * i) <= 2
    for keys in seen.values():
        assert sorted(keys) == [f"{i:010d}" for i in range(60)]


def test_nodesplitter() -> None:
    parts = [list(make_nodesplitter(r, 3)(range(10))) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


# --------------------------------------------------------------------------------------------------------------------
# bad data


@pytest.fixture
def bad_shards(tmp_path: Path) -> dict:
    """Shards with every kind of corruption; returns the directory, the good keys and the bad sample keys."""
    rng = np.random.default_rng(0)
    out = tmp_path / "bad"
    out.mkdir()
    good = [f"a{i:03d}" for i in range(12)]
    samples = [_sample(k, rng, label=i % 2) for i, k in enumerate(good[:6])]
    samples.insert(2, _sample("corrupt", rng, image=_jpeg(rng)[:40] + b"\x00" * 20))  # truncated JPEG data
    samples.insert(4, {"__key__": "textonly", "txt": b"a stray non-image member"})
    samples.insert(6, _sample("nolabel", rng, label=None))
    _write_tar(out / "data-000000.tar", samples)
    _write_tar(out / "data-000001.tar", [_sample(k, rng, label=1) for k in good[6:]])
    # truncated: a copy of a good shard cut in the middle of its 4th sample's image
    _write_tar(out / "full.tmp", [_sample(f"t{i:03d}", rng, label=0) for i in range(6)])
    data = (out / "full.tmp").read_bytes()
    (out / "full.tmp").unlink()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        cut = next(m for m in tf.getmembers() if m.name == "t003.jpg").offset_data + 100
    (out / "data-000002.tar").write_bytes(data[:cut])
    _write_tar(out / "data-000003.tar", [])  # a valid tar with no members
    (out / "data-000004.tar").write_bytes(b"")  # a 0-byte file
    return {
        "dir": out,
        "pattern": str(out / "data-{000000..000004}.tar"),
        "good": set(good) | {"t000", "t001", "t002"},
        "bad_keys": {"corrupt", "textonly", "nolabel"},
        "kinds": {"corrupt_image", "no_image", "missing_label", "bad_tar", "empty_shard"},
    }


def test_eval_reports_skipped_keys(bad_shards: dict) -> None:
    for num_workers in (0, 2):
        loader = eval_loader(bad_shards["pattern"], to_tensor, batch_size=4, num_workers=num_workers)
        keys = [k for _, _, ks, _ in loader for k in ks]
        assert sorted(keys) == sorted(bad_shards["good"])
        assert set(loader.skipped_keys) >= bad_shards["bad_keys"]
        kinds = loader.stats["by_kind"]
        assert set(kinds) >= bad_shards["kinds"] and kinds["empty_shard"] == 2
        assert any(r["kind"] == "bad_tar" and r["url"].endswith("data-000002.tar") for r in loader.skipped)
        # the truncated sample t003 lost its image: reported too, with its key
        assert "t003" in loader.skipped_keys


def test_eval_missing_labels_optional(bad_shards: dict) -> None:
    loader = eval_loader(bad_shards["dir"] / "data-000000.tar", to_tensor, batch_size=16, require_label=False)
    (_, labels, keys, _) = next(iter(loader))
    assert dict(zip(keys, labels.tolist()))["nolabel"] == -1


def test_train_skips_and_counts(bad_shards: dict, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="seer.data")
    loader = train_loader(bad_shards["pattern"], to_tensor, batch_size=4, steps_per_epoch=25, num_workers=2, seed=0)
    batches = list(loader)
    assert len(batches) == 25 and all(x.shape == (4, 3, 16, 16) for x, _ in batches)
    stats = loader.stats
    assert set(stats["by_kind"]) == bad_shards["kinds"] and stats["skipped"] == sum(stats["by_kind"].values())
    assert stats["samples"] == 100
    assert any("skipped so far" in r.getMessage() for r in caplog.records)  # the end-of-pass summary


def test_warnings_are_rate_limited(bad_shards: dict, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="seer.data")
    loader = train_loader(bad_shards["pattern"], to_tensor, batch_size=4, steps_per_epoch=60, seed=0)
    list(loader)
    per_sample = [r for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert loader.stats["skipped"] > 20 and len(per_sample) == 5


@pytest.mark.timeout(120)
def test_all_bad_stream_fails_instead_of_hanging(bad_shards: dict) -> None:
    only_bad = [str(bad_shards["dir"] / f"data-00000{i}.tar") for i in (3, 4)]
    with pytest.raises(ValueError, match="no readable sample.*bad_tar.*empty_shard"):
        train_loader(only_bad, to_tensor, batch_size=2, steps_per_epoch=2, max_consecutive_skips=50)

    def broken(img):
        raise AttributeError("bug in the transform")

    loader = train_loader(bad_shards["pattern"], broken, batch_size=2, steps_per_epoch=2, max_consecutive_skips=30)
    with pytest.raises(RuntimeError, match="bug in the transform"):
        list(loader)


# --------------------------------------------------------------------------------------------------------------------
# two processes (ranks): uneven shards, equal steps; eval over 2 ranks x 2 workers


def _rank_main(rank: int, world_size: int, urls: str, out_dir: str) -> None:
    # A spawned process inherits "spawn" as its default start method; ranks started by torchrun or SLURM use the
    # platform default (fork on Linux), which also keeps this test fast.
    mp.set_start_method("fork", force=True)
    loader = train_loader(
        urls, to_tensor, batch_size=4, steps_per_epoch=7, rank=rank, world_size=world_size, num_workers=2, seed=5
    )
    steps = [len(y) for _, y in loader] + [len(y) for _, y in loader]  # two passes
    evl = eval_loader(urls, to_tensor, batch_size=5, rank=rank, world_size=world_size, num_workers=2)
    keys = [k for _, _, ks, _ in evl for k in ks]
    result = {"steps": steps, "keys": keys, "step": loader.step}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_two_ranks_equal_steps_and_eval_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shard_dir = tmp_path / "uneven"
    shard_dir.mkdir()
    start = 0
    for s, n in enumerate([40, 3, 17]):  # rank 0 gets shards 0 and 2 (57 samples), rank 1 gets shard 1 (3 samples)
        _write_tar(shard_dir / f"data-{s:06d}.tar", [_sample(f"{i:010d}", rng, i % 4) for i in range(start, start + n)])
        start += n
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, str(shard_dir / "data-*.tar"), str(tmp_path))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in results] == [[4] * 14, [4] * 14] and [r["step"] for r in results] == [14, 14]
    keys = results[0]["keys"] + results[1]["keys"]
    assert sorted(keys) == [f"{i:010d}" for i in range(60)]
    assert len(results[0]["keys"]) == 57 and len(results[1]["keys"]) == 3
    assert all(p.exitcode == 0 for p in procs)


def test_rank_comes_from_arguments_not_the_environment(colour_shards: str, monkeypatch) -> None:
    """webdataset's own splitters read RANK/WORLD_SIZE and torch.distributed; ours use only the arguments."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    keys = [
        k for _, _, ks, _ in eval_loader(colour_shards, mean_value, batch_size=64, rank=0, world_size=1) for k in ks
    ]
    assert len(keys) == 60
    data = Path(__file__).parents[1] / "seer" / "data"
    files = [*sorted((data / "shards").glob("*.py")), data / "sources.py"]
    assert len(files) >= 4  # the shards package (write, read, cli) and sources
    for path in files:
        src = path.read_text()
        assert "import torch.distributed" not in src and "from torch.distributed" not in src


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_pipelines_pickle_into_spawned_workers(colour_shards: str) -> None:
    """spawn / forkserver (Python 3.14's default) pickle the pipeline into the workers."""
    loader = train_loader(colour_shards, to_tensor, batch_size=4, steps_per_epoch=3, num_workers=2,
                          multiprocessing_context="spawn")  # fmt: skip
    assert [tuple(x.shape) for x, _ in loader] == [(4, 3, 16, 16)] * 3
    evl = eval_loader(colour_shards, to_tensor, batch_size=16, num_workers=2, multiprocessing_context="spawn")
    assert sorted(k for _, _, ks, _ in evl for k in ks) == [f"{i:010d}" for i in range(60)]


def test_verify_shards(image_folder: Path, bad_shards: dict, tmp_path: Path, capsys) -> None:
    from seer.cli import main
    from seer.data.shards import verify_shards

    out = tmp_path / "good"
    write_shards(image_folder, out, max_samples_per_shard=10, progress=False)
    report = verify_shards(out, decode=True, progress=False)
    assert report["ok"] and report["total"] == 24 and [s["expected"] for s in report["shards"]] == [10, 10, 4]
    # a shard cut exactly between two samples still reads as a valid tar: only the index count reveals it
    data = (out / "data-000001.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        cut = next(m for m in tf.getmembers() if m.name.endswith(".cls") and m.name != tf.getnames()[0]).offset
    (out / "data-000001.tar").write_bytes(data[:cut])
    report = verify_shards(out, workers=2, progress=False)
    assert [p["kind"] for p in report["problems"]] == ["count_mismatch"] and report["total"] == 24 - 9
    assert main(["shards", "verify", str(out), "--no-progress"]) == 1
    assert "count_mismatch" in capsys.readouterr().out

    report = verify_shards(bad_shards["pattern"], decode=True, progress=False)
    assert {p["kind"] for p in report["problems"]} == bad_shards["kinds"] and report["total"] == 15
