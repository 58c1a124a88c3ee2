"""A run directory is resumed only with the config its checkpoints were trained with (issue 31, items 2 and 13).

Keys that change what is trained are refused, named, before anything is written; the keys of
``seer.config.RESUME_MAY_CHANGE`` may change; ``--allow-config-change`` keeps the old config beside the new one;
``--dry-run`` writes nothing; a run that fails before its first checkpoint leaves no directory that looks like a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from seer.config import (
    RESUME_MAY_CHANGE,
    ConfigError,
    PretrainConfig,
    config_differences,
    config_to_dict,
    load_config,
)
from seer.data.synthetic import SyntheticMultiCrop
from seer.train.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from seer.train.loop import cli_finetune, cli_main, pretrain
from seer.train.rundir import RunDirConfigError


@pytest.fixture
def tiny(tiny_overrides):
    return [*tiny_overrides, "data.batch_size_per_gpu=8", "train.total_steps=2", "swav.freeze_prototypes_iters=1"]


def _cfg(tiny, run: Path, *extra: str):
    return load_config(None, [*tiny, f"run_dir={run}", *extra])


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` with its bytes and mtime: what "nothing was written" compares. Not the lock file,
    which every run takes (a dry run does not: that test checks it on its own)."""
    files = (p for p in root.rglob("*") if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


@pytest.fixture
def finished(tmp_path, tiny) -> Path:
    """A finished 2-step run."""
    run = tmp_path / "run"
    pretrain(_cfg(tiny, run))
    return run


def test_a_change_of_what_is_trained_is_refused_naming_the_keys(finished, tiny, capsys):
    before = _snapshot(finished)
    with pytest.raises(RunDirConfigError) as err:
        pretrain(_cfg(tiny, finished, "optim.base_lr=0.2", "swav.epsilon=0.07"))
    msg = str(err.value)
    assert "optim.base_lr: 0.3 -> 0.2" in msg and "swav.epsilon: 0.05 -> 0.07" in msg, msg
    assert "--allow-config-change" in msg and "another run_dir" in msg and "Nothing was written" in msg
    assert _snapshot(finished) == before  # config.yaml still describes the checkpoints

    # the command line: one error line block on stderr, exit 1, nothing on stdout
    code = cli_main([*tiny, f"run_dir={finished}", "optim.base_lr=0.2"])
    out, errtext = capsys.readouterr()
    assert code == 1 and errtext.startswith("seer pretrain: run_dir") and "optim.base_lr" in errtext
    assert "NaN" not in out and _snapshot(finished) == before

    # another global batch (the lr scales with it) is refused too, by name
    with pytest.raises(RunDirConfigError, match=r"global batch: 8 -> 16"):
        pretrain(_cfg(tiny, finished, "data.batch_size_per_gpu=16"))


def test_a_checkpoint_without_its_config_is_checked_against_config_yaml(finished, tiny, capsys):
    meta_path = latest_checkpoint(finished) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]  # as checkpoints of older versions were saved
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RunDirConfigError, match=r"optim.base_lr: 0.3 -> 0.2"):
        pretrain(_cfg(tiny, finished, "optim.base_lr=0.2"))
    (finished / "config.yaml").unlink()  # nothing left to compare with: said, not guessed
    capsys.readouterr()
    assert pretrain(_cfg(tiny, finished, "optim.base_lr=0.2", "train.total_steps=3"))["step"] == 3
    assert "records no config" in capsys.readouterr().out


def test_the_allowed_keys_resume_and_update_config_yaml(finished, tiny, capsys):
    changed = ["train.total_steps=4", "train.log_every=2", "train.ckpt_every_steps=1", "train.keep_last=5",
               "data.global_batch_size=8", "data.batch_size_per_gpu=4", "train.lock_wait_minutes=1"]  # fmt: skip
    capsys.readouterr()
    summary = pretrain(_cfg(tiny, finished, *changed))
    out = capsys.readouterr().out
    assert summary["step"] == 4 and math.isfinite(summary["loss"])
    assert "resumed from" in out and "train.total_steps: 2 -> 4" in out
    saved = yaml.safe_load((finished / "config.yaml").read_text())
    assert saved["train"]["total_steps"] == 4 and saved["train"]["keep_last"] == 5
    assert not list(finished.glob("config.step_*.yaml"))  # nothing that changes what is trained changed
    assert [p.name for p in list_checkpoints(finished)][-2:] == ["step_00000003", "step_00000004"]
    assert read_meta(latest_checkpoint(finished))["config"]["train"]["total_steps"] == 4


def test_a_requeue_with_the_same_config_resumes(tmp_path, tiny, monkeypatch, capsys):
    run = tmp_path / "run"
    common = ["train.total_steps=4", "train.ckpt_every_steps=2"]
    real = SyntheticMultiCrop.batch

    def preempted(self, step, *args):
        if step == 2:  # after the step-2 checkpoint, as a preemption would
            raise KeyboardInterrupt
        return real(self, step, *args)

    monkeypatch.setattr(SyntheticMultiCrop, "batch", preempted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(tiny, run, *common))
    monkeypatch.setattr(SyntheticMultiCrop, "batch", real)
    config = (run / "config.yaml").read_bytes()
    assert latest_checkpoint(run).name == "step_00000002"  # the run had a checkpoint: nothing was taken back
    capsys.readouterr()
    summary = pretrain(_cfg(tiny, run, *common))
    assert "resumed from" in capsys.readouterr().out and summary["step"] == 4
    assert (run / "config.yaml").read_bytes() == config


