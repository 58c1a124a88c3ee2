"""The training stream: every sample once per epoch, unlabeled data, exact resume at any number of workers."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from seer.data.shards import train_loader
from seer.data.shards.epochs import Layout, count_tar_samples, epoch_plan


def _jpeg(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def mean_value(img: Image.Image) -> torch.Tensor:
    return torch.tensor(float(np.asarray(img).mean()))


def random_draw(img: Image.Image) -> torch.Tensor:
    """A stand-in for random augmentations."""
    return torch.rand(())


@pytest.fixture
def unlabeled_shards(tmp_path: Path) -> str:
    """128 images written by webdataset's own ShardWriter as {"__key__", "jpg"} only: no label, no index."""
    out = tmp_path / "wds"
    out.mkdir()
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=25, verbose=0) as sink:
        for i in range(128):
            sink.write({"__key__": f"img{i:04d}", "jpg": _jpeg(i)})
    return str(out / "train-*.tar")


def _run(urls, n_steps: int, **kw) -> tuple[list[list[str]], object]:
    kw.setdefault("require_label", False)
    loader = train_loader(urls, kw.pop("transform", mean_value), batch_size=kw.pop("batch_size", 8),
                          steps_per_epoch=n_steps, **kw)  # fmt: skip
    keys = []
    for _ in loader:
        keys.append(list(loader.last_keys))
    return keys, loader


# --------------------------------------------------------------------------------------------------------------------
# the layout


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    world=st.integers(1, 5),
    streams=st.integers(1, 4),
    epoch=st.integers(0, 3),
)
def test_layout_every_sample_once_per_epoch(counts: list[int], world: int, streams: int, epoch: int) -> None:
    if sum(counts) < world * streams:
        with pytest.raises(ValueError, match="cannot feed"):
            Layout(tuple(counts), world, streams)
        return
    lay = Layout(tuple(counts), world, streams, seed=7)
    seen = []
    for r in range(world):
        for s in range(streams):
            size = lay.stream_size(r, s)
            cut = size // 2  # two reads of one stream give the same pieces as one read
            pieces = lay.pieces(epoch, r, s, 0, cut) + lay.pieces(epoch, r, s, cut, size)
            seen += [(u, i) for u, a, b in pieces for i in range(a, b)]
    assert sorted(seen) == [(u, i) for u, c in enumerate(counts) for i in range(c)]
    sizes = [b - a for a, b in (lay.rank_range(r) for r in range(world))]
    assert max(sizes) - min(sizes) <= 1  # equal shares, whatever the shard sizes
    plan = epoch_plan(lay, 4)
    assert plan["samples"] == sum(counts) and plan["samples_per_rank"] == [min(sizes), max(sizes)]


def test_layout_permutes_shards_per_epoch_and_offsets_follow_steps() -> None:
    lay = Layout(tuple([10] * 20), 2, 3, seed=1)
    orders = [tuple(lay.unit_order(e)) for e in range(4)]
    assert len(set(orders)) == 4 and all(sorted(o) == list(range(20)) for o in orders)
    assert lay.offsets_at_step(7, 4) == [12, 8, 8]  # steps 0,3,6 -> stream 0; 1,4 -> 1; 2,5 -> 2
    assert Layout(lay.counts, 2, 3, seed=2).fingerprint != lay.fingerprint


# --------------------------------------------------------------------------------------------------------------------
# unlabeled data: ShardWriter shards, a tar of plain .jpg files, an image folder


def test_unlabeled_shardwriter_shards_one_epoch_each_image_once(unlabeled_shards: str) -> None:
    keys, loader = _run(unlabeled_shards, 16)  # 128 images / 8 per step
    flat = [k for b in keys for k in b]
    assert sorted(flat) == [f"img{i:04d}" for i in range(128)]
    assert loader.coverage() == {0: {"seen": 128, "skipped": 0, "of": 128, "complete": True}}
    assert loader.stats["skipped"] == 0
    keys2, _ = _run(unlabeled_shards, 32)  # the second epoch: all again, in another order
    second = [k for b in keys2[16:] for k in b]
    assert sorted(second) == sorted(flat) and second != flat


def test_labels_still_required_when_asked(unlabeled_shards: str) -> None:
    loader = train_loader(unlabeled_shards, mean_value, batch_size=4, steps_per_epoch=1, max_consecutive_skips=20)
    with pytest.raises(RuntimeError, match="missing_label"):
        list(loader)


