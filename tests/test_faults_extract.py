"""`seer extract` / `extract_dataset` against unlucky users and hostile files (issue 29, items 4, 7, 8, 9, 15).

- The output directory: seer writes only into a new or empty directory or a previous extraction; a directory of
  other files needs ``overwrite``, which replaces only the extraction's own file names; never into its own source.
- A resume never mixes two models: a changed model file, a run's new checkpoint or changed in-memory weights are
  refused, naming the change and the fix.
- Shard samples are known by (shard, key): keys repeating across shards survive a resume, and the merged count is
  checked against what the ranks read.
- A merger killed midway leaves no lock that stops the rerun, which writes the features.
- Any file name the OS gives works end to end (bytes that are not UTF-8); one that inputs.txt cannot list (a line
  break) is skipped, or refused before any work.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seer.features import cli_main, extract_dataset, extract_features, load_feature_file, merge_features
from seer.models.regnet import RegNetCfg, build_trunk
from seer.weights import save_trunk

pytestmark = pytest.mark.faults

OUTPUT_MARKER = ".seer-output.json"  # seer.io's, spelled out: these tests also run against seer before it had one
OutputDirError = FileExistsError  # seer.io.OutputDirError's base, for the same reason

TINY = RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)
OPTS = {"num_workers": 0, "progress": False, "dtype": "float32"}


def _make_trunk(seed: int):
    torch.manual_seed(seed)
    trunk = build_trunk(TINY).eval()
    trunk.pretrained_cfg = {"resolution": 32, "crop_pct": 0.875, "interpolation": "bicubic"}
    return trunk


@pytest.fixture(scope="module")
def trunk():
    return _make_trunk(0)


@pytest.fixture(scope="module")
def other_trunk():
    """Same architecture, other weights: what a model file or a run holds after the kill."""
    return _make_trunk(1)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two class folders of three PNGs."""
    root = tmp_path_factory.mktemp("images")
    paths = []
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir()
        for i in range(3):
            path = root / name / f"{i}.png"
            path.write_bytes(_png(10 * c + i))
            paths.append(str(path))
    return root, paths


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _interrupt(out: Path, chunk: int = -1) -> None:
    """What a kill leaves: one chunk never written, the rank not done, nothing merged."""
    chunks = sorted((out / "chunks").glob("r00000_c*.npz"))
    chunks[chunk].unlink()
    (out / "chunks" / "r00000.done.json").unlink()
    for name in ("features.npy", "labels.npy", "indices.npy", "inputs.txt", "skipped.json"):
        (out / name).unlink()


# ----------------------------------------------------------------------------------------------------------------
# 4. The output directory
# ----------------------------------------------------------------------------------------------------------------
def _users_dir(path: Path) -> Path:
    """A directory of the user's own files, some with the names an extraction writes."""
    path.mkdir()
    np.save(path / "labels.npy", np.array([7, 7, 7]))
    (path / "inputs.txt").write_text("my own list\n")
    (path / "notes.md").write_text("mine\n")
    (path / "chunks").mkdir()
    (path / "chunks" / "r00000-notes.txt").write_text("mine too\n")  # a name the old clean-up's glob matched
    return path


def test_a_directory_of_other_files_is_refused_and_left_intact(trunk, folder, tmp_path):
    root, _ = folder
    out = _users_dir(tmp_path / "mine")
    before = _snapshot(out)
    # from Python the message names the argument (the CLI's, below, names --overwrite)
    with pytest.raises(OutputDirError, match=r"files seer did not write.*overwrite=True.*labels\.npy.*replaced"):
        extract_dataset(root, out, trunk, **OPTS)
    assert _snapshot(out) == before
    assert not (out / "meta.json").exists() and not (out / OUTPUT_MARKER).exists()


