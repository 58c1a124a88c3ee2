"""eval/knn.py, eval/linear.py and eval/benchmark.py (thin scripts over seer.evaluation) end to end on a tiny
generated dataset (random-init trunk)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from seer.data.synthetic import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalscripts")
    write_image_folder(root / "train", 6, 32, n_classes=3)
    write_image_folder(root / "test", 3, 32, seed=1, n_classes=3)
    return root


@pytest.mark.parametrize("script, extra", [("knn", ["--ks", "3", "5"]), ("linear", ["--epochs", "2"])])
def test_eval_script_end_to_end(folders, tmp_path, monkeypatch, script, extra):
    out = tmp_path / script
    argv = [f"eval/{script}.py", "--checkpoint", "regnety_200mf", "--random-init", "--train", str(folders / "train"),
            "--test", str(folders / "test"), "--resolution", "32", "--out", str(out), *extra]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "eval" / f"{script}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    payload = json.loads((out / "results.json").read_text())
    rows = payload["rows"]
    assert len(rows) == 1 and 0.0 <= rows[0]["top1"] <= 1.0
    assert (out / "results.md").exists()


@pytest.mark.parametrize("script, extra", [("knn", ["--ks", "3"]), ("linear", ["--epochs", "2"])])
def test_eval_script_features_mode_runs_the_cached_cli(tmp_path, monkeypatch, script, extra):
    """``--features`` hands the other arguments to ``seer knn`` / ``seer linear`` on cached feature files."""
    import numpy as np

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8))
    for name, n in (("train", 60), ("test", 30)):
        y = rng.integers(0, 3, n)
        feats = (centers[y] + 0.1 * rng.normal(size=(n, 8))).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", features=feats, labels=y)
    out = tmp_path / "result.json"
    argv = [f"eval/{script}.py", "--features", "--train", str(tmp_path / "train.npz"), "--test",
            str(tmp_path / "test.npz"), "--out", str(out), *extra]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "eval" / f"{script}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads(out.read_text())["settings"]["protocol"] == script


def test_benchmark_script_is_seer_eval_suite(tmp_path, monkeypatch, capsys):
    """eval/benchmark.py takes the options of `seer eval-suite` (here: a suite name that is not shipped)."""
    monkeypatch.setattr(sys, "argv", ["eval/benchmark.py", "--suite", "smal", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "eval" / "benchmark.py"), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python eval/benchmark.py: error:") and "did you mean small" in err
    assert not (tmp_path / "results.json").exists()
