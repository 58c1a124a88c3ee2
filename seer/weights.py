"""Checkpoint formats in and out: ours, HF transformers, timm, torchvision and VISSL / ClassyVision.

Every format describes the same modules under other names, so one small table per format (``LAYOUTS``) converts
keys both ways. Loading works in three steps:

1. read the tensors without copying them (safetensors and ``torch.load(mmap=True, weights_only=True)`` both map the
   file; nothing is unpickled but tensors and plain containers);
2. rename the keys to ours (timm's regnety names) and infer the architecture from the tensor shapes (cross-checked
   with HF's ``config.json``), or take it from ``preset=`` / our metadata;
3. build the trunk on the meta device and *assign* the checkpoint tensors to it: the weights exist once in memory
   (the file's pages), whatever the model size.

Loading is strict: a missing or unexpected tensor, or a shape mismatch, raises ``CheckpointError`` naming the keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seer.data.images import IMAGENET_MEAN, IMAGENET_STD
from seer.models.regnet import PRESETS, RegNetCfg, RegNetTrunk, build_trunk, resolve_cfg

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "LAYOUTS",
    "DEFAULT_HUB_MODEL",
    "load_trunk",
    "save_trunk",
    "read_checkpoint",
    "infer_cfg",
    "convert_state_dict",
]

# The model `seer.extract_features(images)` uses when no model is given: SEER RegNetY-32GF (RG-32) features.
DEFAULT_HUB_MODEL = "facebook/regnet-y-320-seer"

# Preprocessing each format's checkpoints expect when the checkpoint itself does not say (``trunk.pretrained_cfg``).
# timm's regnety_*.seer tags: 224 px, crop_pct 0.965, bicubic. VISSL's SEER benchmarks and torchvision: resize 256,
# center crop 224, bilinear. HF directories carry their own processor (``preprocessor_config.json``).
DEFAULT_PREPROCESS: dict[str, dict] = {
    "seer": {"resolution": 224, "crop_pct": 0.875, "interpolation": "bicubic", "resize_mode": "shorter"},
    "timm": {"resolution": 224, "crop_pct": 0.965, "interpolation": "bicubic", "resize_mode": "shorter"},
    "torchvision": {"resolution": 224, "crop_pct": 0.875, "interpolation": "bilinear", "resize_mode": "shorter"},
    "vissl": {"resolution": 224, "crop_pct": 0.875, "interpolation": "bilinear", "resize_mode": "shorter"},
    "classy": {"resolution": 224, "crop_pct": 0.875, "interpolation": "bilinear", "resize_mode": "shorter"},
    "hf": {"resolution": 224, "crop_pct": 0.875, "interpolation": "bicubic", "resize_mode": "shorter"},
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the trunk (the message names the file and keys)."""


# ----------------------------------------------------------------------------------------------------------------
# Key layouts: one table per format
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """How one format names the trunk's modules.

    ``stem`` and ``inner`` map our module names to theirs (the parameter name after the last dot is shared);
    ``block`` formats their block prefix from ``s`` (stage, from 1), ``b`` (block, from 1) and ``s0``/``b0`` (from
    0); ``block_re`` parses it back (named groups ``s``/``s0`` and ``b``/``b0``); ``head`` lists prefixes of
    classifier / SSL-head tensors, which are set aside.
    """

    name: str
    stem: dict[str, str]
    block: str
    block_re: str
    inner: dict[str, str]
    head: tuple[str, ...] = ()
    extra_inner: dict[str, str] = field(default_factory=dict)  # theirs -> ours, only when reading

    def their_key(self, key: str) -> str:
        """Our key -> theirs."""
        module, param = key.rsplit(".", 1)
        if module in self.stem:
            return f"{self.stem[module]}.{param}"
        m = _OUR_BLOCK.match(module)
        if m is None:
            raise KeyError(f"{key!r} is not a trunk tensor")
        s, b, inner = int(m["s"]), int(m["b"]), m["inner"]
        prefix = self.block.format(s=s, b=b, s0=s - 1, b0=b - 1, res=s + 1)
        return f"{prefix}.{self.inner[inner]}.{param}"

    def our_key(self, key: str) -> str | None:
        """Their key -> ours (``None`` when the key is not a trunk tensor of this layout)."""
        if "." not in key:
            return None
        module, param = key.rsplit(".", 1)
        stem = {v: k for k, v in self.stem.items()}
        if module in stem:
            return f"{stem[module]}.{param}"
        m = re.match(self.block_re + r"\.(?P<inner>.+)$", module)
        if m is None:
            return None
        groups = m.groupdict()
        s = int(groups["s"]) if groups.get("s") is not None else int(groups["s0"]) + 1
        b = int(groups["b"]) if groups.get("b") is not None else int(groups["b0"]) + 1
        inner = {v: k for k, v in self.inner.items()}
        inner.update(self.extra_inner)
        if m["inner"] not in inner:
            return None
        return f"s{s}.b{b}.{inner[m['inner']]}.{param}"


