"""Checkpoint formats in and out: ours, HF transformers, timm, torchvision and VISSL / ClassyVision.

``formats`` holds one key-renaming table per layout (``LAYOUTS``), the conversion to our names and the architecture
inferred from tensor shapes; ``read`` reads files, HF directories and hub snapshots, timm directories, VISSL
checkpoints and pretraining run directories without copying tensors; ``load`` builds the trunk from them (strict,
the weights held once in memory); ``save`` writes them back atomically; ``cli`` is `seer export`.
"""

from seer.data.images import IMAGENET_MEAN as IMAGENET_MEAN
from seer.data.images import IMAGENET_STD as IMAGENET_STD
from seer.weights.formats import DEFAULT_PREPROCESS as DEFAULT_PREPROCESS
from seer.weights.formats import FINETUNED_PREPROCESS as FINETUNED_PREPROCESS
from seer.weights.formats import LAYOUTS, Checkpoint, CheckpointError, convert_state_dict, infer_cfg
from seer.weights.formats import Layout as Layout
from seer.weights.formats import detect_layout as detect_layout
from seer.weights.formats import timm_preprocess as timm_preprocess
from seer.weights.load import load_classifier, load_trunk
from seer.weights.read import DEFAULT_HUB_MODEL, read_checkpoint
from seer.weights.save import save_trunk

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "LAYOUTS",
    "DEFAULT_HUB_MODEL",
    "load_trunk",
    "load_classifier",
    "save_trunk",
    "read_checkpoint",
    "infer_cfg",
    "convert_state_dict",
]