def test_a_finished_run_says_so_with_its_step_and_loss(finished, tiny, capsys):
    capsys.readouterr()
    losses = [json.loads(line)["loss"] for line in (finished / "metrics.jsonl").read_text().splitlines()]
    before = _snapshot(finished)
    summary = pretrain(_cfg(tiny, finished))
    assert summary["step"] == 2 and summary["loss"] == pytest.approx(losses[-1])
    assert "already at step 2 of train.total_steps=2: nothing to train" in summary["note"]
    assert "nothing to train" in capsys.readouterr().out
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN
    assert _snapshot(finished) == before
    # a checkpoint from before the loss was recorded: null, and the note says why
    meta_path = latest_checkpoint(finished) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["loss"]
    meta_path.write_text(json.dumps(meta))
    summary = pretrain(_cfg(tiny, finished))
    assert summary["loss"] is None and "records no loss" in summary["note"]


def test_allow_config_change_keeps_the_old_config(finished, tiny, capsys):
    capsys.readouterr()
    summary = pretrain(_cfg(tiny, finished, "optim.base_lr=0.2", "train.total_steps=3"), allow_config_change=True)
    out = capsys.readouterr().out
    assert summary["step"] == 3 and "optim.base_lr: 0.3 -> 0.2" in out and "config.step_00000002.yaml" in out
    old = yaml.safe_load((finished / "config.step_00000002.yaml").read_text())
    new = yaml.safe_load((finished / "config.yaml").read_text())
    assert old["optim"]["base_lr"] == 0.3 and new["optim"]["base_lr"] == 0.2
    assert read_meta(latest_checkpoint(finished))["config"]["optim"]["base_lr"] == 0.2
    # the command line's flag does the same; the new config is now the one a resume is compared with
    code = cli_main([*tiny, f"run_dir={finished}", "optim.base_lr=0.1", "train.total_steps=4",
                     "--allow-config-change"])  # fmt: skip
    assert code == 0 and (finished / "config.step_00000003.yaml").is_file()
    assert yaml.safe_load((finished / "config.step_00000003.yaml").read_text())["optim"]["base_lr"] == 0.2


