"""Checkpoint formats: one key-renaming table per layout, the conversion to our names, the architecture inferred
from tensor shapes, and each format's preprocessing convention.

Every format (ours = timm's regnety names, torchvision, HF transformers, VISSL, ClassyVision) describes the same
modules under other names, so one small table per format (``LAYOUTS``) converts keys both ways. Nothing here reads
or writes files: ``seer.weights.read`` does, ``seer.weights.save`` writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from seer.data.images import CONVENTIONS, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS
from seer.models.regnet import PRESETS, RegNetCfg, describe_value, resolve_cfg

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "Layout",
    "LAYOUTS",
    "DEFAULT_PREPROCESS",
    "FINETUNED_PREPROCESS",
    "detect_layout",
    "convert_state_dict",
    "infer_cfg",
    "cfg_from_dict",
    "check_cfg_fits",
    "check_hf_config",
    "check_preprocess",
    "classifier_head",
    "head_labels",
    "HEAD_KEYS",
    "timm_preprocess",
    "hf_preprocess",
    "hf_processor",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the trunk (the message names the file and keys)."""


# ----------------------------------------------------------------------------------------------------------------
# Typed fields of JSON files (config.json, preprocessor_config.json, our metadata)
# ----------------------------------------------------------------------------------------------------------------
# A file from a stranger may hold any JSON value under any key. Each field is checked for its type before it is
# used, and the error names the file, the key and what was found: the string "32" is a type error, not a mismatch.

# A resolution a file may ask for (SEER's checkpoints use 224 to 512): a stranger's config cannot make every image be
# resized to gigapixels. Larger inputs are still possible, asked for by the caller (``resolution=`` / --resolution).
MAX_FILE_RESOLUTION = 4096


def _expected(where: str, what: str, value: Any) -> CheckpointError:
    return CheckpointError(f"{where}: expected {what}, got {describe_value(value)}")


