"""Checkpoint formats: parity with the libraries that wrote them, round trips, strictness, hostile files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seer
from seer.models.regnet import RegNetCfg, build_trunk
from seer.weights import CheckpointError, infer_cfg, load_trunk, read_checkpoint, save_trunk

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics, so that a mix-up of BN tensors (or a missed fold) changes the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / a.norm())


def hf_config(**overrides):
    transformers = pytest.importorskip("transformers")
    # SEER-like: group width = first stage width (as RG-32's 232), Y layers, 32-wide stem.
    kwargs = dict(hidden_sizes=[24, 48, 96, 192], depths=[1, 2, 2, 1], groups_width=24, embedding_size=32,
                  layer_type="y", num_labels=5)  # fmt: skip
    kwargs.update(overrides)
    return transformers.RegNetConfig(**kwargs)


def hf_features(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).pooler_output.flatten(1)


# ----------------------------------------------------------------------------------------------------------------
# Parity with the source libraries
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["regnety_002", "regnety_004"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_parity(tmp_path, name, suffix):
    timm = pytest.importorskip("timm")
    ref = randomize_bn(timm.create_model(name, pretrained=False))
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save(ref.state_dict(), path)
    trunk = load_trunk(path)
    assert trunk.cfg == seer.PRESETS[{"regnety_002": "regnety_200mf", "regnety_004": "regnety_400mf"}[name]]
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(X), pre_logits=True)
        assert rel_err(expected, trunk(X)) < 1e-4
    assert trunk.checkpoint_format == "timm"
    assert trunk.pretrained_cfg["crop_pct"] == 0.965 and trunk.pretrained_cfg["resolution"] == 224
    assert set(read_checkpoint(path).heads) == {"head.fc.weight", "head.fc.bias"}


def test_timm_hub_directory_preprocessing_follows_its_pretrained_cfg(tmp_path):
    """timm's ``.seer_ft_in1k`` classifiers use 384 px / crop 1.0, its ``.seer`` feature weights 224 px / 0.965: a
    directory written by timm's own ``save_for_hf`` (what a hub snapshot of ``timm/...`` holds) says which."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    ref = randomize_bn(timm.create_model("regnety_004", pretrained=False, num_classes=10))
    for tag, size, crop in (("seer_ft_in1k", 384, 1.0), ("seer", 224, 0.965)):
        ref.pretrained_cfg = {**ref.pretrained_cfg, "tag": tag, "input_size": (3, size, size), "crop_pct": crop}
        folder = tmp_path / tag
        save_for_hf(ref, str(folder), safe_serialization=True)
        trunk = load_trunk(folder)
        assert trunk.checkpoint_format == "timm"
        assert (trunk.pretrained_cfg["resolution"], trunk.pretrained_cfg["crop_pct"]) == (size, crop), tag
        with torch.no_grad():
            assert rel_err(ref.forward_head(ref.forward_features(X), pre_logits=True), trunk(X)) < 1e-4
    # a bare file says nothing but its name: SEER's fine-tuned classifiers are named so
    torch.save(ref.state_dict(), tmp_path / "regnety_320.seer_ft_in1k.pth")
    torch.save(ref.state_dict(), tmp_path / "regnety_320.seer.pth")
    assert load_trunk(tmp_path / "regnety_320.seer_ft_in1k.pth").pretrained_cfg["resolution"] == 384
    assert load_trunk(tmp_path / "regnety_320.seer.pth").pretrained_cfg["resolution"] == 224