_OUR_BLOCK = re.compile(r"^s(?P<s>\d+)\.b(?P<b>\d+)\.(?P<inner>.+)$")
_OUR_INNER = ("conv1.conv", "conv1.bn", "conv2.conv", "conv2.bn", "se.fc1", "se.fc2", "conv3.conv", "conv3.bn",
              "downsample.conv", "downsample.bn")  # fmt: skip

LAYOUTS: dict[str, Layout] = {
    # timm's regnety_* and ours: identical names.
    "timm": Layout(
        name="timm",
        stem={"stem.conv": "stem.conv", "stem.bn": "stem.bn"},
        block="s{s}.b{b}",
        block_re=r"^s(?P<s>\d+)\.b(?P<b>\d+)",
        inner={k: k for k in _OUR_INNER},
        head=("head.", "final_conv."),
    ),
    "torchvision": Layout(
        name="torchvision",
        stem={"stem.conv": "stem.0", "stem.bn": "stem.1"},
        block="trunk_output.block{s}.block{s}-{b0}",
        block_re=r"^trunk_output\.block(?P<s>\d+)\.block\d+-(?P<b0>\d+)",
        inner={
            "conv1.conv": "f.a.0",
            "conv1.bn": "f.a.1",
            "conv2.conv": "f.b.0",
            "conv2.bn": "f.b.1",
            "se.fc1": "f.se.fc1",
            "se.fc2": "f.se.fc2",
            "conv3.conv": "f.c.0",
            "conv3.bn": "f.c.1",
            "downsample.conv": "proj.0",
            "downsample.bn": "proj.1",
        },  # fmt: skip
        head=("fc.",),
    ),
    # HF transformers RegNetModel (``regnet.`` inside RegNetForImageClassification is stripped before matching).
    "hf": Layout(
        name="hf",
        stem={"stem.conv": "embedder.embedder.convolution", "stem.bn": "embedder.embedder.normalization"},
        block="encoder.stages.{s0}.layers.{b0}",
        block_re=r"^encoder\.stages\.(?P<s0>\d+)\.layers\.(?P<b0>\d+)",
        inner={
            "conv1.conv": "layer.0.convolution",
            "conv1.bn": "layer.0.normalization",
            "conv2.conv": "layer.1.convolution",
            "conv2.bn": "layer.1.normalization",
            "se.fc1": "layer.2.attention.0",
            "se.fc2": "layer.2.attention.2",
            "conv3.conv": "layer.3.convolution",
            "conv3.bn": "layer.3.normalization",
            "downsample.conv": "shortcut.convolution",
            "downsample.bn": "shortcut.normalization",
        },  # fmt: skip
        head=("classifier.",),
        # RegNetX layers (layer_type "x") have no SE: their last 1x1 conv is layer.2.
        extra_inner={"layer.2.convolution": "conv3.conv", "layer.2.normalization": "conv3.bn"},
    ),
    # VISSL / ClassyVision trunks; FSDP-trained ones (SEER 10B) add a ``block{s}-part{p}`` level.
    "vissl": Layout(
        name="vissl",
        stem={"stem.conv": "_feature_blocks.conv1.stem.0", "stem.bn": "_feature_blocks.conv1.stem.1"},
        block="_feature_blocks.res{res}.block{s}-{b0}",
        block_re=r"^_feature_blocks\.res\d+\.(?:block\d+-part\d+\.)?block(?P<s>\d+)-(?P<b0>\d+)",
        inner={
            "conv1.conv": "f.a.0",
            "conv1.bn": "f.a.1",
            "conv2.conv": "f.b.0",
            "conv2.bn": "f.b.1",
            "se.fc1": "f.se.excitation.0",
            "se.fc2": "f.se.excitation.2",
            "conv3.conv": "f.c",
            "conv3.bn": "f.final_bn",
            "downsample.conv": "proj",
            "downsample.bn": "bn",
        },  # fmt: skip
        head=("heads.",),
    ),
}
# ClassyVision's own RegNet / AnyNet (``classy_state_dict`` of ClassyVision tasks): VISSL's block internals under
# torchvision-like containers.
LAYOUTS["classy"] = Layout(
    name="classy",
    stem={"stem.conv": "stem.stem.0", "stem.bn": "stem.stem.1"},
    block="trunk_output.block{s}.block{s}-{b0}",
    block_re=r"^trunk_output\.block(?P<s>\d+)\.block\d+-(?P<b0>\d+)",
    inner=LAYOUTS["vissl"].inner,
    head=("heads.", "head.", "fc."),
)
LAYOUTS["seer"] = LAYOUTS["timm"]

