"""seer eval-suite (seer.evaluation.suites): suites -> features -> protocols -> results.{json,md,png};
placeholders; suites by name; shards == folders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seer.evaluation import suites as bench
from seer.evaluation.cache import compute_features, split_features

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "eval"))
    spec = importlib.util.spec_from_file_location(f"eval_{name}", ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = {"depth": 4, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}


def _suite(tmp_path: Path) -> Path:
    suite = {
        "name": "t",
        "features": {"layers": ["avgpool", "res2"], "batch_size": 256, "device": "cpu"},
        "checkpoints": [
            {"name": "pixels", "kind": "pixels", "size": 8},
            {"name": "tiny", "preset": TINY, "init_seed": 0},
        ],
        "datasets": [{"name": "digits", "generate": {"kind": "digits", "size": 16}, "resolution": 16, "crop_pct": 1.0}],
        "protocols": [
            {"name": "knn", "ks": [10, 20]},
            {"name": "knn", "label": "knn-2shot", "ks": [1, 5], "n_per_class": 2, "n_tries": 2},
            {"name": "linear", "lrs": [0.03, 0.3], "head_types": ["bn"], "epochs": 3},
            {"name": "logreg", "label": "logreg-5shot", "Cs": [1.0], "n_per_class": 5, "n_tries": 2},
        ],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_suite_runs_and_writes_table_json_plot(tmp_path):
    out = tmp_path / "out"
    assert bench.main(["--suite", str(_suite(tmp_path)), "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    # pixels: 1 layer -> knn, knn-2shot, linear, logreg; tiny: 2 layers for the kNN protocols
    assert len(rows) == 4 + 6
    for r in rows:
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
    knn_pix = next(r for r in rows if r["checkpoint"] == "pixels" and r["protocol"] == "knn")
    assert knn_pix["top1"] > 0.9  # raw pixels of digits are easy for kNN
    full = res["results"]
    assert all(r["metadata"]["dataset"] == "digits" and r["metadata"]["resolution"] == 16 for r in full)
    knn = next(r for r in full if r["metadata"]["protocol_label"] == "knn")
    assert knn["settings"]["ks"] == [10, 20] and knn["settings"]["temperature"] == 0.07
    lin = next(r for r in full if r["metadata"]["protocol_label"] == "linear" and r["metadata"]["checkpoint"] == "tiny")
    assert lin["selected"]["layer"] in ("avgpool", "res2") and len(lin["heads"]) == 4
    md = (out / "results.md").read_text()
    assert md.count("| digits |") == len(rows)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # features are cached and reused by a second run
    cache = out / "features" / "tiny" / "digits" / "train" / "avgpool" / "features.npy"
    stamp = cache.stat().st_mtime_ns
    bench.main(["--suite", str(_suite(tmp_path)), "--out", str(out), "--quiet", "--only-protocol", "knn"])
    assert cache.stat().st_mtime_ns == stamp
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 3


def test_placeholders_and_validation(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    monkeypatch.delenv("SEER_CHECKPOINT", raising=False)
    with pytest.raises(bench.SuiteError, match="IMAGENET_DIR.*SEER_CHECKPOINT|--set IMAGENET_DIR"):
        bench.load_suite(ROOT / "configs/eval/imagenet1k.yaml")
    suite = bench.load_suite(
        ROOT / "configs/eval/imagenet1k.yaml",
        {"IMAGENET_DIR": "/data/in1k"},
        ["rg32=/ckpt/rg32.safetensors", "seer=/ckpt/x.safetensors"],
    )
    assert suite["datasets"][0]["train"] == "/data/in1k/train"
    assert {c["name"]: c["source"] for c in suite["checkpoints"]} == {
        "rg32": "/ckpt/rg32.safetensors",
        "seer": "/ckpt/x.safetensors",
    }
    monkeypatch.setenv("INAT_DIR", "/data/inat")
    monkeypatch.setenv("SEER_CHECKPOINT", "/ckpt/a.safetensors")
    assert bench.load_suite(ROOT / "configs/eval/inat2018.yaml")["datasets"][0]["test"] == "/data/inat/val"
    assert bench.load_suite(ROOT / "configs/eval/places205.yaml", {"PLACES205_DIR": "/p"})["name"] == "places205"
    small = bench.load_suite(ROOT / "configs/eval/small.yaml")
    assert {d["name"] for d in small["datasets"]} == {"digits", "shapes"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "checkpoints": [{"name": "p", "kind": "pixels"}],
                "datasets": [{"name": "d", "generate": {"kind": "digits"}}],
                "protocols": [{"name": "svm"}],
            }
        )
    )
    with pytest.raises(bench.SuiteError, match="protocol 'svm'"):
        bench.load_suite(bad)
    assert bench.main(["--suite", str(ROOT / "configs/eval/imagenet1k.yaml"), "--out", str(tmp_path / "x")]) == 2


def _folder(tmp_path: Path) -> Path:
    from seer.data.synthetic import write_image_folder

    return write_image_folder(tmp_path / "imgs", n_per_class=4, size=32, seed=0, n_classes=3)


def test_shards_give_the_same_features_as_the_folder(tmp_path):
    from seer.data.shards import write_shards
    from seer.models.regnet import build_trunk

    folder = _folder(tmp_path)
    write_shards(str(folder), tmp_path / "shards", max_samples_per_shard=5, progress=False)
    torch.manual_seed(0)
    trunk = build_trunk(TINY).eval()
    kw = {
        "layers": ["avgpool"],
        "resolution": 32,
        "crop_pct": 1.0,
        "batch_size": 4,
        "num_workers": 0,
        "device": torch.device("cpu"),
    }
    f_dir, y_dir = compute_features(trunk, str(folder), **kw)
    f_sh, y_sh = compute_features(trunk, str(tmp_path / "shards"), **kw)
    assert f_dir["avgpool"].shape == (12, trunk.num_features)
    np.testing.assert_array_equal(y_dir, y_sh)
    np.testing.assert_allclose(f_dir["avgpool"], f_sh["avgpool"], rtol=1e-4, atol=1e-5)
    # the suite path: trunks go through seer.features.extract_dataset (one cache directory per layer)
    kw.pop("layers")
    g_dir, z_dir = split_features(trunk, str(folder), tmp_path / "c1", layers=["avgpool", "res2"], **kw)
    g_sh, z_sh = split_features(trunk, str(tmp_path / "shards"), tmp_path / "c2", layers=["avgpool", "res2"], **kw)
    np.testing.assert_array_equal(z_dir, y_dir)
    np.testing.assert_array_equal(z_sh, y_dir)
    for layer in ("avgpool", "res2"):
        np.testing.assert_allclose(g_dir[layer], g_sh[layer], rtol=1e-4, atol=1e-5)
    assert g_dir["avgpool"].shape == (12, trunk.num_features)


def test_eval_scripts_end_to_end(tmp_path):
    folder = _folder(tmp_path)
    knn_script, linear_script = _load("knn"), _load("linear")
    out = tmp_path / "knn"
    assert (
        knn_script.main(
            [
                "--checkpoint",
                "regnety_200mf",
                "--random-init",
                "--train",
                str(folder),
                "--test",
                str(folder),
                "--resolution",
                "32",
                "--crop-pct",
                "1.0",
                "--ks",
                "1",
                "5",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["results"][0]["top1"]["1"] == 1.0  # test == train: the nearest neighbour is the image itself
    assert res["rows"][0]["top1"] == res["results"][0]["top1"]["5"]  # the table shows k=20, else the largest k
    assert res["results"][0]["metadata"]["resolution"] == 32 and res["results"][0]["settings"]["ks"] == [1, 5]
    out = tmp_path / "lin"
    assert (
        linear_script.main(
            [
                "--checkpoint",
                "regnety_200mf",
                "--random-init",
                "--train",
                str(folder),
                "--test",
                str(folder),
                "--resolution",
                "32",
                "--lrs",
                "0.1",
                "--heads",
                "bn",
                "--epochs",
                "2",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads((out / "results.json").read_text())["results"][0]["settings"]["selection"].startswith("none")


@pytest.mark.slow
def test_small_suite(tmp_path):
    assert bench.main(["--suite", str(ROOT / "configs/eval/small.yaml"), "--out", str(tmp_path), "--quiet"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["dataset"] for r in rows} == {"digits", "shapes"}


def test_suites_by_name_and_the_seer_command(tmp_path, capsys, monkeypatch):
    """`--suite small` finds the shipped suite from any directory; `seer eval-suite` runs it (two quick protocols of
    one dataset here; the whole suite is test_seer_eval_suite_small)."""
    from seer.cli import main

    monkeypatch.chdir(tmp_path)
    assert bench.load_suite("small") == bench.load_suite(ROOT / "configs/eval/small.yaml")
    with pytest.raises(bench.SuiteError, match="did you mean small"):
        bench.load_suite("smal")
    out = tmp_path / "out"
    argv = ["eval-suite", "--suite", "small", "--out", str(out), "--quiet", "--only-dataset", "digits",
            "--only-protocol", "knn", "--only-protocol", "knn-5shot"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    # pixels: 1 layer; tiny-random: avgpool and res2
    assert [(r["checkpoint"], r["protocol"], r["layer"]) for r in rows] == [
        ("pixels", "knn", "pixels"), ("pixels", "knn-5shot", "pixels"),
        ("tiny-random", "knn", "avgpool"), ("tiny-random", "knn", "res2"),
        ("tiny-random", "knn-5shot", "avgpool"), ("tiny-random", "knn-5shot", "res2"),
    ]  # fmt: skip
    assert rows[0]["top1"] > 0.9
    assert (out / "data" / "digits" / ".complete").exists()  # generated data goes under --out
    assert "wrote results.json, results.md, results.png" in capsys.readouterr().out
    # a typo in a subset is an error, not an empty run
    assert main([*argv[:5], "--only-dataset", "digit"]) == 2
    assert "--only-dataset digit: not in the suite" in capsys.readouterr().err


def test_plot_is_optional(tmp_path, capsys, monkeypatch):
    """Without matplotlib the table and JSON are written and one line names the extra that installs it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    rows = [{"dataset": "d", "checkpoint": "c", "protocol": "knn", "kind": "knn", "layer": "avgpool", "top1": 0.5,
             "top5": 0.9, "detail": ""}]  # fmt: skip
    payload = {"suite": {"name": "t"}, "rows": rows, "results": []}
    assert bench.write_outputs(tmp_path, payload, bench.markdown_table(rows, {"name": "t"})) == [
        "results.json",
        "results.md",
    ]
    assert not (tmp_path / "results.png").exists() and (tmp_path / "results.md").is_file()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "seer-ssl[plots]"' in err


@pytest.mark.slow
def test_seer_eval_suite_small(tmp_path):
    from seer.cli import main

    assert main(["eval-suite", "--suite", "small", "--out", str(tmp_path), "--quiet"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 20 and {r["dataset"] for r in rows} == {"digits", "shapes"}
