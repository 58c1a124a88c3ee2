"""``classify`` and `seer classify`: labels and probabilities of images with a classifier checkpoint.

Inputs go through ``extract_features``'s own handling (paths, folders, PIL images, arrays, ``on_error``): the
classifier's logits are its "features". The command line adds CSV/TXT file lists and webdataset shards, whose samples
are read in shard order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from seer.data.sources import IMAGE_MEMBER_KEYS, resolve_source
from seer.features.inputs import ImageError, as_items, unpack
from seer.features.memory import extract_features
from seer.models.classifier import RegNetClassifier

__all__ = ["classify", "expand_inputs", "cli_main"]


def _as_classifier(model: Any, device: Any) -> RegNetClassifier:
    if isinstance(model, RegNetClassifier):
        return model
    if isinstance(model, torch.nn.Module):
        raise TypeError(f"classify needs a classifier (trunk + head, seer.load_classifier), got {type(model).__name__}")
    from seer.weights import load_classifier

    return load_classifier(model, device=device)


def classify(images: Any, model: Any, *, top_k: int = 5, batch_size: int | None = None, device: Any = None,
             on_error: str = "raise", progress: bool | None = None, amp: str | None = None) -> list[dict]:  # fmt: skip
    """The ``top_k`` labels and probabilities of each image, in input order.

    Args:
        images: anything ``extract_features`` takes (paths, a folder, PIL images, arrays, tensors, a Dataset).
        model: a ``RegNetClassifier`` or any source ``seer.load_classifier`` reads (HF directory or hub id, timm,
            torchvision, VISSL or seer checkpoint with its head).
        top_k: labels per image (at most the number of classes).
        on_error: "raise" (an unreadable image raises ``ImageError`` naming it) or "skip" (its entry has an
            ``"error"`` instead of labels).

    Returns:
        One dict per input: ``{"index", "input", "labels": [...], "probs": [...], "class_ids": [...]}`` (best first),
        or ``{"index", "input", "error"}`` for a skipped image.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    clf = _as_classifier(model, device)
    items, iterable = as_items(images)
    if items is None:
        items = list(iterable)
    # shard samples already found bad (a member over the size cap) are never decoded: they fail like an unreadable
    # image, with their own reason
    bad = {i: it.error for i, it in enumerate(items) if isinstance(it, _Named) and it.error is not None}
    if bad and on_error == "raise":
        i = min(bad)
        raise ImageError(f"{_name(items, i)}: {bad[i]}")
    good = [i for i in range(len(items)) if i not in bad]
    sub = [items[i] for i in good] if bad else items
    if good:
        logits = extract_features(sub, clf, batch_size=batch_size, device=device, on_error=on_error,
                                  progress=progress, amp=amp)  # fmt: skip
    else:
        logits = np.zeros((0, clf.n_classes), dtype=np.float32)
    kept = getattr(logits, "indices", None)
    kept = [good[i] for i in (range(len(logits)) if kept is None else kept)]
    probs = torch.from_numpy(np.asarray(logits, dtype=np.float32)).softmax(-1)
    k = min(top_k, clf.n_classes)
    top = probs.topk(k, dim=-1) if len(kept) else None
    out: list[dict] = [{} for _ in range(len(items))]
    for row, pos in enumerate(kept):
        ids = [int(i) for i in top.indices[row]]
        out[pos] = {"index": pos, "input": _name(items, pos), "labels": [clf.id2label[i] for i in ids],
                    "probs": [float(p) for p in top.values[row]], "class_ids": ids}  # fmt: skip
    for skip in getattr(logits, "skipped", []):
        pos = good[skip["index"]]
        out[pos] = {"index": pos, "input": _name(items, pos), "error": skip["error"]}
    for pos, error in bad.items():
        out[pos] = {"index": pos, "input": _name(items, pos), "error": error}
    return out


def _name(items: Sequence, pos: int) -> str:
    item = unpack(items[pos])[0]
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, _Named):
        return item.name
    return f"#{pos}"


