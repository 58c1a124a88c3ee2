"""Released SEER weights by name (``seer.weights.named``): the table against timm's registry, loading by name from a
pre-populated HF cache (no network: HF_HUB_OFFLINE is set), the order of the sources, did-you-mean, `seer models`,
and a hub id or name that is not cached failing at once when offline (HF_HUB_OFFLINE, or an unreachable endpoint)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seer
from seer.models.regnet import PRESETS
from seer.weights import CheckpointError, load_classifier, load_trunk
from seer.weights import read as read_mod
from seer.weights.named import NAMED_WEIGHTS, suggest_name

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

SHA = "0" * 40
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _hf_model(widths=(16, 32, 48, 64), seed=0):
    """A tiny random HF RegNet with non-trivial BN statistics (a mix-up of tensors changes its features)."""
    torch.manual_seed(seed)
    cfg = transformers.RegNetConfig(hidden_sizes=list(widths), depths=[1, 1, 1, 1], groups_width=16,
                                    embedding_size=32, layer_type="y")  # fmt: skip
    model = transformers.RegNetModel(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _hf_features(model, x):
    with torch.no_grad():
        return model(pixel_values=x).pooler_output.flatten(1)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _snapshot_dir(cache: Path, repo_id: str) -> Path:
    """The real HF cache layout of ``repo_id``: models--org--name/snapshots/<rev>/ with refs/main naming <rev>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    return repo / "snapshots" / SHA


def _cache_hf(cache: Path, repo_id: str, model) -> None:
    snap = _snapshot_dir(cache, repo_id)
    model.save_pretrained(snap)
    # the hub SEER repositories' processor: 384 px, which a *name* overrides with the table's preprocessing
    (snap / "preprocessor_config.json").write_text(json.dumps({"size": 384, "crop_pct": 1.0, "resample": 3}))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache, offline: any request to the hub would fail, so what loads came from the cache."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from seer.features import runner

    yield cache
    runner._MODEL_CACHE.clear()  # extract_features keeps the last model by its name: not across tests


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------
def test_the_table_agrees_with_timms_registry():
    """timm names, VISSL URLs, preprocessing, licence and architecture of every entry timm also has."""
    from timm.models import get_pretrained_cfg
    from timm.models.regnet import model_cfgs

    checked = 0
    for entry in NAMED_WEIGHTS.values():
        if entry.timm_name is None:
            continue
        cfg = get_pretrained_cfg(entry.timm_name)
        assert cfg is not None, entry.timm_name
        assert cfg.url == entry.vissl_url, entry.name
        assert cfg.input_size[-1] == entry.preprocess["resolution"], entry.name
        assert cfg.crop_pct == entry.preprocess["crop_pct"] and cfg.interpolation == entry.preprocess["interpolation"]
        assert cfg.license == "seer-license" and "non-commercial" in entry.license, entry.name
        assert (cfg.num_classes or 0) == entry.classes, entry.name
        arch, ours = model_cfgs[entry.timm_name.split(".")[0]], PRESETS[entry.preset]
        assert (arch.depth, arch.w0, arch.wa, arch.wm, arch.group_size) == (
            ours.depth, ours.w0, ours.wa, ours.wm, ours.group_w), entry.name  # fmt: skip
        checked += 1
    assert checked >= 7
    # every SEER tag timm publishes has a name here
    assert set(timm.list_pretrained("regnety_*seer*")) <= {e.timm_name for e in NAMED_WEIGHTS.values()}


def test_names_cover_every_size_and_are_not_recipe_names():
    from seer.catalog import available

    sizes = ("rg32", "rg64", "rg128", "rg256", "rg10b")
    assert set(NAMED_WEIGHTS) == {f"seer-{s}" for s in sizes} | {f"seer-{s}-in1k" for s in sizes}
    assert not set(NAMED_WEIGHTS) & set(available("pretrain") + available("finetune") + available("eval"))
    for entry in NAMED_WEIGHTS.values():
        assert entry.preset in PRESETS and entry.vissl_url.startswith("https://dl.fbaipublicfiles.com/vissl/")
        assert entry.kind == ("classifier" if entry.name.endswith("-in1k") else "features")
        trunk = seer.complexity(entry.preset)
        assert entry.params == trunk["params"] + (trunk["widths"][-1] + 1) * entry.classes  # + a linear head


