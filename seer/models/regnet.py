"""RegNetY trunks from 200MF to the 10B SEER width, as data (``RegNetCfg`` + ``PRESETS``) and one module.

The architecture follows pycls (Radosavovic et al., "Designing Network Design Spaces") and the SEER papers:
a 3x3 stride-2 stem, then four stages of SE bottleneck blocks whose widths come from the quantized linear
rule in ``generate_widths``. Module names match timm's ``regnety_*`` (``stem.conv``, ``s1.b1.conv1.conv`` ...),
so timm state dicts load without renaming and every other layout converts through one table (``seer.weights``).

This file imports only torch and numpy: parallelism, configs and checkpoint formats live elsewhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seer import hardware

__all__ = [
    "RegNetCfg",
    "PRESETS",
    "RegNetTrunk",
    "build_trunk",
    "checkpoint_segments",
    "complexity",
    "generate_widths",
    "standardize_images",
    "get_preset",
    "resolve_cfg",
]

STAGE_NAMES = ("res2", "res3", "res4", "res5")
FOLD_CACHE_MAX_BYTES = 2 << 30  # trunks larger than this fold BN at every inference forward instead of caching


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
# Sanity bounds of every RegNetCfg, far above any published RegNet (SEER 10B: depth 27, widths below 2**13): a config
# read from a file cannot make numpy overflow or ask for a trunk that would take hours to build, even on meta.
MAX_DEPTH = 1024
MAX_WIDTH = 1 << 20
MAX_BOTTLENECK = 64.0


def describe_value(value: object) -> str:
    """A value as an error message names it, its type first: ``the string '32'``, ``the integer 0``, ``null``."""
    try:
        text = repr(value if not isinstance(value, tuple) else list(value))
    except ValueError:  # an integer beyond Python's 4300-digit conversion limit
        text = "with more than 4300 digits"
    text = text if len(text) <= 60 else text[:57] + "..."
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    for kinds, name in ((int, "the integer"), (float, "the number"), (str, "the string"), ((list, tuple), "a list"),
                        (dict, "an object")):  # fmt: skip
        if isinstance(value, kinds):
            return f"{name} {text}"
    return f"a {type(value).__name__} {text}"


@dataclass(frozen=True)
class RegNetCfg:
    """Parameters of one RegNetY design (pycls notation).

    Args:
        depth: total number of blocks.
        w0: initial width (a multiple of 8).
        wa: slope of the continuous widths ``w0 + wa * i``.
        wm: width multiplier between quantized stages (> 1).
        group_w: group width of the 3x3 grouped convolutions.
        se_ratio: squeeze-excitation width as a fraction of the block's input width (0 disables SE).
        bottleneck: bottleneck multiplier (1.0 for every RegNetY).
        stem_width: output width of the 3x3 stride-2 stem.
        image_norm: standardize each input image per channel (zero mean, unit variance over its pixels) before the
            stem. Not in pycls; the small-image CPU recipe uses it: it takes a crop's brightness, contrast and colour
            cast out of the features, the shortcut SwAV otherwise learns on small images (docs/swav.md).
    """

    depth: int
    w0: int
    wa: float
    wm: float
    group_w: int
    se_ratio: float = 0.25
    bottleneck: float = 1.0
    stem_width: int = 32
    image_norm: bool = False
    # Explicit per-stage layout, for checkpoints whose widths do not come from (w0, wa, wm): torchvision's
    # regnet_y_800mf rounds 136 / 16 half-up (stage 2 width 144; pycls and timm give 128). Set by ``from_stages``.
    stage_widths: tuple[int, ...] | None = None
    stage_depths: tuple[int, ...] | None = None
    stage_group_widths: tuple[int, ...] | None = None

    @classmethod
    def from_stages(cls, widths: Sequence[int], depths: Sequence[int], group_widths: Sequence[int] | int,
                    se_ratio: float = 0.25, stem_width: int = 32) -> RegNetCfg:  # fmt: skip
        """A configuration given by its stage widths, depths and group widths instead of (w0, wa, wm)."""
        if isinstance(group_widths, int):
            group_widths = [group_widths] * len(widths)
        if not (len(widths) == len(depths) == len(group_widths)) or not widths:
            raise ValueError(
                f"RegNetCfg.from_stages needs equally long non-empty widths, depths and group_widths, got "
                f"{list(widths)}, {list(depths)}, {list(group_widths)}"
            )
        for w, g in zip(widths, group_widths):
            if w < 1 or g < 1 or w % g:
                raise ValueError(f"RegNetCfg.stage_widths: width {w} is not a positive multiple of group width {g}")
        if any(d < 1 for d in depths):
            raise ValueError(f"RegNetCfg.stage_depths must all be >= 1, got {list(depths)}")
        w0 = max(8, int(widths[0]) // 8 * 8)  # placeholders that pass validation; the stages above rule
        return cls(depth=int(sum(depths)), w0=w0, wa=0.0, wm=2.0, group_w=int(group_widths[0]), se_ratio=se_ratio,
                   stem_width=stem_width, stage_widths=tuple(int(w) for w in widths),
                   stage_depths=tuple(int(d) for d in depths),
                   stage_group_widths=tuple(int(g) for g in group_widths))  # fmt: skip

    def __post_init__(self) -> None:
        # Configs come from users and from files (checkpoint metadata): each field is checked for its type first, so
        # that the string "32" is reported as a string, not as a wrong number, and nothing fails later inside numpy.
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"RegNetCfg.{field} {why}, got {describe_value(getattr(self, field))}")

        for name in ("depth", "w0", "group_w", "stem_width"):
            value, most = getattr(self, name), MAX_DEPTH if name == "depth" else MAX_WIDTH
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(name, "must be an integer")
            if not 1 <= value <= most:
                raise bad(name, f"must be in [1, {most}]")
        floats = ("wa", "wm", "se_ratio", "bottleneck")
        for name in floats:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise bad(name, "must be a number")
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if self.w0 % 8:
            raise bad("w0", "must be a positive multiple of 8")
        if not 0 <= self.wa <= MAX_WIDTH:
            raise bad("wa", f"must be in [0, {MAX_WIDTH}]")
        if not 1 < self.wm <= MAX_WIDTH:
            raise bad("wm", f"must be > 1 and <= {MAX_WIDTH}")
        if not 0 <= self.se_ratio < 1:
            raise bad("se_ratio", "must be in [0, 1)")
        if not 0 < self.bottleneck <= MAX_BOTTLENECK:
            raise bad("bottleneck", f"must be in (0, {MAX_BOTTLENECK}]")
        if not isinstance(self.image_norm, bool):
            raise bad("image_norm", "must be true or false")
        for name in floats:  # an int from JSON / YAML, now known to be small: numpy's width rule wants floats
            object.__setattr__(self, name, float(getattr(self, name)))
        self._check_stages()

    def _check_stages(self) -> None:
        """The explicit per-stage layout: all three fields or none, one entry per stage, blocks that can be built."""
        names = ("stage_widths", "stage_depths", "stage_group_widths")
        given = [n for n in names if getattr(self, n) is not None]
        if not given:
            return
        if len(given) != 3:
            absent = [n for n in names if n not in given]
            raise ValueError(f"RegNetCfg: {', '.join(given)} given without {', '.join(absent)}")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"RegNetCfg.{name} must be a non-empty list of integers, got {describe_value(value)}")
            for v in value:
                if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_WIDTH:
                    raise ValueError(
                        f"RegNetCfg.{name} must hold integers in [1, {MAX_WIDTH}], got {describe_value(v)}"
                    )
            object.__setattr__(self, name, tuple(value))
        widths, depths, group_ws = self.stage_widths, self.stage_depths, self.stage_group_widths
        if not len(widths) == len(depths) == len(group_ws):
            raise ValueError(
                f"RegNetCfg: stage_widths, stage_depths and stage_group_widths differ in length: {list(widths)}, "
                f"{list(depths)}, {list(group_ws)}"
            )
        if sum(depths) != self.depth:
            raise ValueError(f"RegNetCfg.depth is {self.depth} but stage_depths {list(depths)} sum to {sum(depths)}")
        for w, g in zip(widths, group_ws):
            mid = int(round(w * self.bottleneck))
            if mid < g or mid % g:
                raise ValueError(
                    f"RegNetCfg.stage_group_widths: group width {g} does not divide the bottleneck width {mid} of "
                    f"stage width {w}"
                )

    @property
    def widths(self) -> list[int]:
        return self.stages()[0]

    @property
    def depths(self) -> list[int]:
        return self.stages()[1]

    def stages(self) -> tuple[list[int], list[int], list[int]]:
        """Per-stage (widths, depths, group widths) after width/group compatibility."""
        if self.stage_widths is not None:
            return list(self.stage_widths), list(self.stage_depths), list(self.stage_group_widths)
        widths, depths = generate_widths(self.w0, self.wa, self.wm, self.depth)
        group_ws = [self.group_w] * len(widths)
        # pycls adjust_block_compatibility: group width <= bottleneck width, bottleneck width a multiple of it.
        mids = [max(1, int(w * self.bottleneck)) for w in widths]
        group_ws = [min(g, m) for g, m in zip(group_ws, mids)]
        mids = [max(g, int(round(m / g) * g)) for m, g in zip(mids, group_ws)]
        widths = [int(m / self.bottleneck) for m in mids]
        return widths, depths, group_ws

    def to_dict(self) -> dict:
        """Plain dict (JSON/YAML-safe); explicit stage fields only when set."""
        d = dataclasses.asdict(self)
        if not d["image_norm"]:  # absent = off: files written without the field (and older readers) agree
            del d["image_norm"]
        for key in ("stage_widths", "stage_depths", "stage_group_widths"):
            if d[key] is None:
                del d[key]
            else:
                d[key] = list(d[key])
        return d


def generate_widths(w0: int, wa: float, wm: float, depth: int, q: int = 8) -> tuple[list[int], list[int]]:
    """pycls ``generate_regnet``: per-block quantized widths, grouped into stages of equal width."""
    ws_cont = np.arange(depth) * wa + w0
    ks = np.round(np.log(ws_cont / w0) / np.log(wm))
    ws_all = np.round(w0 * np.power(wm, ks) / q) * q
    widths, depths = [], []
    for w in ws_all.astype(int).tolist():
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    return widths, depths


# Published parameters: pycls model zoo / torchvision / timm for 200MF..32GF, SEER papers for 64GF..10B.
PRESETS: dict[str, RegNetCfg] = {
    "regnety_200mf": RegNetCfg(depth=13, w0=24, wa=36.44, wm=2.49, group_w=8),
    "regnety_400mf": RegNetCfg(depth=16, w0=48, wa=27.89, wm=2.09, group_w=8),
    "regnety_600mf": RegNetCfg(depth=15, w0=48, wa=32.54, wm=2.32, group_w=16),
    "regnety_800mf": RegNetCfg(depth=14, w0=56, wa=38.84, wm=2.4, group_w=16),
    "regnety_1_6gf": RegNetCfg(depth=27, w0=48, wa=20.71, wm=2.65, group_w=24),
    "regnety_3_2gf": RegNetCfg(depth=21, w0=80, wa=42.63, wm=2.66, group_w=24),
    "regnety_4gf": RegNetCfg(depth=22, w0=96, wa=31.41, wm=2.24, group_w=64),
    "regnety_6_4gf": RegNetCfg(depth=25, w0=112, wa=33.22, wm=2.27, group_w=72),
    "regnety_8gf": RegNetCfg(depth=17, w0=192, wa=76.82, wm=2.19, group_w=56),
    "regnety_12gf": RegNetCfg(depth=19, w0=168, wa=73.36, wm=2.37, group_w=112),
    "regnety_16gf": RegNetCfg(depth=18, w0=200, wa=106.23, wm=2.48, group_w=112),
    "regnety_32gf": RegNetCfg(depth=20, w0=232, wa=115.89, wm=2.53, group_w=232),
    "regnety_64gf": RegNetCfg(depth=20, w0=352, wa=147.48, wm=2.4, group_w=328),
    "regnety_128gf": RegNetCfg(depth=27, w0=456, wa=160.83, wm=2.52, group_w=264),
    # SEER's RG-256 -- not ClassyVision's regnet_y_256gf (wa 124.47, wm 2.04, group_w 848), a different model.
    "regnety_256gf": RegNetCfg(depth=27, w0=640, wa=230.83, wm=2.53, group_w=373),
    "regnety_10b": RegNetCfg(depth=27, w0=1744, wa=620.83, wm=2.52, group_w=1010),
}

# Names users bring from other libraries: torchvision (regnet_y_1_6gf), timm (regnety_016), SEER (rg-256), dotted.
_ALIASES: dict[str, str] = {}
for _name in PRESETS:
    _size = _name.split("_", 1)[1]  # "1_6gf"
    _ALIASES[_name.replace("regnety_", "regnet_y_")] = _name
    _ALIASES[f"regnety_{_size.replace('_', '.')}"] = _name
for _timm, _ours in {
    "002": "200mf", "004": "400mf", "006": "600mf", "008": "800mf", "016": "1_6gf", "032": "3_2gf",
    "040": "4gf", "064": "6_4gf", "080": "8gf", "120": "12gf", "160": "16gf", "320": "32gf", "640": "64gf",
    "1280": "128gf", "2560": "256gf",
}.items():  # fmt: skip
    _ALIASES[f"regnety_{_timm}"] = f"regnety_{_ours}"
for _seer, _ours in {"32": "32gf", "64": "64gf", "128": "128gf", "256": "256gf"}.items():
    _ALIASES[f"rg-{_seer}"] = _ALIASES[f"rg{_seer}"] = f"regnety_{_ours}"
_ALIASES["seer-10b"] = _ALIASES["regnet_y_10b"] = "regnety_10b"


def get_preset(name: str) -> RegNetCfg:
    """Look up a preset by our name or a torchvision / timm / SEER alias; unknown names list close matches."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    candidates = list(PRESETS) + list(_ALIASES)
    close = difflib.get_close_matches(key, candidates, n=4, cutoff=0.6)
    close = list(dict.fromkeys(_ALIASES.get(c, c) for c in close))
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known presets: {', '.join(PRESETS)}"
    raise ValueError(f"unknown RegNet preset {name!r}{hint}")