# Wrapper prefixes that DDP / FSDP(1) / checkpoint wrappers / VISSL extraction scripts put in front of the names.
_WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_fpw_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_STRIP_PREFIXES = ("module.", "model.", "trunk.", "regnet.", "backbone.")


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A checkpoint read into our names: what ``load_trunk`` builds from.

    Attributes:
        state_dict: trunk tensors under our (timm) names; memory-mapped from the file where possible.
        cfg: the architecture if the checkpoint states it (our metadata, a run directory) else ``None``.
        format: "seer", "timm", "torchvision", "hf" or "vissl".
        heads: classifier / SSL-head tensors under their original names (ignored by ``load_trunk``).
        hf_config: HF ``config.json`` contents (HF directories).
        preprocess: the preprocessing the checkpoint expects (resolution, crop_pct, interpolation, mean, std).
        origin: where it came from, for messages.
        renamed: our key -> the checkpoint's key, for messages.
    """

    state_dict: dict[str, torch.Tensor]
    cfg: RegNetCfg | None
    format: str
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    hf_config: dict | None = None
    preprocess: dict | None = None
    origin: str = "<state dict>"
    renamed: dict[str, str] = field(default_factory=dict)


# numpy data types some checkpoints carry (VISSL stores numpy scalars next to the weights): data, never code.
_NUMPY_DATA_GLOBALS = {"_reconstruct", "scalar", "ndarray", "dtype"}
_NUMPY_DATA_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")


def _numpy_data_globals(path: Path) -> list:
    """The numpy data-type globals a checkpoint needs, if those are all it needs beyond torch's defaults."""
    import importlib

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: no allowlisting, plain weights_only rules
        return []
    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        if not ((module in _NUMPY_DATA_MODULES and attr in _NUMPY_DATA_GLOBALS) or module == "numpy.dtypes"):
            return []
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            return []
    if found:  # unpickling a numpy dtype builds its DType class (numpy.dtypes.Int64DType ...): data classes too
        import numpy as np

        found += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")]
    return found


def _torch_load(path: Path) -> Any:
    """``torch.load`` of an untrusted file: tensors and plain containers only, memory-mapped when the format allows."""

    def load(**kwargs: Any) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True, **kwargs)
        except RuntimeError as exc:  # legacy (pre-zip) serialization cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)

    try:
        numpy_globals = _numpy_data_globals(path)
        if numpy_globals:
            with torch.serialization.safe_globals(numpy_globals):
                return load()
        return load()
    except pickle.UnpicklingError as exc:
        with contextlib.suppress(Exception):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        detail = f"it references {unsafe}" if "unsafe" in locals() and unsafe else str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled objects other than tensors and plain containers "
            f"({detail}). It was read with torch.load(weights_only=True), so nothing in it was executed. If you "
            f"trust the file, convert it yourself to a plain state dict or safetensors."
        ) from None
    except (EOFError, OSError, RuntimeError, ValueError, IndexError, KeyError, TypeError, AttributeError) as exc:
        # the weights-only unpickler meets arbitrary bytes with any of these (e.g. IndexError: pop from empty list)
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata  # memory-mapped: pages are read on first use
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read as safetensors ({exc})") from exc


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, origin: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Find the trunk tensors (and head tensors) inside a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{origin}: expected a dict of tensors, got {type(obj).__name__}")
    heads: dict[str, torch.Tensor] = {}
    if "classy_state_dict" in obj:  # VISSL / ClassyVision
        try:
            model = obj["classy_state_dict"]["base_model"]["model"]
            trunk = model["trunk"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{origin}: VISSL checkpoint without ['classy_state_dict']['base_model']['model']['trunk'] ({exc!r})"
            ) from None
        heads = {f"heads.{k}": v for k, v in (model.get("heads") or {}).items() if isinstance(v, torch.Tensor)}
        return dict(trunk), heads
    for key in ("state_dict", "model", "model_state", "model_state_dict", "module", "trunk"):
        if key in obj and isinstance(obj[key], Mapping) and not isinstance(obj[key], torch.Tensor):
            inner = obj[key]
            if _is_tensor_dict(inner) or "trunk" in inner or "classy_state_dict" in inner:
                return _unwrap(inner, origin)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{origin}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    return tensors, heads


def _clean_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for token in _WRAPPER_TOKENS:
            k = k.replace(token, "")
        out[k] = v
    # Strip a prefix that every key shares (DDP's "module.", "trunk." of VISSL extracts, HF's "regnet.").
    changed = True
    while changed and out:
        changed = False
        for prefix in _STRIP_PREFIXES:
            trunkish = [k for k in out if k.startswith(prefix)]
            rest = [k for k in out if not k.startswith(prefix)]
            # HF's RegNetForImageClassification: "regnet." on the trunk, "classifier." outside it.
            if trunkish and all(k.startswith(("classifier.", "head.", "fc.", "heads.")) for k in rest):
                out = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in out.items()}
                changed = True
                break
    return out


