"""`seer finetune`: the supervised method started from a checkpoint, through the same loop as pretraining.

A tiny SwAV run on real images (scikit-learn's digits) is fine-tuned with a new head, with the checkpoint's own
head, and as a linear head on the frozen trunk; SIGKILLed and resumed; exported and classified.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seer
from seer.config import ConfigError, load_config
from seer.train.loop import pretrain

SMALL = ["train.log_every=5", "optim.warmup_iters=2", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from seer.data.tasks import write_task

    root = tmp_path_factory.mktemp("digits")
    write_task("digits", root, n_train=160, n_test=60, seed=0)
    return root


@pytest.fixture(scope="module")
def swav_run(digits, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("swav") / "run"
    cfg = load_config("tiny_cpu", [f"run_dir={run}", "data.source=images", f"data.images={digits / 'train'}",
                                   "train.total_steps=6", "swav.freeze_prototypes_iters=2",
                                   "data.global_batch_size=32", *SMALL])  # fmt: skip
    pretrain(cfg)
    return run


def finetune_cfg(run_dir: Path, digits: Path, swav_run: Path, *extra: str, recipe: str = "tiny_cpu"):
    return load_config(recipe, [f"run_dir={run_dir}", f"model.init_from={swav_run}", f"data.images={digits / 'train'}",
                                "data.global_batch_size=32", "train.total_steps=8", "train.ckpt_every_steps=4",
                                *SMALL, *extra], kind="finetune")  # fmt: skip


def state(run: Path) -> dict[str, torch.Tensor]:
    model = seer.load_classifier(run)
    return {**{f"trunk.{k}": v for k, v in model.trunk.state_dict().items()}, "head.weight": model.head.weight,
            "head.bias": model.head.bias}  # fmt: skip


def test_recipes_resolve_by_name_and_infer_the_classes(digits, swav_run, tmp_path):
    cfg = finetune_cfg(tmp_path / "ft", digits, swav_run)
    assert cfg.method == "supervised" and cfg.supervised.n_classes == 10 and cfg.optim.nesterov
    assert load_config("tiny_cpu_linear", [f"data.images={digits / 'train'}"], kind="finetune").supervised.freeze_trunk
    big = load_config("seer_rg32_in1k", ["data.urls=/data/in1k-{000000..000099}.tar"], kind="finetune")
    assert big.model.init_from == "facebook/regnet-y-320-seer" and big.data.multicrop == "finetune_384"
    # `seer plan` and `seer pretrain` find a fine-tuning recipe's name too (pretraining recipes first)
    assert load_config("seer_rg32_in1k", ["data.urls=/x.tar"]).supervised.n_classes == 1000
    with pytest.raises(ConfigError, match="supervised.head"):
        finetune_cfg(tmp_path / "ft2", digits, swav_run, "supervised.head=old")
    with pytest.raises(ConfigError, match="optim.nesterov"):
        finetune_cfg(tmp_path / "ft3", digits, swav_run, "optim.momentum=0")


def test_finetune_validates_each_epoch_and_exports_a_classifier(digits, swav_run, tmp_path, capsys):
    run = tmp_path / "ft"
    cfg = finetune_cfg(run, digits, swav_run, f"train.val_images={digits / 'test'}")
    pretrain(cfg)
    log = capsys.readouterr().out
    lines = [line for line in log.splitlines() if line.startswith("val step")]
    # 160 images at 32 per step: an epoch is 5 steps -> step 5, then the last step
    assert [line.split()[2] for line in lines] == ["5", "8"], log
    assert "top-1" in lines[0] and "top-5" in lines[0] and "(60 images of 10 classes)" in lines[0]
    # the trunk started from the SwAV run, the head is new
    swav = seer.load_trunk(swav_run).state_dict()
    model = seer.load_classifier(run)
    assert model.id2label == {i: str(i) for i in range(10)}
    assert not torch.equal(model.trunk.state_dict()["stem.conv.weight"], swav["stem.conv.weight"])

    from seer.cli import main

    assert main(["export", str(run), str(tmp_path / "ft.safetensors")]) == 0
    assert "classifier (10 classes)" in capsys.readouterr().out
    paths = sorted((digits / "test").rglob("*.png"))[:6]
    assert main(["classify", *map(str, paths), "--model", str(tmp_path / "ft.safetensors"), "--top-k", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in out] == list(map(str, paths))
    with torch.no_grad():
        from seer.features.classify import classify

        direct = classify(paths, model, top_k=1)
    assert [line.split("\t")[1].split()[0] for line in out] == [r["labels"][0] for r in direct]


def test_frozen_trunk_is_the_linear_protocol(digits, swav_run, tmp_path):
    run = tmp_path / "linear"
    pretrain(finetune_cfg(run, digits, swav_run, recipe="tiny_cpu_linear"))
    before, after = seer.load_trunk(swav_run).state_dict(), seer.load_classifier(run).trunk.state_dict()
    for key in before:  # weights and BatchNorm statistics untouched
        assert torch.equal(before[key], after[key]), key


def test_existing_head_continues_from_the_checkpoint(digits, swav_run, tmp_path):
    first = tmp_path / "first"
    pretrain(finetune_cfg(first, digits, swav_run))
    second = tmp_path / "second"
    # a vanishing lr: the head must come back as it went in (a new head would be a fresh random one)
    pretrain(finetune_cfg(second, digits, first, "supervised.head=existing", "optim.base_lr=1e-12",
                          "optim.weight_decay=0"))  # fmt: skip
    a, b = seer.load_classifier(first), seer.load_classifier(second)
    assert torch.allclose(a.head.weight, b.head.weight, atol=1e-7) and torch.allclose(a.head.bias, b.head.bias)
    swav_dir = tmp_path / "from_swav"
    with pytest.raises(ValueError, match=r"model.init_from: .*no classifier head.*load_trunk"):
        pretrain(finetune_cfg(swav_dir, digits, swav_run, "supervised.head=existing"))
    five = tmp_path / "five"
    (five / "train").mkdir(parents=True)
    for c in "01234":
        os.symlink(digits / "train" / c, five / "train" / c)
    with pytest.raises(ValueError, match=r"has 10 classes, the data \(supervised.n_classes\) 5"):
        pretrain(load_config("tiny_cpu", [f"run_dir={tmp_path / 'x'}", f"model.init_from={first}",
                                          f"data.images={five / 'train'}", "supervised.head=existing", *SMALL],
                             kind="finetune"))  # fmt: skip


RUNNER = (
    "import sys\nfrom seer.config import load_config\nfrom seer.train.loop import pretrain\n"
    "pretrain(load_config('tiny_cpu', sys.argv[1:], kind='finetune'))\n"
)


@pytest.mark.slow
def test_sigkill_and_resume_equal_an_uninterrupted_finetune(digits, swav_run, tmp_path):
    common = [f"model.init_from={swav_run}", f"data.images={digits / 'train'}", "data.global_batch_size=32",
              "train.total_steps=12", "train.ckpt_every_steps=2", *SMALL]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-c", RUNNER, f"run_dir={whole}", *common], env=env, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, f"run_dir={killed}", *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000006").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run, whatever it is doing
    assert proc.wait(timeout=60) == -signal.SIGKILL
    done = sorted(p.name for p in (killed / "checkpoints").glob("step_*"))
    assert done and done[-1] < "step_00000012", done
    out = subprocess.run([sys.executable, "-c", RUNNER, f"run_dir={killed}", *common], env=env, check=True,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert "resumed from" in out.stdout + out.stderr
    a, b = state(whole), state(killed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
