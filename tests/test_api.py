"""The public Python API: what `dir(seer)` shows, the version's one home, `seer.pretrain` / `seer.finetune`, and the
one device resolver every user-facing `device=` goes through (its errors checked on this machine, GPU or not)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import seer
from seer.config import ConfigError, PretrainConfig, config_to_dict, load_config
from seer.hardware import resolve_device
from seer.train import api

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# dir(seer), import cost, __version__
# ----------------------------------------------------------------------------------------------------------------
def test_dir_lists_every_public_name_and_each_resolves():
    names = dir(seer)
    for name in seer.__all__:
        assert name in names, f"dir(seer) misses {name}"
        assert getattr(seer, name) is not None
    for name in ("load_trunk", "extract_features", "save_trunk", "load_classifier", "pretrain", "finetune"):
        assert callable(getattr(seer, name))
    assert seer.pretrain is api.pretrain and seer.finetune is api.finetune
    assert {"evaluation", "config", "__version__"} <= set(names)
    with pytest.raises(AttributeError, match="no attribute 'load_trunks'"):
        seer.load_trunks  # noqa: B018


# What `import seer` loads of seer itself: the trunk (eager, as before) and two torch-free leaves. seer.extras (pure
# Python) names the distribution whose metadata holds the version.
IMPORTED_BY_SEER = {"seer", "seer.extras", "seer.hardware", "seer.models", "seer.models.regnet"}
HEAVY = ("torchvision", "timm", "transformers", "faiss", "onnx", "onnxruntime", "openvino", "yaml", "PIL",
         "webdataset", "submitit", "sklearn", "safetensors", "huggingface_hub")  # fmt: skip


def test_import_seer_and_dir_import_no_heavy_module():
    code = (
        "import json, sys\n"
        "import seer\n"
        "after_import = sorted(sys.modules)\n"
        "dir(seer)\n"
        "print(json.dumps([after_import, sorted(sys.modules)]))\n"
        "print(seer.config.load_config.__name__, seer.evaluation.eval_knn.__name__)\n"  # reachable without an import
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    modules, reached = out.stdout.splitlines()
    assert reached == "load_config eval_knn"
    after_import, after_dir = json.loads(modules)
    assert after_dir == after_import, "dir(seer) imported modules"
    assert {m for m in after_import if m.split(".")[0] == "seer"} == IMPORTED_BY_SEER
    loaded = {m.split(".")[0] for m in after_import}
    assert not loaded & set(HEAVY), f"import seer loads {sorted(loaded & set(HEAVY))}"


def test_version_has_one_home():
    assert seer.__version__ == importlib.metadata.version("seer-ssl")
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert seer.__version__ == pyproject["project"]["version"]
    # no literal second copy anywhere in the package
    for path in (ROOT / "seer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
                assert not isinstance(node.value, ast.Constant), f"{path}: __version__ is a literal"


# ----------------------------------------------------------------------------------------------------------------
# seer.pretrain / seer.finetune: config forms and overrides
# ----------------------------------------------------------------------------------------------------------------
# what a fine-tuning recipe needs before it validates: labeled images (unread here) and their number of classes
FINETUNE_DATA = {"data": {"images": "digits/train"}, "supervised.n_classes": 10}


def test_dotted_keys_section_dicts_and_the_cli_give_one_config():
    cli = config_to_dict(load_config("tiny_cpu", ["train.total_steps=30", "optim.base_lr=0.1", "run_dir=runs/a"]))
    dotted = api.resolve_config("tiny_cpu", {"train.total_steps": 30, "optim.base_lr": 0.1, "run_dir": "runs/a"},
                                "pretrain")  # fmt: skip
    sections = api.resolve_config("tiny_cpu", {"train": {"total_steps": 30}, "optim": {"base_lr": 0.1},
                                               "run_dir": "runs/a"}, "pretrain")  # fmt: skip
    mixed = api.resolve_config("tiny_cpu", {"train": {"total_steps": 30}, "optim.base_lr": 0.1, "run_dir": "runs/a"},
                               "pretrain")  # fmt: skip
    assert config_to_dict(dotted) == config_to_dict(sections) == config_to_dict(mixed) == cli
    assert cli["train"]["total_steps"] == 30 and cli["train"]["log_every"] == 50  # the rest of the recipe stays


def test_a_config_object_or_dict_is_taken_as_is_and_never_modified():
    cfg = load_config("tiny_cpu")
    before = config_to_dict(cfg)
    out = api.resolve_config(cfg, {"optim.base_lr": 0.2}, "pretrain")
    assert out.optim.base_lr == 0.2 and out.optim.name == "sgd" and config_to_dict(cfg) == before
    as_dict = api.resolve_config({"optim": {"name": "sgd"}, "train.total_steps": 7}, {}, "pretrain")
    assert as_dict.optim.name == "sgd" and as_dict.train.total_steps == 7 and isinstance(as_dict, PretrainConfig)
    assert api.resolve_config(None, {}, "pretrain") == PretrainConfig()
    # a dict-valued key is replaced whole in every form, as a recipe's override replaces it: never merged
    small = {"depth": 2, "w0": 8, "wa": 8.0, "wm": 2.0, "group_w": 8}
    for base in (cfg, "tiny_cpu", {"model": {"cfg": {**small, "se_ratio": 0.0}}}):
        assert api.resolve_config(base, {"model": {"cfg": small}}, "pretrain").model.cfg == small
    # the kind picks the recipe directory: tiny_cpu is a pretraining and a fine-tuning recipe
    assert api.resolve_config("tiny_cpu", FINETUNE_DATA, "finetune").method == "supervised"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"optim": {"bse_lr": 0.1}}, r"unknown config key 'optim.bse_lr'; did you mean optim.base_lr\?"),
        ({"optim.bse_lr": 0.1}, r"unknown config key 'optim.bse_lr'; did you mean optim.base_lr\?"),
        ({"trian": {"total_steps": 2}}, r"unknown config key 'trian'; did you mean train\?"),
        ({"train": {"total_steps": "many"}}, r"train.total_steps: expected int, got 'many'"),
        ({"train": {"total_steps": 5}, "train.total_steps": 6}, r"'train.total_steps' is given twice"),
        ({"optim.base_lr": 0.1, "optim.base_lr.x": 1}, r"'optim.base_lr' is both a value and a section"),
        ({"optim..base_lr": 0.1}, r"empty key"),
    ],
)
def test_bad_overrides_fail_before_anything_runs(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        seer.pretrain("tiny_cpu", run_dir=str(tmp_path / "run"), **overrides)
    assert not (tmp_path / "run").exists()


def test_bad_config_argument_names_what_it_takes():
    with pytest.raises(FileNotFoundError, match="tiny_cpuu.*did you mean tiny_cpu"):
        seer.pretrain("tiny_cpuu")
    with pytest.raises(TypeError, match="recipe name, a yaml path, a PretrainConfig or a dict, got int"):
        seer.pretrain(3)


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_allow_config_change_reaches_the_loop(monkeypatch, kind):
    from seer.train import loop

    calls = []
    monkeypatch.setattr(loop, "pretrain", lambda cfg, **kw: calls.append((cfg, kw)) or {"step": 0})
    fn = seer.pretrain if kind == "pretrain" else seer.finetune
    extra = FINETUNE_DATA if kind == "finetune" else {}
    assert fn("tiny_cpu", allow_config_change=True, **extra) == {"step": 0}
    assert fn("tiny_cpu", **extra) == {"step": 0}
    assert [kw for _, kw in calls] == [{"allow_config_change": True}, {"allow_config_change": False}]
    assert calls[0][0].method == ("swav" if kind == "pretrain" else "supervised")


@pytest.mark.slow
def test_pretrain_then_finetune_from_python(tmp_path):
    from seer.data.tasks import write_task

    run = tmp_path / "swav"
    train = {"total_steps": 3, "log_every": 1, "tensorboard": False}
    summary = seer.pretrain("tiny_cpu", run_dir=str(run), train=train, optim={"warmup_iters": 1},
                            **{"data.global_batch_size": 16})  # fmt: skip
    assert summary["step"] == 3 and summary["run_dir"] == str(run) and Path(summary["checkpoint"]).exists()
    assert np.isfinite(summary["loss"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["total_steps"] == 3 and saved["data"]["global_batch_size"] == 16
    assert saved["optim"]["name"] == "sgd"  # the recipe's, under the overrides

    digits = tmp_path / "digits"
    write_task("digits", digits, n_train=40, n_test=20, seed=0)
    ft = seer.finetune("tiny_cpu", run_dir=str(tmp_path / "ft"), model={"init_from": str(run)},
                       data={"images": str(digits / "train"), "global_batch_size": 16},
                       train={"total_steps": 2, "log_every": 1, "tensorboard": False, "ckpt_every_steps": 0},
                       **{"optim.warmup_iters": 1})  # fmt: skip
    assert ft["step"] == 2 and np.isfinite(ft["loss"])
    clf = seer.load_classifier(tmp_path / "ft")
    assert clf.head.out_features == 10  # supervised.n_classes inferred from the folder


# ----------------------------------------------------------------------------------------------------------------
# The device resolver
# ----------------------------------------------------------------------------------------------------------------
def test_resolve_device_takes_every_form():
    auto = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == resolve_device(" AUTO ") == auto
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")
    for bad in ("gpu", "cuda:x", ""):
        with pytest.raises(ValueError, match=rf"^my_key={bad!r} is not a device: use 'auto', 'cpu', 'cuda'"):
            resolve_device(bad, what="my_key")
    for bad in (1.5, True, ["cpu"]):
        with pytest.raises(ValueError, match=r"^device: expected 'auto', 'cpu', 'cuda' or 'cuda:N' or a torch"):
            resolve_device(bad)


@pytest.fixture
def cuda_build(monkeypatch):
    """This torch as a CUDA 12.4 build, whatever it is; the test sets how many GPUs it sees."""

    def see(n: int):
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "init", lambda: None)  # no driver error to quote: the generic reason

    return see


def test_a_cpu_only_torch_build_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with pytest.raises(ValueError, match=r"train.device='cuda', but this torch \(.*\) is a CPU-only build"):
        resolve_device("cuda", what="train.device")


def test_no_visible_gpu_is_named_with_the_reason(cuda_build, monkeypatch):
    cuda_build(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    hidden = r"device='cuda:0', but no CUDA GPU is visible.*CUDA_VISIBLE_DEVICES='' hides every GPU.*CUDA 12.4\)"
    with pytest.raises(ValueError, match=hidden + r": use device='cpu' or 'auto'"):
        resolve_device("cuda:0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ValueError, match=r"no CUDA GPU is visible to this process \(no GPU is visible;"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_an_index_beyond_the_visible_gpus_is_named(cuda_build, monkeypatch):
    cuda_build(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device(1) == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"device='cuda:2', but this process sees 2 CUDA GPUs \(cuda:0 \.\. cuda:1; "
                                         r"CUDA_VISIBLE_DEVICES='3,5'\)"):  # fmt: skip
        resolve_device("cuda:2")
    cuda_build(1)
    with pytest.raises(ValueError, match=r"sees 1 CUDA GPU \(cuda:0; CUDA_VISIBLE_DEVICES='3,5'\)"):
        resolve_device(torch.device("cuda", 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")
def test_every_user_device_argument_fails_clearly_without_a_gpu(tmp_path):
    """The real no-GPU path (torch's own reason, no monkeypatching) through each public entry point."""
    from seer.distributed.env import init_distributed
    from seer.evaluation.knn import eval_knn
    from seer.evaluation.linear import eval_linear
    from seer.evaluation.suites import suite_device

    no_gpu = r"but (no CUDA GPU is visible|this torch .* is a CPU-only build)"
    small = {"depth": 2, "w0": 8, "wa": 8.0, "wm": 2.0, "group_w": 8}
    with pytest.raises(ValueError, match=rf"^device='cuda', {no_gpu}"):
        seer.build_trunk(small, device="cuda")
    trunk = seer.build_trunk(small)
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=rf"^device='cuda', {no_gpu}"):
        seer.extract_features(images, trunk, device="cuda", resolution=32)
    path = tmp_path / "trunk.safetensors"
    seer.save_trunk(trunk, path)
    with pytest.raises(ValueError, match=rf"^device='cuda:1', {no_gpu}"):
        seer.load_trunk(path, device="cuda:1")
    x, y = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), np.arange(8) % 2
    with pytest.raises(ValueError, match=rf"^device='cuda', {no_gpu}"):
        eval_knn(x, y, x, y, ks=(1,), device="cuda")
    with pytest.raises(ValueError, match=rf"^device='cuda', {no_gpu}"):
        eval_linear(x, y, x, y, device="cuda", epochs=1)
    with pytest.raises(ValueError, match=rf"^suite 'small': features.device='cuda', {no_gpu}"):
        suite_device({"name": "small", "features": {"device": "cuda"}})
    with pytest.raises(ValueError, match=rf"^train.device='cuda', {no_gpu}"):
        init_distributed(device="cuda")
    with pytest.raises(ValueError, match=rf"^train.device='cuda', {no_gpu}"):
        seer.pretrain("tiny_cpu", run_dir=str(tmp_path / "run"), train={"device": "cuda"})
    assert seer.extract_features(images, trunk, device="auto", resolution=32).shape == (2, trunk.num_features)