def test_the_cli_refuses_it_in_one_line(tmp_path, folder, model_file, capsys):
    root, _ = folder
    out = _users_dir(tmp_path / "mine")
    before = _snapshot(out)
    assert cli_main([str(root), str(out), "--model", model_file, "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seer extract: output directory") and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(out) == before


def test_overwrite_into_a_directory_of_other_files_replaces_only_the_extraction_files(trunk, folder, tmp_path):
    root, paths = folder
    out = _users_dir(tmp_path / "mine")
    for _ in range(2):  # the second time, the clean-up of the first extraction runs too
        extract_dataset(root, out, trunk, overwrite=True, **OPTS)
        assert (out / "notes.md").read_text() == "mine\n"
        assert (out / "chunks" / "r00000-notes.txt").read_text() == "mine too\n"
        got = load_feature_file(out)
        assert got["labels"].tolist() == [0, 0, 0, 1, 1, 1] and got["inputs"] == paths
    # still the user's directory: a rerun without overwrite is refused, naming what to do
    with pytest.raises(OutputDirError, match="move them out to resume"):
        extract_dataset(root, out, trunk, **OPTS)


def test_a_user_file_added_to_an_extraction_stops_the_resume_not_the_files(trunk, folder, tmp_path):
    root, _ = folder
    out = tmp_path / "feats"
    extract_dataset(root, out, trunk, chunk_size=2, **OPTS)
    (out / "README").write_text("my notes\n")
    with pytest.raises(OutputDirError, match=r"seer extraction and files seer did not write \(README\)"):
        extract_dataset(root, out, trunk, chunk_size=2, **OPTS)
    assert (out / "README").read_text() == "my notes\n" and (out / "features.npy").is_file()


def test_the_source_is_never_the_output(trunk, folder, tmp_path):
    root, _ = folder
    before = _snapshot(root)
    for out in (root, root.parent):
        with pytest.raises(OutputDirError, match="contains the source"):
            extract_dataset(root, out, trunk, overwrite=True, **OPTS)
    # shards inside the output directory
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "a.tar", ["x", "y"], seed=0)
    with pytest.raises(OutputDirError, match="contains the source"):
        extract_dataset(str(shards / "*.tar"), shards, trunk, overwrite=True, **OPTS)
    assert _snapshot(root) == before and sorted(p.name for p in shards.iterdir()) == ["a.tar"]


def test_an_extraction_by_the_previous_seer_still_resumes(trunk, folder, tmp_path):
    root, paths = folder
    out = tmp_path / "feats"
    extract_dataset(root, out, trunk, chunk_size=2, **OPTS)
    (out / OUTPUT_MARKER).unlink()  # written before seer marked its output directories
    meta = json.loads((out / "meta.json").read_text())
    del meta["weights"], meta["shard_list"]  # nor did it record these
    (out / "meta.json").write_text(json.dumps(meta))
    _interrupt(out)
    summary = extract_dataset(root, out, trunk, chunk_size=2, **OPTS)
    assert summary["chunks_written"] == 1 and load_feature_file(out)["inputs"] == paths
    assert json.loads((out / OUTPUT_MARKER).read_text())["kind"] == "features"


def test_merge_only_into_a_directory_that_is_not_an_extraction(tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "meta.json").write_text('{"a": 1}')
    assert cli_main(["unused", str(out), "--merge-only"]) == 2
    err = capsys.readouterr().err
    assert "meta.json is not the meta.json of seer features" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]


# ----------------------------------------------------------------------------------------------------------------
# 7. A resume never mixes two models
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(trunk, tmp_path_factory):
    return str(save_trunk(trunk, tmp_path_factory.mktemp("model") / "tiny.safetensors"))


def test_resume_refuses_a_model_file_that_changed(trunk, other_trunk, folder, tmp_path):
    root, paths = folder
    model = tmp_path / "model.safetensors"
    save_trunk(trunk, model)
    out = tmp_path / "feats"
    extract_dataset(root, out, str(model), chunk_size=2, **OPTS)
    _interrupt(out)
    save_trunk(other_trunk, model)  # the same path, other weights (a re-export, a copy of a later checkpoint)
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with pytest.raises(ValueError, match=r"weights of model .* changed .*modified.*mix two models.*overwrite"):
        extract_dataset(root, out, str(model), chunk_size=2, **OPTS)
    extract_dataset(root, out, str(model), chunk_size=2, overwrite=True, **OPTS)
    np.testing.assert_allclose(load_feature_file(out)["features"], extract_features(paths, other_trunk), atol=1e-5)