def test_torchvision_parity(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    ref = randomize_bn(torchvision.models.regnet_y_400mf(weights=None))
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    trunk = load_trunk(tmp_path / "tv.pth")
    with torch.no_grad():
        expected = ref.avgpool(ref.trunk_output(ref.stem(X))).flatten(1)
        assert rel_err(expected, trunk(X)) < 1e-4
    assert trunk.checkpoint_format == "torchvision"


def test_torchvision_800mf_infers_its_own_widths(tmp_path):
    """torchvision's regnet_y_800mf rounds a stage width differently from pycls: the shapes rule, not the name."""
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.models.regnet_y_800mf(weights=None)
    cfg = infer_cfg(read_checkpoint(ref).state_dict)
    assert cfg.widths == [stage[-1].f.c[0].out_channels for stage in ref.trunk_output.children()]
    assert cfg.widths != seer.PRESETS["regnety_800mf"].widths
    randomize_bn(ref)
    trunk = load_trunk(ref)
    with torch.no_grad():
        assert rel_err(ref.avgpool(ref.trunk_output(ref.stem(X))).flatten(1), trunk(X)) < 1e-4


@pytest.mark.parametrize("head", [False, True])
def test_hf_parity(tmp_path, head):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cls = transformers.RegNetForImageClassification if head else transformers.RegNetModel
    ref = randomize_bn(cls(hf_config()))
    ref.save_pretrained(tmp_path / "hf")
    trunk = load_trunk(tmp_path / "hf")
    assert trunk.cfg.stages() == ([24, 48, 96, 192], [1, 2, 2, 1], [24, 24, 24, 24])
    base = ref.regnet if head else ref
    assert rel_err(hf_features(base, X), trunk(X)) < 1e-4
    if head:
        assert set(read_checkpoint(tmp_path / "hf").heads) == {"classifier.1.weight", "classifier.1.bias"}


def test_hf_pytorch_model_bin_and_sharded(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    ref = randomize_bn(transformers.RegNetModel(hf_config()))
    ref.save_pretrained(tmp_path / "bin")  # then the older pytorch_model.bin layout of the same weights
    sd = load_file(tmp_path / "bin" / "model.safetensors")
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    reloaded = transformers.RegNetModel.from_pretrained(tmp_path / "bin")
    assert rel_err(hf_features(reloaded, X), hf_features(ref, X)) < 1e-6
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert list((tmp_path / "sharded").glob("*.index.json")), "expected a sharded save"
    for sub in ("bin", "sharded"):
        assert rel_err(hf_features(ref, X), load_trunk(tmp_path / sub)(X)) < 1e-4


def test_hf_processor_resolution(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.RegNetModel(hf_config())
    ref.save_pretrained(tmp_path / "hf")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 384}).save_pretrained(tmp_path / "hf")
    pre = load_trunk(tmp_path / "hf").pretrained_cfg
    assert pre["resolution"] == 384 and pre["resize_mode"] == "warp"


def test_hf_config_inconsistent_with_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.RegNetModel(hf_config()).save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["depths"] = [1, 2, 3, 1]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: depths=\[1, 2, 3, 1\]"):
        load_trunk(tmp_path / "hf")


# -- VISSL ------------------------------------------------------------------------------------------------------
_VISSL_INNER = {
    "conv1.conv": "f.a.0", "conv1.bn": "f.a.1", "conv2.conv": "f.b.0", "conv2.bn": "f.b.1",
    "se.fc1": "f.se.excitation.0", "se.fc2": "f.se.excitation.2", "conv3.conv": "f.c", "conv3.bn": "f.final_bn",
    "downsample.conv": "proj", "downsample.bn": "bn",
}  # fmt: skip


def to_vissl_key(key: str, parts: int) -> str:
    """timm name -> VISSL RegNet name, written independently of seer.weights' table."""
    if key.startswith("stem."):
        key = key.replace("stem.conv", "_feature_blocks.conv1.stem.0")
        return key.replace("stem.bn", "_feature_blocks.conv1.stem.1")
    s, b, rest = re.match(r"s(\d+)\.b(\d+)\.(.+)", key).groups()
    s, b = int(s), int(b)
    module, param = rest.rsplit(".", 1)
    prefix = f"_feature_blocks.res{s + 1}."
    if parts:  # FSDP: blocks split in `parts` groups per stage, block{s}-part{p}.block{s}-{j}
        prefix += f"block{s}-part{(b - 1) % parts}."
    return f"{prefix}block{s}-{b - 1}.{_VISSL_INNER[module]}.{param}"


@pytest.mark.parametrize("parts", [0, 2])
def test_vissl_parity(tmp_path, parts):
    timm = pytest.importorskip("timm")
    ref = randomize_bn(timm.create_model("regnety_002", pretrained=False, num_classes=0))
    trunk_sd = {to_vissl_key(k, parts): v for k, v in ref.state_dict().items()}
    heads = {"0.projection_head.0.weight": torch.randn(16, 368), "0.prototypes0.weight": torch.randn(30, 16)}
    ckpt = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk_sd, "heads": heads}}}, "iteration": 7}
    if not parts:  # timm's own VISSL converter reads the same layout: the test's renaming is the real one
        from timm.models.regnet import _filter_fn

        timm.create_model("regnety_002", num_classes=0).load_state_dict(_filter_fn(ckpt), strict=True)
    torch.save(ckpt, tmp_path / "model_final_checkpoint_phase0.torch")
    trunk = load_trunk(tmp_path / "model_final_checkpoint_phase0.torch")
    with torch.no_grad():
        assert rel_err(ref(X), trunk(X)) < 1e-4
    read = read_checkpoint(tmp_path / "model_final_checkpoint_phase0.torch")
    assert read.format == "vissl" and set(read.heads) == {f"heads.{k}" for k in heads}


