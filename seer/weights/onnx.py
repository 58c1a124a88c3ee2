"""ONNX export of a trunk (or a classifier): pooled features per layer, a dynamic batch dimension.

The graph is traced by ``torch.onnx.export`` (the torch.export-based exporter, which needs ``onnxscript``) through the
trunk's plain autograd-mode ops: the oneDNN-fused inference kernels (``ConvBN``'s fused conv + ReLU / residual) run
only without autograd, and have no ONNX form. Batch norm stays a separate op in the graph; ONNX Runtime and OpenVINO
fold it into the convolution when they load the file.

Outputs are named after ``seer.extract_features``'s layers: ``avgpool`` (the last stage, globally averaged), the
stages ``res2``..``res5`` (each averaged), or with ``pool=False`` the stages' feature maps; a classifier adds
``logits``. The input is ``images``: ``[batch, 3, H, W]`` float32, already resized and normalized (the file's
metadata records the preprocessing, as ``seer`` checkpoints do).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from seer.extras import require
from seer.io import OutputDirError, honour_umask
from seer.models.classifier import RegNetClassifier
from seer.models.pooling import pool
from seer.models.regnet import RegNetTrunk
from seer.progress import heartbeat
from seer.weights.targets import check_export_target

__all__ = ["export_onnx", "layer_choices", "ONNX_MAX_PROTO_BYTES"]

# protobuf's 2 GiB message limit: larger weights go to one external-data file beside the .onnx
ONNX_MAX_PROTO_BYTES = 2**31 - 2**24


class _Exported(nn.Module):
    """The exported function: images -> a tuple of the wanted outputs, in ``names`` order."""

    def __init__(self, model: RegNetTrunk | RegNetClassifier, layers: Sequence[str], pool: bool) -> None:
        super().__init__()
        self.model, self.layers, self.pool = model, tuple(layers), pool

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        trunk = self.model.trunk if isinstance(self.model, RegNetClassifier) else self.model
        last = trunk.stage_names[-1]
        stages = [last if layer == "avgpool" else layer for layer in self.layers]
        classifier = isinstance(self.model, RegNetClassifier)
        deepest = last if classifier else max(stages, key=trunk.stage_names.index)
        maps = trunk.forward_stages(images, until=deepest)
        outs = [pool(maps[s]) if self.pool else maps[s] for s in stages]
        if classifier:
            outs.append(self.model.head(pool(maps[last])))
        return tuple(outs)


def layer_choices(trunk: RegNetTrunk) -> dict[str, tuple[str, ...]]:
    """Every name ``export_onnx(layers=...)`` accepts -> the outputs it stands for: "avgpool", each stage of this
    trunk, and "stages" (all of them). The accepted set and the error's list both come from here."""
    choices: dict[str, tuple[str, ...]] = {"avgpool": ("avgpool",)}
    choices.update({stage: (stage,) for stage in trunk.stage_names})
    choices["stages"] = tuple(trunk.stage_names)
    return choices


def _expand_layers(trunk: RegNetTrunk, layers: Sequence[str] | str) -> list[str]:
    """The output names ``layers`` asks for, in order, each once ("stages" expanded); ValueError naming a bad one."""
    choices = layer_choices(trunk)
    names: list[str] = []
    for layer in [layers] if isinstance(layers, str) else list(layers):
        if not isinstance(layer, str) or layer not in choices:
            raise ValueError(
                f"layer {layer!r}: choose from {', '.join(map(repr, choices))} (each stage of this trunk, "
                f"'avgpool' = the last stage averaged, 'stages' = every stage)"
            )
        names += choices[layer]
    if not names:
        raise ValueError("layers is empty: name at least one output")
    return list(dict.fromkeys(names))  # "stages" and "res5" together: one "res5" output (ONNX names are unique)


