"""`seer demo` end to end on a reduced size: every stage runs and the report artifacts are written."""

import json

import pytest

from seer.demo import run_demo


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_demo_small_end_to_end(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(out, n_train_per_class=20, n_test_per_class=5, steps=20, world_size=2, seed=0)
    for name in (
        "report.md",
        "loss.png",
        "accuracy.png",
        "results.json",
        "trunk.safetensors",
        "pretrain.yaml",
        "supervised.yaml",
        "supervised.safetensors",
    ):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["table"]) == {"SwAV pretrained", "random init", "supervised"}
    for row in saved["table"].values():
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert saved["settings"]["world_size"] == 2
    assert "margin" in (out / "report.md").read_text()
    metrics = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 20
    assert results["knn_margin_points"] == pytest.approx(saved["knn_margin_points"])