def detect_layout(keys: list[str], origin: str = "<state dict>") -> str:
    """Which format a list of (cleaned) keys follows."""
    keyset = set(keys)
    if any(k.startswith("_feature_blocks.") for k in keys):
        return "vissl"
    if "embedder.embedder.convolution.weight" in keyset:
        return "hf"
    if "stem.stem.0.weight" in keyset:
        return "classy"
    if "stem.0.weight" in keyset and any(k.startswith("trunk_output.") for k in keys):
        return "torchvision"
    if "stem.conv.weight" in keyset:
        return "timm"
    raise CheckpointError(
        f"{origin}: unknown checkpoint layout (not ours/timm, torchvision, HF transformers or VISSL RegNet); "
        f"first keys: {keys[:6]}"
    )


def convert_state_dict(sd: Mapping[str, torch.Tensor], format: str | None = None, origin: str = "<state dict>"
                       ) -> Checkpoint:  # fmt: skip
    """A state dict in any supported layout -> ``Checkpoint`` with our key names (tensors are not copied).

    Keys that are neither trunk tensors nor known head tensors are kept under their names, so that the strict
    check in ``load_trunk`` reports them as unexpected.
    """
    sd = _clean_keys(dict(sd))
    fmt = format or detect_layout(list(sd), origin)
    if fmt not in LAYOUTS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; known: {sorted(LAYOUTS)}")
    layout = LAYOUTS[fmt]
    ours: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for key, value in sd.items():
        new = layout.our_key(key)
        if new is None:
            if key.startswith(layout.head):
                heads[key] = value
                continue
            new = key  # reported as unexpected by the strict check
        if new in ours:
            raise CheckpointError(f"{origin}: keys {renamed[new]!r} and {key!r} both map to {new!r}")
        ours[new] = value
        renamed[new] = key
    return Checkpoint(ours, None, fmt, heads=heads, origin=origin, renamed=renamed)


