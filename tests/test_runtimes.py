"""ONNX export and the extraction backends (onnxruntime, openvino, torch.compile, auto) against eager torch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from seer.models.classifier import RegNetClassifier
from seer.models.regnet import RegNetCfg, build_trunk

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

# SE, a projection shortcut in every stage, two group widths: every op a SEER trunk exports
TINY = RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)
RTOL = 1e-4  # the bound: relative to the largest feature


def _trunk(seed: int = 0, **cfg) -> torch.nn.Module:
    torch.manual_seed(seed)
    trunk = build_trunk(RegNetCfg(**{**TINY.to_dict(), **cfg}))
    # non-trivial BN statistics, so a missed fold or a training-mode BN shows
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return trunk.eval()


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("image_norm", [False, True])
def test_onnx_export_matches_torch_at_any_batch(tmp_path, image_norm):
    from seer.weights.onnx import export_onnx

    trunk = _trunk(image_norm=image_norm)
    path = export_onnx(trunk, tmp_path / "t.onnx", layers="stages", resolution=32)
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == list(trunk.stage_names)
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 5):  # the example batch was 2: the batch dimension is dynamic
        x = torch.randn(batch, 3, 32, 32)
        got = session.run(None, {"images": x.numpy()})
        with torch.inference_mode():
            want = trunk.forward_stages(x)
        for name, g in zip(trunk.stage_names, got):
            assert g.shape == (batch, want[name].shape[1])
            assert _rel(g, want[name].mean((2, 3))) < RTOL, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]  # no temporary left behind


def test_onnx_maps_and_classifier_logits(tmp_path):
    import onnx

    from seer.weights import save_trunk
    from seer.weights.onnx import export_onnx

    trunk = _trunk(1)
    path = export_onnx(trunk, tmp_path / "maps.onnx", layers=("res3",), pool=False, resolution=32)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        want = trunk.forward_stages(x)["res3"]
    (got,) = _session(path).run(None, {"images": x.numpy()})
    assert got.shape == tuple(want.shape) and _rel(got, want) < RTOL

    clf = RegNetClassifier(trunk, 3, id2label={0: "cat", 1: "dog", 2: "owl"}).eval()
    path = save_trunk(clf, tmp_path / "clf.onnx", format="onnx")  # resolution from the trunk's preprocessing
    x = torch.randn(2, 3, 224, 224)
    feats, logits = _session(path).run(None, {"images": x.numpy()})
    with torch.inference_mode():
        assert _rel(logits, clf(x)) < RTOL and _rel(feats, trunk(x)) < RTOL
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert '"owl"' in meta["id2label"] and '"depth": 4' in meta["regnet_cfg"]
    assert clf.training is False and trunk.training is False


def test_onnx_export_refuses_bad_requests_and_writes_nothing(tmp_path):
    from seer.weights.onnx import export_onnx

    trunk = _trunk()
    with pytest.raises(ValueError, match=r"<name>\.onnx.*t\.pt"):
        export_onnx(trunk, tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"layer 'res9'.*res2"):
        export_onnx(trunk, tmp_path / "t.onnx", layers=("res9",))
    with pytest.raises(TypeError, match="Linear"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "t.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_keeps_the_old_file_when_export_fails(tmp_path, monkeypatch):
    from seer.weights.onnx import export_onnx

    path = tmp_path / "t.onnx"
    path.write_bytes(b"old")

    def boom(*a, **k):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(_trunk(), path, resolution=32)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]


def test_onnx_external_data_for_large_weights(tmp_path):
    from seer.weights.onnx import export_onnx

    trunk = _trunk()
    path = export_onnx(trunk, tmp_path / "big.onnx", resolution=32, external_data=True)
    assert (tmp_path / "big.onnx.data").is_file()  # what a > 2 GiB trunk gets, forced here
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert _rel(_session(path).run(None, {"images": x.numpy()})[0], trunk(x)) < RTOL


def test_seer_export_cli_writes_onnx(tmp_path, tiny_overrides):
    from seer.config import load_config
    from seer.train.loop import pretrain
    from seer.weights import load_trunk
    from seer.weights.cli import cli_export

    run = tmp_path / "run"
    pretrain(load_config(None, [*tiny_overrides, f"run_dir={run}", "train.total_steps=2",
                                "data.batch_size_per_gpu=4", "swav.freeze_prototypes_iters=0"]))  # fmt: skip
    assert cli_export([str(run), str(tmp_path / "trunk.onnx"), "--format", "onnx"]) == 0
    trunk = load_trunk(run).eval()
    side = trunk.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    x = torch.randn(2, 3, side, side)
    with torch.inference_mode():
        assert _rel(_session(tmp_path / "trunk.onnx").run(None, {"images": x.numpy()})[0], trunk(x)) < RTOL


# ----------------------------------------------------------------------------------------------------------------
# extract_features(backend=...)
# ----------------------------------------------------------------------------------------------------------------
def _images(n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_extract_features_runtime_backends_match_torch(backend):
    import seer

    if backend == "openvino":
        pytest.importorskip("openvino")
    trunk = _trunk(2)
    imgs = _images()
    for layer in ("avgpool", "res3"):
        want = seer.extract_features(imgs, trunk, backend="torch", resolution=32, layer=layer, batch_size=5)
        got = seer.extract_features(imgs, trunk, backend=backend, resolution=32, layer=layer, batch_size=5)
        assert got.shape == want.shape and _rel(got, want) < RTOL, (backend, layer)


def test_progress_false_silences_the_backend_set_up(monkeypatch, capsys):
    """The extraction's ``progress`` reaches the ONNX export: ``False`` prints nothing, the default its heartbeat."""
    import seer
    from seer.features import backends

    monkeypatch.delenv("SEER_PROGRESS", raising=False)
    trunk = _trunk(6)
    for progress, heard in ((False, False), (None, True)):
        backends._CACHE.clear()  # an export is cached per process and model: set it up again
        capsys.readouterr()
        seer.extract_features(_images(4), trunk, backend="onnxruntime", resolution=32, progress=progress)
        err = capsys.readouterr().err
        assert ("ONNX export of the RegNetTrunk" in err) is heard, (progress, err)
        assert ("done in" in err) is heard


