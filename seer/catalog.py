"""The recipes and suites shipped with seer, found by name as well as by path.

    resolve("seer_rg32", "pretrain")       # -> .../pretrain/seer_rg32.yaml
    resolve("small", "eval")               # -> .../eval/small.yaml
    resolve("my/own.yaml", "pretrain")     # an existing file is used as is
    available("eval")                      # ["imagenet1k", "inat2018", "places205", "small"]

The yaml files live in the top-level ``configs/<kind>/`` of the source tree; a wheel ships them as the package data
directory ``seer/recipes/<kind>/``. Both places are searched (the wheel's first), so a name works from an installed
wheel, an editable install and a source checkout alike.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

__all__ = ["KINDS", "RecipeNotFoundError", "available", "looks_like_path", "resolve", "search_dirs"]

KINDS = {"pretrain": "pretraining recipe", "finetune": "fine-tuning recipe", "eval": "evaluation suite"}
PACKAGE_DIR = Path(__file__).resolve().parent  # .../seer
_SUFFIXES = (".yaml", ".yml")


class RecipeNotFoundError(FileNotFoundError):
    """Neither an existing file nor a shipped recipe / suite name (the message lists the names).

    ``suggestion`` is the part of the message that says what to type instead ("" when there is nothing to say).
    """

    def __init__(self, message: str, suggestion: str = "") -> None:
        super().__init__(message)
        self.suggestion = suggestion


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")


def search_dirs(kind: str) -> list[Path]:
    """Where shipped files of ``kind`` are looked for, in order: the wheel's package data, then a source checkout."""
    _check_kind(kind)
    return [PACKAGE_DIR / "recipes" / kind, PACKAGE_DIR.parent / "configs" / kind]


def available(kind: str) -> list[str]:
    """The names of the shipped recipes (``kind="pretrain"``) or suites (``kind="eval"``), sorted."""
    names = set()
    for folder in search_dirs(kind):
        if folder.is_dir():
            names.update(p.stem for p in folder.iterdir() if p.suffix in _SUFFIXES and p.is_file())
    return sorted(names)


def looks_like_path(text: str) -> bool:
    """Whether an argument is meant as a path (it has a directory part or a yaml suffix) rather than a name."""
    return os.sep in text or "/" in text or text.startswith((".", "~")) or text.endswith(_SUFFIXES)


def resolve(name_or_path: str | os.PathLike, kind: str = "pretrain") -> Path:
    """The yaml file meant by ``name_or_path``: an existing file first, else a shipped recipe / suite of that name.

    Raises:
        RecipeNotFoundError: (a ``FileNotFoundError``) naming the argument, close matches and the shipped names.
    """
    _check_kind(kind)
    text = os.fspath(name_or_path)
    what = KINDS[kind]
    if not text.strip():
        raise RecipeNotFoundError(f"empty {what} name")
    path = Path(text).expanduser()
    if path.is_file():
        return path
    names = available(kind)
    if path.exists():  # a directory, a socket...: not a yaml file
        raise RecipeNotFoundError(f"{text}: not a {what} file (a directory?)")
    if looks_like_path(text):
        hint = f" (a shipped {what} has that name: pass just {path.stem!r})" if path.stem in names else ""
        raise RecipeNotFoundError(f"{what} file not found: {text}{hint}", hint)
    for folder in search_dirs(kind):
        for suffix in _SUFFIXES:
            candidate = folder / f"{text}{suffix}"
            if candidate.is_file():
                return candidate
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    listing = ", ".join(names) if names else "none found: is the package data installed?"
    raise RecipeNotFoundError(f"{text!r} is neither a file nor a shipped {what}{hint}; shipped: {listing}", hint)