def test_plain_tar_of_jpgs_and_image_folder(tmp_path: Path) -> None:
    files = tmp_path / "photos"
    (files / "sub").mkdir(parents=True)
    for i in range(20):
        (files / ("sub" if i % 2 else "") / f"p{i:02d}.jpg").write_bytes(_jpeg(i * 10))
    tar_path = tmp_path / "plain.tar"
    with tarfile.open(tar_path, "w") as tar:  # what `tar cf plain.tar *.jpg` makes: no keys, labels or index
        for p in sorted(files.rglob("*.jpg")):
            tar.add(p, arcname=p.name)
    assert count_tar_samples(tar_path) == (20, None)
    keys, _ = _run(str(tar_path), 5, batch_size=4)
    assert sorted(k for b in keys for k in b) == sorted(f"p{i:02d}" for i in range(20))
    # a flat image folder: no shards written first
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(12):
        (flat / f"q{i}.png").write_bytes(_jpeg(i))  # JPEG bytes under a .png name: decoded by content
    keys, loader = _run(None, 3, batch_size=4, images=str(flat))
    assert sorted(k for b in keys for k in b) == sorted(f"q{i}.png" for i in range(12))
    assert loader.coverage()[0]["complete"]
    # a file list
    (tmp_path / "list.txt").write_text("\n".join(f"flat/q{i}.png" for i in range(0, 12, 2)))
    keys, _ = _run(None, 3, batch_size=2, images=str(tmp_path / "list.txt"))
    assert len({k for b in keys for k in b}) == 6


# --------------------------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("workers", [(0, 2), (2, 0), (2, 1)])
def test_resume_from_position_same_samples_at_other_worker_counts(unlabeled_shards: str, workers) -> None:
    before, after = workers
    full, _ = _run(unlabeled_shards, 23, num_workers=before, streams=2, shuffle_buffer=10, transform=random_draw)
    head, loader = _run(unlabeled_shards, 9, num_workers=before, streams=2, shuffle_buffer=10)
    pos = json.loads(json.dumps(loader.position()))  # it goes through a checkpoint as plain data
    assert head == full[:9]
    resumed = train_loader(unlabeled_shards, mean_value, batch_size=8, steps_per_epoch=14, num_workers=after,
                           position=pos, require_label=False, shuffle_buffer=10)  # fmt: skip
    keys = []
    for _ in resumed:
        keys.append(resumed.last_keys)
    assert keys == full[9:] and "restored" in resumed.resume_note
    assert resumed.layout.streams == 2  # kept from the position, not from the worker count


def test_resume_without_position_derives_it_from_the_step(unlabeled_shards: str) -> None:
    full, _ = _run(unlabeled_shards, 20, streams=3, shuffle_buffer=7)
    tail, _ = _run(unlabeled_shards, 7, streams=3, shuffle_buffer=7, start_step=13)
    assert tail == full[13:]


def test_augmentations_follow_the_sample_not_the_worker(unlabeled_shards: str) -> None:
    def draws(**kw) -> list[float]:
        loader = train_loader(unlabeled_shards, random_draw, batch_size=8, steps_per_epoch=6, require_label=False,
                              streams=2, **kw)  # fmt: skip
        return [v for x, _ in loader for v in x.tolist()]

    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    first = draws(num_workers=0)
    assert torch.equal(torch.rand(2), expected)  # num_workers=0 leaves the caller's RNG alone
    assert draws(num_workers=2) == first and len(set(first)) == len(first)