@pytest.mark.parametrize(
    "typed, meant",
    [("seer-rg23", "seer-rg32"), ("SEER-RG32-IN1K", "seer-rg32-in1k"), ("seer_rg10b_in1k", "seer-rg10b-in1k"),
     ("seer-rg128-in1", "seer-rg128-in1k")],
)  # fmt: skip
def test_a_close_name_gets_a_did_you_mean(hf_cache, typed, meant):
    assert suggest_name(typed) == meant
    with pytest.raises(FileNotFoundError, match=f"did you mean the released weights '{meant}'"):
        load_trunk(typed)


def test_a_recipe_name_says_it_is_a_recipe_and_far_names_get_no_suggestion(hf_cache):
    with pytest.raises(FileNotFoundError, match=r"'seer_rg32' is a pretraining recipe.*'seer-rg32'"):
        load_trunk("seer_rg32")
    with pytest.raises(FileNotFoundError) as info:
        load_trunk("resnet50_weights.pth")
    assert "did you mean" not in str(info.value) and "resnet50_weights.pth" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Loading by name, from a pre-populated cache
# ----------------------------------------------------------------------------------------------------------------
def test_load_trunk_extract_features_and_init_from_by_name(hf_cache):
    ref = _hf_model()
    _cache_hf(hf_cache, "facebook/regnet-y-320-seer", ref)
    trunk = seer.load_trunk("seer-rg32")
    assert trunk.cfg.widths == [16, 32, 48, 64] and trunk.checkpoint_format == "hf"
    with torch.no_grad():
        assert _rel(trunk(X), _hf_features(ref, X)) < 1e-4
    # the name's preprocessing (timm's .seer tag), not the 384 px of the repository's processor file ...
    assert (trunk.pretrained_cfg["resolution"], trunk.pretrained_cfg["crop_pct"]) == (224, 0.965)
    # ... which the hub id itself keeps
    assert seer.load_trunk("facebook/regnet-y-320-seer").pretrained_cfg["resolution"] == 384

    images = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    by_name = seer.extract_features(images, "seer-rg32", progress=False)
    assert by_name.shape == (2, 64)
    assert torch.allclose(torch.from_numpy(by_name), torch.from_numpy(seer.extract_features(images, trunk)))

    from seer.train.loop import _init_trunk_from

    fresh = seer.build_trunk(trunk.cfg)
    _init_trunk_from(fresh, "seer-rg32", None)  # model.init_from: the same loader
    with torch.no_grad():
        assert _rel(fresh.eval()(X), trunk(X)) < 1e-5


def test_load_classifier_by_name_from_the_timm_cache(hf_cache):
    """No HF repository cached: the timm one is the next source; its head and 384 px come with the name."""
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    ref = timm.create_model("regnety_002", pretrained=False, num_classes=7).eval()
    save_for_hf(ref, str(_snapshot_dir(hf_cache, "timm/regnety_320.seer_ft_in1k")), safe_serialization=True)
    model = load_classifier("seer-rg32-in1k")
    assert model.trunk.checkpoint_format == "timm" and model.n_classes == 7
    with torch.no_grad():
        assert _rel(model(X), ref(X)) < 1e-4
    assert (model.trunk.pretrained_cfg["resolution"], model.trunk.pretrained_cfg["crop_pct"]) == (384, 1.0)
    assert load_trunk("seer-rg32-in1k").cfg == model.trunk.cfg  # load_trunk sets the head aside


def test_hf_cache_before_timm_cache_and_a_local_path_before_both(hf_cache, tmp_path, monkeypatch):
    from timm.models._hub import save_for_hf

    _cache_hf(hf_cache, "facebook/regnet-y-640-seer", _hf_model((16, 32, 48, 64)))
    save_for_hf(timm.create_model("regnety_002", num_classes=0), str(_snapshot_dir(hf_cache, "timm/regnety_640.seer")))
    assert load_trunk("seer-rg64").cfg.widths == [16, 32, 48, 64]  # HF's repository first
    assert load_trunk("seer-rg64").pretrained_cfg["resolution"] == 224

    local = tmp_path / "work"
    _hf_model((16, 16, 32, 32), seed=3).save_pretrained(local / "seer-rg64")
    monkeypatch.chdir(local)
    assert load_trunk("seer-rg64").cfg.widths == [16, 16, 32, 32]  # an existing path of that name wins
    assert load_trunk("seer-rg64").checkpoint_format == "hf"


def test_a_name_not_cached_offline_fails_at_once_saying_where_to_get_it(hf_cache):
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load_trunk("seer-rg64")
    assert time.monotonic() - t0 < 2.0
    msg = str(info.value)
    assert "seer-rg64" in msg and "HF_HUB_OFFLINE" in msg and str(hf_cache) in msg
    assert "facebook/regnet-y-640-seer" in msg and "timm/regnety_640.seer" in msg
    assert NAMED_WEIGHTS["seer-rg64"].vissl_url in msg and "hf download facebook/regnet-y-640-seer" in msg
    # RG-256's feature weights are on no hub repository seer can load: the VISSL file is the way
    with pytest.raises(CheckpointError, match="no hub repository seer can load.*swav_ig1b_cosine_rg256gf"):
        load_trunk("seer-rg256")


