"""Small file and argument helpers every part of seer shares: atomic writes and ``key=value`` parsing.

An interrupted write never leaves a half-written file under the final name: data goes to a temporary file in the
same directory (same filesystem, so the rename is atomic), which replaces the target only once it is complete.
``atomic_dir`` does the same for a directory of files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_path", "atomic_dir", "parse_key_values"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path``: write to it inside the block; on success it replaces ``path`` atomically,
    on any error it is removed and ``path`` is untouched. Works for files written by other libraries."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO[Any]], None], *,
                 binary: bool | None = None) -> Path:  # fmt: skip
    """Write ``data`` (text, bytes, or a function that writes to the open file) to ``path`` atomically."""
    path = Path(path)
    binary = isinstance(data, bytes) if binary is None else binary
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary directory beside ``path``: fill it inside the block; on success it replaces ``path`` (an existing
    directory is moved aside whole, then deleted), on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_key_values(items: Iterable[str], *, what: str, example: str = "key=value") -> list[tuple[str, str]]:
    """``["a.b=1", "c=x"]`` -> ``[("a.b", "1"), ("c", "x")]``; raises ValueError naming ``what`` and the item."""
    out = []
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"{what} {item!r} is not of the form key=value (e.g. {example})")
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"{what} {item!r} has an empty key")
        out.append((key, value))
    return out
