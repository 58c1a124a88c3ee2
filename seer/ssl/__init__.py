"""Self-supervised methods: SwAV (``seer.ssl.swav``)."""

from seer.ssl.swav import SwAV, multicrop_forward, sinkhorn

__all__ = ["SwAV", "multicrop_forward", "sinkhorn"]