def resolve_cfg(preset_or_cfg: str | RegNetCfg | dict) -> RegNetCfg:
    """A preset name, a ``RegNetCfg`` or a dict of its fields -> ``RegNetCfg``."""
    if isinstance(preset_or_cfg, RegNetCfg):
        return preset_or_cfg
    if isinstance(preset_or_cfg, str):
        return get_preset(preset_or_cfg)
    if isinstance(preset_or_cfg, dict):
        known = {f.name for f in dataclasses.fields(RegNetCfg)}
        unknown = sorted(set(preset_or_cfg) - known)
        if unknown:
            raise ValueError(f"unknown RegNetCfg field(s) {unknown}; known fields: {sorted(known)}")
        required = [f.name for f in dataclasses.fields(RegNetCfg) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in preset_or_cfg]
        if missing:
            raise ValueError(f"RegNetCfg: missing field(s) {missing} (a preset name, or all of {required})")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in preset_or_cfg.items()}
        return RegNetCfg(**fields)
    raise TypeError(f"expected a preset name, RegNetCfg or dict, got {type(preset_or_cfg).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------
# True while torch.utils.checkpoint recomputes a segment: batch norms must not update their running statistics a
# second time (plain checkpointing would apply the momentum twice per step and drift from the uncheckpointed run).
_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("seer_regnet_recomputing", default=False)


@contextlib.contextmanager
def _recompute_context():
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def _checkpoint_contexts():
    return contextlib.nullcontext(), _recompute_context()


def _like_input(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight in channels_last when the input is: oneDNN / cuDNN pick their fast NHWC kernels only then.

    Parameters themselves stay contiguous (FSDP2 shards only contiguous parameters); the copy is weight-sized.
    """
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and weight.size(2) * weight.size(3) > 1:
        return weight.contiguous(memory_format=torch.channels_last)
    return weight


_MKLDNN_FUSION = hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()


def _cpu_autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in bf16 under CPU bf16 autocast (the folded / fused convs are not autocast ops and would stay fp32).

    On CPUs with AMX this is where ``amp="bf16"`` pays: measured 1.7-2.3x the fp32 inference speed of
    regnety_800mf / 1_6gf (batch 16, 224 px), features within ~3e-3 relative error. Where oneDNN has no bf16
    kernels (AVX2-only CPUs) the folded convs stay fp32: the fused bf16 convolution would raise there.
    """
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and hardware.cpu_bf16_kernels()
    ):
        return x.to(torch.bfloat16)
    return x


def _fusable(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """CPU fp32 / bf16 channels_last inference without autograd: oneDNN's fused conv + post-op kernels apply."""
    if not _MKLDNN_FUSION or torch.is_grad_enabled() or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.dtype == torch.bfloat16 and not hardware.cpu_bf16_kernels():
        return False
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    return residual is None or (residual.dtype == x.dtype and residual.is_contiguous(memory_format=torch.channels_last))


def _fused_conv(x, weight, bias, padding, stride, dilation, groups, act: str) -> torch.Tensor:
    """oneDNN conv [+ ReLU] in one kernel (a module-level function so tests can watch what reaches it)."""
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, act, [], "")


def _fused_conv_add_relu(x, residual, weight, bias, padding, stride, dilation, groups) -> torch.Tensor:
    """oneDNN conv + residual sum + ReLU in one kernel."""
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, padding, stride, dilation, groups, "add", None, "relu", [], ""
    )


