"""The wheel is the whole package: built from the tracked files, installed into a fresh venv with the pinned torch,
and run from a directory that holds no checkout (recipes, suites, SLURM launching, extraction, evaluation)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = os.environ.get("SEER_TORCH_PIN", "torch==2.14.1 torchvision==0.29.1").split()


def test_pyproject_lists_every_package():
    """setuptools is given an explicit package list (so configs/ can ship as seer.recipes): it must stay complete."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "seer").rglob("__init__.py")}
    assert listed - {"seer.recipes", "seer.recipes.eval", "seer.recipes.finetune", "seer.recipes.pretrain"} == found


def test_no_upper_bounds_on_torch_and_one_faiss_per_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "seer-ssl"
    for dep in project["dependencies"]:
        assert "<" not in dep and "==" not in dep, dep
        assert not dep.startswith("faiss"), "faiss-cpu and faiss-gpu share a module: faiss belongs to an extra"
    for extra, deps in project["optional-dependencies"].items():
        assert sum(d.startswith("faiss") for d in deps) <= 1, extra
    assert project["optional-dependencies"]["gpu"] == ["faiss-gpu>=1.8"]


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_wheel_installed_outside_the_checkout_does_everything(tmp_path):
    # 1. the wheel, from what git tracks (an untracked file in the checkout cannot make it pass)
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    for rel in files:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
         tmp_path, dict(os.environ))  # fmt: skip
    (wheel,) = dist.glob("seer_ssl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "seer/recipes/pretrain/seer_rg32.yaml" in names and "seer/recipes/eval/small.yaml" in names
    assert "seer/recipes/finetune/tiny_cpu.yaml" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "launch/", "eval/", "configs/")) for n in names)

    # 2. a fresh venv with the pinned torch, then the wheel and its core dependencies (no extras)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, dict(os.environ))
    py, seer_bin = venv / "bin" / "python", venv / "bin" / "seer"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    _run([str(py), "-m", "pip", "install", "-q", *TORCH_PIN], tmp_path, env, timeout=900)
    _run([str(py), "-m", "pip", "install", "-q", str(wheel)], tmp_path, env, timeout=900)

    # 3. from a directory with no checkout
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import seer, torch; print(seer.__file__); print(torch.__version__)"], work, env)
    assert str(venv) in where.splitlines()[0] and TORCH_PIN[0].split("==")[1] in where
    out = _run([str(seer_bin), "presets"], work, env)
    assert "regnety_10b" in out and "3712" in out
    smoke = ["train.total_steps=5", "optim.warmup_iters=1", "run_dir=run"]  # the recipe warms up for 20 steps
    _run([str(seer_bin), "pretrain", "--config", "tiny_cpu", *smoke], work, env)
    assert (work / "run" / "config.yaml").is_file() and list((work / "run" / "checkpoints").glob("step_*"))
    out = _run([str(seer_bin), "plan", "--config", "seer_10b", "--world-size", "496", "--gpu-memory-gb", "40"],
               work, env)  # fmt: skip
    assert "regnety_10b" in out or "10b" in out.lower()
    out = _run([str(seer_bin), "launch", "pretrain", "--config", "seer_rg32", "--nodes", "2", "--dry-run"], work, env)
    assert "#SBATCH" in out and "--nodes=2" in out.replace(" ", "=")
    images = _run([str(py), "-c", "import sklearn.datasets as d, os; print(os.path.dirname(d.__file__))"], work, env)
    folder = work / "images"
    folder.mkdir()
    for name in ("china.jpg", "flower.jpg"):
        shutil.copy(Path(images.strip()) / "images" / name, folder / name)
    _run([str(seer_bin), "extract", str(folder), "feats", "--model", "run", "--no-progress"], work, env)
    meta = list((work / "feats").iterdir())
    assert any(p.name.startswith("features") for p in meta), meta
    _run([str(seer_bin), "eval-suite", "--suite", "small", "--out", "eval_small"], work, env, timeout=900)
    results = list((work / "eval_small").rglob("*.json"))
    assert results and any("knn" in p.read_text() for p in results)
    # 4. what a timm / HF user looks for first: the version report, the config's keys, the named released weights
    out = _run([str(seer_bin), "--version"], work, env)
    assert out.startswith("seer ") and "torch 2." in out and "bf16" in out and "extras" in out, out
    out = _run([str(seer_bin), "config", "show", "tiny_cpu"], work, env)
    for key in ("optim.base_lr", "train.total_steps", "swav.epsilon", "data.multicrop"):
        assert key in out, key
    out = _run([str(seer_bin), "models"], work, env)
    assert "seer-rg32" in out and "seer-rg10b" in out and "seer-rg32-in1k" in out, out
    # a named checkpoint from an offline HF cache: a tiny RegNet saved by transformers under the RG-32's hub id
    cache = work / "hf_cache"
    _cache_tiny_hf_regnet(cache, "facebook/regnet-y-320-seer")
    named_env = dict(env, HF_HUB_CACHE=str(cache))
    out = _run([str(py), "-c", "import seer, numpy as np; t = seer.load_trunk('seer-rg32'); "
                "f = seer.extract_features([np.zeros((40, 50, 3), np.uint8)], t, progress=False); "
                "print(t.cfg.widths, f.shape)"], work, named_env)  # fmt: skip
    assert "[16, 32, 48, 64]" in out and "(1, 64)" in out, out
    out = subprocess.run([str(seer_bin), "bench"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "checkout" in (out.stdout + out.stderr), out.stdout + out.stderr
    json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[-1])  # the log is well-formed


def _cache_tiny_hf_regnet(cache: Path, repo_id: str) -> None:
    """The HF cache layout of ``repo_id`` (refs/main -> snapshots/<rev>/) holding a tiny random RegNet that
    transformers saved: the installed wheel (which has no transformers) must read it offline by its seer name."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = transformers.RegNetConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], groups_width=16,
                                    embedding_size=32, layer_type="y")  # fmt: skip
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    rev = "0" * 40
    (repo / "refs" / "main").write_text(rev)
    transformers.RegNetModel(cfg).save_pretrained(repo / "snapshots" / rev)