def test_dry_run_writes_nothing(tmp_path, finished, tiny, capsys):
    new = tmp_path / "new"
    assert cli_main([*tiny, f"run_dir={new}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not new.exists()
    assert "nothing was created or written" in out and "starts at step 0" in out and "M params" in out
    assert "pretraining, method swav" in out and "8 global = 8 per rank x 1 rank" in out

    before, lock = _snapshot(finished), (finished / ".lock").stat().st_mtime_ns
    assert cli_main([*tiny, f"run_dir={finished}", "--dry-run"]) == 0
    assert "already at step 2" in capsys.readouterr().out
    assert cli_main([*tiny, f"run_dir={finished}", "train.total_steps=5", "--dry-run"]) == 0
    assert "resumes from" in capsys.readouterr().out
    # the run directory's check applies: refused as the run would be, allowed with the flag
    assert cli_main([*tiny, f"run_dir={finished}", "optim.base_lr=0.2", "--dry-run"]) == 1
    assert "optim.base_lr: 0.3 -> 0.2" in capsys.readouterr().err
    assert cli_main([*tiny, f"run_dir={finished}", "--dry-run", "optim.base_lr=0.2", "--allow-config-change"]) == 0
    assert "config.step_00000002.yaml" in capsys.readouterr().out
    assert _snapshot(finished) == before and (finished / ".lock").stat().st_mtime_ns == lock
    # a config the run would refuse is refused by the dry run too, with the config error's exit code
    assert cli_main([*tiny, f"run_dir={new}", "optim.warmup_iters=5", "--dry-run"]) == 2
    assert "optim.warmup_iters=0" in capsys.readouterr().err and not new.exists()


def test_finetune_dry_run_names_the_kind(tmp_path, finished, capsys):
    images = tmp_path / "images"
    for c in ("a", "b"):
        (images / c).mkdir(parents=True)
        for i in range(2):
            (images / c / f"{i}.png").write_bytes(b"")  # never opened: the dry run reads no image
    code = cli_finetune(["--config", "tiny_cpu", f"run_dir={tmp_path / 'ft'}", f"model.init_from={finished}",
                         f"data.images={images}", "--dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "fine-tuning, method supervised" in out and str(finished) in out, out
    assert not (tmp_path / "ft").exists()


def test_a_failed_start_leaves_no_run(tmp_path, tiny, monkeypatch, capsys):
    # a new directory: only the (empty) lock file stays, which the lock never deletes
    run = tmp_path / "run"
    wrong = [f"model.init_from={tmp_path / 'missing'}"]
    with pytest.raises(FileNotFoundError):
        pretrain(_cfg(tiny, run, *wrong))
    assert sorted(p.name for p in run.iterdir()) == [".lock"] and not (run / ".lock").read_bytes()
    assert "removed what this run wrote" in capsys.readouterr().out
    # a directory the user made: their files stay, the run's go
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    real = SyntheticMultiCrop.batch
    monkeypatch.setattr(SyntheticMultiCrop, "batch", lambda self, *a: [c * math.nan for c in real(self, *a)])
    with pytest.raises(FloatingPointError, match="No checkpoint was saved"):
        pretrain(_cfg(tiny, mine))
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "notes.txt"]
    # a run resumed with --allow-config-change that fails before its first checkpoint: config.yaml is put back
    monkeypatch.setattr(SyntheticMultiCrop, "batch", real)
    done = tmp_path / "done"
    pretrain(_cfg(tiny, done))
    config, before = (done / "config.yaml").read_bytes(), _snapshot(done / "checkpoints")
    monkeypatch.setattr(SyntheticMultiCrop, "batch", lambda self, *a: [c * math.nan for c in real(self, *a)])
    with pytest.raises(FloatingPointError):
        pretrain(_cfg(tiny, done, "optim.base_lr=0.2", "train.total_steps=3"), allow_config_change=True)
    assert (done / "config.yaml").read_bytes() == config and not list(done.glob("config.step_*"))
    assert _snapshot(done / "checkpoints") == before


def test_config_differences_and_the_table():
    cfg = PretrainConfig()
    saved = config_to_dict(cfg)
    assert config_differences(saved, cfg) == []
    del saved["optim"]["clip_grad"]  # written before the key existed: its default
    saved["train"]["removed_since"] = 1  # a key the tree no longer has: ignored
    assert config_differences(saved, cfg) == []
    cfg.optim.base_lr, cfg.model.cfg = 0.1, {"depth": 2}
    assert config_differences(saved, cfg) == [("model.cfg", None, {"depth": 2}), ("optim.base_lr", 0.3, 0.1)]

    # every key the table allows exists in the tree, and no section is allowed whole
    def keys(node, prefix=""):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            yield from keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [f"{prefix}{f.name}"]

    known = set(keys(PretrainConfig()))
    assert set(RESUME_MAY_CHANGE) <= known, set(RESUME_MAY_CHANGE) - known
    for refused in ("method", "model.cfg", "model.preset", "optim.base_lr", "data.source", "swav.epsilon",
                    "train.seed", "train.precision", "optim.warmup_iters"):  # fmt: skip
        assert refused not in RESUME_MAY_CHANGE


@pytest.mark.parametrize(
    "overrides, fix",
    [
        (["train.total_steps=2"], "set optim.warmup_iters=0"),  # the recipe's warmup (20) outlasts the run
        (["optim.nesterov=true", "optim.name=lars"], "set optim.nesterov=false"),
        (["data.image_size=16"], "set data.image_size=32"),
        (["method=supervised"], "set data.source=images data.images=DIR"),
        (["data.source=shards"], "set data.urls="),
        (["model.init_from=' '"], "set model.init_from=null"),
        # the method's own section (seer/ssl/swav.py): a crop count only data.* can raise, indices it bounds
        (["data.crops=[[1, 32]]"], "set data.multicrop to a preset with 2 or more crops, or data.crops=[[2, RES]"),
        (["swav.crops_for_assign=[0, 9]"], "set swav.crops_for_assign=[0, 1] (the first two crops), or more crops"),
    ],
)
def test_a_refused_value_names_the_override_that_fixes_it(overrides, fix):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", overrides)
    assert fix in str(err.value), str(err.value)


def test_the_method_sections_name_the_override_too():
    from seer.ssl.swav import SwAV
    from seer.train.supervised import SupervisedConfig

    with pytest.raises(ValueError, match=r"supervised.crops: .* got \[5\]; set supervised.crops=\[\] \(every"):
        SupervisedConfig(n_classes=10, crops=[5]).validate(n_crops=2)
    SupervisedConfig(n_classes=10, crops=[]).validate(n_crops=2)  # the fix it names passes
    # the queue's size is checked at its first step, where the batch and the world size are known
    head = SwAV([8, 6], n_prototypes=7, queue_length=3)
    with pytest.raises(ValueError, match=r"swav.queue_length: .* got 3; set swav.queue_length=4 or more .*=0"):
        head(torch.randn(2 * 4, 8), 2, 0)
    SwAV([8, 6], n_prototypes=7, queue_length=4)(torch.randn(2 * 4, 8), 2, 0)


def test_bn_splits_refusal_names_a_divisor():
    from seer.config import validate

    # the per-GPU batch depends on the world size: checked by validate(cfg, world_size), as the loop calls it
    cfg = load_config("tiny_cpu", ["data.global_batch_size=0", "data.batch_size_per_gpu=12", "train.bn_splits=5"])
    with pytest.raises(ConfigError, match=r"must divide the per-GPU batch \(12\), got 5; set train.bn_splits=4"):
        validate(cfg, world_size=1)
