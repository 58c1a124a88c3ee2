"""Config tree: yaml overrides, dotted CLI overrides, errors that name the key, the resolved dump."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from seer.config import (
    ConfigError,
    PretrainConfig,
    batch_per_gpu,
    config_to_dict,
    dump_config,
    load_config,
    trunk_cfg,
    validate,
)
from seer.data.transforms import preset_crops

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "pretrain").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, PretrainConfig) and cfg.optim.name == "lars" and cfg.run_dir


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    validate(cfg)
    raw = yaml.safe_load(path.read_text())
    assert raw["run_dir"] == cfg.run_dir  # the file holds overrides only, applied on the defaults
    trunk_cfg(cfg.model)


def test_recipes_match_the_published_settings():
    names = {p.stem: load_config(p) for p in CONFIGS}
    assert {"tiny_cpu", "seer_rg32", "seer_rg64", "seer_rg128", "seer_rg256", "seer_10b"} <= set(names)
    for name in ("seer_rg32", "seer_rg64", "seer_rg128", "seer_rg256", "seer_10b"):
        c = names[name]
        assert c.swav.n_prototypes == 16000 and c.swav.sinkhorn_iters == 10 and c.swav.head_dims[-1] == 256
        assert c.swav.temperature == 0.1 and c.swav.freeze_prototypes_iters == 313
        assert c.optim.name == "lars" and c.optim.weight_decay == 1e-5 and c.optim.trust_coeff == 0.001
    ten = names["seer_10b"]
    assert ten.model.preset == "regnety_10b" and ten.swav.epsilon == 0.03 and ten.swav.use_bn is False
    assert ten.swav.head_dims == [8192, 8192, 256] and preset_crops(ten.data.multicrop) == [(2, 160), (4, 96)]
    assert batch_per_gpu(ten, 496) == 16
    assert names["seer_rg256"].optim.base_lr * 8192 / names["seer_rg256"].optim.reference_batch == pytest.approx(9.6)


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  base_lr: 0.5\ntrain:\n  fsdp:\n    shard_unit: group\n")
    cfg = load_config(path, ["optim.base_lr=0.1", "train.total_steps=7", "swav.head_dims=[64, 32]",
                             "model.activation_checkpointing=[[1], [], [2, 4], []]"])  # fmt: skip
    assert cfg.optim.base_lr == 0.1 and cfg.train.total_steps == 7 and cfg.total_steps == 7
    assert cfg.train.fsdp.shard_unit == "group" and cfg.swav.head_dims == [64, 32]
    assert cfg.model.activation_checkpointing == [[1], [], [2, 4], []]
    assert load_config(None, ["optim.weight_decay=1"]).optim.weight_decay == 1.0  # ints accepted for floats
    # PyYAML reads 1e-6 (no dot) as a string: on the command line and in a yaml file it is still the float
    assert load_config(None, ["optim.weight_decay=1e-6"]).optim.weight_decay == 1e-6
    (tmp_path / "wd.yaml").write_text("optim:\n  weight_decay: 5E-05\n")
    assert load_config(tmp_path / "wd.yaml").optim.weight_decay == 5e-5


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.bse_lr=0.1", "optim.bse_lr"),  # unknown key, with a suggestion
        ("train.fsdp.shard_unti=block", "train.fsdp.shard_unti"),
        ("optim.base_lr=fast", "optim.base_lr"),  # wrong type
        ("train.total_steps=1.5", "train.total_steps"),
        ("swav.use_bn=3", "swav.use_bn"),
        ("optim.base_lr=-0.1", "optim.base_lr"),  # impossible values
        ("data.image_size=16", "data.image_size"),  # crops larger than the images
        ("swav.crops_for_assign=[0, 9]", "swav.crops_for_assign"),
        ("train.precision=fp16", "train.precision"),
        ("data.multicrop=sear", "data.multicrop"),
        ("model.preset=regnety_4000mf", "model.preset"),
        ("optim.warmup_iters=500", "optim.warmup_iters"),
        ("optim=3", "optim"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.total_steps=100", override])
    assert key in str(info.value)


def test_unknown_key_in_yaml_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("swav:\n  n_protoypes: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*swav.n_protoypes.*did you mean swav.n_prototypes"):
        load_config(path)


def test_global_batch_must_divide_the_world():
    cfg = load_config(None, ["data.global_batch_size=7936"])
    assert batch_per_gpu(cfg, 496) == 16
    with pytest.raises(ConfigError, match="data.global_batch_size.*not divisible by the world size 500"):
        validate(cfg, 500)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["optim.base_lr=0.2", "model.cfg={depth: 4, w0: 16, wa: 8.0, wm: 2.0, group_w: 8}"])
    dump_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name != "config.yaml"]  # no temp file left
