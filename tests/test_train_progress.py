"""What the training loop shows while it runs (issue 31, items 5, 7 and 13): progress with rate and ETA from the
start on stderr, the log lines and metrics.jsonl as before, one line for the epochs of a log window, validation at
most once per log window when epochs are shorter than that, and messages that name the kind of run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from seer.config import load_config
from seer.train.loop import pretrain

# "pretraining: 5/12 step (42%)  3.1 step/s  elapsed 0:02  eta 0:02  loss 5.1234  lr 0.01" (seer.progress)
PROGRESS = re.compile(r"^(?P<kind>[a-z -]+): (?P<n>\d+)/(?P<total>\d+) step \(\d+%\)  [\d.e+-]+ (step/s|s/step)")


@pytest.fixture
def fast_lines(monkeypatch):
    """Progress lines every 0.2 s instead of 10 s, whatever the caller's SEER_PROGRESS says."""
    monkeypatch.setenv("SEER_PROGRESS_SECONDS", "0.2")
    monkeypatch.delenv("SEER_PROGRESS", raising=False)


def _images(root: Path, classes: int = 2, per_class: int = 6, size: int = 16) -> Path:
    """A labeled folder of small solid-colour images (class subfolders)."""
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * c + 5 * i, 200 - 30 * c, 17 * i)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_progress_lines_come_from_the_start_with_rate_and_eta(tmp_path, tiny_overrides, fast_lines, capsys):
    cfg = load_config(None, [*tiny_overrides, f"run_dir={tmp_path}", "train.total_steps=12", "train.log_every=4",
                             "data.batch_size_per_gpu=8", "train.min_step_seconds=0.1"])  # fmt: skip
    pretrain(cfg)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert re.match(r"pretraining: 0/12 step \(0%\).*started$", lines[0]), err  # before the first step
    counted = [(m, line) for line in lines[1:] if (m := PROGRESS.match(line))]
    # at 0.1 s a step and a line every 0.2 s: the first counted line comes within the first few steps, not at a log
    # step; each shows the rate, the ETA while steps remain, and the step's loss and lr
    assert counted and int(counted[0][0]["n"]) <= 6, err
    assert all(m["kind"] == "pretraining" for m, _ in counted)
    running = [line for m, line in counted if int(m["n"]) < 12]
    assert running and all(" eta " in line and " loss " in line and " lr " in line for line in running), err
    assert lines[-1].startswith("pretraining: 12/12 step (100%)") and lines[-1].endswith("done")
    # the log lines (stdout) and metrics.jsonl are what they were: every log_every steps, nothing on stderr
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["4/12", "8/12", "12/12"]
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [4, 8, 12]
    assert "rank 0" not in out + err  # one process: no rank prefix anywhere


def test_progress_off_shows_nothing_and_changes_no_log_line(tmp_path, tiny_overrides, monkeypatch, capsys):
    monkeypatch.setenv("SEER_PROGRESS", "0")
    cfg = load_config(None, [*tiny_overrides, f"run_dir={tmp_path}", "train.total_steps=2",
                             "data.batch_size_per_gpu=8"])  # fmt: skip
    pretrain(cfg)
    out, err = capsys.readouterr()
    assert err == "" and "step 2/2  loss" in out


def test_a_small_folder_logs_epochs_per_window_and_validates_per_window(tmp_path, tiny_overrides, capsys):
    """12 images and a batch of 16: an epoch is shorter than a step. Before: one "epoch N done" line per epoch and a
    validation every step. Now: one epochs line and one validation per log window."""
    images = _images(tmp_path / "images")
    cfg = load_config(None, [*tiny_overrides, f"run_dir={tmp_path / 'run'}", "method=supervised",
                             "data.source=images", f"data.images={images}", "data.crops=null",
                             "data.multicrop=finetune_small", "data.image_size=16", "data.batch_size_per_gpu=16",
                             "train.total_steps=12", "train.log_every=4", f"train.val_images={images}",
                             "optim.name=sgd"])  # fmt: skip
    pretrain(cfg)
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 3, out  # one per log window (steps 4, 8, 12), each naming several epochs
    assert re.match(r"epochs 0-\d+ done \(\d+ epochs\): \d+ samples seen, 0 skipped, of \d+$", epoch_lines[0]), out
    seen = sum(int(re.search(r"(\d+) samples seen", line)[1]) for line in epoch_lines)
    assert seen == 12 * (12 * 16 // 12), out  # every epoch counted once: 16 epochs of 12 images
    assert [line.split()[2] for line in out.splitlines() if line.startswith("val step")] == ["4", "8", "12"]
    # a method trained on labels from a random init is not "pretraining"
    assert "pretraining" not in out and "supervised training" in out and "rank 0" not in out


def test_finetune_names_itself(tmp_path, tiny_overrides, fast_lines, capsys):
    source = tmp_path / "swav"
    pretrain(load_config(None, [*tiny_overrides, f"run_dir={source}", "train.total_steps=1",
                                "data.batch_size_per_gpu=8"]))  # fmt: skip
    capsys.readouterr()
    images = _images(tmp_path / "images")
    cfg = load_config(None, [*tiny_overrides, f"run_dir={tmp_path / 'ft'}", "method=supervised",
                             f"model.init_from={source}", "data.source=images", f"data.images={images}",
                             "data.crops=null", "data.multicrop=finetune_small", "data.image_size=16",
                             "data.batch_size_per_gpu=8", "train.total_steps=2"], kind="finetune")  # fmt: skip
    pretrain(cfg)
    out, err = capsys.readouterr()
    assert "pretraining" not in out + err, out + err
    assert re.search(r"^fine-tuning \{.*\} \+ supervised: ", out, re.M), out
    assert err.splitlines()[0].startswith("fine-tuning: 0/2 step")


def test_long_validation_shows_progress_on_rank_0_only(tmp_path, monkeypatch, fast_lines, capsys):
    import torch
    from torch import nn

    from seer.train import monitor

    monkeypatch.setattr(monitor, "PROGRESS_MIN_IMAGES", 4)  # as if the folder held 50,000 images
    images = _images(tmp_path / "val", per_class=3)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Linear(3, 2)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return self.w(x.mean(dim=(2, 3)))

    validator = monitor.ClassifierValidator(str(images), 16, batch_size=2)
    assert validator(Model())["images"] == 6
    err = capsys.readouterr().err
    assert "loading the validation images: 0/6 img" in err and "validating: 6/6 img (100%)" in err, err
    quiet = monitor.ClassifierValidator(str(images), 16, batch_size=2, report=False)  # ranks other than 0
    quiet(Model(), score=False)
    assert capsys.readouterr().err == ""
