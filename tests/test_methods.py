"""The method seam: the loop names no method and trains any registered one; a method is chosen by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seer.train.loop
from seer.config import ConfigError, load_config
from seer.ssl.swav import SwAVConfig, SwAVModel
from seer.train.checkpoint import read_trunk_state
from seer.train.loop import build_model, pretrain
from seer.train.methods import METHODS, Method, get_method, method_config
from seer.train.plan import plan


def test_the_loop_names_no_method():
    text = Path(seer.train.loop.__file__).read_text().lower()
    assert "swav" not in text


def test_swav_is_chosen_by_name(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    assert cfg.method == "swav" and get_method("swav").config is SwAVConfig
    assert isinstance(method_config(cfg), SwAVConfig) and method_config(cfg) is cfg.swav
    model = build_model(cfg)
    assert isinstance(model, SwAVModel) and model.head.n_prototypes == 32
    with pytest.raises(ConfigError, match=r"method: unknown method 'swa'.*did you mean 'swav'"):
        load_config(None, [*tiny_overrides, "method=swa"])
    # the section validates itself, naming its dotted key
    with pytest.raises(ConfigError, match=r"swav\.sinkhorn_iters: must be >= 1"):
        load_config(None, [*tiny_overrides, "swav.sinkhorn_iters=0"])


class Toy(nn.Module):
    """A supervised-style model: a linear classifier on the pooled features of the first crop, fixed targets."""

    def __init__(self, trunk: nn.Module, events: list | None) -> None:
        super().__init__()
        self.trunk, self.head = trunk, nn.Linear(trunk.num_features, 3)
        self.events, self.step = events, None
        if events is not None:  # the hooks exist only when asked for: the loop must cope with either
            self.before_forward = self._before_forward
            self.before_optimizer_step = self._before_optimizer_step

    def _before_forward(self, step: int) -> None:
        self.events.append(("before_forward", step))
        self.step = step

    def _before_optimizer_step(self, step: int) -> None:
        grads = all(p.grad is not None for p in self.head.parameters())
        self.events.append(("before_optimizer_step", step, grads))

    def forward(self, crops: list[torch.Tensor]) -> dict:
        if self.events is not None:
            self.events.append(("forward", self.step))
        logits = self.head(self.trunk(crops[0]))
        target = torch.arange(logits.shape[0], device=logits.device) % 3
        return {"loss": F.cross_entropy(logits, target), "logits": logits.detach()}


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "no-hooks"])
def test_the_loop_trains_a_module_through_the_seam(tmp_path, monkeypatch, tiny_overrides, hooks):
    events: list | None = [] if hooks else None
    built = []

    def build(trunk, method_cfg, *, bn_splits=1):
        assert method_cfg is None  # a method without a config section
        built.append(Toy(trunk, events))
        return built[-1]

    monkeypatch.setitem(METHODS, "toy", Method(build=build))
    cfg = load_config(None, [*tiny_overrides, "method=toy", f"run_dir={tmp_path}", "train.total_steps=3",
                             "data.batch_size_per_gpu=6", "optim.name=sgd", "optim.base_lr=0.1"])  # fmt: skip
    summary = pretrain(cfg)
    assert summary["step"] == 3 and summary["checkpoint"] and len(built) == 1
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    if hooks:  # in order, once per step, the optimizer hook after backward (gradients present)
        expected = []
        for step in range(3):
            expected += [("before_forward", step), ("forward", step), ("before_optimizer_step", step, True)]
        assert events == expected
    # the run directory holds the trunk like any other run's
    state, trunk_cfg = read_trunk_state(tmp_path)
    assert trunk_cfg["depth"] == 4 and set(state) == set(built[0].trunk.state_dict())
    # the planner asks the method for its head: a method without a section counts none
    assert plan(cfg, 1, None, device="cpu")["params"]["head"] == 0


# ----------------------------------------------------------------------------------------------------------------
# The second method: supervised (the ceiling of the demo, the base of finetuning)
# ----------------------------------------------------------------------------------------------------------------
def test_supervised_trains_on_the_labels_through_the_same_loop(tmp_path: Path, tiny_overrides) -> None:
    from seer.data.tasks import write_task

    task = write_task("digits", tmp_path / "digits", n_train=64, n_test=10, size=32)
    common = [*tiny_overrides, "method=supervised", "supervised.n_classes=10", "data.source=images",
              "data.multicrop=demo", f"data.images={task['root'] / 'train'}", "data.batch_size_per_gpu=16",
              "train.total_steps=6", "train.log_every=1", "optim.warmup_iters=1", "optim.name=sgd",
              "optim.base_lr=0.4"]  # fmt: skip
    summary = pretrain(load_config(None, [*common, f"run_dir={tmp_path / 'run'}"]))
    assert summary["step"] == 6 and math.isfinite(summary["loss"])
    model = build_model(load_config(None, [*common, "run_dir=none"]))
    assert model.head.out_features == 10
    trunk, _ = read_trunk_state(tmp_path / "run")  # the trunk is exported like a SwAV one
    assert trunk and all(torch.isfinite(v).all() for v in trunk.values() if v.is_floating_point())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 2 * math.log(10)  # cross-entropy over 10 classes, not SwAV's ln K

    # labels the classifier cannot hold are an error naming the key, never a silent wrap-around
    with pytest.raises(ValueError, match=r"label [4-9] is outside \[0, 4\).*supervised\.n_classes"):
        pretrain(load_config(None, [*common, "supervised.n_classes=4", f"run_dir={tmp_path / 'small'}"]))


def test_supervised_config_names_what_is_missing(tiny_overrides) -> None:
    with pytest.raises(ConfigError, match=r"supervised\.n_classes: must be >= 2"):
        load_config(None, [*tiny_overrides, "method=supervised", "data.source=images", "data.images=x"])
    with pytest.raises(ConfigError, match=r"data\.source: method 'supervised' trains on labels"):
        load_config(None, [*tiny_overrides, "method=supervised", "supervised.n_classes=3"])
    with pytest.raises(ConfigError, match=r"supervised\.crops: indices must be in \[0, 4\)"):
        load_config(None, [*tiny_overrides, "method=supervised", "supervised.n_classes=3", "supervised.crops=[7]",
                           "data.source=images", "data.images=x"])  # fmt: skip