# -- architecture -----------------------------------------------------------------------------------------------
def infer_cfg(sd: Mapping[str, torch.Tensor], origin: str = "<state dict>") -> RegNetCfg:
    """The ``RegNetCfg`` of a state dict with our key names, from tensor shapes alone (meta tensors work).

    Stage widths come from the last 1x1 conv, group widths from the 3x3 conv's input channels per group, the SE
    ratio from the SE width over the block input width. A preset with exactly this architecture is returned when
    there is one, else an explicit ``RegNetCfg.from_stages`` config.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(f"{origin}: cannot infer the architecture: missing tensor {key!r}")
        return tuple(sd[key].shape)

    stem_width = shape("stem.conv.weight")[0]
    blocks: dict[int, int] = {}
    for key in sd:
        m = _OUR_BLOCK.match(key)
        if m:
            s, b = int(m["s"]), int(m["b"])
            blocks[s] = max(blocks.get(s, 0), b)
    if not blocks:
        raise CheckpointError(f"{origin}: no RegNet blocks found (first keys: {list(sd)[:6]})")
    n_stages = max(blocks)
    missing_stages = [s for s in range(1, n_stages + 1) if s not in blocks]
    if missing_stages:
        raise CheckpointError(f"{origin}: stages {missing_stages} have no tensors")
    widths, depths, group_ws, mids = [], [], [], []
    for s in range(1, n_stages + 1):
        widths.append(shape(f"s{s}.b1.conv3.conv.weight")[0])
        mids.append(shape(f"s{s}.b1.conv1.conv.weight")[0])
        group_ws.append(shape(f"s{s}.b1.conv2.conv.weight")[1])
        depths.append(blocks[s])
    ratios = {m / w for m, w in zip(mids, widths)}
    if len(ratios) != 1:
        raise CheckpointError(f"{origin}: bottleneck ratios differ between stages: {sorted(ratios)}")
    bottleneck = ratios.pop()
    # SE width = round(se_ratio * block input width): find the ratio that reproduces every block's SE width.
    se_ratio = 0.0
    if "s1.b1.se.fc1.weight" in sd:
        pairs, in_chs = [], stem_width
        for s, (w, d) in enumerate(zip(widths, depths), 1):
            for b in range(1, d + 1):
                pairs.append((in_chs if b == 1 else w, shape(f"s{s}.b{b}.se.fc1.weight")[0]))
            in_chs = w
        candidates = [0.25] + [se / cin for cin, se in pairs[:1]]
        se_ratio = next((r for r in candidates if all(int(round(cin * r)) == se for cin, se in pairs)), -1.0)
        if se_ratio < 0:
            raise CheckpointError(f"{origin}: SE widths {[se for _, se in pairs]} follow no single SE ratio")
    for preset in PRESETS.values():
        if (
            preset.stages() == (widths, depths, group_ws)
            and preset.se_ratio == se_ratio
            and preset.stem_width == stem_width
            and preset.bottleneck == bottleneck
        ):
            return preset
    if bottleneck == 1.0:
        return RegNetCfg.from_stages(widths, depths, group_ws, se_ratio=se_ratio, stem_width=stem_width)
    base = RegNetCfg.from_stages([int(m) for m in mids], depths, group_ws, se_ratio=se_ratio, stem_width=stem_width)
    return RegNetCfg(**{**base.to_dict(), "bottleneck": bottleneck, "stage_widths": tuple(widths),
                        "stage_depths": tuple(depths), "stage_group_widths": tuple(group_ws)})  # fmt: skip


def _cfg_from_dict(d: Mapping) -> RegNetCfg:
    d = dict(d)
    for key in ("stage_widths", "stage_depths", "stage_group_widths"):
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return resolve_cfg(d)


def _check_hf_config(hf: dict, cfg: RegNetCfg, origin: str) -> None:
    """HF's config.json must describe the tensors we found (else the file set is inconsistent)."""
    widths, depths, group_ws = cfg.stages()
    if hf.get("model_type", "regnet") != "regnet":
        raise CheckpointError(f"{origin}/config.json: model_type is {hf.get('model_type')!r}, expected 'regnet'")
    if not hf.get("downsample_in_first_stage", True):
        raise CheckpointError(f"{origin}/config.json: downsample_in_first_stage=false is not a SEER/pycls RegNet")
    checks = {
        "hidden_sizes": (list(hf.get("hidden_sizes", widths)), widths),
        "depths": (list(hf.get("depths", depths)), depths),
        "embedding_size": (hf.get("embedding_size", cfg.stem_width), cfg.stem_width),
    }
    if "groups_width" in hf:
        gw = int(hf["groups_width"])
        checks["groups_width"] = ([w // max(1, w // gw) for w in widths], group_ws)
    if "layer_type" in hf:
        checks["layer_type"] = (hf["layer_type"], "y" if cfg.se_ratio else "x")
    for name, (theirs, ours) in checks.items():
        if theirs != ours:
            raise CheckpointError(f"{origin}/config.json: {name}={theirs} but the weights have {ours}")


# -- sources ----------------------------------------------------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local HF cache) an HF hub model: config, processor and weights only."""
    try:
        import huggingface_hub
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise CheckpointError(f"{repo_id}: huggingface_hub is needed to load hub models ({exc})") from exc

    def has_weights(path: Path) -> bool:
        return any((path / n).is_file() for n in _WEIGHT_FILES + _WEIGHT_INDEXES)

    # The local cache first: works offline and makes no request.
    with contextlib.suppress(Exception):
        local = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        if has_weights(local) and (local / "config.json").is_file():
            return local
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        kind = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", kind]))
    except Exception as exc:  # noqa: BLE001 - network, auth, offline mode and missing repos all end here
        raise CheckpointError(
            f"no local file or directory {repo_id!r}, and could not get it from the Hugging Face hub "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}). "
            f"Without network access, pass a local directory holding config.json and model.safetensors (or "
            f"pytorch_model.bin), e.g. one made with `hf download {repo_id} --local-dir DIR` elsewhere."
        ) from None
    if not has_weights(path):
        raise CheckpointError(f"{repo_id}: the hub repository has no model.safetensors or pytorch_model.bin")
    return path


def _read_hf_dir(path: Path) -> Checkpoint:
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/config.json: cannot read ({exc})") from exc
    if isinstance(hf, Mapping) and "model_type" not in hf and "pretrained_cfg" in hf:
        return _read_timm_dir(path, hf)
    tensors: dict[str, torch.Tensor] = {}
    index = next((path / n for n in _WEIGHT_INDEXES if (path / n).is_file()), None)
    if index is not None:  # sharded weights (large models)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: cannot read the shard index ({exc})") from exc
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_file_tensors(path / shard)[0])
    else:
        weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: HF directory without model.safetensors or pytorch_model.bin")
        tensors = _read_file_tensors(weights)[0]
    ckpt = convert_state_dict(tensors, "hf", origin=str(path))
    ckpt.hf_config = hf
    ckpt.preprocess = _hf_preprocess(path)
    return ckpt


def _read_timm_dir(path: Path, config: Mapping) -> Checkpoint:
    """A timm hub directory (``timm/regnety_320.seer_ft_in1k``): timm keys, preprocessing from ``pretrained_cfg``."""
    weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: timm directory without model.safetensors or pytorch_model.bin")
    tensors, _, heads = _read_file_tensors(weights)
    ckpt = convert_state_dict(tensors, "timm", origin=str(path))
    ckpt.heads.update(heads)
    ckpt.preprocess = timm_preprocess(config.get("pretrained_cfg") or {})
    return ckpt


