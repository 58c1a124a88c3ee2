"""Optional dependencies: a missing one gives one line naming the extra, and the rest of the job goes on."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from seer import extras
from seer.config import load_config
from seer.evaluation import eval_knn
from seer.train.loop import pretrain


@pytest.fixture
def tiny(tiny_overrides):
    return [*tiny_overrides, "data.batch_size_per_gpu=8", "train.total_steps=2"]


def _missing(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def test_require_names_the_extra(monkeypatch):
    _missing(monkeypatch, "faiss")
    with pytest.raises(ImportError, match=r'pip install "seer-ssl\[faiss\]"'):
        extras.require("faiss")
    assert extras.require("numpy") is np


def test_optional_says_one_line_once(monkeypatch, capsys):
    _missing(monkeypatch, "matplotlib")
    extras._SAID.discard("matplotlib")
    assert extras.optional("matplotlib", "plots") is None
    assert extras.optional("matplotlib", "plots") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['seer: plots skipped: matplotlib is not installed (pip install "seer-ssl[plots]")']


def test_knn_faiss_backend_without_faiss_names_the_extra(monkeypatch):
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 2, 40)
    assert eval_knn(feats, labels, feats, labels, ks=(5,), backend="torch")["top1"][5] > 0.5
    _missing(monkeypatch, "faiss")
    with pytest.raises(ImportError, match=r'backend="faiss" needs faiss.*seer-ssl\[faiss\]'):
        eval_knn(feats, labels, feats, labels, ks=(5,), backend="faiss")


@pytest.mark.slow
def test_pretraining_without_tensorboard_logs_metrics_and_says_so(tmp_path, monkeypatch, capsys, tiny):
    _missing(monkeypatch, "torch.utils.tensorboard", "tensorboard")
    extras._SAID.discard("torch.utils.tensorboard")
    summary = pretrain(load_config(None, [*tiny, f"run_dir={tmp_path}", "train.tensorboard=true"]))
    assert summary["step"] == 2 and (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    assert not (tmp_path / "tensorboard").exists()
    assert "TensorBoard logs skipped" in capsys.readouterr().err
