"""Hostile shard files (issue 29, items 1, 11 and the shard part of 12).

* A file name found by a glob or listed by an ``index.json`` is a local file, never a command: a shard directory
  holding ``pipe:touch PWNED; cat data-000000.tar #.tar`` must not make any entry point run it. Every entry point
  that expands or opens shard URLs is tried: ``seer shards verify`` (glob in the current directory, index in ``.``),
  ``seer extract``, ``seer pretrain data.urls=.``, the train and eval streams, a list of names from a directory
  listing (what ``seer.evaluation.cache`` passes), ``seer classify``'s shard inputs.
* Index entries are plain file names in the index's own directory.
* A tar member is read only up to the member cap (its declared size: sparse members count expanded, gzip shards
  cannot expand past it); a member over the cap is a skipped, counted bad sample, never a good one.
* Only regular files are read as shards: a FIFO or a ``/dev/zero`` link named ``.tar`` is reported, not waited on.

Whatever could hang or allocate GiBs before the fix runs in a subprocess with a timeout and an address-space limit.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import resource
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import seer
from seer.data.limits import limits
from seer.data.shards import eval_loader, expand_urls, read_index, train_loader, verify_shards

pytestmark = pytest.mark.faults

HOSTILE = "pipe:touch PWNED; cat data-000000.tar #.tar"
REPO = str(Path(seer.__file__).resolve().parents[1])  # the seer under test, also for CLI subprocesses
GiB = 1 << 30


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _jpeg(seed: int, side: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _shard(path: Path, first: int, n: int = 4) -> Path:
    """A shard of `n` samples ``<key>.jpg`` + ``<key>.cls``, keys from `first` on."""
    with tarfile.open(path, "w") as tf:
        for i in range(first, first + n):
            _add(tf, f"{i:06d}.jpg", _jpeg(i))
            _add(tf, f"{i:06d}.cls", str(i % 3).encode())
    return path


def _hostile_dir(tmp_path: Path, index: bool = False) -> Path:
    """Two shards and a third, valid shard whose *name* is a shell command (12 samples in all)."""
    d = tmp_path / "shards"
    d.mkdir()
    _shard(d / "data-000000.tar", 0)
    _shard(d / "data-000001.tar", 4)
    _shard(d / HOSTILE, 8)
    if index:
        names = ["data-000000.tar", HOSTILE, "data-000001.tar"]
        _write_index(d, names)
    return d


def _write_index(d: Path, names: list[str], samples: int = 4) -> None:
    shards = [{"name": n, "samples": samples} for n in names]
    index = {"format": "seer-shards", "version": 1, "shards": shards, "total": samples * len(names)}
    (d / "index.json").write_text(json.dumps(index))


def _columns(batch: list[tuple]) -> tuple[list, ...]:
    """Collate without torch: (images, labels[, keys, indices]) as lists."""
    return tuple(map(list, zip(*batch)))


def _assert_not_pwned(*dirs: Path) -> None:
    for d in (*dirs, Path.cwd()):
        assert not (d / "PWNED").exists(), f"a shard name was run as a shell command (PWNED in {d})"


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _limit_memory(gib: float):
    def limit() -> None:
        cap = int(gib * GiB)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return limit


def _run(argv: list[str], cwd: Path, timeout: float = 180, mem_gib: float = 6, **env: str) -> Any:
    """A child process under a time and an address-space limit (torch alone maps ~3 GiB); a hang fails the test."""
    try:
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                              timeout=timeout, preexec_fn=_limit_memory(mem_gib))  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv[:4]} did not finish in {timeout}s (blocked on a special file?): {exc.stderr!r}")


def _seer(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return _run(["-m", "seer.cli", *args], cwd, **kw)


def _python(code: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return _run(["-c", textwrap.dedent(code)], cwd, **kw)


def _clean_error(r: subprocess.CompletedProcess, prefix: str) -> None:
    assert r.returncode in (1, 2), (r.returncode, r.stdout, r.stderr)
    assert prefix in r.stderr and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------------------------
# Item 1: names from a listing or an index are never commands
# ----------------------------------------------------------------------------------------------------------------


def test_verify_glob_in_shard_dir_reads_a_command_named_file_as_a_file(tmp_path):
    d = _hostile_dir(tmp_path)
    r = _seer(["shards", "verify", "*.tar", "--workers", "1", "--no-progress"], cwd=d)
    _assert_not_pwned(d)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "3 shards, 12 good samples" in r.stdout and "0 problem(s)" in r.stdout, r.stdout


def test_verify_index_in_cwd_naming_a_command_reads_it_as_a_file(tmp_path):
    d = _hostile_dir(tmp_path, index=True)
    r = _seer(["shards", "verify", ".", "--workers", "1", "--no-progress"], cwd=d)
    _assert_not_pwned(d)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "3 shards, 12 good samples" in r.stdout and "0 problem(s)" in r.stdout, r.stdout


def test_extract_glob_in_shard_dir(tmp_path):
    from seer.models.regnet import RegNetCfg, build_trunk
    from seer.weights import save_trunk

    d = _hostile_dir(tmp_path)
    model = save_trunk(build_trunk(RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)), tmp_path / "tiny.safetensors")
    out = tmp_path / "feats"
    r = _seer(["extract", "*.tar", str(out), "--model", str(model), "--device", "cpu", "--workers", "0",
               "--dtype", "float32", "--backend", "torch", "--no-progress"], cwd=d)  # fmt: skip
    _assert_not_pwned(d, out)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert np.load(out / "features.npy").shape[0] == 12


def test_pretrain_cli_with_index_in_cwd(tmp_path, tiny_overrides):
    d = _hostile_dir(tmp_path, index=True)
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides if not o.startswith(("data.crops", "data.image_size"))]
    r = _seer(["pretrain", *overrides, "data.source=shards", "data.urls=.", "data.multicrop=cpu_tiny",
               "data.batch_size_per_gpu=12", "data.shuffle_buffer=4", "train.total_steps=1", f"run_dir={run}"],
              cwd=d, timeout=300)  # fmt: skip
    _assert_not_pwned(d, run)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["data_skipped"] == {"samples": 12, "skipped": 0, "by_kind": {}}  # one step read all 3 shards


@pytest.mark.parametrize("reader", ["eval", "train"])
@pytest.mark.parametrize("pattern", [".", "*.tar", "index.json"])
def test_train_and_eval_streams_read_listed_names_as_files(tmp_path, monkeypatch, pattern, reader):
    d = _hostile_dir(tmp_path, index=True)
    monkeypatch.chdir(d)
    if reader == "eval":
        ev = eval_loader(pattern, None, batch_size=5, decode="bytes", collate_fn=_columns)
        keys = [k for _, _, ks, _ in ev for k in ks]
        skipped = ev.stats["skipped"]
    else:
        loader = train_loader(pattern, None, batch_size=4, decode="bytes", collate_fn=_columns, shuffle_buffer=4)
        keys = []
        for _ in loader:
            keys += loader.last_keys
        skipped = loader.stats["skipped"]
    _assert_not_pwned(d)
    assert sorted(keys) == [f"{i:06d}" for i in range(12)] and skipped == 0  # the command-named shard's own samples
    # every listed name comes back as an absolute local path: no opener can take it for a command or a URL
    urls = expand_urls(pattern)
    assert sorted(urls) == sorted(str(d / n) for n in ("data-000000.tar", "data-000001.tar", HOSTILE))


def test_names_from_a_directory_listing_are_taken_literally(tmp_path, monkeypatch):
    """A list of names (what seer.evaluation.cache globs in a split folder and passes on) is files, not commands or
    patterns: 'pipe:', '::', braces and glob characters in a name are part of the name."""
    d = _hostile_dir(tmp_path)
    monkeypatch.chdir(d)
    listed = sorted(str(p) for p in Path(".").glob("*.tar"))  # relative names, as Path(".").glob gives them
    assert HOSTILE in listed
    ev = eval_loader(listed, None, batch_size=8, decode="bytes", collate_fn=_columns)
    keys = [k for _, _, ks, _ in ev for k in ks]
    _assert_not_pwned(d)
    assert sorted(keys) == [f"{i:06d}" for i in range(12)]
    for i, odd in enumerate(["a::b.tar", "c{1,2}.tar", "[de].tar"]):
        _shard(d / odd, 100 + 4 * i)
    listed = sorted(str(p) for p in Path(".").glob("*.tar"))
    assert len(listed) == 6
    assert expand_urls(listed) == [str(d / n) for n in listed]
    for name in listed:
        assert expand_urls(name) == [str(d / name)]
    n = sum(len(ks) for _, _, ks, _ in eval_loader(listed, None, batch_size=8, decode="bytes", collate_fn=_columns))
    assert n == 24


def test_a_pipe_pattern_given_by_the_user_runs_and_is_logged(tmp_path, caplog):
    d = _hostile_dir(tmp_path)
    pattern = f"pipe:cat {d}/data-00000{{0..1}}.tar"
    with caplog.at_level(logging.INFO, logger="seer.data"):
        keys = [k for _, _, ks, _ in eval_loader(pattern, None, batch_size=8, decode="bytes", collate_fn=_columns)
                for k in ks]  # fmt: skip
    assert sorted(keys) == [f"{i:06d}" for i in range(8)]
    logged = [r.getMessage() for r in caplog.records if r.name == "seer.data"]
    for i in range(2):
        assert any(f"cat {d}/data-00000{i}.tar" in m for m in logged), logged


@pytest.mark.parametrize("entry", ["../outside.tar", "sub/inner.tar", "ABSOLUTE", "..", "", 7])
def test_index_entries_must_be_plain_file_names(tmp_path, entry):
    d = tmp_path / "shards"
    (d / "sub").mkdir(parents=True)
    _shard(d / "data-000000.tar", 0)
    _shard(tmp_path / "outside.tar", 4)
    _shard(d / "sub" / "inner.tar", 8)
    entry = str(tmp_path / "outside.tar") if entry == "ABSOLUTE" else entry
    _write_index(d, ["data-000000.tar", entry])
    with pytest.raises(ValueError, match="index.json") as info:
        read_index(d)
    assert repr(entry) in str(info.value)
    with pytest.raises(ValueError, match="not a plain file name"):
        expand_urls(d)
    if entry == "../outside.tar":  # through the CLI: a one-line error naming the index and the entry
        r = _seer(["shards", "verify", str(d), "--workers", "1", "--no-progress"], cwd=tmp_path)
        _clean_error(r, "seer shards verify")
        assert "index.json" in r.stderr and "../outside.tar" in r.stderr


def test_classify_shard_inputs_are_read_safely(tmp_path, monkeypatch):
    from seer.features.classify import expand_inputs

    d = _hostile_dir(tmp_path)
    monkeypatch.chdir(d)
    with limits(max_member_bytes=1 << 20):
        items = expand_inputs(["*.tar"])
    assert len(items) == 12 and all(not getattr(it, "error", None) for it in items)
    _assert_not_pwned(d)
    big = tmp_path / "big.tar"
    with tarfile.open(big, "w") as tf:
        _add(tf, "000000.jpg", _jpeg(0))
        _add(tf, "000001.jpg", b"\xff\xd8" + bytes(200_000))
    with limits(max_member_bytes=100_000):
        items = expand_inputs([str(big)])
    assert [it.error is None for it in items] == [True, False] and "oversized_member" in items[1].error


# ----------------------------------------------------------------------------------------------------------------
# Item 11: a size cap on tar members
# ----------------------------------------------------------------------------------------------------------------


def _sparse_shard(path: Path, realsize: int) -> Path:
    """A ~10 KB tar whose sample 000000 has a sparse (GNU 1.0, pax) .jpg member of `realsize` bytes, then two good
    samples."""
    data = b"\xff\xd8\xff" + bytes(509)
    payload = f"1\n0\n{len(data)}\n".encode().ljust(512, b"\0") + data  # the sparse map: one 512-byte data block
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("GNUSparseFile.0/000000.jpg")
        info.size = len(payload)
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "000000.jpg",
                            "GNU.sparse.realsize": str(realsize)}  # fmt: skip
        tf.addfile(info, io.BytesIO(payload))
        _add(tf, "000000.cls", b"0")
        for i in (1, 2):
            _add(tf, f"{i:06d}.jpg", _jpeg(i))
            _add(tf, f"{i:06d}.cls", b"1")
    return path


def _gzip_shard(path: Path, member_bytes: int) -> Path:
    """A gzip-compressed shard whose sample 000000 has a .jpg member of `member_bytes` zero bytes (a few hundred KB
    compressed), then two good samples."""

    class Zeros(io.RawIOBase):
        def __init__(self, n: int):
            self.n = n

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            k = min(len(b), self.n)
            b[:k] = bytes(k)
            self.n -= k
            return k

    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tf:
        info = tarfile.TarInfo("000000.jpg")
        info.size = member_bytes
        tf.addfile(info, io.BufferedReader(Zeros(member_bytes), 1 << 20))
        _add(tf, "000000.cls", b"0")
        for i in (1, 2):
            _add(tf, f"{i:06d}.jpg", _jpeg(i))
            _add(tf, f"{i:06d}.cls", b"1")
    return path


def test_sparse_member_expanding_to_2gib_is_skipped_unread(tmp_path):
    shard = _sparse_shard(tmp_path / "sparse.tar", 2 * GiB)
    assert shard.stat().st_size < 40_000
    r = _seer(["shards", "verify", str(shard), "--workers", "1", "--no-progress"], cwd=tmp_path, mem_gib=6)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "oversized_member" in r.stdout and "2147483648 bytes" in r.stdout, r.stdout
    assert "1 shards, 2 good samples" in r.stdout and "1 problem(s)" in r.stdout, r.stdout


def test_gzip_member_over_the_cap_is_skipped_not_a_good_sample(tmp_path):
    shard = _gzip_shard(tmp_path / "bomb.tar", 128 << 20)
    assert shard.stat().st_size < 2 << 20
    # SEER_MAX_MEMBER_MB: the documented per-process setting; 4 MiB keeps the test to seconds
    r = _seer(["shards", "verify", str(shard), "--workers", "1", "--no-progress"], cwd=tmp_path, mem_gib=6,
              SEER_MAX_MEMBER_MB="4")  # fmt: skip
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "oversized_member" in r.stdout and str(128 << 20) in r.stdout, r.stdout
    assert "1 shards, 2 good samples" in r.stdout and "1 problem(s)" in r.stdout, r.stdout


def test_member_cap_in_every_shard_reader(tmp_path, monkeypatch):
    """verify, the eval stream and the train stream skip a member over the cap as one bad sample, in its place."""
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(4):
            _add(tf, f"{i:06d}.jpg", b"\xff\xd8" + bytes(300_000 if i == 2 else 100))
            _add(tf, f"{i:06d}.cls", b"1")
    index_dir = tmp_path / "indexed"
    index_dir.mkdir()
    (index_dir / "s.tar").write_bytes(shard.read_bytes())
    _write_index(index_dir, ["s.tar"])
    with limits(max_member_bytes=100_000):
        report = verify_shards(index_dir, progress=False, workers=1)
        assert report["total"] == 3 and [p["kind"] for p in report["problems"]] == ["oversized_member"]
        assert report["problems"][0]["key"] == "000002"  # a keyed sample: the index count adds up, no mismatch
        ev = eval_loader(str(shard), None, batch_size=8, decode="bytes", collate_fn=_columns)
        assert [k for _, _, ks, _ in ev for k in ks] == ["000000", "000001", "000003"]
        assert ev.stats["by_kind"] == {"oversized_member": 1} and ev.skipped_keys == ["000002"]
        tr = train_loader(str(shard), None, batch_size=3, decode="bytes", collate_fn=_columns, shuffle_buffer=1)
        assert len(list(tr)) == 1 and sorted(tr.last_keys) == ["000000", "000001", "000003"]
        assert tr.stats["by_kind"] == {"oversized_member": 1}
        assert tr.coverage()[0] == {"seen": 3, "skipped": 1, "of": 4, "complete": True}


def test_extended_header_over_the_cap_is_refused_not_read(tmp_path):
    """A pax header is read into memory whole by tarfile before any member is seen: it is capped too."""
    shard = tmp_path / "pax.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "000000.jpg", b"\xff\xd8")
        info = tarfile.TarInfo("000001.jpg")
        info.size = 2
        info.pax_headers = {"comment": "x" * 300_000}
        tf.addfile(info, io.BytesIO(b"\xff\xd8"))
    with limits(max_member_bytes=100_000):
        ev = eval_loader(str(shard), None, batch_size=8, decode="bytes", require_label=False, collate_fn=_columns)
        assert [k for _, _, ks, _ in ev for k in ks] == ["000000"]
        assert ev.stats["by_kind"] == {"bad_tar": 1} and "extended tar header" in ev.skipped[0]["error"]


# ----------------------------------------------------------------------------------------------------------------
# Item 12 (shards): only regular files are read
# ----------------------------------------------------------------------------------------------------------------


def _special_dir(tmp_path: Path) -> Path:
    d = tmp_path / "special"
    d.mkdir()
    _shard(d / "data-000000.tar", 0)
    os.mkfifo(d / "data-000001.tar")
    os.symlink("/dev/zero", d / "data-000002.tar")
    return d


def test_verify_refuses_a_fifo_and_a_device_named_tar(tmp_path):
    d = _special_dir(tmp_path)
    r = _seer(["shards", "verify", "*.tar", "--workers", "1", "--no-progress"], cwd=d, timeout=60, mem_gib=6)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "3 shards, 4 good samples, 2 problem(s)" in r.stdout, r.stdout
    assert r.stdout.count("unreadable_shard") == 2 and "a FIFO" in r.stdout and "device" in r.stdout, r.stdout


def test_streams_counting_and_classify_refuse_special_files(tmp_path):
    """The eval and train streams, the sample count of the train stream, classify's shard inputs and image units of
    the train stream never block on a FIFO or read a device."""
    d = _special_dir(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.open(io.BytesIO(_jpeg(0))).save(images / "a.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    code = f"""
        import json
        from seer.data.shards import eval_loader, train_loader
        from seer.data.shards.epochs import count_tar_samples
        from seer.data.shards.read import SkipLog, SampleError
        from seer.features.classify import expand_inputs
        def _columns(batch):
            return tuple(map(list, zip(*batch)))
        out = {{}}
        ev = eval_loader("*.tar", None, batch_size=8, decode="bytes", collate_fn=_columns)
        out["eval"] = [sum(len(b[2]) for b in ev), ev.stats["by_kind"]]
        out["count"] = [count_tar_samples("data-000001.tar"), count_tar_samples("data-000002.tar")]
        tr = train_loader("*.tar", None, batch_size=4, decode="bytes", collate_fn=_columns, shuffle_buffer=4)
        list(tr)
        out["train"] = [sorted(tr.last_keys), tr.stats["by_kind"]]
        try:
            expand_inputs(["data-000001.tar"])
            out["classify"] = "no error"
        except ValueError as exc:
            out["classify"] = str(exc)
        loader = train_loader(None, None, images={str(images)!r}, batch_size=1, decode="bytes", collate_fn=_columns)
        loader.items[0] = ({str(tmp_path / "fifo.jpg")!r}, 0)
        got = list(loader._units().read(0, 0, 1, SkipLog()))
        out["images"] = [g.kind if isinstance(g, SampleError) else "read" for g in got]
        print("RESULT " + json.dumps(out))
    """
    r = _python(code, cwd=d, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["eval"] == [4, {"unreadable_shard": 2}]
    assert out["count"] == [[0, "unreadable_shard"], [0, "unreadable_shard"]]
    assert out["train"] == [["000000", "000001", "000002", "000003"], {"unreadable_shard": 2}]
    assert "unreadable_shard" in out["classify"] and "not a regular file" in out["classify"]
    assert out["images"] == ["unreadable_shard"]