def timm_preprocess(pretrained_cfg: Mapping) -> dict:
    """Our preprocessing from a timm ``pretrained_cfg``: the ``.seer`` feature weights use 224 px / crop 0.965,
    the ``.seer_ft_in1k`` classifiers 384 px / crop 1.0 (timm resizes the short side, then center-crops)."""
    pre = dict(DEFAULT_PREPROCESS["timm"])
    size = pretrained_cfg.get("test_input_size") or pretrained_cfg.get("input_size")
    if isinstance(size, (list, tuple)) and size:
        pre["resolution"] = int(size[-1])
    if pretrained_cfg.get("test_crop_pct") or pretrained_cfg.get("crop_pct"):
        pre["crop_pct"] = float(pretrained_cfg.get("test_crop_pct") or pretrained_cfg["crop_pct"])
    if pretrained_cfg.get("interpolation") in ("bilinear", "bicubic", "nearest", "lanczos"):
        pre["interpolation"] = pretrained_cfg["interpolation"]
    for key in ("mean", "std"):
        if isinstance(pretrained_cfg.get(key), (list, tuple)) and len(pretrained_cfg[key]) == 3:
            pre[key] = tuple(float(v) for v in pretrained_cfg[key])
    return pre


# A timm / VISSL file carries no preprocessing; SEER's fine-tuned classifiers (timm ``*.seer_ft_in1k``, VISSL
# ``seer_finetuned/*finetuned_in1k*``) were trained and are evaluated at 384 px with crop 1.0, unlike the 224 px
# feature weights: their file names say which they are.
_FINETUNED_NAME = re.compile(r"seer_ft|finetuned", re.IGNORECASE)
FINETUNED_PREPROCESS = {"resolution": 384, "crop_pct": 1.0, "interpolation": "bicubic", "resize_mode": "shorter"}


