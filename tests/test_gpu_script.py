"""benchmarks/gpu.py, the GPU check, on a machine without a GPU: its CPU-side checks, the clear failure, the partial
results, and its training path (seer's loop under torchrun) on gloo ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_runs_the_cpu_checks_writes_them_and_fails_clearly(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU here, and none on a GPU machine either
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == gpu.NO_GPU_EXIT, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("no CUDA GPU: ") and len(last) > len("no CUDA GPU: ") + 10, out.stderr
    assert sum(line.startswith("no CUDA GPU") for line in out.stderr.splitlines()) == 1
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert payload["status"] == "no_gpu" and payload["no_gpu"] in last
    checks = payload["cpu_checks"]
    for recipe in ("seer_rg32", "seer_rg128"):
        assert checks[f"config {recipe}"]["ok"] and checks[f"seer plan {recipe}"]["ok"], checks
        assert "GB per GPU" in checks[f"seer plan {recipe}"]["note"]
    assert checks["gpu tests collected"]["ok"] and int(checks["gpu tests collected"]["note"].split()[0]) >= 1
    assert all(c["ok"] for c in checks.values()), checks
    assert payload["sections"] == {name: {"status": "not run: no CUDA GPU"} for name in gpu.SECTIONS}
    md = (tmp_path / "gpu.md").read_text()
    assert "| seer plan seer_rg128 | ok:" in md and "## train: not run: no CUDA GPU" in md


def test_cpu_check_mode_passes_without_a_gpu(tmp_path, capsys):
    assert gpu.run(["--cpu-check", "--sections", "knn", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "gpu.json").read_text())
    assert payload["status"] == "cpu checks passed" and "gpu tests collected" not in payload["cpu_checks"]
    assert "seer plan seer_rg32" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["--sections", "bogus"], ["--gpus", "-1"], ["--steps", "0"], ["--batch-per-gpu", "0"], ["--nope"]]
)
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        gpu.parse_args(argv)
    assert info.value.code == 2


def test_arguments_round_steps_to_whole_log_windows():
    args = gpu.parse_args(["--warmup", "4", "--steps", "10"])
    assert (args.warmup, args.steps) == (4, 12)
    assert (gpu.parse_args(["--quick"]).warmup, gpu.parse_args(["--quick"]).steps) == (3, 6)


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-40GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10", 125.0),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_bf16_peak_by_device_name(name, tflops):
    assert gpu.gpu_peak_tflops(name, environ={})[0] == tflops


def test_bf16_peak_env_override():
    assert gpu.gpu_peak_tflops("Tesla V100", environ={gpu.PEAK_ENV: "125"}) == (125.0, gpu.PEAK_ENV)
    for bad in ("fast", "0", "nan", "-3"):
        with pytest.raises(ValueError, match=gpu.PEAK_ENV):
            gpu.gpu_peak_tflops("NVIDIA H100", environ={gpu.PEAK_ENV: bad})


def test_syncbn_groups_compared():
    assert gpu.syncbn_groups(8) == [0, 4, 2, 1]
    assert gpu.syncbn_groups(6) == [0, 3, 2, 1]
    assert gpu.syncbn_groups(4) == [0, 2, 1]
    assert gpu.syncbn_groups(2) == [0, 1]
    assert gpu.syncbn_groups(1) == [0]


def test_train_figures_from_log_windows():
    records = [{"step": 5, "images_per_sec": 1.0}, {"step": 10, "images_per_sec": 100.0, "data_time": 0.01},
               {"step": 15, "images_per_sec": 200.0, "data_time": 0.03, "loss": 9.0}]  # fmt: skip
    f = gpu.train_figures({"global_batch": 32, "records": records}, warmup_steps=5, flops_per_image=1e12,
                          hfu_factor=4 / 3, n_gpus=2, peak_tflops=100.0, mm_tflops=80.0)  # fmt: skip
    # the warm-up window (step 5) is left out; step times 0.32 and 0.16 s average to 0.24 s
    assert f["windows"] == 2 and f["step_s"] == pytest.approx(0.24) and f["images_per_sec"] == pytest.approx(32 / 0.24)
    assert f["tflops_per_gpu"] == pytest.approx(32 / 0.24 / 2)  # 1 TFLOP per image, 2 GPUs
    assert f["mfu"] == pytest.approx(32 / 0.24 / 2 / 100) and f["hfu"] == pytest.approx(f["mfu"] * 4 / 3)
    assert f["mfu_of_measured_mm"] == pytest.approx(32 / 0.24 / 2 / 80) and f["loss"] == 9.0
    assert gpu.train_figures({"global_batch": 8, "records": records}, 5, 1.0, 1.0, 1, None, None)["mfu"] is None
    with pytest.raises(ValueError, match="no log window"):
        gpu.train_figures({"global_batch": 8, "records": records[:1]}, 5, 1.0, 1.0, 1, None, None)


@pytest.mark.multiprocess
def test_training_section_runs_seers_loop_under_torchrun(tmp_path, tiny_overrides):
    """The train / syncbn path on 2 gloo ranks: two runs in one launch, each a row as soon as it finishes."""
    report = gpu.Report(tmp_path / "out", {})
    runs = [
        {"name": f"tiny sync_bn_group={g}", "config": None, "meta": {"group": g, "ranks_per_group": g or 2},
         "overrides": gpu.train_overrides(None, tmp_path / f"run{g}", steps=2, warmup=1, batch_per_gpu=4,
                                          device="cpu", extra=[*tiny_overrides, f"train.sync_bn_group={g}"])}
        for g in (0, 1)
    ]  # fmt: skip
    ok = gpu.section_train(report, "syncbn", runs, 2, tmp_path / "work", device="cpu", warmup=1, timeout=240, gpu={})
    rows = report.payload["sections"]["syncbn"]["runs"]
    assert ok, report.payload["sections"]["syncbn"]
    assert [r["group"] for r in rows] == [0, 1] and all(r["gpus"] == 2 and r["global_batch"] == 8 for r in rows)
    for r in rows:
        assert [rec["step"] for rec in r["records"]] == [1, 2, 3]
        assert r["figures"]["windows"] == 2 and r["figures"]["images_per_sec"] > 0 and r["figures"]["mfu"] is None
        assert r["save_s"] > 0 and r["data"].startswith("one synthetic batch") and r["peak_allocated_gib"] > 0
        assert not (tmp_path / f"run{r['group']}").exists()  # the run directory (its checkpoint) is removed
    written = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert written["sections"]["syncbn"]["status"] == "passed" and len(written["sections"]["syncbn"]["runs"]) == 2
    assert "exit_note" not in written["sections"]["syncbn"]  # the ranks exit 0: no teardown abort reaches torchrun
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "| train.sync_bn_group |" in md and "| 1 | 1 |" in md


@pytest.mark.multiprocess
def test_a_failing_run_fails_its_section_and_names_the_error(tmp_path, tiny_overrides):
    report = gpu.Report(tmp_path / "out", {})
    bad = gpu.train_overrides(None, tmp_path / "run", steps=1, warmup=1, batch_per_gpu=4, device="cpu",
                              extra=[*tiny_overrides, "optim.base_lr=1e30"])  # fmt: skip
    ok = gpu.section_train(report, "train", [{"name": "tiny", "config": None, "overrides": bad}], 1,
                           tmp_path / "work", device="cpu", warmup=1, timeout=240, gpu={})  # fmt: skip
    s = report.payload["sections"]["train"]
    assert not ok and s["status"] == "failed" and s["runs"][0]["ok"] is False
    assert "FloatingPointError" in s["runs"][0]["error"] and "torchrun exit" in s["error"]
