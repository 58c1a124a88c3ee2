"""Self-supervised methods, one module each: SwAV (``seer.ssl.swav``)."""

from seer.ssl.swav import SwAV, SwAVConfig, SwAVModel, multicrop_forward, sinkhorn

__all__ = ["SwAV", "SwAVConfig", "SwAVModel", "multicrop_forward", "sinkhorn"]