def _bf16_tiny_strided(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """A CPU bf16 training conv that oneDNN gets wrong: stride > 1 over an input smaller than the kernel.

    Measured (torch 2.14.1, oneDNN bf16 kernels on an AVX512-BF16 EPYC): a 3x3 stride-2 padding-1 conv on a 1x1
    input returns non-finite weight gradients in 6-23 of 50 backward passes (never in fp32, never at 2x2 and up),
    which turns a whole training run to NaN within a few steps. Multi-crop training at small resolutions meets it
    (a 16 px crop reaches the last stage at 1x1). Such convs are tiny, so they run in fp32 instead.
    """
    if x.device.type != "cpu" or not torch.is_grad_enabled() or max(conv.stride) == 1:
        return False
    bf16 = x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return bf16 and x.dim() == 4 and min(x.shape[-2:]) < max(conv.kernel_size)


class ConvBN(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d [-> ReLU].

    In eval mode the batch norm is folded into the convolution weights on the fly (a weight-sized computation),
    which saves one full pass over the activations; the result equals conv -> bn up to float rounding.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs, eps=1e-5, momentum=0.1)
        self.act = act
        self.fold_bn = True
        self.cache_fold = True  # RegNetTrunk turns this off for trunks too big to hold a folded copy

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv -> BN [-> ReLU]; with ``residual``: conv -> BN -> (+ residual) -> ReLU (the block's output)."""
        bn, conv = self.bn, self.conv
        if not self.training and self.fold_bn and bn.running_var is not None:
            x = _cpu_autocast_input(x)
            if residual is not None:
                residual = residual.to(x.dtype)
            weight, bias = self._folded(x)
            if _fusable(x, residual):
                # oneDNN conv with the ReLU (and the residual sum) as post-ops: one pass over the output, not 2-3.
                args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
                if residual is not None:
                    return _fused_conv_add_relu(x, residual, weight, bias, *args)
                return _fused_conv(x, weight, bias, *args, "relu" if self.act else "none")
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding, 1, conv.groups)
        elif _bf16_tiny_strided(x, conv):  # computed in fp32, handed on in bf16 as the conv would have
            with torch.autocast("cpu", enabled=False):
                x = F.conv2d(x.float(), conv.weight.float(), None, conv.stride, conv.padding, 1, conv.groups)
            x = self._bn(x.to(torch.bfloat16))
        else:
            x = F.conv2d(x, _like_input(conv.weight, x), None, conv.stride, conv.padding, 1, conv.groups)
            x = self._bn(x)
        if residual is not None:
            return F.relu(x + residual, inplace=True)
        return F.relu(x, inplace=True) if self.act else x

    def _bn(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not (self.training and _RECOMPUTING.get() and bn.running_mean is not None):
            return bn(x)
        # Recomputation: the same batch statistics (through the module, so SyncBatchNorm still syncs), but momentum 0
        # and the batch counter restored, so the running statistics are updated once per step.
        momentum, tracked = bn.momentum, bn.num_batches_tracked
        tracked = tracked.clone() if tracked is not None else None
        bn.momentum = 0.0
        try:
            return bn(x)
        finally:
            bn.momentum = momentum
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)

    def _folded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BN folded into the conv weight and bias, laid out like ``x``.

        Without autograd (inference_mode / no_grad) the result is cached and reused until a parameter or running
        statistic changes (tensor identity + version counters), so repeated inference pays for the fold once.
        """
        conv, bn = self.conv, self.bn
        tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        cacheable = self.cache_fold and not torch.is_grad_enabled()
        key = None
        if cacheable:
            layout = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            key = (layout, x.dtype, x.device, *((id(t), t._version) for t in tensors))
            cached = self.__dict__.get("_fold_cache")
            if cached is not None and cached[0] == key:
                return cached[1], cached[2]
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        # (folded in the parameters' precision, then cast: under CPU bf16 autocast x is bf16, the parameters fp32)
        weight = _like_input((conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype)).to(x.dtype), x)
        bias = (bn.bias - bn.running_mean * scale).to(weight.dtype)
        if cacheable:
            self.__dict__["_fold_cache"] = (key, weight, bias)  # plain attribute: not a buffer, not saved
        return weight, bias


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pool -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate."""

    def __init__(self, chs: int, se_chs: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(chs, se_chs, 1, bias=True)
        self.fc2 = nn.Conv2d(se_chs, chs, 1, bias=True)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Gate ``x`` by its squeeze-excite weights; ``inplace`` overwrites ``x`` (only without autograd)."""
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(F.relu(self.fc1(s), inplace=True))
        if inplace and not torch.is_grad_enabled():
            return x.mul_(s.sigmoid())
        return x * s.sigmoid()


class Bottleneck(nn.Module):
    """RegNetY block: 1x1 -> 3x3 grouped (stride) -> SE -> 1x1, plus a projection shortcut when shapes change."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, group_w: int, bottleneck: float,
                 se_ratio: float) -> None:  # fmt: skip
        super().__init__()
        mid = int(round(out_chs * bottleneck))
        groups = mid // group_w
        self.conv1 = ConvBN(in_chs, mid, 1, act=True)
        self.conv2 = ConvBN(mid, mid, 3, stride, groups=groups, act=True)
        se_chs = int(round(in_chs * se_ratio))
        self.se = SqueezeExcite(mid, se_chs) if se_chs > 0 else nn.Identity()
        self.conv3 = ConvBN(mid, out_chs, 1)
        self.downsample = ConvBN(in_chs, out_chs, 1, stride) if (in_chs != out_chs or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.conv2(self.conv1(x))
        if isinstance(self.se, SqueezeExcite):
            # Without autograd, conv2's output is ours alone (unless a hook on conv2 kept it): gating it in place
            # saves an activation-sized allocation and pass, measured +7-8% inference on regnety_800mf / 1_6gf.
            hooked = self.conv2._forward_hooks or getattr(nn.modules.module, "_global_forward_hooks", None)
            h = self.se(h, inplace=not hooked)
        return self.conv3(h, residual=shortcut)


class RegNetStage(nn.Module):
    """A run of blocks of one width, named b1..bN as in timm."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, group_w: int, bottleneck: float,
                 se_ratio: float) -> None:  # fmt: skip
        super().__init__()
        for i in range(depth):
            block = Bottleneck(in_chs if i == 0 else out_chs, out_chs, 2 if i == 0 else 1, group_w, bottleneck,
                               se_ratio)  # fmt: skip
            self.add_module(f"b{i + 1}", block)

    @property
    def blocks(self) -> list[Bottleneck]:
        return list(self.children())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


CheckpointSpec = bool | str | Sequence[Sequence[int]] | None


def checkpoint_segments(spec: CheckpointSpec, depths: Sequence[int]) -> list[list[tuple[int, int, bool]]]:
    """The one parser of activation-checkpointing specs: per stage, its ``(start, end, checkpointed)`` block ranges.

    Args:
        spec: ``False``/``None`` off; ``True`` or ``"block"`` one segment per block; ``"stage"`` one per stage; or
            SEER-style groups, one list per stage of segment end indices, e.g. ``[[2], [7], [9, 17], []]``
            checkpoints blocks 0-1 of stage 1, 0-6 of stage 2, 0-8 and 9-16 of stage 3, nothing in stage 4. Blocks
            after the last end index run without checkpointing.
        depths: blocks per stage.

    Raises:
        ValueError: an unknown string, not one list per stage, or end indices that do not increase within a stage.
    """
    if spec is None or spec is False:
        return [[(0, d, False)] for d in depths]
    if spec is True or spec == "block":
        return [[(j, j + 1, True) for j in range(d)] for d in depths]
    if spec == "stage":
        return [[(0, d, True)] for d in depths]
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not all(isinstance(g, Sequence) for g in spec):
        raise ValueError(f"activation_checkpointing must be a bool, 'block', 'stage' or groups, got {spec!r}")
    groups = [list(g) for g in spec]
    if len(groups) != len(depths):
        raise ValueError(f"activation_checkpointing groups need one list per stage ({len(depths)}), got {groups}")
    plan = []
    for s, (ends, depth) in enumerate(zip(groups, depths)):
        segs, start = [], 0
        for end in ends:
            if not isinstance(end, int) or isinstance(end, bool) or not start < end <= depth:
                raise ValueError(
                    f"activation_checkpointing groups: stage {s + 1} (depth {depth}) has end index {end!r};"
                    f" ends must increase within 1..{depth}"
                )
            segs.append((start, end, True))
            start = end
        if start < depth:
            segs.append((start, depth, False))
        plan.append(segs)
    return plan


class RegNetTrunk(nn.Module):
    """RegNetY trunk: ``trunk(x)`` -> pooled features ``[B, num_features]``.

    ``forward_stages(x)`` returns the four stage outputs ``res2..res5``; ``forward_features(x)`` the last map.
    Inputs are taken in channels_last memory format by default, which is 1.5-2x faster on CPU and GPU.
    """

    def __init__(self, cfg: RegNetCfg, zero_init_last_bn: bool = False, channels_last: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.channels_last = channels_last
        widths, depths, group_ws = cfg.stages()
        self.widths, self.depths = widths, depths
        self.stem = ConvBN(3, cfg.stem_width, 3, stride=2, act=True)
        in_chs = cfg.stem_width
        for i, (w, d, g) in enumerate(zip(widths, depths, group_ws)):
            self.add_module(f"s{i + 1}", RegNetStage(in_chs, w, d, g, cfg.bottleneck, cfg.se_ratio))
            in_chs = w
        self.num_features = in_chs
        self.stage_names = tuple(f"res{i + 2}" for i in range(len(widths)))
        self._ckpt_plan: list[list[tuple[int, int, bool]]] = [[(0, d, False)] for d in depths]
        self.init_weights(zero_init_last_bn)
        # Inference caches each conv's BN-folded weight (a second copy of the conv weights): fine up to a few GB,
        # not for the 10B, which keeps folding on the fly instead.
        if sum(p.numel() * p.element_size() for p in self.parameters()) > FOLD_CACHE_MAX_BYTES:
            for m in self.modules():
                if isinstance(m, ConvBN):
                    m.cache_fold = False

    # -- construction -------------------------------------------------------------------------------------------
    @property
    def stages(self) -> list[RegNetStage]:
        return [getattr(self, f"s{i + 1}") for i in range(len(self.depths))]

    def blocks(self) -> list[Bottleneck]:
        """All blocks in forward order (the unit of FSDP sharding and activation checkpointing)."""
        return [b for stage in self.stages for b in stage.blocks]

    @torch.no_grad()
    def init_weights(self, zero_init_last_bn: bool = False) -> None:
        """ClassyVision / VISSL init: conv ~ N(0, sqrt(2 / fan_out)), BN weight 1 bias 0 (last BN 0 if asked)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
        if zero_init_last_bn:
            for block in self.blocks():
                block.conv3.bn.weight.zero_()

    def set_grad_checkpointing(self, enable: CheckpointSpec = True) -> None:
        """Activation checkpointing (non-reentrant ``torch.utils.checkpoint``).

        Args:
            enable: ``False``/``None`` off; ``True`` or ``"block"`` one segment per block; ``"stage"`` one per
                stage; or SEER-style groups of segment end indices per stage (see ``checkpoint_segments``).
        """
        self._ckpt_plan = checkpoint_segments(enable, self.depths)

    @property
    def grad_checkpointing(self) -> bool:
        return any(ck for segs in self._ckpt_plan for _, _, ck in segs)

    # -- forward ------------------------------------------------------------------------------------------------
    def _run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        blocks = self.stages[index].blocks
        for start, end, ck in self._ckpt_plan[index]:
            seg = blocks[start:end]
            if ck and torch.is_grad_enabled():
                x = checkpoint(_run_blocks, seg, x, use_reentrant=False, context_fn=_checkpoint_contexts)
            else:
                x = _run_blocks(seg, x)
        return x

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"RegNetTrunk expects images [B, 3, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"RegNetTrunk expects a floating-point tensor, got {x.dtype}")
        if self.cfg.image_norm:
            x = standardize_images(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x)

    def forward_stages(self, x: torch.Tensor, until: str | None = None) -> dict[str, torch.Tensor]:
        """Feature maps after each stage: ``{"res2": [B, w1, H/4, W/4], ..., "res5": [B, w4, H/32, W/32]}``.

        Args:
            x: images ``[B, 3, H, W]``.
            until: stop after this stage: ``until="res3"`` returns res2 and res3 and computes nothing after them.
        """
        if until is not None and until not in self.stage_names:
            raise ValueError(f"until={until!r}: this trunk has stages {self.stage_names}")
        x = self._prepare(x)
        out = {}
        for i, name in enumerate(self.stage_names):
            x = self._run_stage(i, x)
            out[name] = x
            if name == until:
                break
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map ``[B, num_features, H/32, W/32]``."""
        x = self._prepare(x)
        for i in range(len(self.stage_names)):
            x = self._run_stage(i, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean((2, 3))


def standardize_images(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Each image of ``x [B, C, H, W]`` per channel to zero mean and unit variance over its pixels (``image_norm``).

    Statistics in fp32 whatever the dtype; ``eps`` keeps a flat channel (a constant crop) finite: it becomes 0.
    """
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
    return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype)


def _run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def build_trunk(preset_or_cfg: str | RegNetCfg | dict, *, device: torch.device | str | None = None,
                activation_checkpointing: CheckpointSpec = False, zero_init_last_bn: bool = False,
                channels_last: bool = True) -> RegNetTrunk:  # fmt: skip
    """Build a randomly initialized RegNetY trunk.

    Args:
        preset_or_cfg: a name from ``PRESETS`` (or a timm / torchvision alias), a ``RegNetCfg`` or its dict.
        device: where to allocate; ``"meta"`` builds any size (10B included) without allocating memory.
        activation_checkpointing: see ``RegNetTrunk.set_grad_checkpointing``.
        zero_init_last_bn: start each residual branch at zero (its last BN weight = 0).
        channels_last: store 3x3 conv weights and take inputs in channels_last memory format (faster on CPU and
            GPU). ``state_dict()`` tensors are then non-contiguous: call ``.contiguous()`` before serializing.
    """
    cfg = resolve_cfg(preset_or_cfg)
    device = None if device is None else hardware.resolve_device(device, what="device")  # a missing GPU, named
    with torch.device(device) if device is not None else contextlib.nullcontext():
        trunk = RegNetTrunk(cfg, zero_init_last_bn=zero_init_last_bn, channels_last=channels_last)
    if channels_last:
        # Channels-last weights are ~15% faster to train than converting them each step. FSDP2 shards only
        # contiguous parameters: seer.distributed.parallel converts back before fully_shard (the forward then
        # converts each gathered weight, a weight-sized copy).
        trunk.to(memory_format=torch.channels_last)
    if activation_checkpointing:
        trunk.set_grad_checkpointing(activation_checkpointing)
    return trunk


# ----------------------------------------------------------------------------------------------------------------
# Complexity (arithmetic: nothing is allocated)
# ----------------------------------------------------------------------------------------------------------------
def _conv_out(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # k=3 pad=1 and k=1 pad=0 give the same size


def complexity(preset_or_cfg: str | RegNetCfg | dict, resolution: int = 224) -> dict:
    """Parameters and multiply-accumulates of the trunk at ``resolution`` (convolutions and SE, as pycls counts).

    Returns ``{"params", "macs", "activations", "widths", "depths", "group_widths", "groups"}``; ``activations``
    counts the elements of every conv / BN output per image (the basis of the memory planner).
    """
    cfg = resolve_cfg(preset_or_cfg)
    widths, depths, group_ws = cfg.stages()
    params = macs = acts = 0

    def conv(cin: int, cout: int, k: int, groups: int, hw: int) -> None:
        nonlocal params, macs, acts
        params += k * k * cin // groups * cout + 2 * cout  # conv weight + BN affine
        macs += k * k * cin // groups * cout * hw * hw
        acts += 2 * cout * hw * hw  # conv output and BN output

    size = _conv_out(resolution, 2)
    conv(3, cfg.stem_width, 3, 1, size)
    in_chs = cfg.stem_width
    groups_per_stage = []
    for w, d, g in zip(widths, depths, group_ws):
        mid = int(round(w * cfg.bottleneck))
        groups_per_stage.append(mid // g)
        for j in range(d):
            stride = 2 if j == 0 else 1
            out_size = _conv_out(size, stride)
            conv(in_chs, mid, 1, 1, size)
            conv(mid, mid, 3, mid // g, out_size)
            se = int(round(in_chs * cfg.se_ratio))
            if se:
                params += mid * se + se + se * mid + mid
                macs += mid * se + se * mid
                acts += mid * out_size * out_size  # gated output
            conv(mid, w, 1, 1, out_size)
            if in_chs != w or stride != 1:
                conv(in_chs, w, 1, 1, out_size)
            acts += w * out_size * out_size  # residual sum
            in_chs, size = w, out_size
    return {
        "params": int(params),
        "macs": int(macs),
        "activations": int(acts),
        "widths": widths,
        "depths": depths,
        "group_widths": group_ws,
        "groups": groups_per_stage,
    }


# ----------------------------------------------------------------------------------------------------------------
# `seer presets`
# ----------------------------------------------------------------------------------------------------------------
def _fmt_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def presets_table(cfgs: dict[str, RegNetCfg] | None = None, resolution: int = 224) -> str:
    """Markdown table of presets: stage widths, depths, groups, params, GMACs."""
    cfgs = PRESETS if cfgs is None else cfgs
    rows = [f"| preset | widths | depths | groups | params | GMACs@{resolution} |", "|---|---|---|---|---|---|"]
    for name, cfg in cfgs.items():
        c = complexity(cfg, resolution)
        rows.append(
            f"| {name} | {', '.join(map(str, c['widths']))} | {', '.join(map(str, c['depths']))} "
            f"| {', '.join(map(str, c['groups']))} | {_fmt_count(c['params'])} | {c['macs'] / 1e9:.2f} |"
        )
    return "\n".join(rows)


def _parse_cfg_overrides(items: list[str]) -> dict:
    from seer.io import parse_key_values

    fields = {f.name: f.type for f in dataclasses.fields(RegNetCfg)}
    out: dict = {}
    for key, value in parse_key_values(items, what="--cfg", example="depth=13"):
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=2)
            raise ValueError(f"unknown RegNetCfg field {key!r}" + (f" (did you mean {close[0]}?)" if close else ""))
        kind = fields[key] if isinstance(fields[key], str) else fields[key].__name__
        try:
            out[key] = int(value) if kind == "int" else float(value)
        except ValueError:
            raise ValueError(f"RegNetCfg.{key} must be a {kind}, got {value!r}") from None
    return out


def cli_presets(argv: list[str]) -> int:
    """`seer presets [--resolution R] [--cfg depth=.. w0=.. wa=.. wm=.. group_w=..]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="seer presets", description=cli_presets.__doc__)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--cfg", nargs="+", metavar="KEY=VALUE", help="a custom RegNetCfg instead of the presets")
    args = parser.parse_args(argv)
    try:
        cfgs = {"custom": RegNetCfg(**_parse_cfg_overrides(args.cfg))} if args.cfg else None
    except (ValueError, TypeError) as exc:
        print(f"seer presets: {exc}", file=sys.stderr)
        return 2
    print(presets_table(cfgs, args.resolution))
    return 0
