"""Small file and argument helpers every part of seer shares: atomic writes, output directories, ``key=value``.

An interrupted write never leaves a half-written file under the final name: data goes to a temporary file in the
same directory (same filesystem, so the rename is atomic), which replaces the target only once it is complete.
``atomic_dir`` does the same for a directory of files. Both honour the umask, as ``open()`` and ``mkdir()`` do
(``tempfile`` alone would leave 0600 files and 0700 directories that a user's group cannot read).

``prepare_output_dir`` is the one rule for every command that writes into a directory the user names: seer writes
into a new or empty directory, or one that holds a previous seer output of the same kind (marked by
``.seer-output.json``); anything else is refused unless the user says ``overwrite``, and a directory that contains
the command's own source is never replaced or cleared.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "OUTPUT_MARKER",
    "OutputDirError",
    "atomic_write",
    "atomic_path",
    "atomic_dir",
    "claim_output_files",
    "clear_output_dir",
    "current_umask",
    "honour_umask",
    "mark_output_dir",
    "prepare_output_dir",
    "parse_key_values",
]


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, *, directory: bool | None = None) -> None:
    """Give a file made by ``tempfile`` (0600 / 0700) the mode ``open()`` / ``mkdir()`` would have given it."""
    directory = os.path.isdir(path) if directory is None else directory
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path``: write to it inside the block; on success it replaces ``path`` atomically,
    on any error it is removed and ``path`` is untouched. Works for files written by other libraries."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        honour_umask(tmp, directory=False)
        yield Path(tmp)
        # Again: a library may replace the file it was given with its own (safetensors' save_file leaves 0600).
        honour_umask(tmp, directory=False)
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
        honour_umask(tmp, directory=True)
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


# ====================================================================================================================
# Output directories

OUTPUT_MARKER = ".seer-output.json"


class OutputDirError(FileExistsError):
    """seer refused to write into (or replace, or clear) a directory the user named; nothing was changed."""


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads((path / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def prepare_output_dir(
    path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool = False,
    sources: Iterable[str | os.PathLike] = (),
    what: str = "output directory",
    flag: str | None = "overwrite=True",
) -> str:
    """Check that seer may write output of ``kind`` into the directory ``path``, before any work starts.

    Returns the directory's state: ``"new"`` (absent), ``"empty"``, ``"own"`` (a previous seer output of the same
    ``kind`` holding only the files its marker lists, or any files when the marker lists none: the caller may
    replace or clear it) or ``"foreign"`` (other files, accepted only with ``overwrite``: the caller writes its own
    files into it and must not delete anything else). Raises ``OutputDirError`` naming the directory and what it
    holds otherwise, and always when the directory is, or contains, one of ``sources`` (the files the command reads).
    ``flag`` names the option that gives ``overwrite`` in the message, as the caller spells it (a command passes
    ``"--overwrite"``; ``None``: it has none, and the message only asks for another directory). Creates nothing.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{what} {str(path)!r} exists and is not a directory")
    resolved = path.resolve()
    for src in sources:
        src_path = Path(src).expanduser().resolve()
        if _inside(src_path, resolved):
            raise OutputDirError(
                f"{what} {str(path)!r} contains the source {str(src)!r}: writing there would replace or clear what "
                f"is being read; choose another directory"
            )
    if not path.exists():
        return "new"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "empty"
    marker = _read_marker(path)
    if marker is not None and marker["kind"] == kind:
        listed = marker.get("files")
        if listed is None or set(names) <= {OUTPUT_MARKER, *map(str, listed)}:
            return "own"
    if overwrite:
        return "foreign"
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    held = f"a seer {marker['kind']} output" if marker is not None else "files seer did not write"
    fix = f", or pass {flag} to write this {kind} output into it (other files are left alone)" if flag else ""
    raise OutputDirError(
        f"{what} {str(path)!r} is not empty and holds {held} ({shown}); choose a new or empty directory{fix}"
    )


def mark_output_dir(path: str | os.PathLike, kind: str, files: Iterable[str] | None = None, **extra: Any) -> Path:
    """Write the marker that makes ``path`` a seer output of ``kind`` (``files``: the names it owns; ``None``: all)."""
    marker = {"kind": kind, "files": None if files is None else sorted(set(files) - {OUTPUT_MARKER}), **extra}
    return atomic_write(Path(path) / OUTPUT_MARKER, json.dumps(marker, indent=1) + "\n")


def claim_output_files(path: str | os.PathLike, kind: str, files: Iterable[str]) -> Path | None:
    """Record ``files`` as seer's output of ``kind`` in a directory that holds other files too (``"foreign"``).

    The marker is created when there is none, and merged with a marker of the same ``kind``, so a later
    ``clear_output_dir`` removes seer's files and only those. A marker of another kind is left alone (that output
    stays recognisable; the directory is then "own" for neither command). Returns the marker's path, or ``None``
    where it was left alone.
    """
    path = Path(path)
    marker = _read_marker(path)
    if marker is None:
        return mark_output_dir(path, kind, files)
    if marker["kind"] != kind:
        return None
    listed = marker.get("files")
    if listed is None:  # already the whole directory
        return path / OUTPUT_MARKER
    extra = {k: v for k, v in marker.items() if k not in ("kind", "files")}
    return mark_output_dir(path, kind, {*map(str, listed), *files}, **extra)


def clear_output_dir(path: str | os.PathLike, kind: str, *, first: Iterable[str] = ()) -> list[str]:
    """Remove what a previous seer output of ``kind`` in ``path`` owns: the names its marker lists (every entry when
    it lists none), ``first`` of them first, the marker last (an interrupted clear still reads as seer's output).

    Nothing else is touched: without a marker, or with one of another kind, nothing is removed. Returns the removed
    names.
    """
    path = Path(path)
    marker = _read_marker(path)
    if marker is None or marker["kind"] != kind:
        return []
    listed = marker.get("files")
    present = {p.name for p in path.iterdir()} - {OUTPUT_MARKER}
    names = present if listed is None else present & set(map(str, listed))
    first = [n for n in first if n in names]
    order = first + sorted(names - set(first))
    for name in order:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    (path / OUTPUT_MARKER).unlink(missing_ok=True)
    return order


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
