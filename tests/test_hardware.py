"""CPU capability checks: each answer can be forced, and the AVX2-only branch runs for real on any x86 CPU.

oneDNN's ``ONEDNN_MAX_CPU_ISA=AVX2`` (with ``ATEN_CPU_CAPABILITY=avx2`` and ``MKL_ENABLE_INSTRUCTIONS=AVX2``) makes
an AVX-512 or AMX machine refuse bf16 convolutions exactly as an AMD EPYC with AVX2 only does, so the code path a
user of such a machine takes is exercised on every machine that runs the suite.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from seer import hardware
from seer.config import load_config
from seer.evaluation import eval_knn
from seer.train.loop import pretrain

AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.fixture
def tiny(tiny_overrides):
    return [*tiny_overrides, "data.batch_size_per_gpu=8", "train.total_steps=2"]


def _knn_inputs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 64))
    labels = rng.integers(0, 5, 300)
    feats = (centers[labels] + rng.normal(scale=1.5, size=(300, 64))).astype(np.float32)
    return feats[:200], labels[:200], feats[200:], labels[200:]


def test_force_overrides_the_probe_and_restores_it():
    real = hardware.cpu_bf16_kernels()
    with hardware.force("cpu_bf16", not real):
        assert hardware.cpu_bf16_kernels() is (not real)
        with hardware.force("cpu_bf16", real):
            assert hardware.cpu_bf16_kernels() is real
        assert hardware.cpu_bf16_kernels() is (not real)
    assert hardware.cpu_bf16_kernels() is real
    with pytest.raises(KeyError, match="unknown capability"):
        with hardware.force("avx9000", True):
            pass


def test_environment_override_reaches_subprocesses():
    code = "from seer import hardware; print(hardware.cpu_bf16_kernels(), hardware.cpu_amx())"
    for value, expect in (("0", "False"), ("1", "True")):
        env = dict(os.environ, SEER_CPU_BF16=value, SEER_CPU_AMX=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == [expect, expect]


def test_cpu_info_records_the_machine():
    info = hardware.cpu_info()
    assert info["cpu_model"] and info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {"onednn_bf16", "onednn_fp16", "amx", "cores", "torch"} <= set(info)


def test_cpu_amp_dtype_follows_the_capability():
    hardware._WARNED.clear()
    with hardware.force("cpu_bf16", True):
        assert hardware.cpu_amp_dtype(torch.bfloat16, what="x") == torch.bfloat16
    assert hardware.cpu_amp_dtype(None, what="x") is None
    with hardware.force("cpu_bf16", False):
        with pytest.warns(RuntimeWarning, match="x: bf16 requested.*running in fp32"):
            assert hardware.cpu_amp_dtype(torch.bfloat16, what="x") is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert hardware.cpu_amp_dtype(torch.bfloat16, what="x") is None  # one line per process


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [True, False])
def test_bf16_training_on_cpu_follows_the_capability(tmp_path, kernels, tiny):
    """train.precision=bf16 on a CPU: bf16 autocast where oneDNN has bf16 kernels, else fp32 with one warning."""
    hardware._WARNED.clear()
    cfg = load_config(None, [*tiny, f"run_dir={tmp_path}", "train.precision=bf16"])
    seen = []
    real_autocast = torch.autocast

    def spy(device_type, *args, **kwargs):
        seen.append((device_type, kwargs.get("dtype")))
        return real_autocast(device_type, *args, **kwargs)

    with hardware.force("cpu_bf16", kernels), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autocast = spy
        try:
            summary = pretrain(cfg)
        finally:
            torch.autocast = real_autocast
    assert summary["step"] == 2
    said = [str(w.message) for w in caught if "no oneDNN bf16 kernels" in str(w.message)]
    if kernels:
        assert ("cpu", torch.bfloat16) in seen and not said
    else:
        assert ("cpu", torch.bfloat16) not in seen and len(said) == 1 and "train.precision" in said[0]


_AVX2_SCRIPT = r"""
import json, sys, warnings
import numpy as np, torch
from seer import hardware, build_trunk, extract_features
from seer.evaluation import eval_knn
sys.path.insert(0, sys.argv[2])
from test_hardware import _knn_inputs