def test_classyvision_layout(tmp_path):
    """ClassyVision's own RegNet: stem.stem.{0,1} and trunk_output.block{s}.block{s}-{j} with VISSL's internals."""
    timm = pytest.importorskip("timm")
    ref = randomize_bn(timm.create_model("regnety_002", pretrained=False, num_classes=0))

    def rename(key: str) -> str:
        key = to_vissl_key(key, 0).replace("_feature_blocks.conv1.stem.", "stem.stem.")
        return re.sub(r"^_feature_blocks\.res\d+\.block(\d+)-", r"trunk_output.block\1.block\1-", key)

    sd = {rename(k): v for k, v in ref.state_dict().items()}
    assert "trunk_output.block2.block2-0.f.final_bn.running_var" in sd
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": sd, "heads": {}}}}}, tmp_path / "c.torch")
    trunk = load_trunk(tmp_path / "c.torch")
    assert trunk.checkpoint_format == "classy"
    with torch.no_grad():
        assert rel_err(ref(X), trunk(X)) < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------
def tiny_trunk() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(build_trunk(RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)))


def test_save_hf_round_trip_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    trunk = tiny_trunk()
    out = save_trunk(trunk, tmp_path / "hf", format="hf")
    model = transformers.RegNetModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert rel_err(trunk(X), hf_features(model, X)) < 1e-4
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.size["shortest_edge"] == 224
    # and back into seer
    assert rel_err(trunk(X), load_trunk(out)(X)) < 1e-4
    # overwriting an existing directory is atomic too (no temporary left behind)
    save_trunk(trunk, tmp_path / "hf", format="hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_save_hf_seer_preset_groups_width(tmp_path):
    transformers = pytest.importorskip("transformers")
    trunk = build_trunk("regnety_32gf", device="meta")
    from seer.weights.save import _hf_groups_width

    assert _hf_groups_width(trunk.cfg) == 232
    cfg = transformers.RegNetConfig(hidden_sizes=trunk.cfg.widths, depths=trunk.cfg.depths, groups_width=232)
    with torch.device("meta"):
        ref = transformers.RegNetModel(cfg)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in trunk.parameters())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_timm_loads_in_timm(tmp_path, suffix):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    trunk = randomize_bn(build_trunk("regnety_200mf"))
    path = save_trunk(trunk, tmp_path / f"t{suffix}", format="timm")
    model = timm.create_model("regnety_002", pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
    with torch.no_grad():
        assert rel_err(trunk(X), model.eval()(X)) < 1e-4


def test_save_seer_round_trip_exact(tmp_path):
    trunk = tiny_trunk()
    trunk.pretrained_cfg = {"resolution": 160, "crop_pct": 1.0, "interpolation": "bicubic"}
    path = save_trunk(trunk, tmp_path / "t.safetensors")
    back = load_trunk(path)
    assert back.cfg == trunk.cfg
    for (k, a), (k2, b) in zip(trunk.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert back.pretrained_cfg["resolution"] == 160
    with torch.no_grad():
        assert torch.allclose(trunk(X), back(X))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "seer" and json.loads(meta["regnet_cfg"])["depth"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_save_explicit_stage_config_round_trip(tmp_path):
    trunk = randomize_bn(build_trunk(RegNetCfg.from_stages([24, 56, 80, 96], [1, 1, 2, 1], [8, 8, 16, 32])))
    back = load_trunk(save_trunk(trunk, tmp_path / "t.safetensors"))
    assert back.cfg.stages() == trunk.cfg.stages()
    assert torch.allclose(trunk(X), back(X), atol=1e-5)


def test_save_torchvision_round_trip(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    trunk = randomize_bn(build_trunk("regnety_400mf"))
    path = save_trunk(trunk, tmp_path / "tv.pth", format="torchvision")
    ref = torchvision.models.regnet_y_400mf(weights=None).eval()
    missing, unexpected = ref.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    with torch.no_grad():
        assert rel_err(trunk(X), ref.avgpool(ref.trunk_output(ref.stem(X))).flatten(1)) < 1e-4


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_trunk(tiny_trunk(), tmp_path / "t.safetensors")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# Strictness and hostile input
# ----------------------------------------------------------------------------------------------------------------
def test_missing_unexpected_and_mismatch_named(tmp_path):
    sd = {k: v.contiguous() for k, v in build_trunk("regnety_200mf").state_dict().items()}
    del sd["s2.b1.conv1.conv.weight"]
    sd["s1.b1.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "a.pth")
    with pytest.raises(CheckpointError) as info:
        load_trunk(tmp_path / "a.pth", preset="regnety_200mf")
    msg = str(info.value)
    assert "a.pth" in msg and "missing 1" in msg and "s2.b1.conv1.conv.weight" in msg
    assert "unexpected 1" in msg and "s1.b1.extra.weight" in msg
    with pytest.raises(CheckpointError, match=r"shape mismatch.*stem.conv.weight: checkpoint \(32, 3, 3, 3\)"):
        load_trunk(build_trunk("regnety_200mf").state_dict(), preset=RegNetCfg.from_stages(
            [24, 56, 152, 368], [1, 1, 4, 7], [8, 8, 8, 8], stem_width=16))  # fmt: skip


def test_unexpected_key_uses_checkpoint_names(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    sd = torchvision.models.regnet_y_400mf(weights=None).state_dict()
    sd["trunk_output.block9.bogus"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="trunk_output.block9.bogus"):
        load_trunk(sd)


def test_unknown_layout_and_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_trunk({"encoder.layer.0.weight": torch.zeros(2)})
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_trunk(tmp_path / "garbage.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_trunk(tmp_path / "garbage.safetensors")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_trunk(tmp_path / "nowhere.pth")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match="neither an HF model"):
        load_trunk(tmp_path / "emptydir")
    with pytest.raises(TypeError, match="expected a path"):
        load_trunk(3.5)


class _Payload:
    """Unpickling this calls open(marker, "w"): a side effect we can observe."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    sd = {k: v.contiguous() for k, v in build_trunk("regnety_200mf").state_dict().items()}
    torch.save({"state_dict": sd, "payload": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: refused to load.*io.open.*weights_only"):
        load_trunk(tmp_path / "evil.pth")
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it (so the check above can fail)
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_numpy_scalars_next_to_the_weights_are_data(tmp_path):
    """VISSL checkpoints carry numpy scalars (iteration counters): allowlisted as data, the weights load."""
    import numpy as np

    sd = {k: v.contiguous() for k, v in build_trunk("regnety_200mf").state_dict().items()}
    torch.save({"model": sd, "iteration": np.int64(7), "stats": np.zeros(3)}, tmp_path / "np.pth")
    assert load_trunk(tmp_path / "np.pth").cfg == seer.PRESETS["regnety_200mf"]


def test_hub_offline_gives_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    code = (
        "import seer.weights as w\n"
        "try:\n    w.load_trunk('facebook/regnet-y-10b-seer')\n"
        "except w.CheckpointError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR" in out.stdout, out.stderr
    assert "facebook/regnet-y-10b-seer" in out.stdout and "local directory" in out.stdout


def test_hub_id_from_local_cache(tmp_path):
    """A hub id resolves offline from the local HF cache (models--org--name/snapshots/<rev>/...)."""
    transformers = pytest.importorskip("transformers")
    cache = tmp_path / "cache"
    snap = cache / "models--facebook--regnet-y-tiny-seer" / "snapshots" / ("0" * 40)
    ref = randomize_bn(transformers.RegNetModel(hf_config()))
    ref.save_pretrained(snap)
    (cache / "models--facebook--regnet-y-tiny-seer" / "refs").mkdir(parents=True)
    (cache / "models--facebook--regnet-y-tiny-seer" / "refs" / "main").write_text("0" * 40)
    code = (
        "import torch, seer.weights as w\n"
        "t = w.load_trunk('facebook/regnet-y-tiny-seer')\n"
        "print('WIDTHS', t.cfg.widths)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "WIDTHS [24, 48, 96, 192]" in out.stdout, out.stderr


def test_run_directory(tmp_path):
    from seer.train.checkpoint import save_checkpoint

    model = torch.nn.Module()
    model.trunk = tiny_trunk()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "run", 5, model, opt, meta={"regnet_cfg": model.trunk.cfg.to_dict()})
    back = load_trunk(tmp_path / "run")
    assert back.cfg == model.trunk.cfg
    with torch.no_grad():
        assert torch.allclose(model.trunk.eval()(X), back(X), atol=1e-6)


def test_load_is_lazy_and_materialized_from_file(tmp_path):
    """Parameters alias the memory-mapped checkpoint: nothing was allocated for a second copy."""
    trunk = tiny_trunk()
    path = save_trunk(trunk, tmp_path / "t.safetensors")
    back = load_trunk(path)
    assert not any(p.is_meta for p in back.parameters())
    assert all(b.device.type == "cpu" for b in back.buffers())
    assert not back.training


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_peak_rss_loading_32gf(tmp_path):
    """regnety_32gf (565 MB): loading adds at most 1.3x the file size to the process's peak RSS."""
    from benchmarks.extract import measure_load_rss

    result = measure_load_rss("regnety_32gf", tmp_path)
    assert result["ratio"] <= 1.3, result


def test_image_norm_trunk_round_trips_in_seer_format_only(tmp_path):
    trunk = randomize_bn(build_trunk(RegNetCfg(depth=2, w0=16, wa=0.0, wm=2.0, group_w=16, image_norm=True)))
    back = load_trunk(save_trunk(trunk, tmp_path / "t.safetensors"))
    assert back.cfg.image_norm is True
    with torch.no_grad():
        assert torch.allclose(trunk.eval()(X), back.eval()(X), atol=1e-6)
    for fmt in ("hf", "timm", "torchvision"):
        with pytest.raises(ValueError, match="image_norm"):
            save_trunk(trunk, tmp_path / f"t-{fmt}", format=fmt)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # nothing half-written
