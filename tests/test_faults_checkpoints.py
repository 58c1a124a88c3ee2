"""Hostile checkpoints: pickled code is refused by every loader and never runs; truncated files are detected.

Every loader of untrusted files is fed a pickle whose ``__reduce__`` would create a marker file; the test asserts
a clear, documented exception and that the marker does not exist. Truncated safetensors and DCP checkpoints (the
``.metadata`` pickle and the ``.distcp`` shards) must give an error naming the file, never a deep traceback or a
silently partial model.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from seer.models.regnet import RegNetCfg, build_trunk

pytestmark = pytest.mark.faults

TINY = RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)


@pytest.fixture(scope="module")
def pretrain_tiny(tiny_overrides):
    return [*tiny_overrides, "swav.freeze_prototypes_iters=0", "data.batch_size_per_gpu=4"]


class Payload:
    """Unpickling this runs ``os.system('touch MARKER')``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_state(marker: Path) -> dict:
    sd = {k: v.contiguous() for k, v in build_trunk(TINY).state_dict().items()}
    return {"state_dict": sd, "evil": Payload(marker)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pretrain_tiny) -> Path:
    """A real 2-step pretraining run directory (one process), reused read-only by the tests (copy to modify)."""
    from seer.config import load_config
    from seer.train.loop import pretrain

    out = tmp_path_factory.mktemp("faults_ckpt") / "run"
    pretrain(load_config(None, [*pretrain_tiny, f"run_dir={out}", "train.total_steps=2"]))
    return out


def _ckpt(run: Path) -> Path:
    from seer.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".torch"])
def test_pickled_code_refused_by_load_trunk(tmp_path: Path, suffix: str) -> None:
    from seer.weights import CheckpointError, load_trunk

    marker = tmp_path / "PWNED"
    path = tmp_path / f"model{suffix}"
    torch.save(_evil_state(marker), path)
    with pytest.raises(CheckpointError, match=r"refused|cannot read") as info:
        load_trunk(path)
    assert str(path) in str(info.value)
    assert not marker.exists(), "the pickled payload was executed"
    # a plain pickle (not torch's zip container) with a payload: refused too
    plain = tmp_path / f"plain{suffix}"
    plain.write_bytes(pickle.dumps(_evil_state(marker)))
    with pytest.raises(CheckpointError):
        load_trunk(plain)
    assert not marker.exists()


def test_pickled_code_in_dcp_metadata_refused(run_dir: Path, tmp_path: Path) -> None:
    """DCP itself unpickles ``.metadata`` with a bare pickle.load: the run-dir loaders must not."""
    from seer.train.checkpoint import read_trunk_state
    from seer.weights import load_trunk

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "PWNED"
    md = _ckpt(run) / ".metadata"
    md.write_bytes(pickle.dumps(Payload(marker)))
    for loader in (read_trunk_state, load_trunk):
        with pytest.raises(ValueError, match=r"refused to load checkpoint metadata.*posix.system|refused"):
            loader(run)
        assert not marker.exists(), f"{loader.__name__} executed the payload"
    from seer.weights.cli import cli_export

    assert cli_export([str(run), str(tmp_path / "out.safetensors")]) == 1
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_pickled_code_in_dcp_metadata_refused_on_resume(run_dir: Path, tmp_path: Path, pretrain_tiny) -> None:
    """Auto-resume reads the run's latest checkpoint: a planted payload there stops the run, unexecuted."""
    from seer.config import load_config
    from seer.train.loop import pretrain

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "PWNED"
    (_ckpt(run) / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="refused"):
        pretrain(load_config(None, [*pretrain_tiny, f"run_dir={run}", "train.total_steps=3"]))
    assert not marker.exists()


