"""`seer config show RECIPE [key=value ...]`: every config key, its resolved value and its doc.

    seer config show tiny_cpu                       # the pretraining recipe, resolved, with the doc of each key
    seer config show tiny_cpu --kind finetune data.images=DIR
    seer config show seer_rg32 optim.base_lr=0.1 --yaml > my.yaml   # a plain yaml file, a recipe of its own

A key's doc is the comment beside its field, or the comment lines right above it, in the dataclass that declares
it (``seer/config.py``; the method sections ``SwAVConfig`` in ``seer/ssl/swav.py`` and ``SupervisedConfig`` in
``seer/train/supervised.py``). They are read from the installed modules' source with ``inspect`` + ``tokenize``, so
the doc is the code's own comment, never a copy that drifts, and a wheel's sources suffice. A key without a comment
shows no doc; its section's docstring heads the section.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import math
import re
import shutil
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["KeyDoc", "field_comments", "key_docs", "section_docs", "format_config", "cli_main"]

# tool directives, not prose
_DIRECTIVE = re.compile(r"^(fmt:|noqa|type:|pragma|ruff:)")
# wrap docs only at spaces: "AVX512-BW", paths and key names stay whole
_NO_SPLIT = {"break_on_hyphens": False, "break_long_words": False}


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key of the config tree."""

    key: str  # dotted, as overrides name it: "optim.base_lr"
    annotation: str  # as written in the source: "float", "dict | None"
    default: Any
    doc: str  # "" when the field has no comment


@functools.cache
def field_comments(cls: type) -> dict[str, tuple[str, str]]:
    """Field name -> (annotation as written, its comment) of a dataclass, from its source.

    The comment is the block of whole-line comments right above the field (no blank line between) followed by the
    comment at the end of the field's own line(s); tool directives (``# fmt: skip``, ``# noqa``) are left out. An
    install without sources (bytecode only) has no comments to read: every doc is then "".
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}  # row -> text
    whole_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start
        text = tok.string.lstrip("#").strip()
        if _DIRECTIVE.match(text):
            continue
        comments[row] = text
        if not lines[row - 1][:col].strip():
            whole_line.add(row)
    classdef = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef))
    out = {}
    for node in classdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in whole_line:
            above.insert(0, comments[row])
            row -= 1
        inline = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments and r not in whole_line]
        out[node.target.id] = (ast.unparse(node.annotation), " ".join(above + inline))
    return out


def _sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """``[("", PretrainConfig), ("model.", ModelConfig), ..., ("train.fsdp.", FSDPConfig)]`` in declaration order."""
    out = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _sections(hints[f.name], f"{prefix}{f.name}.")
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def key_docs(root: type | None = None) -> list[KeyDoc]:
    """Every leaf key of the config tree (``seer.config.PretrainConfig`` by default) with its doc, in source order."""
    if root is None:
        from seer.config import PretrainConfig as root
    out = []
    for prefix, cls in _sections(root):
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            annotation, doc = comments.get(f.name, (str(hints[f.name]), ""))
            out.append(KeyDoc(f"{prefix}{f.name}", annotation, _default_of(f), doc))
    return out


def section_docs(root: type | None = None) -> dict[str, str]:
    """Section (``"model"``, ``"train.fsdp"``; ``""`` for the top level) -> the first paragraph of its docstring."""
    if root is None:
        from seer.config import PretrainConfig as root
    out = {}
    for prefix, cls in _sections(root):
        doc = inspect.getdoc(cls) or ""
        out[prefix.rstrip(".")] = " ".join(doc.split("\n\n")[0].split()).replace("``", "`")
    return out


def _value(v: Any) -> str:
    """A value as an override would spell it: yaml flow style (``null``, ``true``, ``[512, 128]``, ``{depth: 4}``)."""
    if isinstance(v, float) and math.isfinite(v):
        return repr(v)  # yaml would write 1.0e-06; repr is what a user types
    text = yaml.safe_dump(v, default_flow_style=True, width=math.inf, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def format_config(cfg: Any, *, width: int = 100, unused: typing.Iterable[str] = ()) -> str:
    """The text `seer config show` prints: per section its docstring, then each key's type, resolved value (with the
    default where it differs) and doc. Sections named in ``unused`` are marked as such."""
    docs, sections = key_docs(type(cfg)), section_docs(type(cfg))
    indent = " " * 6
    out: list[str] = []
    current = None
    for kd in docs:
        section = kd.key.rpartition(".")[0]
        if section != current:
            current = section
            head = f"{section}{' (not used by this method)' if section in unused else ''}: " if section else ""
            title = f"{head}{sections.get(section, '')}"
            out += ["", textwrap.fill(title, width, subsequent_indent="    ", **_NO_SPLIT)]
        value = _get(cfg, kd.key)
        line = f"  {kd.key}: {kd.annotation} = {_value(value)}"
        if value != kd.default:
            line += f"   (default {_value(kd.default)})"
        out.append(line)
        if kd.doc:
            out.append(textwrap.fill(kd.doc, width, initial_indent=indent, subsequent_indent=indent, **_NO_SPLIT))
    return "\n".join(out).lstrip("\n") + "\n"


def _pick_kind(recipe: str | None, kind: str | None) -> str:
    """The kind of recipe ``recipe`` names: ``--kind``, else finetune for a name only fine-tuning recipes have;
    a name only the other kind has is that kind's (``load_config`` falls back to it too)."""
    from seer.catalog import available, looks_like_path

    if recipe is None or looks_like_path(recipe):
        return kind or "pretrain"
    kind = kind or "pretrain"
    other = "finetune" if kind == "pretrain" else "pretrain"
    return other if recipe not in available(kind) and recipe in available(other) else kind