def test_resume_refuses_a_run_with_a_new_checkpoint(trunk, other_trunk, folder, tmp_path):
    from seer.train.checkpoint import save_checkpoint

    def save(step: int, net) -> None:
        model = torch.nn.Module()
        model.trunk = net
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        save_checkpoint(tmp_path / "run", step, model, opt, meta={"regnet_cfg": net.cfg.to_dict()})

    root, paths = folder
    save(5, trunk)
    out = tmp_path / "feats"
    extract_dataset(root, out, str(tmp_path / "run"), chunk_size=2, **OPTS)
    _interrupt(out)
    save(10, other_trunk)  # the run went on between the kill and the rerun
    with pytest.raises(ValueError, match=r"checkpoint 'step_00000005' -> 'step_00000010'.*overwrite"):
        extract_dataset(root, out, str(tmp_path / "run"), chunk_size=2, **OPTS)
    # a new directory gets the new checkpoint's features, not a cached copy of the old model
    fresh = tmp_path / "fresh"
    extract_dataset(root, fresh, str(tmp_path / "run"), resolution=32, **OPTS)
    other = extract_features(paths, other_trunk)
    np.testing.assert_allclose(load_feature_file(fresh)["features"], other, rtol=1e-4, atol=1e-4)


def test_resume_refuses_in_memory_weights_that_changed(folder, tmp_path):
    root, _ = folder
    net = _make_trunk(2)
    out = tmp_path / "feats"
    extract_dataset(root, out, net, chunk_size=2, **OPTS)
    _interrupt(out)
    with torch.no_grad():
        next(net.parameters()).add_(0.01)  # trained a little more: same class, same config
    with pytest.raises(ValueError, match=r"model in memory changed since .* \(parameters .*overwrite"):
        extract_dataset(root, out, net, chunk_size=2, **OPTS)