def test_bad_samples_counted_and_resume_exact(tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    out.mkdir()
    with wds.ShardWriter(str(out / "m-%06d.tar"), maxcount=16, verbose=0) as sink:
        for i in range(64):
            sink.write({"__key__": f"s{i:03d}", "jpg": _jpeg(i) if i % 9 else b"not a jpeg"})
    urls = str(out / "m-*.tar")
    full, loader = _run(urls, 20, batch_size=4, streams=2, shuffle_buffer=5)  # into the second epoch
    assert loader.coverage()[0] == {"seen": 56, "skipped": 8, "of": 64, "complete": True}  # 8 bad ones counted
    assert set(loader.stats["by_kind"]) == {"corrupt_image"}
    head, part = _run(urls, 5, batch_size=4, streams=2, shuffle_buffer=5)
    resumed = train_loader(urls, mean_value, batch_size=4, steps_per_epoch=15, position=part.position(),
                           require_label=False, num_workers=2, shuffle_buffer=5)  # fmt: skip
    keys = []
    for _ in resumed:
        keys.append(resumed.last_keys)
    assert keys == full[5:]


def test_changed_data_or_world_size_is_said(unlabeled_shards: str) -> None:
    _, loader = _run(unlabeled_shards, 3, streams=2)
    pos = loader.position()
    other = train_loader(unlabeled_shards, mean_value, batch_size=4, steps_per_epoch=1, world_size=2, rank=0,
                         position={**pos, "world_size": 2}, require_label=False)  # fmt: skip
    assert "not restored" in other.resume_note and "batch" in other.resume_note
    other = train_loader(unlabeled_shards, mean_value, batch_size=8, steps_per_epoch=1, world_size=2, rank=1,
                         position=pos, require_label=False)  # fmt: skip
    assert "world size 1, now 2" in other.resume_note and other.step == 3


def test_index_and_verify_report_coverage(unlabeled_shards: str, capsys) -> None:
    from seer.cli import main

    assert main(["shards", "index", unlabeled_shards]) == 0
    folder = str(Path(unlabeled_shards).parent)
    assert (Path(folder) / "index.json").is_file()
    assert main(["shards", "index", unlabeled_shards]) == 2  # exists: not replaced silently
    capsys.readouterr()
    assert main(["shards", "verify", folder, "--no-progress", "--world-size", "2", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "128 good samples (128 without a label" in out
    assert "each of the 128 good samples once per epoch (64-64 per rank" in out and "8.0 steps per epoch" in out
    assert main(["shards", "verify", folder, "--no-progress", "--labels"]) == 1


# --------------------------------------------------------------------------------------------------------------------
# two ranks x two workers: one epoch, every image exactly once


def _rank_main(rank: int, urls: str, out_dir: str) -> None:
    mp.set_start_method("fork", force=True)
    loader = train_loader(urls, mean_value, batch_size=8, steps_per_epoch=8, rank=rank, world_size=2, num_workers=2,
                          seed=3, require_label=False)  # fmt: skip
    keys = [list(loader.last_keys) for _ in loader]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"keys": keys, "coverage": loader.coverage()}))


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_two_ranks_two_workers_one_epoch_every_image_once(unlabeled_shards: str, tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, unlabeled_shards, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r["keys"]) for r in results] == [8, 8]  # the same step count on both ranks
    every = [k for r in results for b in r["keys"] for k in b]
    assert sorted(every) == [f"img{i:04d}" for i in range(128)]  # 128 = 2 ranks x 8 steps x 8: each image once
    assert [r["coverage"]["0"]["complete"] for r in results] == [True, True]


# --------------------------------------------------------------------------------------------------------------------
# seer pretrain on an image folder


def test_pretrain_on_an_image_folder(tmp_path: Path, tiny_overrides, capsys) -> None:
    from seer.config import load_config
    from seer.train.loop import pretrain

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):  # unlabeled, varied sizes, no shards written first
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.jpg")
    run = tmp_path / "run"
    base = [o for o in tiny_overrides if not o.startswith(("data.crops", "data.image_size", "data.batch"))]
    cfg = load_config(None, [*base, "data.source=images", f"data.images={folder}", "data.multicrop=cpu_tiny",
                             "data.batch_size_per_gpu=4", "train.total_steps=8", "train.log_every=2",
                             "optim.warmup_iters=1", "data.record_keys=true", f"run_dir={run}"])  # fmt: skip
    summary = pretrain(cfg)
    out = capsys.readouterr().out
    assert summary["step"] == 8 and np.isfinite(summary["loss"]) and summary["data_skipped"]["skipped"] == 0
    assert "data: 24 samples in image files" in out and "epoch 0 done: 24 samples seen, 0 skipped" in out
    records = [json.loads(line) for line in (run / "data_keys" / "rank00000.jsonl").read_text().splitlines()]
    first_epoch = [k for r in records[:6] for k in r["keys"]]  # 6 steps x 4 = the 24 images
    assert sorted(first_epoch) == [f"p{i:02d}.jpg" for i in range(24)]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["epoch"] == pytest.approx(8 * 4 / 24)
