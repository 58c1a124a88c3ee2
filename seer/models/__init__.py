"""Model definitions (torch only)."""

from seer.models.regnet import PRESETS, RegNetCfg, RegNetTrunk, build_trunk, complexity, get_preset

__all__ = ["PRESETS", "RegNetCfg", "RegNetTrunk", "build_trunk", "complexity", "get_preset"]
