"""`seer demo`: the recipe it trains is the shipped tiny_cpu file, the learning criteria it reports, and every stage
end to end on a reduced size."""

import json

import pytest

from seer.config import load_config, validate
from seer.demo import CRITERIA, METRICS, ROWS, _criteria, recipe, run_demo, supervised_overrides


def test_recipe_is_the_tiny_cpu_file_with_the_demos_overrides(tmp_path):
    import yaml

    shipped = load_config("tiny_cpu")
    cfg = recipe(tmp_path / "run", data={"source": "shards", "urls": "x-{000000..000001}.tar"}, seed=3,
                 monitor_images=tmp_path / "test")  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    got = load_config(str(tmp_path / "r.yaml"))
    validate(got, world_size=1)
    assert got.model == shipped.model and got.swav == shipped.swav and got.optim == shipped.optim
    assert got.data.multicrop == shipped.data.multicrop and got.data.source == "shards"
    assert got.train.total_steps == shipped.train.total_steps and got.train.seed == 3
    assert got.train.monitor_images == str(tmp_path / "test")
    assert got.train.monitor_every % got.train.log_every == 0  # the monitor runs on log steps
    short = recipe(tmp_path / "run", data={}, steps=60)  # a smoke run keeps the schedule's shape
    assert short["optim"]["warmup_iters"] < shipped.optim.warmup_iters
    assert short["swav"]["freeze_prototypes_iters"] < shipped.swav.freeze_prototypes_iters
    sup = supervised_overrides(cfg, 10, tmp_path / "sup")
    assert sup["method"] == "supervised" and "swav" not in sup and sup["model"] == cfg["model"]
    assert sup["data"] == cfg["data"] and sup["train"]["total_steps"] == cfg["train"]["total_steps"]


def _table(swav, random, raw, sup):
    return {name: {METRICS[0]: {"mean": v}} for name, v in zip(ROWS, (swav, random, raw, sup))}


def test_criteria_pass_and_fail_on_each_condition():
    ok = _criteria(_table(0.80, 0.50, 0.70, 0.95))
    assert all(ok["passed"].values()) and ok["knn_margin_over_random_points"] == pytest.approx(30.0)
    assert ok["fraction_of_supervised"] == pytest.approx(0.80 / 0.95)
    margin = CRITERIA["min_margin_over_random_points"] / 100
    assert list(_criteria(_table(0.80, 0.80 - margin + 0.01, 0.70, 0.95))["passed"].values()) == [False, True, True]
    assert list(_criteria(_table(0.80, 0.50, 0.81, 0.95))["passed"].values()) == [True, False, True]
    assert list(_criteria(_table(0.80, 0.50, 0.70, 1.01))["passed"].values()) == [True, True, False]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_demo_small_end_to_end(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(out, n_train=100, n_test=50, steps=12, seeds=[0, 1], world_size=2)
    for name in ("report.md", "loss.png", "accuracy.png", "results.json"):
        assert (out / name).exists(), name
    for seed in (0, 1):
        for name in ("pretrain.yaml", "supervised.yaml", "pretrain.safetensors", "supervised.safetensors"):
            assert (out / f"seed{seed}" / name).exists(), (seed, name)
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["table"]) == list(ROWS)
    for name, row in saved["table"].items():
        for metric in METRICS:
            stats = row[metric]
            assert len(stats["values"]) == (1 if name == "raw pixels" else 2)  # raw pixels: deterministic
            assert all(0.0 <= v <= 1.0 for v in stats["values"]) and stats["std"] >= 0
    assert set(saved["criteria"]["passed"]) == set(results["criteria"]["passed"])
    assert saved["settings"]["world_size"] == 2 and saved["settings"]["task"] == "digits"
    assert saved["settings"]["machine"]["cpu_model"] and saved["timings_s"]["total"] > 0
    report = (out / "report.md").read_text()
    assert "margin" in report and "± " in report and "supervised" in report
    metrics = [json.loads(line) for line in (out / "seed1" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 12 and "monitor_knn_top1" in metrics[-1]
    assert results["knn_margin_points"] == pytest.approx(saved["knn_margin_points"])
