"""Caps on what one untrusted file may cost: bytes read, tar member size, decoded-image memory.

A shard or a folder from a stranger can hold a sparse tar member that expands to GiBs, a FIFO or a ``/dev/zero``
link named ``.jpg``, or a small PNG that decodes to GiBs. Every reader in ``seer.data`` asks ``read_limits()`` for
its caps. A sample over a cap is skipped and counted as bad, like any other bad sample; a single file given by
name gets an error naming it. The defaults are documented in docs/data.md and can be changed per process with
environment variables (``SEER_MAX_FILE_MB``, ``SEER_MAX_MEMBER_MB``, ``SEER_MAX_IMAGE_MB``) or for a block of
code with ``limits(...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

__all__ = ["ReadLimits", "read_limits", "limits", "DEFAULT_LIMITS"]

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """Per-item caps, in bytes.

    max_file_bytes: one image file read from disk (regular files only).
    max_member_bytes: one member of a tar shard (its declared size, checked before it is read).
    max_image_bytes: the memory one decoded image may take at any point of its decoding and conversion to RGB.
    """

    max_file_bytes: int = 64 * MiB
    max_member_bytes: int = 64 * MiB
    max_image_bytes: int = 1024 * MiB

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"read limit {f.name} must be a positive integer number of bytes, got {v!r}")


DEFAULT_LIMITS = ReadLimits()
_ENV = {
    "max_file_bytes": "SEER_MAX_FILE_MB",
    "max_member_bytes": "SEER_MAX_MEMBER_MB",
    "max_image_bytes": "SEER_MAX_IMAGE_MB",
}
_override: list[ReadLimits] = []


def read_limits() -> ReadLimits:
    """The caps in force: an enclosing ``limits(...)`` block, else the environment, else the defaults."""
    if _override:
        return _override[-1]
    values = {}
    for name, var in _ENV.items():
        text = os.environ.get(var)
        if text is None or not text.strip():
            continue
        try:
            mb = float(text)
        except ValueError:
            raise ValueError(f"environment variable {var}={text!r} is not a number of MiB") from None
        if not (mb > 0 and mb != float("inf")):
            raise ValueError(f"environment variable {var}={text!r} must be a positive, finite number of MiB")
        values[name] = max(1, int(mb * MiB))
    return dataclasses.replace(DEFAULT_LIMITS, **values) if values else DEFAULT_LIMITS


@contextlib.contextmanager
def limits(**caps: int) -> Iterator[ReadLimits]:
    """Use other caps (bytes) inside the block, in this process: ``with limits(max_file_bytes=256 << 20): ...``."""
    current = dataclasses.replace(read_limits(), **caps)
    _override.append(current)
    try:
        yield current
    finally:
        _override.pop()