def _hf_preprocess(path: Path) -> dict | None:
    """HF processor settings (ConvNextImageProcessor semantics: < 384 resize + center crop, >= 384 warp)."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return None
    try:
        p = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    size = p.get("size", 224)
    if isinstance(size, Mapping):
        size = size.get("shortest_edge") or size.get("height") or 224
    crop_pct = p.get("crop_pct") or 0.875
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(p.get("resample", 3), "bicubic")
    return {
        "resolution": int(size),
        "crop_pct": float(crop_pct),
        "interpolation": resample,
        "resize_mode": "warp" if int(size) >= 384 else "shorter",
        "mean": tuple(p.get("image_mean", IMAGENET_MEAN)),
        "std": tuple(p.get("image_std", IMAGENET_STD)),
    }


def _read_file_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """(tensors, safetensors metadata, head tensors set aside by the unwrapping) of one file."""
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        return tensors, metadata, {}
    obj = _torch_load(path)
    tensors, heads = _unwrap(obj, str(path))
    return tensors, {}, heads


def read_checkpoint(source: Any, *, format: str | None = None) -> Checkpoint:
    """Read any supported checkpoint into our key names, without building a model.

    Args:
        source: a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.torch`` file, an HF directory, a
            pretraining run directory, an HF hub id, a state dict, or an ``nn.Module`` (timm, torchvision, HF).
        format: force a layout ("seer", "timm", "torchvision", "hf", "vissl", "classy") instead of detecting it.
    """
    if isinstance(source, nn.Module):
        hf_config = getattr(getattr(source, "config", None), "to_dict", lambda: None)()
        ckpt = convert_state_dict(source.state_dict(), format, origin=type(source).__name__)
        ckpt.hf_config = hf_config if ckpt.format == "hf" else None
        return ckpt
    if isinstance(source, Mapping):
        tensors, heads = _unwrap(source, "<state dict>")
        ckpt = convert_state_dict(tensors, format)
        ckpt.heads.update(heads)
        return ckpt
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_trunk: expected a path, hub id, state dict or module, got {type(source).__name__}")
    path = Path(source).expanduser()
    if not path.exists():
        if isinstance(source, str) and _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
            return _read_hf_dir(_hub_snapshot(source))
        raise FileNotFoundError(f"no such checkpoint file or directory: {path}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_hf_dir(path)
        if (path / "checkpoints").is_dir() or (path / ".metadata").is_file():
            return _read_run_dir(path)
        raise CheckpointError(
            f"{path}: a directory that is neither an HF model (config.json + weights) nor a pretraining run "
            f"(checkpoints/step_*)"
        )
    tensors, metadata, heads = _read_file_tensors(path)
    if metadata.get("format") == "seer":
        try:
            cfg = _cfg_from_dict(json.loads(metadata["regnet_cfg"]))
        except (KeyError, json.JSONDecodeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad 'regnet_cfg' metadata ({exc})") from exc
        ckpt = convert_state_dict(tensors, "seer", origin=str(path))
        ckpt.cfg = cfg
        if "preprocess" in metadata:
            with contextlib.suppress(json.JSONDecodeError):
                ckpt.preprocess = json.loads(metadata["preprocess"])
        return ckpt
    ckpt = convert_state_dict(tensors, format, origin=str(path))
    ckpt.heads.update(heads)
    if ckpt.format in ("timm", "vissl", "classy") and _FINETUNED_NAME.search(path.name):
        ckpt.preprocess = dict(FINETUNED_PREPROCESS)
    return ckpt


def _read_run_dir(path: Path) -> Checkpoint:
    try:
        from seer.train.checkpoint import read_trunk_state
    except ImportError as exc:
        raise CheckpointError(
            f"{path}: looks like a pretraining run directory, but seer.train.checkpoint.read_trunk_state is not "
            f"available in this build ({exc}); export the trunk with `seer export` and load that file"
        ) from exc
    state, cfg_dict = read_trunk_state(path)
    ckpt = convert_state_dict(state, "seer", origin=str(path))
    ckpt.cfg = _cfg_from_dict(cfg_dict)
    return ckpt


# -- loading ----------------------------------------------------------------------------------------------------
def _strict_check(trunk: nn.Module, ckpt: Checkpoint) -> None:
    expected = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
    got = ckpt.state_dict

    def name(k: str) -> str:
        theirs = ckpt.renamed.get(k, k)
        return k if theirs == k else f"{k} (checkpoint: {theirs})"

    missing = [k for k in expected if k not in got and not k.endswith("num_batches_tracked")]
    unexpected = [name(k) for k in got if k not in expected]
    mismatched = [
        f"{name(k)}: checkpoint {tuple(got[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in got and tuple(got[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {show(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {show(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {show(mismatched)}")
        raise CheckpointError(f"{ckpt.origin} ({ckpt.format} layout) does not match the trunk: " + "; ".join(parts))


def load_trunk(source: Any, *, preset: str | RegNetCfg | dict | None = None, device: torch.device | str | None = None,
               format: str | None = None, dtype: torch.dtype | None = None) -> RegNetTrunk:  # fmt: skip
    """Load a RegNetY trunk from any supported checkpoint, the architecture inferred from it.

    Args:
        source: our ``.safetensors`` export or a pretraining run directory; an HF RegNet directory
            (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, ``RegNetForImageClassification``
            included) or hub id (``facebook/regnet-y-10b-seer``); a timm or torchvision state dict file; a VISSL /
            ClassyVision ``.torch`` checkpoint (FSDP ``block{s}-part{p}`` level included); a state dict; a module.
        preset: build this architecture instead of inferring it (the checkpoint must match it exactly).
        device: move the loaded trunk there (default: CPU).
        format: force a layout instead of detecting it ("seer", "timm", "torchvision", "hf", "vissl").
        dtype: floating-point dtype of the parameters (default float32).

    Returns:
        The trunk in eval mode, with ``trunk.pretrained_cfg`` holding the preprocessing its checkpoint expects and
        ``trunk.checkpoint_format`` the layout it came from. Heads (classifier, SwAV projection / prototypes) are
        not loaded: ``read_checkpoint(source).heads`` has them.

    Raises:
        CheckpointError: unreadable file, unknown layout, pickled code, or any missing / unexpected tensor or
            shape mismatch (the message names the keys).
    """
    ckpt = read_checkpoint(source, format=format)
    if preset is not None:
        cfg = resolve_cfg(preset)
    elif ckpt.cfg is not None:
        cfg = ckpt.cfg
    else:
        cfg = infer_cfg(ckpt.state_dict, ckpt.origin)
    if ckpt.hf_config is not None:
        _check_hf_config(ckpt.hf_config, cfg, ckpt.origin)
    # Meta device: no memory is allocated; `assign=True` then makes the checkpoint's (memory-mapped) tensors the
    # parameters, so a large trunk never exists twice. Weights stay in their stored (contiguous) layout: the
    # forward converts them to channels_last on the fly, which costs a weight-sized copy, not a second model.
    trunk = build_trunk(cfg, device="meta", channels_last=False)
    trunk.channels_last = True  # inputs still go channels_last
    _check_and_assign(trunk, ckpt, dtype or torch.float32)
    trunk.eval()
    trunk.checkpoint_format = ckpt.format
    pre = dict(DEFAULT_PREPROCESS.get(ckpt.format, DEFAULT_PREPROCESS["seer"]))
    pre.update({"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    pre.update(ckpt.preprocess or {})
    trunk.pretrained_cfg = pre
    if device is not None:
        trunk.to(device)
    return trunk


def _check_and_assign(trunk: RegNetTrunk, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    _strict_check(trunk, ckpt)
    state = {}
    for key, ref in trunk.state_dict().items():
        value = ckpt.state_dict.get(key)
        if value is None:  # num_batches_tracked: absent from some formats, unused in eval and by momentum BN
            value = torch.zeros((), dtype=torch.long)
        elif value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        elif not value.is_floating_point():
            value = value.to(ref.dtype)
        state[key] = value
    trunk.load_state_dict(state, strict=True, assign=True)


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------
def _atomic_file(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_dir(path: Path, fill) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _trunk_tensors(trunk: nn.Module) -> dict[str, torch.Tensor]:
    # Contiguous CPU copies: channels_last weights and FSDP-gathered tensors serialize as plain row-major arrays.
    return {k: v.detach().to("cpu").contiguous() for k, v in trunk.state_dict().items()}


def _hf_groups_width(cfg: RegNetCfg) -> int:
    widths, _, group_ws = cfg.stages()
    for g in sorted(set(group_ws), reverse=True):
        if all(max(1, w // g) == w // gw for w, gw in zip(widths, group_ws)):
            return g
    raise ValueError(
        f"HF's RegNetConfig has one groups_width for all stages; this trunk's group widths {group_ws} (widths "
        f"{widths}) cannot be written as one"
    )


def save_trunk(trunk: RegNetTrunk, path: str | os.PathLike, *, format: str = "seer",
               preprocess: dict | None = None) -> Path:  # fmt: skip
    """Save a trunk atomically (a temporary name, renamed when complete).

    Args:
        trunk: a ``RegNetTrunk``.
        path: output file ("seer", "timm", "torchvision": ``.safetensors``, or ``.pth`` for a ``torch.save`` state
            dict) or directory ("hf").
        format: "seer" (safetensors + RegNetCfg metadata, what ``load_trunk`` reads back exactly), "hf" (a
            directory ``transformers.RegNetModel.from_pretrained`` loads, with a ``preprocessor_config.json``),
            "timm" (a state dict timm's ``regnety_*`` with ``num_classes=0`` loads) or "torchvision".
        preprocess: preprocessing to record (default: the trunk's ``pretrained_cfg``).

    Returns:
        The written path.
    """
    if not isinstance(trunk, RegNetTrunk):
        raise TypeError(f"save_trunk expects a RegNetTrunk, got {type(trunk).__name__}")
    path = Path(path).expanduser()
    cfg: RegNetCfg = trunk.cfg
    pre = dict(preprocess or getattr(trunk, "pretrained_cfg", None) or {})
    tensors = _trunk_tensors(trunk)
    if any(t.is_meta for t in tensors.values()):
        raise ValueError("save_trunk: the trunk has meta (unmaterialized) tensors")
    if format in ("seer", "timm", "torchvision"):
        layout = LAYOUTS["timm" if format == "seer" else format]
        out = {layout.their_key(k): v for k, v in tensors.items()}
        metadata = {"format": "pt"}
        if format == "seer":
            metadata = {"format": "seer", "regnet_cfg": json.dumps(cfg.to_dict())}
            if pre:
                metadata["preprocess"] = json.dumps(pre)
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            _atomic_file(path, lambda tmp: save_file(out, tmp, metadata=metadata))
        elif format == "seer":
            raise ValueError(f"format='seer' writes a .safetensors file, got {path.name!r}")
        else:
            _atomic_file(path, lambda tmp: torch.save(out, tmp))
        return path
    if format == "hf":
        return _save_hf(tensors, cfg, path, pre)
    raise ValueError(f"unknown format {format!r}; choose 'seer', 'hf', 'timm' or 'torchvision'")


def _save_hf(tensors: dict[str, torch.Tensor], cfg: RegNetCfg, path: Path, pre: dict) -> Path:
    from safetensors.torch import save_file

    if cfg.bottleneck != 1.0 or cfg.se_ratio not in (0.0, 0.25):
        raise ValueError(f"HF's RegNet has bottleneck 1 and SE ratio 0.25 (or none); this trunk has {cfg}")
    widths, depths, _ = cfg.stages()
    layer_type = "y" if cfg.se_ratio else "x"
    layout = LAYOUTS["hf"]
    out = {}
    for k, v in tensors.items():
        key = layout.their_key(k)
        if layer_type == "x":
            key = key.replace(".layer.3.", ".layer.2.")
        out[key] = v
    config = {
        "architectures": ["RegNetModel"],
        "model_type": "regnet",
        "num_channels": 3,
        "embedding_size": cfg.stem_width,
        "hidden_sizes": widths,
        "depths": depths,
        "groups_width": _hf_groups_width(cfg),
        "layer_type": layer_type,
        "hidden_act": "relu",
        "downsample_in_first_stage": True,
    }
    resolution = int(pre.get("resolution", 224))
    processor = {
        "image_processor_type": "ConvNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": resolution},
        "crop_pct": float(pre.get("crop_pct", 0.875)),
        "resample": {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}.get(pre.get("interpolation"), 3),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.get("mean", IMAGENET_MEAN)),
        "image_std": list(pre.get("std", IMAGENET_STD)),
    }

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    _atomic_dir(path, fill)
    return path
