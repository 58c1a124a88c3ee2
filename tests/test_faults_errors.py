"""Clear errors for hostile config files and unlabeled evaluation sets (issue 29, items 13 and 16).

Item 13: every key of the JSON files ``load_trunk`` reads (HF ``config.json`` and ``preprocessor_config.json``, a
timm directory's ``config.json``, our safetensors' ``regnet_cfg`` / ``preprocess`` metadata, a run checkpoint's
``meta.json``) is fuzzed with values of every wrong JSON type, out of range or huge, and the whole file replaced by
a list, a string, a number, invalid JSON or bytes that are not UTF-8. The contract for each: the trunk loads and
computes what the genuine file computes, or a ``CheckpointError`` raised by seer's own code, on one line, names the
file and the key; a type error says which type it found. The CLIs (`seer extract --model`, `seer export`) exit 1
with that one line, no traceback.

Item 16: ``eval_knn`` / ``eval_linear`` (and the suites' few-shot protocols, which call them) refuse the ``-1``
"no label" marker in train or test labels, as the CLIs do, with one check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import seer
from seer.models.regnet import RegNetCfg, build_trunk
from seer.weights import CheckpointError, load_trunk, save_trunk

pytestmark = pytest.mark.faults

TINY = RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# A value of every JSON type, the out-of-range ones and a few near misses: each key of each file gets all of them.
WRONG: dict[str, Any] = {
    "list": [1],
    "empty list": [],
    "list of strings": ["16", "32"],
    "object": {"a": 1},
    "string number": "32",
    "string": "x",
    "true": True,
    "false": False,
    "null": None,
    "zero": 0,
    "negative": -8,
    "huge": 10**30,
    "float": 8.5,
    "whole float": 32.0,
    "nan": float("nan"),
}
# The whole file replaced (json.dumps writes NaN for nan: Python reads it back, so it is a value, not a syntax error).
WHOLE_FILE: dict[str, bytes] = {
    "list": b"[1, 2]",
    "string": b'"regnet"',
    "number": b"3",
    "null": b"null",
    "empty": b"",
    "invalid json": b'{"model_type": ',
    "not utf-8": b'{"model_type": "\xff\xfe"}',
    "integer of 5000 digits": b'{"depths": ' + b"1" * 5000 + b"}",
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
}


def _raised_by_seer(exc: BaseException) -> bool:
    """The exception was raised in seer's own code, not deep inside a library."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "/seer/" in frames[-1].filename


def _assert_clear(exc: BaseException, *names: str) -> str:
    """A seer error on one line naming every one of ``names`` (the file, the key)."""
    assert isinstance(exc, CheckpointError), "".join(traceback.format_exception(exc))
    assert _raised_by_seer(exc), "".join(traceback.format_exception(exc))
    msg = str(exc)
    assert msg.strip() and "\n" not in msg.strip(), msg
    for name in names:
        assert name in msg, f"{name!r} not named in: {msg}"
    return msg


