"""Where an export may be written: the one check ``save_trunk``, ``export_onnx`` and ``seer export`` run first.

It lives apart from ``save.py`` so that the ONNX exporter, which ``save_trunk`` imports lazily, can run it too
without an import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from seer.io import OutputDirError, prepare_output_dir

__all__ = ["check_export_target", "HF_EXPORT_KIND", "HF_EXPORT_FILES"]

HF_EXPORT_KIND = "export-hf"  # the output marker's kind of an HF export directory (seer.io.prepare_output_dir)
HF_EXPORT_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")


def check_export_target(path: str | os.PathLike, format: str, *, overwrite: bool = False,
                        sources: Iterable[str | os.PathLike] = (), flag: str = "overwrite=True") -> str:  # fmt: skip
    """Check, before any work, that ``save_trunk(..., format=format)`` may write ``path``; raises ``OutputDirError``.

    "hf" writes a directory: new, empty, or a previous seer HF export (replaced); another non-empty directory only
    with ``overwrite`` (seer's files are written into it, other files are left alone); never a directory that holds
    one of ``sources`` (the checkpoint being exported). Other formats write one file, which replaces an existing
    file of that name, never a directory, and never a file inside a source directory. Returns
    ``prepare_output_dir``'s state for "hf", ``"file"`` otherwise.
    """
    path = Path(path).expanduser()
    if format == "hf":
        return prepare_output_dir(path, kind=HF_EXPORT_KIND, overwrite=overwrite, sources=sources,
                                  what="HF export directory", flag=flag)  # fmt: skip
    targets = [path] + ([path.with_name(path.name + ".data")] if format == "onnx" else [])  # ONNX external data
    for target in targets:
        if target.is_dir():
            raise OutputDirError(f"output {str(target)!r} is a directory; --format {format} writes a file")
        for src in sources:
            src_path = Path(src).expanduser().resolve()
            if target.resolve() == src_path or (src_path.is_dir() and target.resolve().is_relative_to(src_path)):
                raise OutputDirError(f"output {str(target)!r} is inside the checkpoint being read ({src}); choose "
                                     "another path")  # fmt: skip
    return "file"
