"""Hostile configs: unknown keys, wrong types, impossible values and code in yaml are rejected naming the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seer.config import ConfigError, PretrainConfig, batch_per_gpu, load_config, validate

pytestmark = pytest.mark.faults


@pytest.fixture(scope="session")
def tiny(tiny_overrides):
    return [*tiny_overrides, "train.total_steps=4"]


def _keys(node=None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree."""
    node = node if node is not None else PretrainConfig()
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out += _keys(value, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


KEYS = _keys()


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.bse_lr=0.1", "optim.bse_lr"),
        ("trian.total_steps=3", "trian"),
        ("train.fsdp.shard=block", "train.fsdp.shard"),
    ],
)
def test_unknown_keys_named(override: str, key: str, tiny) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [*tiny, override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.total_steps=abc", "train.total_steps"),
        ("train.total_steps=2.5", "train.total_steps"),
        ("train.total_steps=true", "train.total_steps"),
        ("optim.base_lr=[1]", "optim.base_lr"),
        ("optim.base_lr=.nan", "optim.base_lr"),
        ("optim.base_lr=-0.1", "optim.base_lr"),
        ("model.activation_checkpointing=3", "model.activation_checkpointing"),
        ("model.activation_checkpointing=sometimes", "model.activation_checkpointing"),
        ("data.crops=[[2, a]]", "data.crops"),
        ("data.crops=[[1, 32]]", "data.crops"),  # one crop: SwAV needs two views
        ("data.batch_size_per_gpu=0", "data.batch_size_per_gpu"),
        ("data.source=webdataset", "data.source"),
        ("data.source=shards", "data.urls"),
        ("swav.crops_for_assign=[0, 7]", "swav.crops_for_assign"),
        ("swav.head_dims=[]", "swav.head_dims"),
        ("swav.temperature=0", "swav.temperature"),
        ("optim.warmup_iters=9", "optim.warmup_iters"),
        ("train.precision=fp8", "train.precision"),
        ("train.min_step_seconds=-1", "train.min_step_seconds"),
        ("train.dist_timeout_minutes=0", "train.dist_timeout_minutes"),
        ("model.preset=regnety_9000gf", "model.preset"),
        ("model.cfg={depth: -1}", "model.cfg"),
        ("run_dir=[a, b]", "run_dir"),
        ("model={preset: 3}", "model.preset"),
        ("model=regnety_400mf", "model"),
    ],
)
def test_wrong_types_and_impossible_values_named(override: str, key: str, tiny) -> None:
    extra = ["model.cfg=null"] if key == "model.preset" else []  # a full model.cfg needs no preset
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [*tiny, *extra, override])


def test_crops_larger_than_the_images_named(tiny) -> None:
    with pytest.raises(ConfigError, match=r"data\.image_size.*largest crop \(64 px\)"):
        load_config(None, [*tiny, "data.crops=[[2, 64], [2, 32]]", "data.image_size=48"])


@pytest.mark.parametrize("world_size", [3, 5, 7])
def test_global_batch_not_divisible_by_world_size_named(world_size: int, tiny) -> None:
    cfg = load_config(None, [*tiny, "data.global_batch_size=32"])
    for check in (lambda: validate(cfg, world_size), lambda: batch_per_gpu(cfg, world_size)):
        with pytest.raises(ConfigError, match=rf"data\.global_batch_size.*world size {world_size}"):
            check()
    assert batch_per_gpu(cfg, 4) == 8
    cfg = load_config(None, [*tiny, "data.global_batch_size=12", "train.bn_splits=4"])
    with pytest.raises(ConfigError, match=r"train\.bn_splits"):
        validate(cfg, 2)  # 6 images per GPU cannot be split into 4 BN groups


def test_yaml_files(tmp_path: Path, tiny) -> None:
    marker = tmp_path / "PWNED"
    cases = {
        "unknown.yaml": ("optim:\n  base_lr: 0.1\n  momentun: 0.9\n", "optim.momentun"),
        "list.yaml": ("- a\n- b\n", "expected a mapping"),
        "broken.yaml": ("optim: {base_lr: 0.1\n", "not valid yaml"),
        "section.yaml": ("optim: 0.1\n", "optim"),
        "code.yaml": (f"run_dir: !!python/object/apply:os.system ['touch {marker}']\n", "not valid yaml"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(expected)) as info:
            load_config(path, tiny)
        assert name in str(info.value)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises((FileNotFoundError, ConfigError), match=str(tmp_path)):
        load_config(tmp_path)  # a directory


def test_cli_rejects_bad_configs_in_one_line(tmp_path: Path, capsys, tiny) -> None:
    from seer.cli import main

    for args in (["optim.bse_lr=0.1"], ["train.total_steps=abc"], ["--config", str(tmp_path / "nope.yaml")],
                 ["no_equals_sign"], ["=3"], ["a..b=3"]):  # fmt: skip
        code = main(["pretrain", *tiny, f"run_dir={tmp_path / 'run'}", *args])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("seer pretrain: ") and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "run").exists()  # nothing was started


# values a user might type after `key=`
VALUES = st.one_of(
    st.sampled_from(["", "0", "-1", "1e9", ".inf", ".nan", "true", "null", "[]", "{}", "[[1, 2]]", "{a: 1}", "x"]),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=15)), value=VALUES)
def test_fuzzed_overrides_load_or_name_the_key(key: str, value: str, tiny) -> None:
    """Any ``key=value`` either loads (and validates) or raises ConfigError naming the key; nothing else."""
    override = f"{key}={value}"
    try:
        cfg = load_config(None, [*tiny, override])
    except ConfigError as exc:
        top = key.split("=")[0].strip().split(".")[0]
        assert top in str(exc) or repr(top)[1:-1] in str(exc) or "override" in str(exc), (override, str(exc))
        return
    validate(cfg)  # whatever loaded is valid
