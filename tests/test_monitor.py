"""`seer pretrain` explains itself: the collapse diagnosis and the kNN monitor."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from seer.ssl.swav import SwAVConfig, build_model


class Constant(nn.Module):
    """A trunk whose features do not depend on the image: the collapse SwAV must not reach."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(x.shape[0], -1) + 0 * x.mean()


class Varied(Constant):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :16] * self.w


def _model(trunk: nn.Module, k: int = 32):
    cfg = SwAVConfig(head_dims=[32, 8], n_prototypes=k, freeze_prototypes_iters=0, use_bn=False)
    return build_model(trunk, cfg)


def _crops(b: int = 32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(b, 3, 8, 8) for _ in range(2)] + [torch.randn(b, 3, 4, 4) for _ in range(2)]


def test_forced_collapse_is_named_with_its_knobs() -> None:
    model = _model(Constant())
    out = model(_crops(), iteration=50)
    # identical embeddings: Sinkhorn spreads each sample evenly (codes 1/K), so the loss is at least ln K
    assert out["loss"].item() >= math.log(32) and out["stats"]["code_confidence"] == pytest.approx(1 / 32)
    message = model.diagnose(out, 50)
    assert message.startswith("codes collapsed to uniform at step 50") and "optim.base_lr" in message
    healthy = _model(Varied())
    out = healthy(_crops(), iteration=50)
    assert out["stats"]["codes_used"] > 3 and healthy.diagnose(out, 50) is None
    # codes on a few prototypes, and predictions on one
    few = dict(out, stats={**out["stats"], "codes_used": 2})
    assert re.match(r"codes collapsed to 2 of 32 prototypes at step 7: raise swav.epsilon", healthy.diagnose(few, 7))
    one = dict(out, stats={**out["stats"], "preds_used": 1})
    assert healthy.diagnose(one, 7).startswith("predictions collapsed to 1 of 32 prototypes at step 7")
    assert healthy.diagnose(out, -1) is None  # prototypes still frozen: too early to judge


def test_monitor_and_collapse_in_the_training_log(tmp_path: Path, tiny_overrides, capsys) -> None:
    from seer.config import load_config
    from seer.data.tasks import write_task
    from seer.train.loop import pretrain

    task = write_task("digits", tmp_path / "digits", n_train=60, n_test=50, size=32)
    run = tmp_path / "run"
    cfg = load_config(None, [*tiny_overrides, f"run_dir={run}", "train.total_steps=4", "train.log_every=2",
                             "optim.warmup_iters=1", f"train.monitor_images={task['root'] / 'test'}",
                             "train.monitor_every=2"])  # fmt: skip
    pretrain(cfg)
    out = capsys.readouterr().out
    lines = re.findall(r"monitor step (\d+): kNN top-1 (\d\.\d{3}) \(k=(\d+); (\d+) bank / (\d+) query images of "
                       r"10 classes\), loss (\d+\.\d{3})", out)  # fmt: skip
    assert [int(m[0]) for m in lines] == [2, 4] and all(int(m[3]) + int(m[4]) == 50 for m in lines), out[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [0 <= r["monitor_knn_top1"] <= 1 for r in records] == [True, True]


def test_monitor_needs_labels(tmp_path: Path) -> None:
    from PIL import Image

    from seer.train.monitor import KNNMonitor

    for i in range(6):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match="needs class subfolders"):
        KNNMonitor(str(tmp_path), 8)


def test_real_image_tasks_are_deterministic_and_split_their_sources() -> None:
    from seer.data.tasks import make_task

    a, b = make_task("digits", n_train=30, n_test=20, size=32, seed=3), make_task("digits", n_train=30, n_test=20,
                                                                                  size=32, seed=3)  # fmt: skip
    assert [im.tobytes() for im in a["train"][0]] == [im.tobytes() for im in b["train"][0]]
    assert a["classes"] == [str(d) for d in range(10)] and a["train"][0][0].size == (32, 32)
    assert len(a["test"][1]) == 20 and set(a["train"][1]) <= set(range(10))
    glyphs = make_task("glyphs", n_train=20, n_test=10, size=32)
    assert glyphs["classes"] == list("ABCDEFGHIJ") and glyphs["test"][0][0].mode == "RGB"
    with pytest.raises(ValueError, match="unknown task"):
        make_task("mnist")