def _json_object(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise _expected(where, "a JSON object", value)
    return value


def _json_int(value: Any, where: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _expected(where, "an integer", value)
    if value < minimum:
        raise _expected(where, f"an integer >= {minimum}", value)
    return value


def _json_ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _expected(where, "a non-empty list of integers", value)
    return [_json_int(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _json_number(value: Any, where: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _expected(where, "a number", value)
    if not (low < value if low_open else low <= value) or not value <= high:  # NaN fails both comparisons
        raise _expected(where, f"a number in {'(' if low_open else '['}{low}, {high}]", value)
    return float(value)


def _json_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _expected(where, "a string", value)
    return value


def _json_resolution(value: Any, where: str) -> int:
    """An input resolution a file asks for: an integer in [8, MAX_FILE_RESOLUTION]."""
    value = _json_int(value, where, minimum=8)
    if value > MAX_FILE_RESOLUTION:
        raise _expected(where, f"at most {MAX_FILE_RESOLUTION} pixels", value)
    return value


def _json_rgb(value: Any, where: str, positive: bool) -> tuple[float, float, float]:
    """Three per-channel numbers (mean, or std with ``positive``)."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _expected(where, "a list of 3 numbers (R, G, B)", value)
    return tuple(_json_number(v, f"{where}[{i}]", 0.0, 1e6, low_open=positive) for i, v in enumerate(value))


def check_preprocess(pre: Any, where: str) -> dict:
    """A preprocessing dict read from a file (our metadata, a run's ``meta.json``), its fields type-checked.

    Returns the dict with ``mean`` / ``std`` as tuples; unknown keys are kept. A record without ``convention``
    (written before seer recorded it) gets its format's default at load time. Raises ``CheckpointError`` naming
    ``where`` and the key.
    """
    out = dict(_json_object(pre, where))
    if "resolution" in out:
        out["resolution"] = _json_resolution(out["resolution"], f"{where}: resolution")
    if "crop_pct" in out:
        out["crop_pct"] = _json_number(out["crop_pct"], f"{where}: crop_pct", 0.0, 1.0, low_open=True)
    choices = (("interpolation", sorted(INTERPOLATIONS)), ("resize_mode", ["shorter", "warp"]),
               ("convention", list(CONVENTIONS)))  # fmt: skip
    for key, names in choices:
        if key in out and (not isinstance(out[key], str) or out[key] not in names):  # a list is not even hashable
            raise _expected(f"{where}: {key}", f"one of {names}", out[key])
    for key in ("mean", "std"):
        if key in out:
            out[key] = _json_rgb(out[key], f"{where}: {key}", positive=key == "std")
    return out


# Preprocessing each format's checkpoints expect when the checkpoint itself does not say (``trunk.pretrained_cfg``).
# timm's regnety_*.seer tags: 224 px, crop_pct 0.965, bicubic. VISSL's SEER benchmarks and torchvision: resize 256,
# center crop 224, bilinear. HF directories carry their own processor (``preprocessor_config.json``).
# ``convention``: whose crop arithmetic (``seer.data.images.CONVENTIONS``): each library's own; VISSL and ClassyVision
# evaluate with torchvision's transforms; seer's own checkpoints with torchvision's, as seer always has (a record
# without the key, written before it existed, is read as its format's default here).
DEFAULT_PREPROCESS: dict[str, dict] = {
    fmt: {"resolution": 224, "crop_pct": crop_pct, "interpolation": interpolation, "resize_mode": "shorter",
          "convention": convention}
    for fmt, (crop_pct, interpolation, convention) in {
        "seer": (0.875, "bicubic", "torchvision"),
        "timm": (0.965, "bicubic", "timm"),
        "torchvision": (0.875, "bilinear", "torchvision"),
        "vissl": (0.875, "bilinear", "torchvision"),
        "classy": (0.875, "bilinear", "torchvision"),
        "hf": (0.875, "bicubic", "hf"),
    }.items()
}  # fmt: skip


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
# A checkpoint under our names
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
        labels: the classifier's class names where the file records them outside ``hf_config``.
    """

    state_dict: dict[str, torch.Tensor]
    cfg: RegNetCfg | None
    format: str
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    hf_config: dict | None = None
    preprocess: dict | None = None
    origin: str = "<state dict>"
    renamed: dict[str, str] = field(default_factory=dict)
    labels: dict[int, str] | list[str] | None = None  # class names the file records (our metadata, timm's config)


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


# ----------------------------------------------------------------------------------------------------------------
# Architecture from tensor shapes
# ----------------------------------------------------------------------------------------------------------------
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


def check_cfg_fits(cfg: RegNetCfg, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """The architecture a file states (our metadata, a run's checkpoint) must be its tensors' before a trunk is built
    from it: a stated depth of 10**7 would otherwise build blocks for hours, a huge width overflow inside torch, and
    a stated SE ratio or bottleneck that the tensors contradict is named as the file's field, not as tensors.

    The first block of each stage is compared as ``Bottleneck`` builds it, each tensor only where the file has it;
    missing and unexpected tensors are left to ``load_trunk``'s strict check, which names them.
    """

    def dims(key: str) -> tuple[int, ...]:
        return tuple(sd[key].shape) if key in sd else ()

    blocks: dict[int, int] = {}
    for key in sd:
        m = _OUR_BLOCK.match(key)
        if m:
            blocks[int(m["s"])] = max(blocks.get(int(m["s"]), 0), int(m["b"]))
    n_blocks = sum(blocks.values())
    if cfg.depth != n_blocks:  # before ``cfg.stages()``, whose cost grows with the depth
        raise CheckpointError(f"{where}: depth={cfg.depth} but the weights have {n_blocks} blocks")
    widths, depths, group_ws = cfg.stages()
    rule = "stage_widths, stage_depths" if cfg.stage_widths is not None else "w0, wa, wm, depth"  # what set them
    their_depths = [blocks.get(s, 0) for s in range(1, max(blocks, default=0) + 1)]
    if depths != their_depths:
        raise CheckpointError(f"{where}: stage depths {depths} (from {rule}) but the weights have {their_depths}")
    stem = dims("stem.conv.weight")
    if stem and stem[0] != cfg.stem_width:
        raise CheckpointError(f"{where}: stem_width={cfg.stem_width} but the weights have {stem[0]}")
    in_chs = cfg.stem_width
    for s, (w, g) in enumerate(zip(widths, group_ws), 1):
        mid = int(round(w * cfg.bottleneck))
        se = int(round(in_chs * cfg.se_ratio))
        ours = {"conv3": w, "conv1": mid, "conv2": mid // max(1, mid // g), "se": se}
        theirs = {
            "conv3": dims(f"s{s}.b1.conv3.conv.weight")[:1],
            "conv1": dims(f"s{s}.b1.conv1.conv.weight")[:1],
            "conv2": dims(f"s{s}.b1.conv2.conv.weight")[1:2],
            "se": dims(f"s{s}.b1.se.fc1.weight")[:1] or ((0,) if f"s{s}.b1.conv1.conv.weight" in sd else ()),
        }
        what = {
            "conv3": f"stage width {w} (from {rule})",
            "conv1": f"bottleneck width {mid} (bottleneck={cfg.bottleneck})",
            "conv2": f"group width {ours['conv2']} (group_w / stage_group_widths)",
            "se": f"SE width {se} (se_ratio={cfg.se_ratio})",
        }
        for part, value in ours.items():
            if theirs[part] and theirs[part][0] != value:
                raise CheckpointError(f"{where}: stage {s} has {what[part]} but the weights have {theirs[part][0]}")
        in_chs = w


def cfg_from_dict(d: Mapping) -> RegNetCfg:
    """A ``RegNetCfg`` from its ``to_dict()`` form (json lists back to tuples); ``ValueError`` names a bad field."""
    if not isinstance(d, Mapping):
        raise ValueError(f"expected a JSON object of RegNetCfg fields, got {describe_value(d)}")
    d = dict(d)
    for key in ("stage_widths", "stage_depths", "stage_group_widths"):
        if isinstance(d.get(key), list):  # anything else is left for RegNetCfg to name
            d[key] = tuple(d[key])
    return resolve_cfg(d)


def check_hf_config(hf: Any, cfg: RegNetCfg, origin: str) -> None:
    """HF's config.json must describe the tensors we found (else the file set is inconsistent).

    Every key is type-checked first: a field of the wrong type (``"32"``, ``null``, ``[1]``) or out of range
    (``groups_width: 0``) is reported as such, naming the file and the key; a well-typed value that disagrees with
    the weights is reported as a mismatch.
    """
    file = f"{origin}/config.json"
    hf = _json_object(hf, file)
    widths, depths, group_ws = cfg.stages()
    model_type = _json_str(hf.get("model_type", "regnet"), f"{file}: model_type")
    if model_type != "regnet":
        raise CheckpointError(f"{file}: model_type is {model_type!r}, expected 'regnet'")
    if "downsample_in_first_stage" in hf:
        first = hf["downsample_in_first_stage"]
        if not isinstance(first, bool):
            raise _expected(f"{file}: downsample_in_first_stage", "true or false", first)
        if not first:
            raise CheckpointError(f"{file}: downsample_in_first_stage=false is not a SEER/pycls RegNet")
    if "num_channels" in hf and _json_int(hf["num_channels"], f"{file}: num_channels") != 3:
        raise CheckpointError(f"{file}: num_channels={hf['num_channels']} but the weights take 3 (RGB) input channels")
    if "hidden_act" in hf and _json_str(hf["hidden_act"], f"{file}: hidden_act") != "relu":
        raise CheckpointError(f"{file}: hidden_act={hf['hidden_act']!r}, but a SEER/pycls RegNet uses 'relu'")
    checks: dict[str, tuple[Any, Any]] = {}
    if "hidden_sizes" in hf:
        checks["hidden_sizes"] = (_json_ints(hf["hidden_sizes"], f"{file}: hidden_sizes"), widths)
    if "depths" in hf:
        checks["depths"] = (_json_ints(hf["depths"], f"{file}: depths"), depths)
    if "embedding_size" in hf:
        checks["embedding_size"] = (_json_int(hf["embedding_size"], f"{file}: embedding_size"), cfg.stem_width)
    if "layer_type" in hf:
        layer_type = _json_str(hf["layer_type"], f"{file}: layer_type")
        if layer_type not in ("x", "y"):
            raise _expected(f"{file}: layer_type", "'x' or 'y'", layer_type)
        checks["layer_type"] = (layer_type, "y" if cfg.se_ratio else "x")
    for name, (theirs, ours) in checks.items():
        if theirs != ours:
            raise CheckpointError(f"{file}: {name}={theirs!r} but the weights have {ours!r}")
    if "groups_width" in hf:
        # HF gives every stage groups = width // groups_width (at least 1): the group widths that makes must be ours
        gw = _json_int(hf["groups_width"], f"{file}: groups_width")
        theirs = [w // max(1, w // gw) for w in widths]
        if theirs != group_ws:
            raise CheckpointError(
                f"{file}: groups_width={gw} gives group widths {theirs} but the weights have {group_ws}"
            )


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing conventions
# ----------------------------------------------------------------------------------------------------------------
# A timm / VISSL file carries no preprocessing; SEER's fine-tuned classifiers (timm ``*.seer_ft_in1k``, VISSL
# ``seer_finetuned/*finetuned_in1k*``) were trained and are evaluated at 384 px with crop 1.0, unlike the 224 px
# feature weights: their file names say which they are.
FINETUNED_NAME = re.compile(r"seer_ft|finetuned", re.IGNORECASE)
FINETUNED_PREPROCESS = {"resolution": 384, "crop_pct": 1.0, "interpolation": "bicubic", "resize_mode": "shorter"}

# HF processors name the interpolation by PIL's resampling number (2 bilinear, 3 bicubic, ...).
_PIL_NUMBER = {name: int(mode) for name, mode in INTERPOLATIONS.items()}


def timm_preprocess(pretrained_cfg: Mapping, where: str = "pretrained_cfg") -> dict:
    """Our preprocessing from a timm ``pretrained_cfg``: the ``.seer`` feature weights use 224 px / crop 0.965,
    the ``.seer_ft_in1k`` classifiers 384 px / crop 1.0 (timm resizes the short side, then center-crops).

    What ``timm.data.resolve_data_config(pretrained_cfg=..., use_test_size=True)`` resolves (the test size, as
    timm's ``validate.py`` evaluates), with timm's crop arithmetic (``convention="timm"``); a key the cfg lacks takes
    the regnety SEER value (224 px, crop 0.965, bicubic), where timm would take its generic one (crop 0.875).
    ``where`` names the file in errors: a field of the wrong type, or a crop seer cannot reproduce, raises
    ``CheckpointError``.
    """
    pretrained_cfg = _json_object(pretrained_cfg, where)
    pre = dict(DEFAULT_PREPROCESS["timm"])
    size_key = "test_input_size" if pretrained_cfg.get("test_input_size") else "input_size"
    if pretrained_cfg.get(size_key) is not None:  # timm: (channels, height, width)
        size = _json_ints(pretrained_cfg[size_key], f"{where}: {size_key}")
        if len(size) >= 2 and size[-1] != size[-2]:
            raise _expected(f"{where}: {size_key}", "a square input (seer crops squares)", size)
        pre["resolution"] = _json_resolution(size[-1], f"{where}: {size_key}[{len(size) - 1}]")
    crop_key = "test_crop_pct" if pretrained_cfg.get("test_crop_pct") else "crop_pct"
    if pretrained_cfg.get(crop_key) is not None:
        pre["crop_pct"] = _json_number(pretrained_cfg[crop_key], f"{where}: {crop_key}", 0.0, 1.0, low_open=True)
    if pretrained_cfg.get("crop_mode") is not None:
        # timm's "squash" resizes both sides to resolution / crop_pct, then crops: a warp when nothing is cropped
        mode = _json_str(pretrained_cfg["crop_mode"], f"{where}: crop_mode")
        if mode == "squash" and pre["crop_pct"] == 1.0:
            pre["resize_mode"] = "warp"
        elif mode != "center":
            raise _expected(f"{where}: crop_mode", "'center', or 'squash' with crop_pct 1.0 (what seer reproduces)",
                            mode)  # fmt: skip
    if "interpolation" in pretrained_cfg:
        # timm names a few modes seer does not resize with ("random" is for training): those keep the default
        if _json_str(pretrained_cfg["interpolation"], f"{where}: interpolation") in INTERPOLATIONS:
            pre["interpolation"] = pretrained_cfg["interpolation"]
    for key in ("mean", "std"):
        if pretrained_cfg.get(key) is not None:
            pre[key] = _json_rgb(pretrained_cfg[key], f"{where}: {key}", positive=key == "std")
    return check_preprocess(pre, where)


# ConvNextImageProcessor's own defaults, which it uses for a key the file lacks or sets to null (RegNet checkpoints
# load it): 384 px (warped), crop_pct 224 / 256, bicubic, mean and std 0.5 (its "IMAGENET_STANDARD" statistics).
_HF_DEFAULTS = {"size": 384, "crop_pct": 224 / 256, "resample": 3, "image_mean": (0.5, 0.5, 0.5),
                "image_std": (0.5, 0.5, 0.5), "rescale_factor": 1 / 255}  # fmt: skip


def hf_preprocess(processor: Mapping, where: str = "preprocessor_config.json") -> dict:
    """Our preprocessing from an HF ``preprocessor_config.json``: what ``ConvNextImageProcessor`` (the processor
    ``AutoImageProcessor`` builds for RegNet) computes: below 384 px the short side to ``int(size / crop_pct)`` and
    a center crop (``convention="hf"``: the margin floored), at 384 and above a warp to ``size x size``.

    Missing keys take the processor's own defaults (``_HF_DEFAULTS``), and so do null ones, as in transformers 4
    (transformers 5 refuses them); a null ``do_*`` flag reads false, as in both. ``do_rescale`` / ``rescale_factor``
    / ``do_normalize`` fold into ``mean`` / ``std``. ``where`` names the file in errors: a field of the wrong type, or
    a step seer cannot reproduce (``do_resize: false``, an extra ``do_center_crop``), raises ``CheckpointError``.
    """
    processor = _json_object(processor, where)

    def get(key: str, default: Any = None) -> Any:
        return _HF_DEFAULTS.get(key, default) if processor.get(key) is None else processor[key]

    def flag(key: str, default: bool) -> bool:  # a null flag is not the default: HF keeps None, which reads false
        value = processor.get(key, default)
        if value is not None and not isinstance(value, bool):
            raise _expected(f"{where}: {key}", "true or false", value)
        return bool(value)

    if not flag("do_resize", True):
        raise _expected(f"{where}: do_resize", "true (seer resizes every image to one size)", processor["do_resize"])
    if flag("do_center_crop", False):
        raise _expected(f"{where}: do_center_crop", "false or absent (seer reproduces ConvNext's own crop only)", True)
    size, key = get("size"), "size"
    if isinstance(size, Mapping):
        sub = "shortest_edge" if "shortest_edge" in size else "height"
        size, key = size.get(sub, 224), f"size.{sub}"
    size = _json_resolution(size, f"{where}: {key}")
    by_number = {n: name for name, n in _PIL_NUMBER.items()}
    resample = _json_int(get("resample"), f"{where}: resample", minimum=0)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if flag("do_normalize", True):
        mean = _json_rgb(get("image_mean"), f"{where}: image_mean", positive=False)
        std = _json_rgb(get("image_std"), f"{where}: image_std", positive=True)
    # seer feeds (x / 255 - mean) / std; HF (x * factor - mean) / std = (x / 255 - mean / k) / (std / k), k = 255 factor
    k = 255.0
    if flag("do_rescale", True):
        k *= _json_number(get("rescale_factor"), f"{where}: rescale_factor", 0.0, 1.0, low_open=True)
    if k != 1.0:  # 255 * (1 / 255) is exactly 1.0: the usual file keeps its numbers unchanged
        mean, std = tuple(m / k for m in mean), tuple(s / k for s in std)
    return check_preprocess(
        {
            "resolution": size,
            "crop_pct": _json_number(get("crop_pct"), f"{where}: crop_pct", 0.0, 1.0, low_open=True),
            "interpolation": by_number.get(resample, "bicubic"),
            "resize_mode": "warp" if size >= 384 else "shorter",
            "mean": mean,
            "std": std,
            "convention": "hf",
        },
        where,
    )


def hf_processor(pre: Mapping) -> dict:
    """The HF ``preprocessor_config.json`` (ConvNextImageProcessor) for our preprocessing ``pre``."""
    return {
        "image_processor_type": "ConvNextImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(pre.get("resolution", 224))},
        "crop_pct": float(pre.get("crop_pct", 0.875)),
        "resample": _PIL_NUMBER.get(pre.get("interpolation"), 3),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.get("mean", IMAGENET_MEAN)),
        "image_std": list(pre.get("std", IMAGENET_STD)),
    }


# ----------------------------------------------------------------------------------------------------------------
# Classifier heads
# ----------------------------------------------------------------------------------------------------------------
# The linear classifier of each layout, under the names left in ``Checkpoint.heads``: HF's
# ``classifier = Sequential(Flatten, Linear)``, timm's ``head.fc``, torchvision's ``fc``, VISSL's fine-tune ``mlp``
# head (``heads.<i>.clf.0``) and its linear-eval ``eval_mlp`` (``heads.<i>.channel_bn`` then ``heads.<i>.clf.clf.0``).
HEAD_KEYS: dict[str, tuple[str, ...]] = {
    "hf": ("classifier.1",),
    "timm": ("head.fc",),
    "seer": ("head.fc",),
    "torchvision": ("fc",),
    "vissl": (r"heads\.(?P<i>\d+)\.clf\.0", r"heads\.(?P<i>\d+)\.clf\.clf\.0"),
    "classy": (r"heads\.(?P<i>\d+)\.clf\.0", r"heads\.(?P<i>\d+)\.clf\.clf\.0", "head.fc", "fc"),
}
_BN_EPS = 1e-5  # VISSL's HEAD.BATCHNORM_EPS default


def _fold_bn(weight: torch.Tensor, bias: torch.Tensor, bn: dict[str, torch.Tensor], eps: float
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``Linear(BN(x))`` as one linear layer (BatchNorm in eval mode is an affine map of each channel)."""
    w64, b64 = weight.double(), bias.double()
    scale = bn["weight"].double() / torch.sqrt(bn["running_var"].double() + eps)
    shift = bn["bias"].double() - bn["running_mean"].double() * scale
    return (w64 * scale).to(weight.dtype), (b64 + w64 @ shift).to(bias.dtype)


def classifier_head(ckpt: Checkpoint, num_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [C, D], bias [C])`` of the checkpoint's linear classifier on the trunk's ``num_features`` pooled
    features; a VISSL linear-eval head's BatchNorm is folded in.

    Raises ``CheckpointError`` when the checkpoint has no classifier (naming ``load_trunk``), more than one, or one
    whose shapes do not fit the trunk.
    """
    heads = ckpt.heads
    found: list[tuple[str, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
    for pattern in HEAD_KEYS.get(ckpt.format, ()):
        for key in heads:
            m = re.fullmatch(pattern + r"\.weight", key)
            if m is None:
                continue
            prefix = key[: -len(".weight")]
            bias = heads.get(prefix + ".bias")
            bn: dict[str, torch.Tensor] = {}
            if m.groupdict().get("i") is not None and ".clf.clf." in key:
                bn_prefix = f"heads.{m['i']}.channel_bn."
                bn = {k[len(bn_prefix) :]: v for k, v in heads.items() if k.startswith(bn_prefix)}
            found.append((prefix, heads[key], bias, bn))
    if not found:
        what = f"head tensors {sorted(heads)[:6]}" if heads else "no head tensors"
        raise CheckpointError(
            f"{ckpt.origin} ({ckpt.format} layout) has no classifier head ({what}): it is a feature checkpoint; "
            "load it with seer.load_trunk"
        )
    fitting = [f for f in found if f[1].dim() == 2 and f[1].shape[1] == num_features]
    if not fitting:
        shapes = {p: tuple(w.shape) for p, w, _, _ in found}
        raise CheckpointError(
            f"{ckpt.origin}: the classifier head {shapes} does not take the trunk's {num_features} pooled features "
            f"(expected weight [n_classes, {num_features}])"
        )
    if len(fitting) > 1:
        raise CheckpointError(
            f"{ckpt.origin}: {len(fitting)} classifier heads on the pooled features ({[f[0] for f in fitting]}); "
            "keep one in the state dict"
        )
    prefix, weight, bias, bn = fitting[0]
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    if tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(
            f"{ckpt.origin}: {prefix}.bias has shape {tuple(bias.shape)}, the weight {tuple(weight.shape)}"
        )
    if bn:
        need = ("weight", "bias", "running_mean", "running_var")
        bad = [k for k in need if k not in bn or tuple(bn[k].shape) != (num_features,)]
        if bad:
            raise CheckpointError(f"{ckpt.origin}: the linear-eval head's channel_bn is missing or misshapen: {bad}")
        weight, bias = _fold_bn(weight, bias, bn, _BN_EPS)
    return weight, bias


def head_labels(ckpt: Checkpoint, n_classes: int) -> dict[int, str] | None:
    """The class names a checkpoint records (HF ``id2label``, timm ``label_names``, our metadata), or None.

    A list of names whose length disagrees with the head is an error, not a silent relabelling.
    """
    names = ckpt.labels
    if names is None and ckpt.hf_config is not None and "id2label" in ckpt.hf_config:
        id2label = ckpt.hf_config["id2label"]
        try:
            names = {int(k): str(v) for k, v in id2label.items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{ckpt.origin}/config.json: id2label is not a {{index: name}} map ({exc})") from None
        # HF writes a default {0: LABEL_0, 1: LABEL_1} for configs that never set labels: keep it, it is theirs
    if names is None:
        return None
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if sorted(names) != list(range(n_classes)):
        raise CheckpointError(
            f"{ckpt.origin}: the labels name {len(names)} classes (keys {sorted(names)[:5]}...) but the classifier "
            f"head has {n_classes} outputs"
        )
    return {int(k): str(v) for k, v in names.items()}