# ----------------------------------------------------------------------------------------------------------------
# `seer models`
# ----------------------------------------------------------------------------------------------------------------
def test_seer_models_lists_every_name_and_what_is_cached(hf_cache, capsys):
    from seer.cli import main

    _cache_hf(hf_cache, "facebook/regnet-y-320-seer", _hf_model())
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == list(NAMED_WEIGHTS)
    assert rows["seer-rg32"]["cached"] == ["hf"] and all(not r["cached"] for n, r in rows.items() if n != "seer-rg32")
    rg32 = rows["seer-rg32"]
    assert rg32["hf_id"] == "facebook/regnet-y-320-seer" and rg32["timm_name"] == "regnety_320.seer"
    assert rg32["params"] == seer.complexity("regnety_32gf")["params"] and rg32["preprocess"]["resolution"] == 224
    assert rows["seer-rg256"]["hf_tried"] is False and "RG-256" in rows["seer-rg256"]["note"]

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("seer-")}
    assert set(NAMED_WEIGHTS) <= set(lines)
    assert lines["seer-rg32"].split()[-1] == "hf" and lines["seer-rg64"].split()[-1] == "-"
    assert "384 px crop 1" in lines["seer-rg32-in1k"] and "non-commercial" in out


# ----------------------------------------------------------------------------------------------------------------
# Offline: fail at once (issue 31, item 7)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable-endpoint"])  # fmt: skip
def test_missing_hub_id_and_name_fail_at_once_offline(tmp_path, env):
    """Before: an unreachable endpoint was retried for about 25 s. Now each fails in well under 5 s."""
    code = (
        "import time, seer.weights as w\n"
        "for source in ('facebook/regnet-y-nonexistent-seer', 'seer-rg128'):\n"
        "    t0 = time.monotonic()\n"
        "    try:\n        w.load_trunk(source)\n"
        "    except w.CheckpointError as e:\n"
        "        print('TOOK', round(time.monotonic() - t0, 2), 'ERR', str(e).replace(chr(10), ' '))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE")}
    full_env = {**clean, "HF_HUB_CACHE": str(tmp_path / "cache"), "SEER_PROGRESS": "0", **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("TOOK")]
    assert len(lines) == 2, out.stdout + out.stderr
    for line in lines:
        assert float(line.split()[1]) < 3.0, line
    hub_id, name = lines
    assert "facebook/regnet-y-nonexistent-seer" in hub_id and "local directory" in hub_id
    assert "seer-rg128" in name and NAMED_WEIGHTS["seer-rg128"].vissl_url in name
    reason = "HF_HUB_OFFLINE" if "HF_HUB_OFFLINE" in env else "cannot reach http://127.0.0.1:9"
    assert reason in hub_id and reason in name
    assert "Retrying" not in out.stderr  # huggingface_hub's retry loop never started


@pytest.fixture
def online_env(monkeypatch):
    """Nothing says offline, the endpoint is the default one; no probe answer is remembered."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                 "https_proxy", "all_proxy", "NO_PROXY", "no_proxy"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(read_mod, "_PROBES", {})


def test_the_probe_gives_up_after_its_timeout(online_env, monkeypatch):
    """A network that drops packets (or a DNS that hangs) answers nothing: the probe stops waiting at its timeout."""

    def hang(*args, **kwargs):
        time.sleep(5)
        raise OSError("never reached")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(read_mod, "HUB_PROBE_TIMEOUT_S", 0.2)
    t0 = time.monotonic()
    reason = read_mod.hub_offline_reason()
    assert time.monotonic() - t0 < 1.0
    assert reason == "cannot reach https://huggingface.co (no answer within 0.2 s)"
    assert read_mod.hub_offline_reason() == reason  # remembered: a second repository does not wait again


def test_the_probe_goes_through_the_proxy_the_environment_names(online_env, monkeypatch):
    seen = []

    def connect(address, timeout=None):
        seen.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    reason = read_mod.hub_offline_reason()
    assert seen == [("127.0.0.1", 3128)]
    assert "the proxy 127.0.0.1:3128 for https://huggingface.co" in reason and "refused" in reason
    monkeypatch.setattr(read_mod, "_PROBES", {})
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    read_mod.hub_offline_reason()
    assert seen[-1] == ("huggingface.co", 443)
