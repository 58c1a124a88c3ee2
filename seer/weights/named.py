"""The released SEER weights by name: ``seer.load_trunk("seer-rg32")``, ``seer.load_classifier("seer-rg32-in1k")``.

One table, ``NAMED_WEIGHTS``: each name maps to the same weights published in three places (an HF hub repository, a
timm hub repository, a VISSL ``.torch`` URL), with the trunk preset, the preprocessing the name stands for and the
licence. Names are ``seer-rg<size>`` (hyphens): the pretraining recipes are ``seer_rg<size>`` (underscores), and
``seer models`` / the loader's errors say which is which.

Where each fact comes from (all checked offline except where marked):
- timm names, VISSL URLs, licence tag and preprocessing: timm's registry (``timm.get_pretrained_cfg``); the tests
  compare this table with the installed timm.
- RG-256 / RG-10B VISSL URLs and the published parameter counts: VISSL's ``projects/SEER/README.md``; the licence
  text (non-commercial research only): its ``MODEL_LICENSE.md``.
- HF hub ids: transformers' RegNet conversion script (``convert_regnet_to_pytorch.py``, not shipped in the installed
  transformers). Not checked against the hub itself (no network here). That script gives ``regnet-y-2560-seer`` and
  ``-2560-seer-in1k`` ClassyVision's ``regnet_y_256gf`` config, another model than SEER's RG-256, and converts no
  weights for them: seer does not try those two repositories.

Which source is used (``seer.weights.read``): an existing local path of that name always wins; then the local HF
cache (the HF repository, then timm's), with no request made; then a download from the HF hub, then from timm's.
Offline, nothing is downloaded and the error gives the VISSL URL to fetch elsewhere and pass as a file.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cached_property

from seer.models.regnet import complexity
from seer.weights.formats import DEFAULT_PREPROCESS, FINETUNED_PREPROCESS

__all__ = ["NamedWeights", "NAMED_WEIGHTS", "SEER_LICENSE", "SEER_LICENSE_URL", "named_weights", "suggest_name"]

SEER_LICENSE = "SEER licence (non-commercial research only)"
SEER_LICENSE_URL = "https://github.com/facebookresearch/vissl/blob/main/projects/SEER/MODEL_LICENSE.md"
_VISSL = "https://dl.fbaipublicfiles.com/vissl/model_zoo/"
IN1K_CLASSES = 1000


@dataclass(frozen=True)
class NamedWeights:
    """One released SEER checkpoint and where to get it.

    Attributes:
        name: what a user types (``seer-rg32``).
        title: one line saying what it is.
        preset: the trunk architecture (a ``seer.PRESETS`` name); ``load_trunk`` still reads it from the tensors.
        classes: 1000 for the ImageNet-1k fine-tuned classifiers, 0 for the self-supervised feature trunks.
        hf_id: the HF hub repository, or None.
        timm_name: timm's pretrained name (its hub repository is ``timm/<timm_name>``), or None.
        vissl_url: the original VISSL checkpoint.
        published_params: the parameter count VISSL's README gives (more than the trunk's), for reference.
        hf_skip: why ``hf_id`` is not tried, or None.
        note: a caveat shown by ``seer models``.
    """

    name: str
    title: str
    preset: str
    classes: int
    hf_id: str | None
    timm_name: str | None
    vissl_url: str
    published_params: str
    hf_skip: str | None = None
    note: str | None = None

    @property
    def kind(self) -> str:
        """ "classifier" (load it with ``load_classifier`` or ``load_trunk``) or "features" (``load_trunk``)."""
        return "classifier" if self.classes else "features"

    @property
    def preprocess(self) -> dict:
        """The preprocessing this name stands for, whichever source supplied the weights (timm's for these tags)."""
        return dict(FINETUNED_PREPROCESS if self.classes else DEFAULT_PREPROCESS["timm"])

    @property
    def license(self) -> str:
        return SEER_LICENSE

    @cached_property
    def params(self) -> int:
        """Parameters of what ``load_classifier`` (a classifier) or ``load_trunk`` (features) builds."""
        trunk = complexity(self.preset)
        head = trunk["widths"][-1] * self.classes + self.classes if self.classes else 0
        return trunk["params"] + head

    def hub_sources(self) -> list[tuple[str, str]]:
        """``[(label, hub repository id), ...]`` in the order they are tried (HF, then timm)."""
        out = []
        if self.hf_id and not self.hf_skip:
            out.append(("hf", self.hf_id))
        if self.timm_name:
            out.append(("timm", f"timm/{self.timm_name}"))
        return out

    def to_dict(self) -> dict:
        """Everything ``seer models --json`` shows of this entry (without the local-cache state)."""
        return {
            "name": self.name,
            "title": self.title,
            "kind": self.kind,
            "preset": self.preset,
            "params": self.params,
            "fp32_bytes": 4 * self.params,
            "published_params": self.published_params,
            "classes": self.classes,
            "preprocess": self.preprocess,
            "license": self.license,
            "license_url": SEER_LICENSE_URL,
            "hf_id": self.hf_id,
            "hf_tried": bool(self.hf_id and not self.hf_skip),
            "timm_name": self.timm_name,
            "timm_hub_id": f"timm/{self.timm_name}" if self.timm_name else None,
            "vissl_url": self.vissl_url,
            "note": "; ".join(n for n in (self.note, self.hf_skip) if n) or None,
        }


_HF_256 = (
    "HF's {id} is not tried: transformers' conversion script gives it ClassyVision's regnet_y_256gf config, another "
    "model than SEER's RG-256, and converts no weights for it"
)
_NO_TIMM = "timm has no {what}; the preprocessing is timm's for the smaller SEER models"

_ENTRIES = [
    NamedWeights("seer-rg32", "SEER RegNetY-32GF (RG-32), SwAV on 1B Instagram images: features", "regnety_32gf", 0,
                 "facebook/regnet-y-320-seer", "regnety_320.seer",
                 _VISSL + "seer_regnet32d/seer_regnet32gf_model_iteration244000.torch", "156M"),
    NamedWeights("seer-rg64", "SEER RegNetY-64GF (RG-64), SwAV on 1B Instagram images: features", "regnety_64gf", 0,
                 "facebook/regnet-y-640-seer", "regnety_640.seer",
                 _VISSL + "seer_regnet64/seer_regnet64gf_model_final_checkpoint_phase0.torch", "250M"),
    NamedWeights("seer-rg128", "SEER RegNetY-128GF (RG-128), SwAV on 1B Instagram images: features", "regnety_128gf",
                 0, "facebook/regnet-y-1280-seer", "regnety_1280.seer",
                 _VISSL + "swav_ig1b_regnet128Gf_cnstant_bs32_node16_sinkhorn10_proto16k_syncBN64_warmup8k/"
                 "model_final_checkpoint_phase0.torch", "693M"),
    NamedWeights("seer-rg256", "SEER RegNetY-256GF (RG-256), SwAV on 1B Instagram images: features", "regnety_256gf",
                 0, "facebook/regnet-y-2560-seer", None,
                 _VISSL + "swav_ig1b_cosine_rg256gf_noBNhead_wd1e5_fairstore_bs16_node64_sinkhorn10_proto16k_apex_"
                 "syncBN64_warmup8k/model_final_checkpoint_phase0.torch", "1.5B",
                 hf_skip=_HF_256.format(id="facebook/regnet-y-2560-seer"),
                 note=_NO_TIMM.format(what="RG-256 feature weights") + ". Only the VISSL file holds them: download "
                 "it and pass its path"),
    NamedWeights("seer-rg10b", "SEER RegNetY-10B (RG-10B), SwAV on 1B Instagram images: features", "regnety_10b", 0,
                 "facebook/regnet-y-10b-seer", None,
                 _VISSL + "seer_regnet10B/model_iteration124500_conso.torch", "10B",
                 note=_NO_TIMM.format(what="10B weights")),
    NamedWeights("seer-rg32-in1k", "SEER RG-32 fine-tuned on ImageNet-1k (384 px): classifier", "regnety_32gf",
                 IN1K_CLASSES, "facebook/regnet-y-320-seer-in1k", "regnety_320.seer_ft_in1k",
                 _VISSL + "seer_finetuned/seer_regnet32_finetuned_in1k_model_final_checkpoint_phase78.torch", "156M"),
    NamedWeights("seer-rg64-in1k", "SEER RG-64 fine-tuned on ImageNet-1k (384 px): classifier", "regnety_64gf",
                 IN1K_CLASSES, "facebook/regnet-y-640-seer-in1k", "regnety_640.seer_ft_in1k",
                 _VISSL + "seer_finetuned/seer_regnet64_finetuned_in1k_model_final_checkpoint_phase78.torch", "250M"),
    NamedWeights("seer-rg128-in1k", "SEER RG-128 fine-tuned on ImageNet-1k (384 px): classifier", "regnety_128gf",
                 IN1K_CLASSES, "facebook/regnet-y-1280-seer-in1k", "regnety_1280.seer_ft_in1k",
                 _VISSL + "seer_finetuned/seer_regnet128_finetuned_in1k_model_final_checkpoint_phase78.torch", "693M"),
    NamedWeights("seer-rg256-in1k", "SEER RG-256 fine-tuned on ImageNet-1k (384 px): classifier", "regnety_256gf",
                 IN1K_CLASSES, "facebook/regnet-y-2560-seer-in1k", "regnety_2560.seer_ft_in1k",
                 _VISSL + "seer_finetuned/seer_regnet256_finetuned_in1k_model_final_checkpoint_phase38.torch", "1.5B",
                 hf_skip=_HF_256.format(id="facebook/regnet-y-2560-seer-in1k")),
    NamedWeights("seer-rg10b-in1k", "SEER RG-10B fine-tuned on ImageNet-1k (384 px): classifier", "regnety_10b",
                 IN1K_CLASSES, "facebook/regnet-y-10b-seer-in1k", None,
                 _VISSL + "seer_finetuned/seer_10b_finetuned_in1k_model_phase28_conso.torch", "10B",
                 note=_NO_TIMM.format(what="10B weights")),
]  # fmt: skip
NAMED_WEIGHTS: dict[str, NamedWeights] = {e.name: e for e in _ENTRIES}


def named_weights(source: object) -> NamedWeights | None:
    """The table entry ``source`` names, or None (only an exact name: a path or a hub id never matches)."""
    return NAMED_WEIGHTS.get(source) if isinstance(source, str) else None


def suggest_name(text: str) -> str | None:
    """The released-weights name closest to ``text`` (case, ``_`` for ``-``, a typo), or None when none is close."""
    norm = text.strip().lower().replace("_", "-")
    if norm in NAMED_WEIGHTS:
        return norm
    close = difflib.get_close_matches(norm, NAMED_WEIGHTS, n=1, cutoff=0.75)
    return close[0] if close else None
