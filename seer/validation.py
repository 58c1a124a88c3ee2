"""Checks every config section shares; imports nothing from seer, so a section's own ``validate`` can use them.

``seer.config`` assembles the sections (``SwAVConfig`` lives with SwAV, ``SupervisedConfig`` with fine-tuning) and
imports their modules, so a check they share lives here, below all of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["check_numbers"]

_INT64_MAX = 2**63 - 1


def _numbers(node: Any, key: str) -> Any:
    """(dotted key, value) of every number in a config (sub)tree: dataclass fields, dict and list entries."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            yield from _numbers(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{key}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, node


def check_numbers(node: Any, prefix: str = "", *, error: type[Exception] = ValueError) -> None:
    """Reject a NaN or infinite float, or an integer beyond 64 bits, anywhere in a config (sub)tree.

    The values are walked, not a list of keys: every dataclass field (``optim.weight_decay``) and every dict or list
    entry (``model.cfg``'s ``wa``), so a setting added later is covered without being listed. A NaN slips through
    every range check (``nan < 0`` is false): NaN weight decay trained NaN weights that exported as all-zero
    features, a NaN ``optim.clip_grad`` turned clipping off. ``prefix`` is the dotted key of ``node``.

    Raises:
        error (``ValueError`` by default): naming the dotted key (``optim.weight_decay=nan: must be a finite number``).
    """
    for key, value in _numbers(node, prefix.rstrip(".")):
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{key}={value}: must be a finite number")
        if isinstance(value, int) and not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            raise error(f"{key}: must fit in a signed 64-bit integer, got a {value.bit_length()}-bit integer")