def _options_first(args: list[str]) -> list[str]:
    """``RECIPE --kind finetune k=v`` -> ``--kind finetune RECIPE k=v``: argparse reads positionals in one run, so
    an override after a flag would be left over. (Overrides never start with "-".)"""
    options, positionals = [], []
    it = iter(args)
    for arg in it:
        if arg == "--kind":  # and its value, if any (argparse names a missing one)
            options.append(arg)
            value = next(it, None)
            if value is not None:
                options.append(value)
        elif arg.startswith("-"):
            options.append(arg)
        else:
            positionals.append(arg)
    return options + positionals


def cli_main(argv: list[str] | None = None) -> int:
    """`seer config show [RECIPE] [key=value ...] [--kind pretrain|finetune] [--yaml]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    actions = {"show": "print a recipe resolved: every key, its type, value and doc (--yaml: a plain yaml file)"}
    if not argv or argv[0] not in actions:
        usage = "usage: seer config show [RECIPE] [key=value ...] [--kind pretrain|finetune] [--yaml]"
        listing = "\n".join(f"  {name}  {text}" for name, text in actions.items())
        if argv and argv[0] in ("-h", "--help"):
            print(f"{usage}\n\nactions:\n{listing}")
            return 0
        got = f"unknown action {argv[0]!r}" if argv else "an action is required"
        print(f"seer config: {got}\n{usage}\n\nactions:\n{listing}", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(
        prog="seer config show",
        description="Print a recipe resolved with its overrides: every config key, its type, value (and the default "
        "where it differs) and the doc from the source. Without RECIPE: the defaults in code.",
    )
    ap.add_argument("recipe", nargs="?", help="a shipped recipe's name (tiny_cpu, seer_rg32, ...) or a yaml file")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=0.1 train.total_steps=100")
    ap.add_argument(
        "--kind",
        choices=("pretrain", "finetune"),
        default=None,
        help="which recipes RECIPE names (default: finetune for names only finetune recipes have)",
    )
    ap.add_argument("--yaml", action="store_true", help="print a plain yaml dump (a config file of its own)")
    args = ap.parse_args(_options_first(argv[1:]))

    from seer.catalog import available
    from seer.config import ConfigError, config_to_dict, load_config, resolve_recipe, validate
    from seer.train.methods import METHODS

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # `seer config show optim.base_lr=0.1`: the defaults, overridden
        recipe, overrides = None, [recipe, *overrides]
    kind = _pick_kind(recipe, args.kind)
    try:
        cfg = load_config(recipe, overrides, kind=kind, check=False)
        path = resolve_recipe(recipe, kind) if recipe is not None else None
    except (ConfigError, FileNotFoundError) as exc:  # unknown key, wrong type, no such recipe
        print(f"seer config show: {exc}", file=sys.stderr)
        return 2
    try:
        validate(cfg)
        problem = None
    except ConfigError as exc:
        problem = str(exc)

    if args.yaml:
        sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    else:
        other = "pretrain" if kind == "finetune" else "finetune"
        if path is None:
            title = "the defaults in code (seer/config.py)"
        elif recipe not in available(kind):
            title = f"config file {path}"
        else:
            title = f"{recipe} ({'fine-tuning' if kind == 'finetune' else 'pretraining'} recipe {path})"
            if args.kind is None and recipe in available(other):
                title += f"; a {other} recipe has this name too: --kind {other}"
        if overrides:
            title += f" with {' '.join(overrides)}"
        width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
        unused = [m for m in METHODS if m != cfg.method]
        print(textwrap.fill(f"# {title}", width, subsequent_indent="#   "))
        print("# key: type = value (default where it differs); `--yaml` for a plain yaml file\n")
        sys.stdout.write(format_config(cfg, width=width, unused=unused))
    if problem is not None:
        print(f"seer config show: note: this config does not run as it stands: {problem}", file=sys.stderr)
    return 0