@contextlib.contextmanager
def _quiet(*names: str):
    """The exporter's per-pass INFO lines (hundreds per trunk) off, whatever the user's logging level."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: RegNetTrunk | RegNetClassifier, path: str | os.PathLike, *,
                layers: Sequence[str] | str = ("avgpool",), pool: bool = True, resolution: int | None = None,
                opset: int | None = None, external_data: bool | None = None, preprocess: dict | None = None,
                check: bool = True, progress: bool | None = True) -> Path:  # fmt: skip
    """Write ``model`` as an ONNX file with a dynamic batch dimension (atomically: nothing is left on failure).

    Args:
        model: a ``RegNetTrunk`` or ``RegNetClassifier`` (its ``logits`` become an extra output).
        path: the ``.onnx`` file. Weights over 2 GiB go to ``<path>.data`` beside it (ONNX external data).
        layers: outputs, each one of ``layer_choices(trunk)``: "avgpool", "res2".."res5", or "stages" for every
            stage (a name given twice, or a stage also in "stages", is one output).
        pool: global-average each output (the features ``extract_features`` returns); ``False`` keeps the maps.
        resolution: the example input's side (default: the checkpoint's preprocessing resolution, else 224); the
            spatial size stays fixed in the graph, the batch is dynamic.
        opset: ONNX opset (default: the exporter's).
        external_data: force external weights on or off (default: only when the weights exceed 2 GiB).
        preprocess: preprocessing recorded in the metadata (default: the model's ``pretrained_cfg``).
        check: run ``onnx.checker`` on the written model (skipped for external data, which it reads again).
        progress: a ``seer.progress.heartbeat`` line on stderr while the export runs (``False``: none).

    Returns:
        The written path.
    """
    if not isinstance(model, (RegNetTrunk, RegNetClassifier)):
        raise TypeError(f"export_onnx expects a RegNetTrunk or RegNetClassifier, got {type(model).__name__}")
    trunk = model.trunk if isinstance(model, RegNetClassifier) else model
    layers = _expand_layers(trunk, layers)
    require("onnxscript", "ONNX export")  # torch.onnx's exporter needs it: a message naming the extra beats its own
    pre = dict(preprocess or getattr(model, "pretrained_cfg", None) or {})
    side = int(resolution or (pre.get("input_size") or (3, 224, 224))[-1])
    names = list(layers) + (["logits"] if isinstance(model, RegNetClassifier) else [])
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = n_bytes > ONNX_MAX_PROTO_BYTES if external_data is None else bool(external_data)
    path = Path(path).expanduser()
    if path.suffix != ".onnx":
        raise ValueError(f"an ONNX file is written as <name>.onnx, got {path.name!r}")
    check_export_target(path, "onnx")  # an existing file is replaced; a directory in the way is refused, untouched
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    device = next(model.parameters()).device
    example = torch.zeros(2, 3, side, side, device=device)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        model.eval()
        # One long call of unknown length (minutes for the large presets): a line every 10 s says it still runs.
        size = f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.3g} MB"
        what = f"ONNX export of the {type(model).__name__} ({size} of weights, {side} px) to {path}"
        with heartbeat(what, enabled=progress):
            # Autograd mode on: the trunk's fused oneDNN inference kernels are chosen only without it, and have no
            # ONNX form; with it, every op is a plain conv / batch norm / relu / mean the exporter knows.
            with torch.enable_grad(), _quiet("onnx_ir", "onnxscript", "torch.onnx"):
                program = torch.onnx.export(
                    _Exported(model, layers, pool).eval(), (example,), dynamo=True, input_names=["images"],
                    output_names=names, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset,
                    external_data=False, verbose=False,
                )  # fmt: skip
            meta = {"producer": "seer", "layers": json.dumps(names), "pooled": json.dumps(pool)}
            if isinstance(trunk, RegNetTrunk):
                meta["regnet_cfg"] = json.dumps(trunk.cfg.to_dict())
            if pre:
                meta["preprocess"] = json.dumps(pre)
            if isinstance(model, RegNetClassifier):
                meta["id2label"] = json.dumps({str(k): v for k, v in model.id2label.items()})
            program.model.metadata_props.update(meta)
            out = tmp / path.name
            program.save(str(out), external_data=external)
            if check and not external:
                import onnx

                onnx.checker.check_model(str(out), full_check=True)
        data = [p for p in tmp.iterdir() if p.name != path.name]
        for p in data:
            if (path.parent / p.name).is_dir():
                raise OutputDirError(f"{path.parent / p.name} is a directory: the external data file cannot go there")
        for p in [*data, out]:  # external data first: the .onnx appears last, complete
            honour_umask(p, directory=False)  # the umask's mode, whatever the exporter created the file with
            os.replace(p, path.parent / p.name if p != out else path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)
    return path
