"""Non-finite settings and weights, and checkpoint errors that name the real problem (issue 29, items 6, 13, 14).

* Every float setting of the config tree (found by walking the dataclasses, so a new field is covered) is refused
  as NaN, +inf or -inf, in every spelling, naming its dotted key; the CLI exits 2 before training.
* Non-finite weights are never saved (the save stops the run, naming the step and the tensor), never resumed
  from, and never loaded by ``load_trunk`` / ``seer export`` (NaN weights used to export as all-zero features).
* A checkpoint of another architecture is reported as intact, a corrupt ``meta.json`` by its path, a checkpoint
  rotated away while it is read is read again from the newest one, and ENOSPC while writing ``meta.json`` is the
  same clear error as for the shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import torch

import seer
from seer.config import ConfigError, PretrainConfig, config_from_dict, load_config
from seer.train.checkpoint import latest_checkpoint, list_checkpoints

pytestmark = pytest.mark.faults

SRC = Path(seer.__file__).resolve().parents[1]  # the checkout under test (subprocesses import the same one)
NON_FINITE = {".nan": "nan", "nan": "nan", "NaN": "nan", ".inf": "inf", "inf": "inf", "-.inf": "-inf", "-inf": "-inf",
              "1e400": "inf"}  # fmt: skip


def _float_keys(node=None, prefix: str = "") -> list[str]:
    """Dotted keys of every field of the config tree typed float (or float | None), found recursively."""
    node = PretrainConfig() if node is None else node
    hints = typing.get_type_hints(type(node))
    keys = []
    for f in dataclasses.fields(node):
        value, tp = getattr(node, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            keys += _float_keys(value, f"{prefix}{f.name}.")
        elif tp is float or float in typing.get_args(tp):
            keys.append(f"{prefix}{f.name}")
    return keys


FLOAT_KEYS = _float_keys()


def test_the_float_settings_are_found() -> None:
    """The discovery itself: the issue's examples are among the keys, and the tree has more than a handful."""
    for key in ("optim.weight_decay", "swav.temperature", "optim.clip_grad", "train.ckpt_every_minutes",
                "train.dist_timeout_minutes", "supervised.label_smoothing"):  # fmt: skip
        assert key in FLOAT_KEYS
    assert len(FLOAT_KEYS) >= 13, FLOAT_KEYS


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_setting_must_be_finite(key: str) -> None:
    for spelling, shown in NON_FINITE.items():
        with pytest.raises(ConfigError) as info:  # a dotted override, as on the command line
            load_config(None, [f"{key}={spelling}"])
        assert str(info.value).startswith(f"{key}={shown}: must be a finite number"), (spelling, str(info.value))
    for value in (math.nan, math.inf, -math.inf):  # the Python API: a dict of real floats
        node: dict = {}
        *parents, name = key.split(".")
        leaf = node
        for part in parents:
            leaf = leaf.setdefault(part, {})
        leaf[name] = value
        with pytest.raises(ConfigError, match=rf"^{key}=-?(nan|inf): must be a finite number"):
            config_from_dict(node)


def test_floats_inside_dict_and_list_settings_must_be_finite() -> None:
    """Not only typed fields: a float anywhere in the tree (model.cfg's RegNet widths, crop lists) is checked."""
    cases = {
        "model.cfg={depth: 4, w0: 16, wa: .nan, wm: 2.0, group_w: 8}": "model.cfg.wa=nan",
        "model.cfg={depth: 4, w0: 16, wa: 8.0, wm: .inf, group_w: 8}": "model.cfg.wm=inf",
        "data.crops=[[2, 32], [2, -.inf]]": "data.crops[1][1]=-inf",
    }
    for override, start in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert str(info.value).startswith(f"{start}: must be a finite number"), str(info.value)
    # an integer too large for any float is infinite as a float setting, and too large for an int64 as an int one
    with pytest.raises(ConfigError, match=r"^optim\.base_lr=inf: must be a finite number"):
        load_config(None, ["optim.base_lr=1" + "0" * 400])
    with pytest.raises(ConfigError, match=r"^train\.seed: must fit in a signed 64-bit integer"):
        load_config(None, ["train.seed=1" + "0" * 30])
    # a finite timeout too long for a timedelta (it used to overflow deep in datetime)
    with pytest.raises(ConfigError, match=r"^train\.dist_timeout_minutes: must be a finite number of minutes"):
        load_config(None, ["train.dist_timeout_minutes=1e300"])


