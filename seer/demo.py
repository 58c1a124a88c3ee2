"""`seer demo` / `make demo`: the most complete main job available.

Until the end-to-end pipeline lands this prints the preset table (widths, depths, params, GMACs).
"""

from __future__ import annotations


def cli_main(argv: list[str]) -> int:
    from seer.models.regnet import cli_presets

    return cli_presets(argv)
