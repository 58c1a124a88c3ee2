"""``export_onnx(layers=...)``: every layer name its error lists is accepted and exports (issue 31, item 4), and the
export shows a ``seer.progress.heartbeat`` line while it runs (item 5)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from seer.models.regnet import RegNetCfg, build_trunk
from seer.weights.onnx import export_onnx, layer_choices

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

# four stages (res2..res5, as every SEER trunk has), SE and grouped convolutions, tiny
CFG = RegNetCfg.from_stages([8, 16, 24, 32], [1, 1, 1, 1], 8)
RES = 32


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(0)
    t = build_trunk(CFG)
    for m in t.modules():  # non-trivial BN statistics: a training-mode or a missed BN shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return t.eval()


def _listed_names(trunk) -> list[str]:
    """The layer names the error of a bad name offers, read from the message itself."""
    with pytest.raises(ValueError) as info:
        export_onnx(trunk, "unused.onnx", layers=("res9",))
    listed = str(info.value).split("choose from ", 1)[1].split(" (", 1)[0]
    return re.findall(r"'(\w+)'", listed)


def test_the_error_lists_exactly_the_accepted_names(trunk):
    listed = _listed_names(trunk)
    assert listed == list(layer_choices(trunk)) == ["avgpool", "res2", "res3", "res4", "res5", "stages"]


@pytest.mark.parametrize("name", ["avgpool", "res2", "res3", "res4", "res5", "stages"])
def test_every_listed_name_exports_and_matches_torch(trunk, tmp_path, name):
    assert name in _listed_names(trunk)  # the parametrization is the error's list (checked above, exactly)
    path = export_onnx(trunk, tmp_path / "t.onnx", layers=(name,), resolution=RES, progress=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = list(trunk.stage_names) if name == "stages" else [name]
    assert [o.name for o in session.get_outputs()] == expected
    x = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    got = session.run(None, {"images": x.numpy()})
    with torch.inference_mode():
        maps = trunk.forward_stages(x)
        want = [trunk(x) if n == "avgpool" else maps[n].mean((2, 3)) for n in expected]
    for n, g, w in zip(expected, got, want):
        err = np.abs(g - w.numpy()).max() / np.abs(w.numpy()).max()
        assert g.shape == tuple(w.shape) and err < 1e-4, (n, err)


def test_names_combine_and_each_output_appears_once(trunk, tmp_path):
    path = export_onnx(trunk, tmp_path / "t.onnx", layers=("avgpool", "res5", "stages", "res2"), resolution=RES,
                       progress=False)  # fmt: skip
    names = [o.name for o in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()]
    assert names == ["avgpool", "res5", "res2", "res3", "res4"]
    with pytest.raises(ValueError, match="layers is empty"):
        export_onnx(trunk, tmp_path / "e.onnx", layers=())
    with pytest.raises(ValueError, match=r"layer 3: choose from 'avgpool'"):
        export_onnx(trunk, tmp_path / "e.onnx", layers=(3,))


def test_the_export_shows_a_heartbeat(trunk, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("SEER_PROGRESS", raising=False)
    export_onnx(trunk, tmp_path / "t.onnx", resolution=RES)
    err = capfd.readouterr().err
    assert "ONNX export of the RegNetTrunk" in err and f"{RES} px) to {tmp_path / 't.onnx'} ..." in err
    assert re.search(r"t\.onnx: done in \d+:\d\d", err), err
    export_onnx(trunk, tmp_path / "t.onnx", resolution=RES, progress=False)
    assert "ONNX export" not in capfd.readouterr().err
