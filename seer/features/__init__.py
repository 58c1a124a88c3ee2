"""Features of any images with any SEER checkpoint: in memory (``extract_features``) or on disk (``extract_dataset``).

``memory`` is ``extract_features``; ``dataset`` is ``extract_dataset`` (chunked, resumable, rank-sharded) and
``merge_features``; ``files`` the on-disk layout with its writers and ``load_feature_file``; ``inputs`` turns inputs
of every kind into decoded batches and ``runner`` batches into pooled features through the trunk's feature API;
``cli`` is `seer extract`. Decoding and preprocessing are ``seer.data.images``.
"""

from seer.data.images import Preprocess, load_image
from seer.features.cli import cli_main
from seer.features.dataset import extract_dataset, merge_features
from seer.features.files import load_feature_file
from seer.features.inputs import ImageError
from seer.features.memory import FeatureArray, extract_features
from seer.features.runner import DEFAULT_MODEL, pool, pooled_features
from seer.features.runner import LAYERS as LAYERS

__all__ = [
    "DEFAULT_MODEL",
    "Preprocess",
    "FeatureArray",
    "ImageError",
    "extract_features",
    "extract_dataset",
    "merge_features",
    "load_feature_file",
    "load_image",
    "pool",
    "pooled_features",
    "cli_main",
]