@pytest.mark.slow
def test_extract_features_compile_backend_matches_torch():
    import seer

    trunk = _trunk(3)
    imgs = _images()
    want = seer.extract_features(imgs, trunk, backend="torch", resolution=32, batch_size=6)
    got = seer.extract_features(imgs, trunk, backend="compile", resolution=32, batch_size=6)
    assert _rel(got, want) < RTOL


def test_backend_errors_name_the_problem(monkeypatch):
    import seer

    trunk = _trunk()
    with pytest.raises(ValueError, match=r"backend must be one of .*'tensorrt'"):
        seer.extract_features(_images(2), trunk, backend="tensorrt", resolution=32)
    from seer import hardware

    with hardware.force("cpu_bf16", True), pytest.raises(ValueError, match=r"onnxruntime.*fp32.*amp"):
        seer.extract_features(_images(2), trunk, backend="onnxruntime", resolution=32, amp="bf16")
    # without oneDNN bf16 kernels (AVX2-only CPUs) amp="bf16" is fp32 on CPU, with a warning: nothing to refuse
    monkeypatch.setattr(hardware, "_WARNED", set())  # the warning is once per process
    with hardware.force("cpu_bf16", False), pytest.warns(RuntimeWarning, match="bf16"):
        got = seer.extract_features(_images(2), trunk, backend="onnxruntime", resolution=32, amp="bf16")
    assert _rel(got, seer.extract_features(_images(2), trunk, backend="torch", resolution=32)) < RTOL
    with pytest.raises(ValueError, match=r"RegNetTrunk only.*Sequential"):
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        seer.extract_features(torch.rand(2, 3, 32, 32), net, backend="onnxruntime", preprocess=False, batch_size=2)


def test_auto_keeps_torch_for_small_jobs_and_probes_large_ones(monkeypatch, caplog):
    import seer
    from seer.features import backends

    trunk = _trunk(4)
    imgs = _images()
    ex = torch.zeros(6, 3, 32, 32)
    monkeypatch.delenv("SEER_FEATURES_BACKEND", raising=False)
    small = backends.choose(trunk, "avgpool", ex, n_images=12)
    assert small.name == "torch" and f"12 images < {backends.AUTO_MIN_IMAGES}" in small.rule and small.seconds == {}

    calls = []
    real = backends._probe
    monkeypatch.setattr(backends, "_probe", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(backends, "AUTO_MIN_IMAGES", 4)
    backends._CHOICES.clear()
    with caplog.at_level(logging.INFO, logger="seer.features"):
        got = seer.extract_features(imgs, trunk, backend="auto", resolution=32, batch_size=6)
        again = backends.choose(trunk, "avgpool", ex, n_images=12)
    assert len(calls) == 1  # cached per process
    assert again.name in ("torch", "onnxruntime", "openvino") and "torch" in again.seconds
    assert all(v["batch_s"] > 0 for v in again.seconds.values())
    assert any("backend=auto: " + again.name in r.getMessage() for r in caplog.records)
    want = seer.extract_features(imgs, trunk, backend="torch", resolution=32, batch_size=6)
    assert _rel(got, want) < RTOL


def test_auto_rules_without_a_probe(monkeypatch):
    from seer.features import backends

    trunk = _trunk()
    ex = torch.zeros(4, 3, 32, 32)
    monkeypatch.setenv("SEER_FEATURES_BACKEND", "onnxruntime")
    assert backends.choose(trunk, "avgpool", ex, n_images=5).as_dict() == {
        "backend": "onnxruntime", "rule": "forced by SEER_FEATURES_BACKEND", "seconds": {}}  # fmt: skip
    monkeypatch.setenv("SEER_FEATURES_BACKEND", "tvm")
    with pytest.raises(ValueError, match="SEER_FEATURES_BACKEND='tvm'"):
        backends.choose(trunk, "avgpool", ex, n_images=5)
    monkeypatch.delenv("SEER_FEATURES_BACKEND")
    monkeypatch.setattr(backends, "installed", lambda name: name in ("torch", "compile"))
    choice = backends.choose(trunk, "avgpool", ex, n_images=10**6)
    assert choice.name == "torch" and "no other runtime installed" in choice.rule
    net = torch.nn.Conv2d(3, 3, 1)
    assert "not a seer RegNetTrunk" in backends.choose(net, "avgpool", ex, n_images=10**6).rule


def test_extract_dataset_records_the_backend_that_ran(tmp_path):
    from PIL import Image

    from seer.features import extract_dataset, load_feature_file

    rng = np.random.default_rng(0)
    files = []
    for i in range(6):
        files.append(tmp_path / "imgs" / f"{i}.png")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(files[-1])
    trunk = _trunk(5)
    got = {}
    for backend in ("torch", "onnxruntime"):
        summary = extract_dataset([str(f) for f in files], tmp_path / backend, trunk, backend=backend, resolution=32,
                                  dtype="float32", progress=False, batch_size=4)  # fmt: skip
        assert summary["backend"]["backend"] == backend
        got[backend] = np.asarray(load_feature_file(tmp_path / backend)["features"])
    assert _rel(got["onnxruntime"], got["torch"]) < RTOL