class _Named(bytes):
    """Encoded image bytes that remember where they came from (``shard.tar:key``); ``error`` (no bytes) marks a
    sample that was not read, such as one with a member over the size cap."""

    name: str
    error: str | None

    def __new__(cls, data: bytes, name: str = "", error: str | None = None) -> _Named:
        obj = super().__new__(cls, data)
        obj.name, obj.error = name, error
        return obj

    def __reduce__(self) -> tuple:  # into DataLoader workers with the name
        return (_Named, (bytes(self), self.name, self.error))


def _shard_images(url: str) -> list[_Named]:
    """The image of each sample of a tar shard, in shard order (``key.jpg`` / ``.png`` / ... members), read like the
    shard loaders read it: through ``open_shard`` (a listed file is never run as a ``pipe:`` command; only regular
    files are read) and within the member cap (``seer.data.limits``)."""
    from seer.data.shards.read import OversizedMember, SkipLog, shard_samples

    skips = SkipLog(warn_first=0, warn_every_s=float("inf"))  # problems are reported below, not as warnings
    out: list[_Named] = []
    for sample in shard_samples(url, skips):
        name = f"{url}:{sample['__key__']}"
        oversized = next((v for v in sample.values() if isinstance(v, OversizedMember)), None)
        image_key = next((k for k in IMAGE_MEMBER_KEYS if k in sample), None)
        if oversized is not None:
            out.append(_Named(b"", name, f"oversized_member: {oversized}"))
        elif image_key is not None:
            out.append(_Named(bytes(sample[image_key]), name))
    problems = skips.drain()
    if problems:  # an unreadable, truncated or empty shard: an error, rather than a silently shorter output
        p = problems[0]
        raise ValueError(f"{url}: {p['kind']}: {p['error']}")
    if not out:
        raise ValueError(f"{url}: no image members ({', '.join(IMAGE_MEMBER_KEYS)}) in this shard")
    return out


def expand_inputs(inputs: Sequence[str]) -> list:
    """Command-line inputs -> images in order: image files as given, folders (recursively, sorted), CSV/TXT file
    lists (their paths), webdataset shards (``.tar``, brace patterns: each sample's image)."""
    from seer.features.dataset import _is_shards

    items: list = []
    for arg in inputs:
        if os.path.isdir(arg) or arg.lower().endswith((".csv", ".tsv", ".txt", ".lst", ".list")):
            items += [path for path, _ in resolve_source(arg).items]
        elif _is_shards(arg):
            from seer.data.shards.read import expand_urls

            for url in expand_urls(arg):
                items += _shard_images(url)
        else:
            items.append(arg)  # an image file; a missing one is reported by on_error like any unreadable image
    if not items:
        raise ValueError("seer classify: no images in the inputs")
    return items


def cli_main(argv: Sequence[str] | None = None) -> int:
    """`seer classify IMAGES... --model SRC [--top-k 5]`: labels and probabilities, one line per image."""
    p = argparse.ArgumentParser(
        prog="seer classify",
        description="Classify images with a classifier checkpoint (HF RegNetForImageClassification directory or hub "
        "id, timm / torchvision / VISSL checkpoint with its head, a seer finetune run or export). Prints one line per "
        "image, in input order: the input, then the top-k labels with their probabilities.",
    )
    p.add_argument("images", nargs="+", help="image files, folders, .csv/.txt file lists, or shards (.tar, braces)")
    p.add_argument(
        "--model",
        required=True,
        help="classifier checkpoint path, run directory, HF hub id, or fine-tuned SEER weights by name "
        "(seer-rg32-in1k ...: `seer models` lists them)",
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16"])
    p.add_argument("--on-error", default="skip", choices=["skip", "raise"], help="unreadable images")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = p.parse_args(argv)
    from seer.weights import CheckpointError

    try:
        items = expand_inputs(args.images)
        results = classify(items, args.model, top_k=args.top_k, batch_size=args.batch_size, device=args.device,
                           on_error=args.on_error, amp=args.amp)  # fmt: skip
    except (CheckpointError, ImageError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"seer classify: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for r in results:
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"{r['input']}\tERROR {r['error']}")
        else:
            print(f"{r['input']}\t" + "  ".join(f"{lab} ({p:.3f})" for lab, p in zip(r["labels"], r["probs"])))
        failed += "error" in r
    if failed:
        print(f"seer classify: {failed} of {len(results)} image(s) could not be read", file=sys.stderr)
    return 1 if failed == len(results) else 0