def _loads_or_names(source: Path, reference: torch.Tensor, *names: str) -> str | None:
    """The contract: identical features, or a clear error naming ``names``. Returns the message (None: loaded)."""
    try:
        trunk = load_trunk(source)
    except Exception as exc:  # noqa: BLE001 - what was raised is what is checked
        return _assert_clear(exc, *names)
    with torch.no_grad():
        torch.testing.assert_close(trunk(X), reference, rtol=0, atol=1e-6)
    from seer.data.images import Preprocess

    Preprocess.for_model(trunk)  # whatever preprocessing the file named is one extraction can use
    return None


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> dict[str, Any]:
    """A tiny trunk written by the real ``save_trunk``: an HF directory, our safetensors and a timm directory."""
    root = tmp_path_factory.mktemp("genuine")
    torch.manual_seed(0)
    trunk = build_trunk(TINY).eval()
    with torch.no_grad():
        reference = trunk(X)
    hf = save_trunk(trunk, root / "hf", format="hf")
    ours = save_trunk(trunk, root / "trunk.safetensors", format="seer")
    timm = root / "timm"
    timm.mkdir()
    save_trunk(trunk, timm / "model.safetensors", format="timm")
    pretrained_cfg = {"input_size": [3, 224, 224], "crop_pct": 0.965, "interpolation": "bicubic",
                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    (timm / "config.json").write_text(json.dumps({"architecture": "regnety_032", "pretrained_cfg": pretrained_cfg}))
    return {"trunk": trunk, "reference": reference, "hf": hf, "ours": ours, "timm": timm,
            "pretrained_cfg": pretrained_cfg}  # fmt: skip


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _with_json(directory: Path, name: str, content: Any, tmp_path: Path) -> Path:
    """A copy of ``directory`` whose ``name`` holds ``content`` (bytes as they are, else JSON)."""
    out = _copy(directory, tmp_path / "model")
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (out / name).write_bytes(data)
    return out


# ----------------------------------------------------------------------------------------------------------------
# HF config.json
# ----------------------------------------------------------------------------------------------------------------
HF_KEYS = ("model_type", "num_channels", "embedding_size", "hidden_sizes", "depths", "groups_width", "layer_type",
           "hidden_act", "downsample_in_first_stage", "architectures")  # fmt: skip


@pytest.mark.parametrize("value", list(WRONG.values()), ids=list(WRONG))
@pytest.mark.parametrize("key", HF_KEYS)
def test_hf_config_every_key_every_type(genuine, tmp_path, key, value) -> None:
    config = json.loads((genuine["hf"] / "config.json").read_text())
    model = _with_json(genuine["hf"], "config.json", {**config, key: value}, tmp_path)
    _loads_or_names(model, genuine["reference"], "config.json", key, str(model))


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("embedding_size", "32", "embedding_size: expected an integer, got the string '32'"),
        ("embedding_size", 32.0, "embedding_size: expected an integer, got the number 32.0"),
        ("groups_width", 0, "groups_width: expected an integer >= 1, got the integer 0"),
        ("groups_width", "8", "groups_width: expected an integer, got the string '8'"),
        ("hidden_sizes", [16, "32"], "hidden_sizes[1]: expected an integer, got the string '32'"),
        ("hidden_sizes", 0, "hidden_sizes: expected a non-empty list of integers, got the integer 0"),
        ("depths", [1, None], "depths[1]: expected an integer, got null"),
        ("downsample_in_first_stage", "true", "downsample_in_first_stage: expected true or false"),
    ],
)
def test_hf_config_type_mismatch_is_reported_as_one(genuine, tmp_path, key, value, expected) -> None:
    """A value of the wrong type is a type error: not `embedding_size=32 but the weights have 32`."""
    config = json.loads((genuine["hf"] / "config.json").read_text())
    model = _with_json(genuine["hf"], "config.json", {**config, key: value}, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_trunk(model)
    msg = _assert_clear(info.value, f"{model}/config.json", expected)
    assert "but the weights have" not in msg


def test_hf_config_value_mismatch_names_both_values(genuine, tmp_path) -> None:
    config = json.loads((genuine["hf"] / "config.json").read_text())
    model = _with_json(genuine["hf"], "config.json", {**config, "embedding_size": 48}, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_trunk(model)
    _assert_clear(info.value, "config.json: embedding_size=48 but the weights have 32")


@pytest.mark.parametrize("content", list(WHOLE_FILE.values()), ids=list(WHOLE_FILE))
def test_hf_config_whole_file(genuine, tmp_path, content) -> None:
    model = _with_json(genuine["hf"], "config.json", content, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_trunk(model)
    _assert_clear(info.value, f"{model}/config.json")


PROCESSOR_KEYS = ("size", "crop_pct", "resample", "image_mean", "image_std")


@pytest.mark.parametrize("value", [*WRONG.values(), {"shortest_edge": "224"}, [0.5, 0.5]],
                         ids=[*WRONG, "size object of a string", "two channels"])  # fmt: skip
@pytest.mark.parametrize("key", PROCESSOR_KEYS)
def test_hf_preprocessor_config_every_key(genuine, tmp_path, key, value) -> None:
    """preprocessor_config.json: a bad field is an error naming it, never a silent fallback or a later crash."""
    processor = json.loads((genuine["hf"] / "preprocessor_config.json").read_text())
    model = _with_json(genuine["hf"], "preprocessor_config.json", {**processor, key: value}, tmp_path)
    _loads_or_names(model, genuine["reference"], "preprocessor_config.json", key)


@pytest.mark.parametrize("content", list(WHOLE_FILE.values()), ids=list(WHOLE_FILE))
def test_hf_preprocessor_config_whole_file(genuine, tmp_path, content) -> None:
    """A preprocessor_config.json that is there but unusable is an error, not other preprocessing in silence."""
    model = _with_json(genuine["hf"], "preprocessor_config.json", content, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_trunk(model)
    _assert_clear(info.value, f"{model}/preprocessor_config.json")


@pytest.mark.parametrize(
    "weight_map",
    [[1], {"stem.conv.weight": 5}, {"stem.conv.weight": "../hf/model.safetensors"}, {"stem.conv.weight": "/etc/x"}],
    ids=["list", "number", "climbs out", "absolute"],
)
def test_hf_shard_index_weight_map(genuine, tmp_path, weight_map) -> None:
    """A shard index names files beside it, by name: anything else is refused, naming the index and the key."""
    model = _copy(genuine["hf"], tmp_path / "model")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as info:
        load_trunk(model)
    _assert_clear(info.value, "model.safetensors.index.json", "weight_map")


# ----------------------------------------------------------------------------------------------------------------
# timm directory config.json
# ----------------------------------------------------------------------------------------------------------------
TIMM_KEYS = ("input_size", "test_input_size", "crop_pct", "test_crop_pct", "interpolation", "mean", "std")


@pytest.mark.parametrize("value", list(WRONG.values()), ids=list(WRONG))
@pytest.mark.parametrize("key", TIMM_KEYS)
def test_timm_config_every_key(genuine, tmp_path, key, value) -> None:
    pretrained_cfg = {**genuine["pretrained_cfg"], key: value}
    model = _with_json(genuine["timm"], "config.json", {"pretrained_cfg": pretrained_cfg}, tmp_path)
    _loads_or_names(model, genuine["reference"], "config.json", "pretrained_cfg", key)


@pytest.mark.parametrize("value", [[1], "x", 3, {"a": 1}], ids=["list", "string", "number", "object"])
@pytest.mark.parametrize("key", ["pretrained_cfg", "label_names"])
def test_timm_config_top_level_keys(genuine, tmp_path, key, value) -> None:
    config = {"pretrained_cfg": genuine["pretrained_cfg"], key: value}
    model = _with_json(genuine["timm"], "config.json", config, tmp_path)
    if (key, value) in (("label_names", [1]), ("pretrained_cfg", {"a": 1})):
        # valid: a list of one class name; a pretrained_cfg without the keys seer reads (its defaults apply)
        assert _loads_or_names(model, genuine["reference"], "config.json", key) is None  # identical features
        return
    with pytest.raises(CheckpointError) as info:
        load_trunk(model)
    _assert_clear(info.value, "config.json", key)


# ----------------------------------------------------------------------------------------------------------------
# Our safetensors metadata and a run's meta.json: RegNetCfg validates its own fields
# ----------------------------------------------------------------------------------------------------------------
def _rewrite_metadata(src: Path, dst: Path, **changes: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
    save_file(load_file(str(src)), str(dst), metadata={**metadata, **changes})
    return dst


CFG_KEYS = ("depth", "w0", "wa", "wm", "group_w", "se_ratio", "bottleneck", "stem_width", "image_norm",
            "stage_widths", "stage_depths", "stage_group_widths")  # fmt: skip
_STAGES = RegNetCfg.from_stages(*TINY.stages(), stem_width=TINY.stem_width)  # the same trunk, stated stage by stage


# Every field against the width rule's config; the stage fields (and depth, which they must sum to) also against the
# same trunk stated stage by stage, where they are the layout.
_CFG_CASES = [(TINY, key) for key in CFG_KEYS] + [(_STAGES, key) for key in ("depth", *CFG_KEYS[-3:])]


@pytest.mark.parametrize("value", [*WRONG.values(), "<missing>"], ids=[*WRONG, "missing"])
@pytest.mark.parametrize(
    "base, key", _CFG_CASES, ids=[f"{'stages' if b is _STAGES else 'rule'}-{k}" for b, k in _CFG_CASES]
)
def test_seer_regnet_cfg_every_key(genuine, tmp_path, base, key, value) -> None:
    """Our own metadata from a stranger: a type error names the key and the type found; a well-typed value that
    describes another layout names the stated and the real layout. Never a TypeError from numpy, never a hang."""
    cfg = base.to_dict()
    if key == "image_norm" and value is True:
        # a valid value that changes the model (per-image standardization): no tensor can contradict it, so it loads
        cfg[key] = value
        path = _rewrite_metadata(genuine["ours"], tmp_path / "t.safetensors", regnet_cfg=json.dumps(cfg))
        assert load_trunk(path).cfg.image_norm is True
        return
    if value == "<missing>":
        cfg.pop(key, None)
    else:
        cfg[key] = value
    path = _rewrite_metadata(genuine["ours"], tmp_path / "t.safetensors", regnet_cfg=json.dumps(cfg))
    msg = _loads_or_names(path, genuine["reference"], str(path), "regnet_cfg")
    if msg is not None and (value is None or isinstance(value, (bool, str, dict))):
        # missing, null, a boolean, a string or an object: no field takes one (image_norm takes only a boolean)
        assert key in msg, msg


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("depth", "4", "RegNetCfg.depth must be an integer, got the string '4'"),
        ("depth", 4.0, "RegNetCfg.depth must be an integer, got the number 4.0"),
        ("wa", "8.0", "RegNetCfg.wa must be a number, got the string '8.0'"),
        ("group_w", 0, "RegNetCfg.group_w must be in [1, "),
        ("stage_widths", [16, "32"], "RegNetCfg.stage_widths must hold integers in [1, "),
        ("depth", 1000, "depth=1000 but the weights have 4 blocks"),
        ("se_ratio", 0.0, "stage 1 has SE width 0 (se_ratio=0.0) but the weights have 8"),
        ("bottleneck", 2.0, "stage 1 has bottleneck width 32 (bottleneck=2.0) but the weights have 16"),
    ],
)
def test_seer_regnet_cfg_errors_say_what_is_wrong(genuine, tmp_path, key, value, expected) -> None:
    """A type error says which type it found; a stated layout the tensors contradict names the field and both."""
    cfg = {**_STAGES.to_dict(), key: value} if key.startswith("stage_") else {**TINY.to_dict(), key: value}
    path = _rewrite_metadata(genuine["ours"], tmp_path / "t.safetensors", regnet_cfg=json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        load_trunk(path)
    _assert_clear(info.value, f"{path}: 'regnet_cfg' metadata: ", expected)


@pytest.mark.parametrize("content", ["[1]", '"x"', "3", "null", "{", "{" * 100_000],
                         ids=["list", "string", "number", "null", "invalid", "nested"])  # fmt: skip
def test_seer_regnet_cfg_whole_value(genuine, tmp_path, content) -> None:
    path = _rewrite_metadata(genuine["ours"], tmp_path / "t.safetensors", regnet_cfg=content)
    with pytest.raises(CheckpointError) as info:
        load_trunk(path)
    _assert_clear(info.value, str(path), "regnet_cfg")


PRE_KEYS = ("resolution", "crop_pct", "interpolation", "resize_mode", "mean", "std")


@pytest.mark.parametrize("value", [*WRONG.values(), 10**6], ids=[*WRONG, "million pixels"])
@pytest.mark.parametrize("key", PRE_KEYS)
def test_seer_preprocess_metadata_every_key(genuine, tmp_path, key, value) -> None:
    pre = {"resolution": 224, "crop_pct": 0.875, "interpolation": "bicubic", "resize_mode": "shorter", key: value}
    path = _rewrite_metadata(genuine["ours"], tmp_path / "t.safetensors", preprocess=json.dumps(pre))
    _loads_or_names(path, genuine["reference"], str(path), "preprocess", key)


@pytest.mark.parametrize("content", ["[1]", '"x"', "3", "{"], ids=["list", "string", "number", "invalid"])
def test_seer_preprocess_metadata_whole_value(genuine, tmp_path, content) -> None:
    path = _rewrite_metadata(genuine["ours"], tmp_path / "t.safetensors", preprocess=content)
    with pytest.raises(CheckpointError) as info:
        load_trunk(path)
    _assert_clear(info.value, str(path), "preprocess")


def test_seer_metadata_huge_depth_fails_fast(genuine, tmp_path) -> None:
    """A stated depth of 10**6 (four real blocks) is refused at once, not built block by block for hours."""
    cfg = {**TINY.to_dict(), "depth": 1_000_000}
    path = _rewrite_metadata(genuine["ours"], tmp_path / "t.safetensors", regnet_cfg=json.dumps(cfg))
    code = f"import seer.weights as w\ntry:\n    w.load_trunk({str(path)!r})\nexcept ValueError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0 and "regnet_cfg" in out.stdout and "depth" in out.stdout, out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------------------------
# The CLIs: one line, exit 1
# ----------------------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    """The subprocess imports the same seer as this test (a worktree's, not an installed one)."""
    root = str(Path(seer.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _seer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seer.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=_env())  # fmt: skip


def _assert_one_line(out: subprocess.CompletedProcess, *names: str, codes: tuple[int, ...] = (1,)) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode in codes, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"


@pytest.mark.parametrize(
    "change, names",
    [
        (b"[1, 2]", ("config.json",)),
        ({"groups_width": 0}, ("config.json", "groups_width")),
        ({"embedding_size": "32"}, ("config.json", "embedding_size: expected an integer, got the string '32'")),
    ],
    ids=["list", "groups_width 0", "string 32"],
)
def test_cli_extract_with_a_hostile_hf_config(genuine, tmp_path, change, names) -> None:
    config = json.loads((genuine["hf"] / "config.json").read_text())
    content = change if isinstance(change, bytes) else {**config, **change}
    model = _with_json(genuine["hf"], "config.json", content, tmp_path)
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(images / "a.png")
    out = _seer("extract", str(images), str(tmp_path / "out"), "--model", str(model), "--device", "cpu", cwd=tmp_path)
    _assert_one_line(out, *names, codes=(1, 2))  # `seer extract` exits 2 on any bad input


@pytest.mark.parametrize(
    "change, key",
    [({"depth": "4"}, "depth"), ({"stage_widths": 0}, "stage_widths")],
    ids=["string depth", "int stage_widths"],
)
def test_cli_export_with_a_hostile_run_regnet_cfg(genuine, tmp_path, change, key) -> None:
    """A run checkpoint's meta.json states the trunk's RegNetCfg: a bad field names meta.json and the field."""
    from seer.train.checkpoint import latest_checkpoint, save_checkpoint

    model = torch.nn.Module()
    model.trunk = genuine["trunk"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "run", 5, model, opt, meta={"regnet_cfg": TINY.to_dict()})
    meta_file = latest_checkpoint(tmp_path / "run") / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["regnet_cfg"] = {**meta["regnet_cfg"], **change}
    meta_file.write_text(json.dumps(meta))
    out = _seer("export", str(tmp_path / "run"), str(tmp_path / "out.safetensors"), cwd=tmp_path)
    _assert_one_line(out, "meta.json", key)
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------
# Item 16: the "no label" marker is not a class, in every protocol
# ----------------------------------------------------------------------------------------------------------------
def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype(np.float32), np.arange(n) % 2


def _protocols() -> dict[str, Any]:
    from seer.evaluation import eval_knn, eval_linear

    return {
        "knn": lambda a, b, c, d: eval_knn(a, b, c, d, ks=(3,), backend="torch", device="cpu"),
        "knn few-shot": lambda a, b, c, d: eval_knn(
            a, b, c, d, ks=(1,), n_per_class=2, n_tries=1, backend="torch", device="cpu"
        ),  # fmt: skip
        "linear": lambda a, b, c, d: eval_linear(
            a, b, c, d, epochs=1, lrs=(0.1,), head_types=("linear",), device="cpu", report_heads_on_test=False
        ),  # fmt: skip
        "logreg": lambda a, b, c, d: eval_linear(a, b, c, d, method="logreg", Cs=(1.0,), max_iter=50, device="cpu"),
    }


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("which", ["train", "test"])
@pytest.mark.parametrize("protocol", ["knn", "knn few-shot", "linear", "logreg"])
def test_eval_refuses_the_no_label_marker(protocol, which, as_tensor) -> None:
    """An unlabeled test set scored 0.0 and an unlabeled train row voted for class -1: both are refused, naming the
    set, how many rows, and the fix."""
    xtr, ytr = _split(20, 0)
    xte, yte = _split(10, 1)
    y = ytr if which == "train" else yte
    y[:3] = -1
    if which == "test":
        y[5] = -7  # any negative label is the marker
    if as_tensor:
        ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    with pytest.raises(ValueError, match=rf"{which}_labels: {3 + (which == 'test')} of {len(y)} samples have no label"):
        _protocols()[protocol](xtr, ytr, xte, yte)


def test_eval_unlabeled_test_set_is_an_error_not_zero() -> None:
    """The reported case: a test set extracted without class folders (all -1)."""
    from seer.evaluation import eval_knn

    xtr, ytr = _split(20, 0)
    xte, _ = _split(10, 1)
    with pytest.raises(ValueError, match=r"test_labels: 10 of 10 samples have no label.*drop those rows"):
        eval_knn(xtr, ytr, xte, -np.ones(10, np.int64), ks=(3,), backend="torch", device="cpu")


@pytest.mark.parametrize("proto", [{"name": "knn", "ks": [1], "backend": "torch"},
                                   {"name": "linear", "n_per_class": 2, "epochs": 1},
                                   {"name": "logreg", "n_per_class": 2, "n_tries": 2, "Cs": [1.0]}],
                         ids=["knn", "linear few-shot", "logreg few-shot"])  # fmt: skip
def test_suite_protocols_refuse_the_no_label_marker(proto) -> None:
    """The suites' protocols, few-shot included, go through the same check."""
    from seer.evaluation.suites import run_protocol

    xtr, ytr = _split(20, 0)
    xte, yte = _split(10, 1)
    ytr[:4] = -1
    with pytest.raises(ValueError, match=r"train_labels: \d+ of \d+ samples have no label"):
        run_protocol(proto, {"f": xtr}, ytr, {"f": xte}, yte, {}, "cpu")


@pytest.mark.parametrize("command", ["knn"])  # `seer linear` reads its inputs with the same function
def test_cli_names_the_labels_file(tmp_path, command) -> None:
    """The CLIs make the same check (one line, exit 1), naming the file and their --*-labels option."""
    xtr, ytr = _split(20, 0)
    xte, yte = _split(10, 1)
    yte[:2] = -1
    np.savez(tmp_path / "train.npz", features=xtr, labels=ytr)
    np.savez(tmp_path / "test.npz", features=xte, labels=yte)
    out = _seer(command, "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"), cwd=tmp_path)
    _assert_one_line(out, "test.npz", "2 of 10 samples have no label", "--test-labels")