# ----------------------------------------------------------------------------------------------------------------
# 8. Shard samples are known by (shard, key)
# ----------------------------------------------------------------------------------------------------------------
def _write_shard(path: Path, keys: list[str], seed: int) -> None:
    """A shard written by some other tool: keys numbered per shard, no .json index; names may be any bytes."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for i, key in enumerate(keys):
            for ext, data in ((".png", _png(seed + i)), (".cls", str(seed + i).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "keys", [["img_a", "img_b", "img_c"], ["000000", "000001", "000002"], ["caf\udce9", "b\u2028c", "d"]]
)
def test_shard_resume_keeps_samples_whose_key_repeats_in_another_shard(trunk, tmp_path, keys):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "a.tar", keys, seed=0)
    _write_shard(shards / "b.tar", keys, seed=100)  # the same keys: unique only within a shard
    urls = [str(shards / "a.tar"), str(shards / "b.tar")]
    out = tmp_path / "feats"
    extract_dataset(urls, out, trunk, chunk_size=3, batch_size=3, **OPTS)  # a chunk per shard
    first = load_feature_file(out, mmap=False)
    assert sorted(first["labels"].tolist()) == [0, 1, 2, 100, 101, 102]
    assert len(list((out / "chunks").glob("*.npz"))) == 2
    _interrupt(out)  # the second shard's chunk was never written
    extract_dataset(urls, out, trunk, chunk_size=3, batch_size=3, **OPTS)
    got = load_feature_file(out, mmap=False)
    assert sorted(got["labels"].tolist()) == [0, 1, 2, 100, 101, 102]
    assert sorted(got["inputs"]) == sorted(keys * 2)
    rows = {(int(label), key): f for label, key, f in zip(got["labels"], got["inputs"], got["features"])}
    for label, key, f in zip(first["labels"], first["inputs"], first["features"]):
        np.testing.assert_allclose(rows[(int(label), key)], f, atol=1e-6)


def test_shard_merge_refuses_a_short_result(trunk, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "a.tar", ["x", "y"], seed=0)
    _write_shard(shards / "b.tar", ["x", "y"], seed=10)
    out = tmp_path / "feats"
    extract_dataset(str(shards / "*.tar"), out, trunk, chunk_size=2, batch_size=2, **OPTS)
    sorted((out / "chunks").glob("*.npz"))[1].unlink()  # lost after the rank finished
    with pytest.raises(RuntimeError, match=r"hold 2 samples but the ranks wrote 4.*rerun"):
        merge_features(out)
    extract_dataset(str(shards / "*.tar"), out, trunk, chunk_size=2, batch_size=2, **OPTS)  # recomputes it
    assert len(load_feature_file(out)["features"]) == 4


# ----------------------------------------------------------------------------------------------------------------
# 9. A merger killed midway
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_a_kill_during_the_merge_does_not_stop_the_rerun(folder, model_file, tmp_path):
    root, paths = folder
    out = tmp_path / "feats"
    argv = ["extract", str(root), str(out), "--model", model_file, "--workers", "0", "--no-progress", "--chunk-size",
            "2", "--resolution", "32"]  # fmt: skip
    hang = textwrap.dedent(f"""
        import sys, time
        import seer.features.dataset as d
        def write_merged(*args, **kwargs):  # the merge is under way: killed here
            print("MERGING", flush=True)
            time.sleep(600)
        d.write_merged = write_merged
        from seer.cli import main
        sys.exit(main({argv!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", hang], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(240)
    try:
        assert line == ["MERGING\n"], proc.stderr.read() if proc.poll() is not None else "no merge started"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert not (out / "features.npy").exists()
    rerun = subprocess.run([sys.executable, "-m", "seer.cli", *argv], capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    got = load_feature_file(out)
    assert got["inputs"] == paths and got["features"].shape[0] == len(paths)


def test_a_live_merger_is_left_to_finish(trunk, folder, tmp_path):
    root, _ = folder
    out = tmp_path / "feats"
    extract_dataset(root, out, trunk, merge=False, **OPTS)
    with open(out / ".merge.lock", "w") as held:  # another rank merging now (the OS lock, held by a live process)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on node7")
        held.flush()
        summary = extract_dataset(root, out, trunk, **OPTS)
        assert summary["merged"] == {"merged_by": "pid 4242 on node7"}
    summary = extract_dataset(root, out, trunk, **OPTS)  # released (or its holder died): this rank merges
    assert summary["merged"]["rows"] == 6 and not (out / ".merge.lock").exists()


# ----------------------------------------------------------------------------------------------------------------
# 15. File names
# ----------------------------------------------------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_works_end_to_end(trunk, model_file, tmp_path, capsys):
    root = tmp_path / "images"
    (root / "caf\udce9").mkdir(parents=True)  # a class folder too
    raw = os.fsencode(root / "caf\udce9") + b"/caf\xe9-latin1.png"
    with open(raw, "wb") as f:  # the bytes name, as a Latin-1 system wrote it
        f.write(_png(1))
    (root / "caf\udce9" / "plain.png").write_bytes(_png(2))
    out = tmp_path / "feats"
    argv = [str(root), str(out), "--model", model_file, "--workers", "0", "--no-progress", "--dtype", "float32"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    got = load_feature_file(out)
    assert os.fsencode(got["inputs"][0]) == raw and got["class_names"] == ["caf\udce9"]
    assert all(Path(p).is_file() for p in got["inputs"])
    np.testing.assert_allclose(got["features"], extract_features([raw.decode("utf-8", "surrogateescape"),
                                                                  got["inputs"][1]], trunk), atol=1e-5)  # fmt: skip


def test_a_file_name_with_a_line_break_is_skipped_or_refused_before_any_work(trunk, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a\nb.png").write_bytes(_png(1))
    (root / "ok.png").write_bytes(_png(2))
    with pytest.raises(ValueError, match=r"'.*a\\nb\.png'.*line break.*rename"):
        extract_dataset(root, tmp_path / "raise", trunk, on_error="raise", **OPTS)
    assert not (tmp_path / "raise").exists()
    out = tmp_path / "skip"
    extract_dataset(root, out, trunk, **OPTS)
    got = load_feature_file(out)
    assert got["inputs"] == [str(root / "ok.png")] and len(got["features"]) == 1
    assert [s["input"] for s in got["skipped"]] == [str(root / "a\nb.png")]


def test_a_file_list_that_is_not_utf8_is_refused_naming_it(trunk, folder, tmp_path):
    listing = tmp_path / "files.txt"
    listing.write_bytes(folder[1][0].encode() + b"\n/data/caf\xe9.png\n")
    with pytest.raises(ValueError, match=r"files\.txt: the file list is not UTF-8.*\\xe9.*folder"):
        extract_dataset(listing, tmp_path / "out", trunk, **OPTS)
    assert not (tmp_path / "out").exists()