def test_pickled_code_in_dcp_bytes_item_refused(run_dir: Path, tmp_path: Path, pretrain_tiny) -> None:
    """Non-tensor DCP items (optimizer hyper-parameters) are torch.load-ed by DCP with weights_only=False."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from seer.config import load_config
    from seer.train.checkpoint import SafeReader
    from seer.train.loop import pretrain

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = _ckpt(run)
    marker = tmp_path / "PWNED"
    md = SafeReader(str(ckpt)).read_metadata()
    key = next(k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    info = next(v for k, v in md.storage_data.items() if k.fqn == key)
    import io

    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    evil = buf.getvalue()
    shard = ckpt / info.relative_path
    data = bytearray(shard.read_bytes())
    # Append the payload to the shard and point the item at it (the metadata stays a valid DCP pickle).
    info.offset, info.length = len(data), len(evil)
    shard.write_bytes(bytes(data) + evil)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(ValueError, match="cannot read the checkpoint"):
        pretrain(load_config(None, [*pretrain_tiny, f"run_dir={run}", "train.total_steps=3"]))
    assert not marker.exists(), "DCP's bytes item was unpickled with weights_only=False"


def test_pickled_code_in_feature_files_refused(tmp_path: Path) -> None:
    """Feature directories are .npy/.npz/.json: object arrays (pickles) are refused by np.load(allow_pickle=False)."""
    from seer.features import load_feature_file

    out = tmp_path / "feats"
    out.mkdir()
    marker = tmp_path / "PWNED"
    evil = np.array([Payload(marker)], dtype=object)
    np.save(out / "features.npy", evil, allow_pickle=True)
    np.save(out / "indices.npy", np.arange(1))
    np.save(out / "labels.npy", np.zeros(1, dtype=np.int64))
    (out / "meta.json").write_text(json.dumps({"merged": True, "format": "npy", "world_size": 1, "count": 1}))
    with pytest.raises((ValueError, RuntimeError, FileNotFoundError)):
        feats = load_feature_file(out)
        np.asarray(feats["features"]).sum()
    assert not marker.exists()
    # the evaluation CLIs read the same files
    from seer.cli import main

    for cmd in ("knn", "linear"):
        code = main([cmd, "--train", str(out), "--test", str(out)])
        assert code in (1, 2)
        assert not marker.exists()


def test_truncated_safetensors_detected(tmp_path: Path) -> None:
    from seer.weights import CheckpointError, load_trunk, save_trunk

    good = tmp_path / "good.safetensors"
    save_trunk(build_trunk(TINY), good)
    data = good.read_bytes()
    for cut in (0, 4, 8, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_trunk(bad)
        assert str(bad) in str(info.value)


def test_truncated_torch_zip_detected(tmp_path: Path) -> None:
    from seer.weights import CheckpointError, load_trunk

    good = tmp_path / "good.pth"
    torch.save({k: v.contiguous() for k, v in build_trunk(TINY).state_dict().items()}, good)
    data = good.read_bytes()
    assert zipfile.is_zipfile(good)
    for cut in (10, len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_trunk(bad)
        assert str(bad) in str(info.value)


@pytest.mark.parametrize("target", [".metadata", "shard"])
def test_truncated_dcp_checkpoint_detected(run_dir: Path, tmp_path: Path, target: str) -> None:
    from seer.train.checkpoint import read_trunk_state
    from seer.weights import load_trunk
    from seer.weights.cli import cli_export

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = _ckpt(run)
    victim = ckpt / ".metadata" if target == ".metadata" else next(ckpt.glob("*.distcp"))
    data = victim.read_bytes()
    for cut in (0, len(data) // 3, len(data) - 7):
        victim.write_bytes(data[:cut])
        for loader in (read_trunk_state, load_trunk):
            with pytest.raises(ValueError, match=r"truncated or corrupt") as info:
                loader(run)
            assert str(ckpt) in str(info.value)
        assert cli_export([str(run), str(tmp_path / "out.safetensors")]) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_untouched_checkpoint_still_loads(run_dir: Path) -> None:
    """The safe reader reads what DCP wrote (guards against the checks above passing by refusing everything)."""
    from seer.train.checkpoint import read_trunk_state
    from seer.weights import load_trunk

    state, cfg = read_trunk_state(run_dir)
    trunk = load_trunk(run_dir)
    assert cfg["depth"] == 4 and set(state) == set(trunk.state_dict())
    assert all(torch.equal(trunk.state_dict()[k].contiguous(), v.contiguous()) for k, v in state.items())