out = {"bf16_kernels": hardware.cpu_bf16_kernels(), "capability": torch.backends.cpu.get_cpu_capability()}
torch.manual_seed(0)
trunk = build_trunk({"depth": 4, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}).eval()
x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    ref = trunk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would raise in the fused bf16 conv without the check
        amp = trunk(x)
out["autocast_cos"] = torch.nn.functional.cosine_similarity(amp.float(), ref).min().item()
imgs = (torch.rand(3, 48, 48, 3) * 255).to(torch.uint8).numpy()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    f32 = extract_features(imgs, trunk)
    bf16 = extract_features(imgs, trunk, amp="bf16")
out["extract_equal"] = bool(np.array_equal(f32, bf16))
out["warnings"] = [str(w.message) for w in caught if "oneDNN" in str(w.message)]
out["features"] = f32.tolist()
trunk.train()
with torch.autocast("cpu", dtype=torch.bfloat16):  # training under autocast: reference bf16 kernels, no crash
    loss = trunk(torch.randn(4, 3, 32, 32)).float().square().mean()
loss.backward()
out["train_grad_finite"] = all(torch.isfinite(p.grad).all().item() for p in trunk.parameters() if p.grad is not None)
res = eval_knn(*_knn_inputs(), ks=(5, 20), backend="torch")
out["knn"] = {str(k): v for k, v in res["top1"].items()}
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ONEDNN_MAX_CPU_ISA=AVX2 is an x86 ISA")
def test_an_avx2_only_cpu_runs_bf16_requests_kernels_and_knn(tmp_path):
    """The real AVX2-only branch, whatever this machine has: no oneDNN bf16, and nothing crashes or goes wrong."""
    script = tmp_path / "avx2.py"
    script.write_text(_AVX2_SCRIPT)
    result = tmp_path / "out.json"
    env = dict(os.environ, **AVX2_ONLY)
    env.pop("SEER_CPU_BF16", None)
    proc = subprocess.run([sys.executable, str(script), str(result), os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["bf16_kernels"] is False and out["capability"] == "AVX2"
    assert out["autocast_cos"] > 0.999
    assert out["extract_equal"] and len(out["warnings"]) == 1 and "running in fp32" in out["warnings"][0]
    assert out["train_grad_finite"]
    # the same features and kNN accuracies as this process computes with its own ISA (GEMM rounding aside)
    torch.manual_seed(0)
    from seer import build_trunk, extract_features

    trunk = build_trunk({"depth": 4, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}).eval()
    torch.randn(2, 3, 64, 64)
    imgs = (torch.rand(3, 48, 48, 3) * 255).to(torch.uint8).numpy()
    np.testing.assert_allclose(np.asarray(out["features"]), extract_features(imgs, trunk), rtol=1e-4, atol=1e-5)
    here = eval_knn(*_knn_inputs(), ks=(5, 20), backend="torch")["top1"]
    assert out["knn"] == {str(k): v for k, v in here.items()}


def test_cpu_fp16_follows_its_own_capability():
    """fp16 on CPU has its own oneDNN check (AVX512-FP16 / AMX-FP16): forced off it falls back to fp32 with one
    line, forced on it is kept; bf16's answer does not leak into it."""
    hardware._WARNED.clear()
    with hardware.force("cpu_fp16", True), hardware.force("cpu_bf16", False):
        assert hardware.cpu_amp_dtype(torch.float16, what="y") == torch.float16
    with hardware.force("cpu_fp16", False), hardware.force("cpu_bf16", True):
        with pytest.warns(RuntimeWarning, match="y: fp16 requested.*AVX512-FP16"):
            assert hardware.cpu_amp_dtype(torch.float16, what="y") is None