def test_a_section_validated_alone_refuses_non_finite_floats() -> None:
    from seer.ssl.swav import SwAVConfig
    from seer.train.supervised import SupervisedConfig

    with pytest.raises(ValueError, match=r"^swav\.epsilon=nan: must be a finite number"):
        SwAVConfig(epsilon=math.nan).validate(4)
    with pytest.raises(ValueError, match=r"^supervised\.label_smoothing=-inf: must be a finite number"):
        SupervisedConfig(n_classes=3, label_smoothing=-math.inf).validate(4)


def _seer(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m seer.cli ARGS` on the checkout under test, in its own process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_"))}
    base.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "seer.cli", *args], cwd=cwd, env=base, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_issue_example_nan_weight_decay_is_refused_before_training(tmp_path: Path, tiny_overrides) -> None:
    """`optim.weight_decay=.nan`: a 1-step run used to exit 0 with NaN weights; now exit 2, one line, no run."""
    run = tmp_path / "run"
    out = _seer(["pretrain", *tiny_overrides, f"run_dir={run}", "train.total_steps=1", "data.batch_size_per_gpu=4",
                 "optim.weight_decay=.nan"], tmp_path)  # fmt: skip
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert out.stderr.strip() == "seer pretrain: optim.weight_decay=nan: must be a finite number", out.stderr
    assert not run.exists()


@pytest.mark.parametrize("override", ["swav.temperature=.inf", "optim.clip_grad=nan", "train.ckpt_every_minutes=nan",
                                      "train.dist_timeout_minutes=.inf"])  # fmt: skip
def test_issue_examples_exit_2_with_one_line(override: str, tmp_path: Path, capsys, tiny_overrides) -> None:
    from seer.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", *tiny_overrides, f"run_dir={run}", "train.total_steps=1", "data.batch_size_per_gpu=4",
                 override]) == 2  # fmt: skip
    assert not run.exists()
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert err.startswith(f"seer pretrain: {key}=") and "finite" in err and err.count("\n") == 1, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_infinite_dist_timeout_under_torchrun_is_a_config_error(tmp_path: Path, tiny_overrides) -> None:
    """Under torchrun's variables the timeout used to reach datetime.timedelta: an OverflowError traceback."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    out = _seer(["pretrain", *tiny_overrides, f"run_dir={tmp_path / 'run'}", "train.total_steps=1",
                 "train.device=cpu", "train.dist_timeout_minutes=.inf"], tmp_path, env)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip() == "seer pretrain: train.dist_timeout_minutes=inf: must be a finite number"


def test_init_distributed_refuses_a_timeout_it_cannot_use(monkeypatch) -> None:
    """The API path (a config built without validation): a ValueError naming the setting, not an OverflowError."""
    from seer.distributed.env import init_distributed

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    for minutes in (math.inf, math.nan, 1e300, 0.0, -1.0):
        with pytest.raises(ValueError, match=r"train\.dist_timeout_minutes.*finite number of minutes"):
            init_distributed(timeout_minutes=minutes, device="cpu")
    assert not torch.distributed.is_initialized()


# ----------------------------------------------------------------------------------------------------------------
# Non-finite weights: never saved, never resumed from, never loaded
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tiny_overrides) -> list[str]:
    return [*tiny_overrides, "swav.freeze_prototypes_iters=0", "data.batch_size_per_gpu=4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small) -> Path:
    """A real 2-step run (checkpoints at steps 1 and 2), reused read-only: copy it to change it."""
    from seer.train.loop import pretrain

    out = tmp_path_factory.mktemp("settings") / "run"
    pretrain(load_config(None, [*small, f"run_dir={out}", "train.total_steps=2", "train.ckpt_every_steps=1"]))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001", "step_00000002"]
    return out


POISONED = "trunk.stem.conv.weight"
TINY = {"depth": 4, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}


def _poison_after_step(monkeypatch, at: int, name: str = POISONED) -> None:
    """The optimizer's ``at``-th step leaves a NaN in parameter ``name`` (what NaN weight decay did), loss finite."""
    import seer.train.optim as optim

    real = optim.build_optimizer

    def build(model, cfg):
        opt = real(model, cfg)
        param = dict(model.named_parameters())[name]
        step, calls = opt.step, [0]

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            calls[0] += 1
            if calls[0] == at:
                with torch.no_grad():
                    param[(0,) * param.dim()] = math.nan  # (conv weights are channels_last: no view(-1))
            return out

        opt.step = poisoned_step
        return opt

    monkeypatch.setattr(optim, "build_optimizer", build)


def test_non_finite_weights_stop_the_run_before_the_save(tmp_path: Path, monkeypatch, capsys, small) -> None:
    import seer.train.optim as optim
    from seer.cli import main
    from seer.train.loop import pretrain
    from seer.train.rundir import RunDirConfigError

    real_build_optimizer = optim.build_optimizer
    _poison_after_step(monkeypatch, 2)
    monkeypatch.setenv("SEER_PROGRESS", "0")  # stderr holds the error line alone (no progress lines)
    run = tmp_path / "run"
    argv = [*small, f"run_dir={run}", "train.total_steps=3", "train.ckpt_every_steps=1"]
    with pytest.raises(FloatingPointError) as info:
        pretrain(load_config(None, argv))
    msg = str(info.value)
    assert POISONED in msg and "after step 2" in msg and "step_00000002" in msg, msg
    assert "last good" not in msg and str(run / "checkpoints" / "step_00000001") in msg, msg
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001"]  # the poisoned state was not saved
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # the advice works as written: a lower lr changes what is trained, so the resume needs --allow-config-change
    assert "lower optim.base_lr" in msg and "resume with --allow-config-change" in msg, msg
    cfg = load_config(None, argv)
    lower = [*argv, f"optim.base_lr={cfg.optim.base_lr / 10}"]
    with monkeypatch.context() as m:
        m.setattr(optim, "build_optimizer", real_build_optimizer)  # the cause is fixed
        with pytest.raises(RunDirConfigError, match="optim.base_lr"):
            pretrain(load_config(None, lower))
        assert pretrain(load_config(None, lower), allow_config_change=True)["step"] == 3
    # the CLI: exit 1, one line
    shutil.rmtree(run)
    assert main(["pretrain", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("seer pretrain: ") and POISONED in err and err.count("\n") == 1, err


def test_the_nan_loss_error_names_the_newest_checkpoint_plainly(tmp_path: Path, monkeypatch, small) -> None:
    """The loss check never calls a checkpoint "the last good one": it names the newest and when it was saved."""
    from seer.train.loop import pretrain

    run = tmp_path / "run"
    argv = [*small, f"run_dir={run}", "train.total_steps=4", "train.ckpt_every_steps=2"]
    # a NaN that appears in the weights after step 3, not at a save: the loss of step 4 is NaN
    _poison_after_step(monkeypatch, 3)
    with pytest.raises(FloatingPointError) as info:
        pretrain(load_config(None, argv))
    msg = str(info.value)
    assert msg.startswith("loss is nan at step 4") and "last good" not in msg, msg
    assert f"The newest checkpoint, {run / 'checkpoints' / 'step_00000002'} (step 2), was saved before step 4" in msg


def _poison_checkpoint(ckpt: Path, small: list[str], name: str = POISONED) -> None:
    """Rewrite a real checkpoint's shards with one NaN in ``name`` (meta.json kept): what an unchecked save wrote."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from seer.train.checkpoint import load_checkpoint
    from seer.train.loop import build_model
    from seer.train.optim import build_optimizer

    cfg = load_config(None, [*small, f"run_dir={ckpt.parent.parent}"])
    model = build_model(cfg, init_trunk=False)
    optimizer = build_optimizer(model, cfg.optim)
    load_checkpoint(ckpt, model, optimizer)
    with torch.no_grad():
        param = dict(model.named_parameters())[name]
        param[(0,) * param.dim()] = math.nan
    model_sd, optim_sd = get_state_dict(model, optimizer)
    for f in ckpt.glob("*.distcp"):
        f.unlink()
    with warnings_off():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt))


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_non_finite_checkpoint_is_refused_by_load_trunk_export_and_resume(run_dir, tmp_path, capsys, small) -> None:
    from seer.cli import main
    from seer.train.loop import pretrain
    from seer.weights import CheckpointError, load_trunk

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = latest_checkpoint(run)
    _poison_checkpoint(ckpt, small)
    with pytest.raises(CheckpointError) as info:
        load_trunk(run)
    assert str(ckpt) in str(info.value) and "stem.conv.weight" in str(info.value), str(info.value)
    # `seer export` fails, writes nothing: NaN weights can no longer become all-zero features
    out = tmp_path / "trunk.safetensors"
    assert main(["export", str(run), str(out)]) == 1
    err = capsys.readouterr().err
    assert "stem.conv.weight" in err and "NaN" in err and err.count("\n") == 1, err
    assert not out.exists()
    # resuming refuses it too, naming the checkpoint before it
    with pytest.raises(ValueError) as info:
        pretrain(load_config(None, [*small, f"run_dir={run}", "train.total_steps=3"]))
    msg = str(info.value)
    assert str(ckpt) in msg and POISONED in msg and str(run / "checkpoints" / "step_00000001") in msg, msg
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001", "step_00000002"]  # nothing new saved


def test_non_finite_weights_file_is_refused_by_load_trunk(tmp_path: Path) -> None:
    from seer.models.regnet import build_trunk
    from seer.weights import CheckpointError, load_classifier, load_trunk, save_trunk

    trunk = build_trunk(TINY)
    with torch.no_grad():
        w = trunk.s2.b1.conv2.conv.weight
        w[(1,) * w.dim()] = math.inf
    path = tmp_path / "w.safetensors"
    save_trunk(trunk, path)  # the export itself does not check: the reader must
    with pytest.raises(CheckpointError) as info:
        load_trunk(path)
    assert str(path) in str(info.value) and "s2.b1.conv2.conv.weight" in str(info.value)
    # a torch state dict file, a NaN in a BatchNorm buffer (not a parameter)
    clean = {k: v.contiguous() for k, v in build_trunk(TINY).state_dict().items()}
    sd = dict(clean, **{"s1.b1.conv2.bn.running_var": torch.full_like(clean["s1.b1.conv2.bn.running_var"], math.nan)})
    path2 = tmp_path / "w.pth"
    torch.save(sd, path2)
    with pytest.raises(CheckpointError, match=r"s1\.b1\.conv2\.bn\.running_var.* holds NaN or infinite") as info:
        load_trunk(path2)
    assert str(path2) in str(info.value)
    # a classifier head with a NaN: the trunk alone loads, the classifier does not
    sd = dict(clean, **{"head.fc.weight": torch.full((3, trunk.num_features), math.nan),
                        "head.fc.bias": torch.zeros(3)})  # fmt: skip
    path3 = tmp_path / "clf.pth"
    torch.save(sd, path3)
    load_trunk(path3)
    with pytest.raises(CheckpointError, match=r"weight of the classifier head holds NaN"):
        load_classifier(path3)


# ----------------------------------------------------------------------------------------------------------------
# Non-finite weights on one rank of two (FSDP): both ranks stop, nothing is saved
# ----------------------------------------------------------------------------------------------------------------
_WORKER = textwrap.dedent(
    """
    import json, math, sys, torch
    from torch.distributed.tensor import DTensor
    import seer.train.optim as optim
    from seer.config import load_config
    from seer.train.loop import pretrain

    out, overrides = sys.argv[1], sys.argv[2:]
    rank = int(__import__("os").environ["RANK"])
    real = optim.build_optimizer

    def build(model, cfg):
        opt = real(model, cfg)
        param = dict(model.named_parameters())["trunk.stem.conv.weight"]
        step, calls = opt.step, [0]

        def poisoned_step(*args, **kwargs):
            result = step(*args, **kwargs)
            calls[0] += 1
            if calls[0] == 2 and rank == 1:  # rank 1's own shard only
                with torch.no_grad():
                    local = param.to_local() if isinstance(param, DTensor) else param
                    local[(0,) * local.dim()] = math.nan
            return result

        opt.step = poisoned_step
        return opt

    optim.build_optimizer = build
    try:
        pretrain(load_config(None, overrides))
        result = {"error": None}
    except Exception as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_non_finite_shard_on_one_rank_stops_every_rank(tmp_path: Path, small) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    run = tmp_path / "run"
    port = _free_port()
    overrides = [*small, f"run_dir={run}", "train.total_steps=3", "train.ckpt_every_steps=1", "train.device=cpu",
                 "train.dist_timeout_minutes=2"]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "out"), *overrides],
            env=dict(
                os.environ,
                PYTHONPATH=str(SRC),
                RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for r in range(2):
        path = tmp_path / f"out.{r}.json"
        assert path.is_file(), logs[r][-3000:]
        result = json.loads(path.read_text())
        assert result["error"] == "FloatingPointError", (r, result, logs[r][-3000:])
        assert POISONED in result["message"] and "on rank 1" in result["message"], result
        assert "after step 2" in result["message"], result
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001"]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint errors that name the real problem (item 14)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, key",
    [
        ("model.cfg={depth: 4, w0: 24, wa: 8.0, wm: 2.0, group_w: 8}", "trunk.s1.b1.conv1.conv.weight"),
        ("swav.n_prototypes=48", "head.prototypes"),
    ],
)
def test_resuming_with_another_architecture_is_not_called_corrupt(run_dir, tmp_path, capsys, monkeypatch, small,
                                                                   change, key):  # fmt: skip
    from seer.cli import main
    from seer.train.loop import pretrain

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = latest_checkpoint(run)
    argv = [*small, f"run_dir={run}", "train.total_steps=3", change]
    # The run directory's config check refuses the change first, naming the key (tests/test_run_dir_config.py);
    # past it (--allow-config-change), the checkpoint itself says it holds another model.
    with pytest.raises(ValueError, match=re.escape(change.split("=")[0])) as info:
        pretrain(load_config(None, argv))
    assert type(info.value).__name__ == "RunDirConfigError"
    with pytest.raises(ValueError) as info:
        pretrain(load_config(None, argv), allow_config_change=True)
    msg = str(info.value)
    assert "corrupt" not in msg and "truncated" not in msg, msg
    assert type(info.value).__name__ == "CheckpointMismatchError"  # its own class (a ValueError: CLI exit 1)
    assert str(ckpt) in msg and "intact" in msg and "another model" in msg, msg
    assert f"'{key}" in msg and "in the checkpoint" in msg and "this run's model" in msg, msg
    assert "new run_dir" in msg and "meta.json" in msg, msg
    monkeypatch.setenv("SEER_PROGRESS", "0")  # stderr holds the error line alone (no progress lines)
    assert main(["pretrain", *argv, "--allow-config-change"]) == 1
    err = capsys.readouterr().err
    assert "intact" in err and "corrupt" not in err and err.count("\n") == 1, err
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001", "step_00000002"]


@pytest.mark.parametrize("content", [b'{"step": 2, "world_', b"\x00\xff garbage", b"[1, 2]", b'{"world_size": 1}'])
def test_corrupt_meta_json_is_named(run_dir, tmp_path, capsys, small, content: bytes) -> None:
    from seer.cli import main
    from seer.train.checkpoint import read_trunk_state
    from seer.train.loop import pretrain
    from seer.weights import load_trunk

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    meta = latest_checkpoint(run) / "meta.json"
    meta.write_bytes(content)
    for read in (read_trunk_state, load_trunk):
        with pytest.raises(ValueError) as info:
            read(run)
        assert str(meta) in str(info.value), str(info.value)
    with pytest.raises(ValueError) as info:
        pretrain(load_config(None, [*small, f"run_dir={run}", "train.total_steps=3"]))
    assert str(meta) in str(info.value), str(info.value)
    assert main(["export", str(run), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert str(meta) in err and err.count("\n") == 1, err


def _rotate_during_reads(monkeypatch, victim: Path, times: int = 1) -> list[Path]:
    """The first time a reader opens one of ``victim``'s shards, a job still training saves a newer checkpoint and
    its keep_last rotation renames ``victim`` away and deletes it (what save_checkpoint does), ``times`` times in a
    row (each newest checkpoint is rotated away in turn)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream
    rotated: list[Path] = []
    state = {"victim": victim}

    def create_stream(self, path, mode):
        current = state["victim"]
        if "r" in mode and len(rotated) < times and Path(path).parent == current:
            newer = current.with_name(f"step_{int(current.name.split('_')[1]) + 1:08d}")
            shutil.copytree(current, newer)
            doomed = current.with_name(f".tmp-{current.name}.deleting")
            os.replace(current, doomed)
            shutil.rmtree(doomed)
            rotated.append(current)
            state["victim"] = newer
        return real(self, path, mode)

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    return rotated


def test_a_run_read_while_keep_last_rotates_it_reads_the_newest(run_dir, tmp_path, monkeypatch) -> None:
    from seer.train.checkpoint import read_trunk_state
    from seer.weights import load_trunk

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    expected = load_trunk(run).state_dict()
    for read in (load_trunk, read_trunk_state):
        rotated = _rotate_during_reads(monkeypatch, latest_checkpoint(run), times=2)
        got = read(run)
        assert len(rotated) == 2, "the injected rotation never happened"
        state = got.state_dict() if hasattr(got, "state_dict") else got[0]
        assert all(torch.equal(expected[k], state[k]) for k in expected)
        monkeypatch.undo()
    # one checkpoint named explicitly is not swapped for another: its removal is said as it is, not "corrupt"
    from seer.train.checkpoint import CheckpointRemovedError

    ckpt = latest_checkpoint(run)
    _rotate_during_reads(monkeypatch, ckpt)
    with pytest.raises(CheckpointRemovedError) as info:
        load_trunk(ckpt)
    assert str(ckpt) in str(info.value) and "removed while it was being read" in str(info.value)
    assert "corrupt" not in str(info.value)


def test_disk_full_while_writing_meta_json_is_a_clear_error(tmp_path: Path, monkeypatch, capsys, small) -> None:
    import builtins

    from seer.cli import main
    from seer.train.loop import pretrain

    real_open = builtins.open
    fired: list[str] = []

    class Full(io.TextIOWrapper):
        def write(self, s) -> int:
            fired.append(self.name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

    def fake_open(file, mode="r", *args, **kwargs):
        name = os.path.basename(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        if "w" in mode and "meta.json" in name and "step_00000004" in os.fspath(file):
            return Full(real_open(file, "wb"), encoding="utf-8")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setenv("SEER_PROGRESS", "0")  # stderr holds the error line alone (no progress lines)
    run = tmp_path / "run"
    argv = [*small, f"run_dir={run}", "train.total_steps=4", "train.ckpt_every_steps=2"]
    with pytest.raises(OSError) as info:
        pretrain(load_config(None, argv))
    assert fired, "the injected fault never fired"
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC and "No space left on device" in msg, msg
    assert "cannot write checkpoint step_00000004" in msg and "meta.json" in msg, msg
    assert f"the earlier checkpoints are intact (latest: {run / 'checkpoints' / 'step_00000002'})" in msg, msg
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert main(["pretrain", *argv]) == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoint step_00000004" in err and err.count("\n") == 1, err


def test_saving_a_step_again_replaces_it_whole(tmp_path: Path, monkeypatch) -> None:
    """The same step saved again (a resumed run) replaces the old directory by renames: a reader never sees the old
    one half deleted, and a failed rename puts the old one back."""
    from seer.train.checkpoint import read_trunk_state, save_checkpoint

    model = torch.nn.Module()
    model.trunk = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, 5, model, optimizer, meta={"regnet_cfg": {}})
    with torch.no_grad():
        model.trunk.weight.fill_(7.0)
    save_checkpoint(tmp_path, 5, model, optimizer, meta={"regnet_cfg": {}})
    state, _ = read_trunk_state(tmp_path)
    assert torch.equal(state["weight"], torch.full((2, 3), 7.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
    # the final rename fails (after the old one was moved aside): the old one is back, the error is the clear one
    real = os.replace

    def failing(src, dst):
        if Path(dst).name == "step_00000005" and Path(src).name == ".tmp-step_00000005":
            raise OSError(errno.EIO, "injected")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with torch.no_grad():
        model.trunk.weight.fill_(9.0)
    with pytest.raises(OSError, match=r"cannot write checkpoint step_00000005 .*earlier checkpoints are intact"):
        save_checkpoint(tmp_path, 5, model, optimizer, meta={"regnet_cfg": {}})
    monkeypatch.undo()
    state, _ = read_trunk_state(tmp_path)
    assert torch.equal(state["weight"], torch.full((2, 3), 7.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
