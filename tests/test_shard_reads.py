"""Shard reads: each shard byte read once per epoch (a stream keeps its shard open across shuffle blocks and seeks to
a mid-shard start by the tar headers), a resume re-reads only the current block of each stream, and shard counts at
start-up are read by rank 0 alone (broadcast to the others; more than 1,000 shards without an index are refused)."""

from __future__ import annotations

import gzip
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

import seer.data.shards.read as read_mod
import seer.data.shards.train as train_mod
from seer.data.shards import train_loader
from seer.data.shards.epochs import count_tar_samples
from seer.data.shards.read import SkipLog, seek_sample, shard_samples

MEMBERS = 2  # members per sample: <key>.jpg and <key>.cls


def _sample_members(key: str, size: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", bytes([len(key) % 251]) * size), (f"{key}.cls", b"3")]


def _write_tar(path: Path, keys: list[str], size: int = 1500, fmt: int = tarfile.GNU_FORMAT, extra=()) -> None:
    """A shard of `keys` (``MEMBERS`` members each); `extra` are ``(position, TarInfo, bytes)`` members put before
    the sample at that position (directories, webdataset's __meta__, ...)."""
    extra = list(extra)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for i, key in enumerate(keys):
            for pos, info, data in extra:
                if pos == i:
                    tar.addfile(info, io.BytesIO(data) if data else None)
            for name, data in _sample_members(key, size):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_shards(out: Path, shards: int, per_shard: int, suffix: str = ".tar") -> str:
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        _write_tar(out / f"data-{s:06d}{suffix}", [f"s{s:03d}i{i:05d}" for i in range(per_shard)])
    return str(out / f"data-*{suffix}")


class _Reads:
    """Counts the tar members parsed (read by ``tar_members``, data included) and the bytes read from shard files
    (through ``open_shard``), by wrapping both in ``seer.data.shards.read``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.members = self.bytes = 0
        real_members, real_open = read_mod.tar_members, read_mod.open_shard
        reads = self

        def tar_members(fileobj, cap):
            for member in real_members(fileobj, cap):
                reads.members += 1
                yield member

        class Counting(io.RawIOBase):
            def __init__(self, f):
                self.f = f

            def readable(self) -> bool:
                return True

            def seekable(self) -> bool:
                return True

            def readinto(self, b) -> int:
                data = self.f.read(len(b))
                reads.bytes += len(data)
                b[: len(data)] = data
                return len(data)

            def seek(self, *args):
                return self.f.seek(*args)

            def tell(self) -> int:
                return self.f.tell()

            def close(self) -> None:
                self.f.close()
                super().close()

        monkeypatch.setattr(read_mod, "tar_members", tar_members)
        monkeypatch.setattr(read_mod, "open_shard", lambda url: io.BufferedReader(Counting(real_open(url))))

    def reset(self) -> None:
        self.members = self.bytes = 0


def _size(b: bytes) -> torch.Tensor:
    return torch.tensor(len(b))


def _loader(pattern: str, rank: int, shuffle: int, **kw):
    kw = {"batch_size": 10, "world_size": 2, "streams": 2, "seed": 3, **kw}
    return train_loader(pattern, _size, rank=rank, shuffle_buffer=shuffle, decode="bytes", require_label=False, **kw)


# --------------------------------------------------------------------------------------------------------------------
# each shard byte once per epoch


# 13 shards of 200 samples over 2 ranks x 2 streams: a stream holds 650 samples (a multiple of the batch of 10 and of
# every block size below), and all but the first stream start mid-shard (650 = 3 x 200 + 50).
SHARDS, PER_SHARD = 13, 200


@pytest.mark.parametrize("ratio", [20, 4, 1])
def test_members_parsed_per_member_used_over_an_epoch(tmp_path, monkeypatch, ratio: int) -> None:
    """Shards `ratio` x the shuffle buffer: over one epoch of both ranks, every sample once, and at most 1.05 members
    parsed (and bytes read) per member used. Before, a stream re-read its shard from the first member for every
    block: x10.6 at a ratio of 20, x2.5 at 4, x1.5 at 1 (this setup's mid-shard stream starts)."""
    pattern = _write_shards(tmp_path / "shards", SHARDS, PER_SHARD)
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "shards").glob("*.tar"))
    reads = _Reads(monkeypatch)
    keys: list[str] = []
    for rank in range(2):
        loader = _loader(pattern, rank, PER_SHARD // ratio)
        for _ in loader:
            keys += loader.last_keys
        assert loader.coverage() == {0: {"seen": 1300, "skipped": 0, "of": 1300, "complete": True}}
    assert sorted(keys) == sorted(f"s{s:03d}i{i:05d}" for s in range(SHARDS) for i in range(PER_SHARD))
    used = len(keys) * MEMBERS
    assert reads.members / used <= 1.05, (reads.members, used)
    assert reads.bytes / shard_bytes <= 1.05, (reads.bytes, shard_bytes)


def test_a_shard_that_cannot_seek_is_still_read_once_per_block(tmp_path, monkeypatch) -> None:
    """Gzipped shards cannot seek: a stream starting mid-shard reads that shard's prefix once, and then continues
    it block after block. Members parsed = members used + the prefixes of the streams' first shards (+ one member of
    look-ahead per stream), not x10 as before."""
    pattern = _write_shards(tmp_path / "gz", SHARDS, PER_SHARD, suffix=".tar.gz")
    reads = _Reads(monkeypatch)
    used = prefixes = 0
    for rank in range(2):
        loader = _loader(pattern, rank, PER_SHARD // 20)
        for _ in loader:
            used += len(loader.last_keys) * MEMBERS
        lay = loader.layout
        prefixes += sum(lay.pieces(0, rank, s, 0, 1)[0][1] for s in range(lay.streams)) * MEMBERS
    assert prefixes > 0  # the layout starts streams mid-shard
    assert used <= reads.members <= used + prefixes + 4, (reads.members, used, prefixes)


def test_a_resume_rereads_only_the_current_block_of_each_stream(tmp_path, monkeypatch) -> None:
    """Resumed mid-block: the first step reads each stream's current block and nothing before it (one member of
    look-ahead per stream), and the resumed run gives the uninterrupted run's batches, each sample once."""
    pattern = _write_shards(tmp_path / "shards", SHARDS, PER_SHARD)
    # after 27 steps stream 0 took 14 batches (56 samples: block 5 + 6), stream 1 13 (52: block 5 + 2), so the next
    # batch of each stream lies in its current block
    block, batch, stop = 10, 4, 27
    reads = _Reads(monkeypatch)
    straight = _loader(pattern, 0, block, batch_size=batch)
    want = []
    for _ in range(2 * 325 // batch):
        straight._next()
        want.append(list(straight.last_keys))
    first = _loader(pattern, 0, block, batch_size=batch)
    for _ in range(stop):
        first._next()
    position = first.position()
    assert all(o % block for o in position["offsets"])  # mid-block in every stream
    reads.reset()
    resumed = _loader(pattern, 0, block, batch_size=batch, position=position)
    resumed._next()
    lay = resumed.layout
    current = sum(min(lay.stream_size(0, s), (o // block + 1) * block) - o // block * block
                  for s, o in enumerate(position["offsets"]))  # fmt: skip
    assert current * MEMBERS <= reads.members <= current * MEMBERS + lay.streams, (reads.members, current)
    got = [list(resumed.last_keys)]
    for _ in range(len(want) - stop - 1):
        resumed._next()
        got.append(list(resumed.last_keys))
    assert got == want[stop:]
    assert resumed.coverage() == straight.coverage()


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    return info


@pytest.mark.parametrize(
    "name, fmt, extra, seeks",
    [
        ("plain.tar", tarfile.GNU_FORMAT, (), True),
        ("gnu_long_names.tar", tarfile.GNU_FORMAT, (), True),
        ("pax_long_names.tar", tarfile.PAX_FORMAT, (), True),
        ("skipped_members.tar", tarfile.GNU_FORMAT,
         [(2, _member("d", kind=tarfile.DIRTYPE), b""), (3, _member("__index__/a.json", b"{}"), b"{}"),
          (5, _member("noext", b"xx"), b"xx")], True),
        ("compressed.tar.gz", tarfile.GNU_FORMAT, (), False),
    ],
)  # fmt: skip
def test_shard_samples_from_any_start_equals_the_tail_of_a_full_read(tmp_path, name, fmt, extra, seeks) -> None:
    """``shard_samples(start=k)`` gives exactly the samples ``k, k+1, ...`` of a full read, whether it seeks by the
    headers (long GNU or pax names, directories, __index__/ and extension-less members in between) or cannot
    (compressed) and reads from the first member."""
    stem = "x" * 120 + "/" if "long" in name else ""
    keys = [f"{stem}k{i:03d}" for i in range(8)]
    path = tmp_path / name
    _write_tar(path, keys, size=700, fmt=fmt, extra=extra)
    full = list(shard_samples(str(path), SkipLog()))
    assert [s["__key__"] for s in full] == keys
    assert count_tar_samples(path) == (len(keys), None)  # the count the layout uses agrees with the reader
    for k in range(len(keys) + 2):
        assert list(shard_samples(str(path), SkipLog(), start=k)) == full[k:], k
        with open(path, "rb") as f:
            assert seek_sample(f, k, 1 << 20) == (seeks and k < len(keys)), k


def test_a_member_named_like_webdataset_metadata_is_counted_as_the_reader_reads_it(tmp_path, monkeypatch) -> None:
    """webdataset (and the reader) skip only ``__name__`` and ``__name__/...`` members: a ``__meta__.json`` is a sample
    (skipped later as ``no_image``). The count takes it too, so the shard's last image is not lost to it (it was:
    counted 2, read 3, and ``b`` never trained)."""
    path = tmp_path / "meta.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["__meta__.json", "__index__/x.json", "__meta__", "a.jpg", "b.jpg"]:
            tar.addfile(_member(name, b"x"), io.BytesIO(b"x"))
    assert count_tar_samples(path) == (3, None)
    assert [s["__key__"] for s in shard_samples(str(path), SkipLog())] == ["__meta__", "a", "b"]
    loader = train_loader(str(path), _size, batch_size=1, steps_per_epoch=2, decode="bytes", require_label=False)
    keys = []
    for _ in loader:
        keys += loader.last_keys
    assert sorted(keys) == ["a", "b"] and loader.stats["skipped"] == 1


def test_a_pax_global_header_or_a_truncated_shard_is_read_from_the_start(tmp_path) -> None:
    """A pax global header applies to the members after it, so a start past it reads from the first member; so
    does a start past a truncation, which reports the broken shard as a full read does."""
    path = tmp_path / "global.tar"
    keys = [f"g{i}" for i in range(5)]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}) as tar:
        for key in keys:
            for member, data in _sample_members(key, 600):
                tar.addfile(_member(member, data), io.BytesIO(data))
    with open(path, "rb") as f:
        assert not seek_sample(f, 3, 1 << 20) and f.tell() == 0
    assert [s["__key__"] for s in shard_samples(str(path), SkipLog(), start=3)] == keys[3:]

    cut = tmp_path / "cut.tar"
    _write_tar(tmp_path / "whole.tar", [f"c{i}" for i in range(6)], size=600)
    data = (tmp_path / "whole.tar").read_bytes()
    cut.write_bytes(data[: 4 * 2560 + 512 + 100])  # inside the data of sample 4 (2,560 bytes a sample)
    full, tail = SkipLog(), SkipLog()
    assert len(list(shard_samples(str(cut), full))) < 5
    assert list(shard_samples(str(cut), tail, start=5)) == []
    assert full.counts == tail.counts and tail.counts["bad_tar"] == 1


# --------------------------------------------------------------------------------------------------------------------
# shard counts at start-up


def _tiny_tar(path: Path, key: str) -> None:
    with tarfile.open(path, "w") as tar:
        tar.addfile(_member(f"{key}.jpg", b"j"), io.BytesIO(b"j"))


def test_more_than_1000_shards_without_an_index_are_refused_before_counting(tmp_path, monkeypatch, capsys,
                                                                             tiny_overrides) -> None:  # fmt: skip
    """`seer pretrain` on 2,000 shards without index.json fails before counting any of them, and the command its
    message gives writes the index, after which the shards' counts come from it (no tar header read)."""
    from seer.data.shards.cli import cli_main as shards_cli
    from seer.train.loop import cli_main

    shards = tmp_path / "many"
    shards.mkdir()
    for i in range(2000):
        _tiny_tar(shards / f"part-{i:05d}.tar", f"p{i:05d}")
    counted = []
    real = train_mod.count_tar_samples
    monkeypatch.setattr(train_mod, "count_tar_samples", lambda p, *a: counted.append(p) or real(p, *a))
    pattern = f"{shards}/part-*.tar"
    tiny = [o for o in tiny_overrides if not o.startswith(("data.crops", "data.image_size"))]
    rc = cli_main([*tiny, "data.multicrop=cpu_tiny", "data.source=shards", f"data.urls={pattern}",
                   f"run_dir={tmp_path / 'run'}", "train.total_steps=1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and counted == [], err
    command = f"seer shards index '{pattern}'"
    assert "2000 shards without an index.json" in err and f"`{command}`" in err, err

    assert shards_cli(["index", pattern]) == 0  # the command the message gives
    assert len(counted) == 2000 and (shards / "index.json").is_file()
    counted.clear()
    urls, counts = train_mod.shard_counts(pattern, max_counted=1000)
    assert len(urls) == 2000 and counts == [1] * 2000 and counted == []


def test_the_refusal_names_one_index_command_per_directory(tmp_path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(3):
            _tiny_tar(tmp_path / d / f"x-{i}.tar", f"{d}{i}")
    (tmp_path / "b" / "index.json").write_text(json.dumps({"shards": [{"name": "x-0.tar", "samples": 1}]}))
    with pytest.raises(ValueError, match="index.json") as exc:
        train_mod.shard_counts([f"{tmp_path}/a/*.tar", f"{tmp_path}/b/*.tar"], max_counted=5)
    # b's index lists only one of its shards: rewriting it needs --overwrite
    want = f"`seer shards index '{tmp_path}/a/*.tar' && seer shards index '{tmp_path}/b/*.tar' --overwrite`"
    assert want in str(exc.value), exc.value
    assert train_mod.shard_counts([f"{tmp_path}/a/*.tar", f"{tmp_path}/b/*.tar"], max_counted=6)[1] == [1] * 6


_RANKS_WORKER = textwrap.dedent(
    """
    import json, sys
    import seer.data.shards.read as read_mod
    import seer.data.shards.train as train_mod
    from seer.distributed.env import init_distributed

    calls = {"read_index": 0, "count_tar_samples": 0, "expand_urls": 0}

    def counting(module, name):
        real = getattr(module, name)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        setattr(module, name, wrapper)

    for module, name in [(read_mod, "read_index"), (train_mod, "read_index"), (train_mod, "count_tar_samples"),
                         (train_mod, "expand_urls")]:
        counting(module, name)
    out, indexed, unindexed, run_dir, *overrides = sys.argv[1:]
    env = init_distributed(device="cpu")
    from seer.train.shard_counts import broadcast_shard_counts

    result = {"errors": []}
    for pattern, limit in [(indexed + "/nothing-*.tar", None), (unindexed + "/*.tar", 3)]:
        try:
            broadcast_shard_counts(pattern, env, max_counted=limit)
        except Exception as exc:
            result["errors"].append(f"{type(exc).__name__}: {exc}")
    calls.update(read_index=0, count_tar_samples=0, expand_urls=0)
    counted = broadcast_shard_counts(unindexed + "/*.tar", env)
    result["unindexed"] = [len(counted.urls), sum(counted.counts), dict(calls)]
    calls.update(read_index=0, count_tar_samples=0, expand_urls=0)

    from seer.cli import main
    result["rc"] = main(["pretrain", *overrides, "data.source=shards",
                         "data.urls=" + indexed, "run_dir=" + run_dir, "train.total_steps=2",
                         "data.batch_size_per_gpu=4", "data.shuffle_buffer=8"])
    result["pretrain"] = dict(calls)
    json.dump(result, open(out + f".{env.rank}.json", "w"))
    """
)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_only_rank_0_reads_shard_metadata(tmp_path, tiny_overrides) -> None:
    """2 gloo ranks: rank 0 expands the pattern and reads index.json (or counts the tar headers), rank 1 reads no
    shard metadata and gets the same counts; an error on rank 0 (no shard, too many without an index) is raised on
    both ranks with rank 0's message; `seer pretrain` on indexed shards reads the index on rank 0 only."""
    from seer.data.shards import write_shards

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(40):
        Image.new("RGB", (40, 40), (i * 6, 90, 200 - i * 4)).save(images / f"im{i:03d}.jpg")
    indexed = tmp_path / "indexed"
    write_shards(str(images), str(indexed), max_samples_per_shard=8, progress=False, workers=1)
    unindexed = tmp_path / "unindexed"
    unindexed.mkdir()
    for i in range(5):
        _tiny_tar(unindexed / f"u-{i}.tar", f"u{i}")
    script = tmp_path / "worker.py"
    script.write_text(_RANKS_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    tiny = [o for o in tiny_overrides if not o.startswith(("data.crops", "data.image_size"))]
    args = [
        str(tmp_path / "out"),
        str(indexed),
        str(unindexed),
        str(tmp_path / "run"),
        *tiny,
        "data.multicrop=cpu_tiny",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    res = []
    for r in range(2):
        path = tmp_path / f"out.{r}.json"
        assert path.is_file(), logs[r][-3000:]
        res.append(json.loads(path.read_text()))
    zero, one = res
    assert zero["errors"] == one["errors"] and len(zero["errors"]) == 2, res
    assert zero["errors"][0].startswith("FileNotFoundError") and "nothing-*.tar" in zero["errors"][0]
    assert zero["errors"][1].startswith("ValueError") and "seer shards index" in zero["errors"][1]
    assert zero["unindexed"] == [5, 5, {"read_index": 0, "count_tar_samples": 5, "expand_urls": 1}], zero
    assert one["unindexed"] == [5, 5, {"read_index": 0, "count_tar_samples": 0, "expand_urls": 0}], one
    assert zero["rc"] == one["rc"] == 0, logs
    assert zero["pretrain"]["read_index"] >= 1 and zero["pretrain"]["expand_urls"] == 1, zero
    assert one["pretrain"] == {"read_index": 0, "count_tar_samples": 0, "expand_urls": 0}, one
