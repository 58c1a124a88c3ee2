"""Every fenced block of README.md and docs/*.md, and how tests/test_docs.py checks it.

The reviewed list is ``tests/docs_blocks.yaml``: one entry per block, keyed by file and block id (the block's
heading, slugged, and its index under that heading), holding the sha of the block's text (an edited block must be
reviewed again) and what to do with it:

- ``run``: run the block as written, on the test's stand-in data (``sub`` replaces paths and sizes; ``{name}``
  in a replacement is a stand-in path); shell commands run in-process through their entry point (``seer.cli.main``
  for ``seer``), Python blocks are executed;
- ``dry-run``: run the command with ``--dry-run`` appended: it must succeed and write nothing;
- ``check``: what needs GPUs, many nodes, a hub download or ImageNet: the command is parsed by its real argparse
  parser (every ``--flag`` must exist, spelled out), ``key=value`` overrides must load with ``seer.config``,
  recipe and suite names must resolve through ``seer.catalog``, ``--set`` names must be the suite's ``${VARS}``;
  Python blocks are compiled and every ``seer.*`` name (and keyword argument of a seer function) must exist;
- ``skip``: not a command (sample output, a directory tree), with the reason.

A block of several commands gives one entry per command under ``commands:``. ``python tests/doccheck.py`` prints
an entry to paste for every block that is new or changed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import io
import os
import re
import reprlib
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LIST_FILE = Path(__file__).resolve().parent / "docs_blocks.yaml"
KINDS = ("run", "dry-run", "check", "skip")
# Programs a doc names that are not this project's: SLURM's, the shell's. Nothing of theirs can be checked here.
EXTERNAL = {"squeue", "scancel", "scontrol", "sinfo", "sbatch", "export", "cat", "nproc", "lscpu"}
# Module roots a Python block may use without importing them (earlier blocks of the page import them).
IMPLICIT_ROOTS = {"seer": "seer", "torch": "torch", "np": "numpy", "transformers": "transformers", "timm": "timm"}


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Block:
    file: str  # relative to the repository
    id: str  # heading slug + "/" + index under that heading (1-based)
    line: int  # of the opening fence
    lang: str  # the fence's info string ("" for none)
    text: str

    @property
    def sha(self) -> str:
        return sha_of(self.text)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line} ({self.id})"


def sha_of(text: str) -> str:
    return hashlib.sha256(text.strip().encode()).hexdigest()[:12]


def doc_files() -> list[str]:
    return ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))


def slugify(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r" ", "-", text)


_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def extract_blocks(rel: str, text: str | None = None) -> list[Block]:
    """The fenced code blocks of one markdown file (``text``, or the file ``rel`` of the repository), in order."""
    lines = (REPO / rel).read_text(encoding="utf-8").splitlines() if text is None else text.splitlines()
    blocks: list[Block] = []
    heading, counts = "top", {}
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            h = re.match(r"^#{1,6}\s+(.*)$", lines[i])
            if h:
                heading = slugify(h.group(1))
            i += 1
            continue
        indent, fence = len(m.group("indent")), m.group("fence")
        body, j = [], i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if close and close.group("fence")[0] == fence[0] and len(close.group("fence")) >= len(fence):
                if not close.group("info").strip():
                    break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        counts[heading] = counts.get(heading, 0) + 1
        lang = m.group("info").strip().split()[0] if m.group("info").strip() else ""
        blocks.append(Block(rel, f"{heading}/{counts[heading]}", i + 1, lang, "\n".join(body)))
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for rel in doc_files() for b in extract_blocks(rel)]


# an inline `code span` that is a command: a seer command or top-level flag, a benchmark, a script, torchrun,
# pytest or make (with an optional environment prefix)
_INLINE_COMMAND = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S* )*(?:seer (?:[a-z][a-z-]*|--?[a-z-]+)(?: |$)|python -m benchmarks\.|"
    r"python \S+\.py|torchrun |pytest |make [a-zA-Z])"
)


def inline_commands(rel: str, text: str | None = None) -> list[tuple[int, str]]:
    """``(line, span)`` of the inline code spans of a markdown file (outside fenced blocks) that are commands."""
    lines = (REPO / rel).read_text(encoding="utf-8").splitlines() if text is None else text.splitlines()
    out, fence = [], None
    for n, line in enumerate(lines, 1):
        m = _FENCE.match(line)
        if m and (fence is None or (m.group("fence")[0] == fence[0] and not m.group("info").strip())):
            fence = m.group("fence") if fence is None else None
            continue
        if fence is not None:
            continue
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", line):
            if _INLINE_COMMAND.match(span.strip()):
                out.append((n, span.strip()))
    return out


def load_list(path: Path = LIST_FILE) -> dict[str, dict[str, dict]]:
    """``{file: {block id: entry}}`` from the reviewed list."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of file -> block id -> entry")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Commands of a shell block
# ----------------------------------------------------------------------------------------------------------------
def shell_commands(text: str, *, usage: bool = False) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at ``;`` and ``&&``.

    ``usage``: a usage synopsis, where an indented line continues the one before (no backslash).
    """
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if usage and logical and line[:1] in (" ", "\t") and line.strip():
            logical[-1] += " " + line.strip()
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip():
            logical.append(line.strip())
    commands = []
    for line in logical:
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        part: list[str] = []
        for tok in lex:
            if tok in (";", "&&", "||", "|", "&"):
                if part:
                    commands.append(shlex.join(part))
                part = []
            else:
                part.append(tok)
        if part:
            commands.append(shlex.join(part))
    return commands


@dataclasses.dataclass
class Invocation:
    """One command, normalized: ``program`` is "seer", "module" (``python -m X``), "script" (``python X.py``),
    "pytest", "make", "pip" or "external"; ``target`` the module, script or external program."""

    program: str
    target: str
    argv: list[str]
    env: dict[str, str]
    launcher: list[str]  # torchrun / srun and their options, in front of the command


_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _is_python(tok: str) -> bool:
    return re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", tok) is not None


def parse_invocation(command: str) -> Invocation:
    """What program a documented command runs, with which arguments (an optional flag of a synopsis, ``[--quick]``,
    is taken as given)."""
    toks = [t[1:-1] if re.fullmatch(r"\[-[^\[\]]*\]", t) else t for t in shlex.split(command)]
    env: dict[str, str] = {}
    while toks and _ENV.match(toks[0]):
        key, _, value = toks.pop(0).partition("=")
        env[key] = value
    launcher: list[str] = []
    if toks and toks[0] == "srun":  # srun OPTIONS program ...: the options are SLURM's
        k = 1
        while k < len(toks) and not (toks[k] in ("seer", "torchrun") or _is_python(toks[k])):
            k += 1
        launcher, toks = toks[:k], toks[k:]
    if toks and toks[0] == "torchrun":
        k = toks.index("-m") if "-m" in toks else next((i for i, t in enumerate(toks) if t.endswith(".py")), None)
        if k is None:  # torchrun's options alone (`torchrun --max-restarts 1`)
            return Invocation("external", "torchrun", [], env, launcher + toks)
        launcher, toks = launcher + toks[:k], ["python"] + toks[k:]
    if not toks:
        raise ValueError(f"no program in {command!r}")
    head, rest = toks[0], toks[1:]
    if head == "seer":
        return Invocation("seer", "", rest, env, launcher)
    if _is_python(head):
        if rest[:1] == ["-m"]:
            module, args = rest[1], rest[2:]
            if module == "seer.cli":
                return Invocation("seer", "", args, env, launcher)
            if module == "pytest":
                return Invocation("pytest", "pytest", args, env, launcher)
            return Invocation("module", module, args, env, launcher)
        if rest and rest[0].endswith(".py"):
            return Invocation("script", rest[0], rest[1:], env, launcher)
        raise ValueError(f"python without -m MODULE or a script: {command!r}")
    if head == "pytest":
        return Invocation("pytest", "pytest", rest, env, launcher)
    if head in ("make", "pip"):
        return Invocation(head, head, rest, env, launcher)
    if head in EXTERNAL:
        return Invocation("external", head, rest, env, launcher)
    raise ValueError(f"unknown program {head!r} in {command!r}: add it to EXTERNAL in tests/doccheck.py if it is "
                     "another project's, or write the command with a program seer ships")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Entry points, run in-process
# ----------------------------------------------------------------------------------------------------------------
def entry_point(inv: Invocation) -> Callable[[list[str]], Any]:
    """The function a command's program calls with its argv (``seer.cli.main`` for ``seer``)."""
    if inv.program == "seer":
        from seer.cli import main

        return main
    if inv.program == "module":
        module = importlib.import_module(inv.target)
    elif inv.program == "script":
        path = REPO / inv.target
        if not path.is_file():
            raise FileNotFoundError(f"{inv.target}: no such script in the repository")
        spec = importlib.util.spec_from_file_location(f"_doc_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        raise ValueError(f"{inv.program} commands have no Python entry point")
    func = getattr(module, "main", None) or getattr(module, "cli_main", None)
    if func is None:
        raise AttributeError(f"{inv.target} has no main(argv)")
    return func


@dataclasses.dataclass
class Result:
    rc: int
    out: str
    err: str


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def call(inv: Invocation, cwd: Path) -> Result:
    """Run a command's entry point in this process, in ``cwd``, with its environment prefix; output captured."""
    func = entry_point(inv)
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in inv.env}
    os.environ.update(inv.env)
    try:
        with _cwd(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = func(list(inv.argv))
            except SystemExit as exc:  # argparse errors, sys.exit(...)
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    code = rc if isinstance(rc, int) else 0  # benchmarks' main returns its results dict
    return Result(code, out.getvalue(), err.getvalue())


class _Parsed(BaseException):
    """Raised instead of parsing: a BaseException, so that no `except Exception` of a command swallows it."""

    def __init__(self, parser: argparse.ArgumentParser, args: list[str], method: str):
        super().__init__(parser.prog)
        self.parser, self.args, self.method = parser, args, method


# every way a command can ask argparse to parse (the intermixed ones call parse_known_args inside: the first wins)
_PARSE_METHODS = ("parse_args", "parse_known_args", "parse_intermixed_args", "parse_known_intermixed_args")


@dataclasses.dataclass
class Captured:
    parser: argparse.ArgumentParser
    args: list[str]  # what the command hands the parser (its argv without the subcommands it dispatched on)
    method: str  # which parse method it called

    def parse(self) -> argparse.Namespace:
        """Parse as the command would; an argparse error becomes an AssertionError with argparse's message."""
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                result = getattr(self.parser, self.method)(self.args)
        except SystemExit:
            raise AssertionError(f"{self.parser.prog}: {err.getvalue().strip().splitlines()[-1]}") from None
        return result[0] if isinstance(result, tuple) else result


def capture_parser(inv: Invocation) -> Captured:
    """The argparse parser a command builds, and the argv it hands it: the command's own function is called, in a
    scratch directory, with argparse stopped before it parses (so the command does nothing)."""
    import tempfile

    func = entry_point(inv)
    originals = {name: getattr(argparse.ArgumentParser, name) for name in _PARSE_METHODS}

    def stopper(method: str):
        def stop(self, args=None, namespace=None):
            raise _Parsed(self, list(sys.argv[1:] if args is None else args), method)

        return stop

    for name in _PARSE_METHODS:
        setattr(argparse.ArgumentParser, name, stopper(name))
    out, err = io.StringIO(), io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as scratch, _cwd(Path(scratch)):
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = func(list(inv.argv))
    except _Parsed as p:
        return Captured(p.parser, p.args, p.method)
    except SystemExit as exc:
        rc = exc.code
    finally:
        for name, method in originals.items():
            setattr(argparse.ArgumentParser, name, method)
    raise AssertionError(f"{shlex.join(inv.argv)}: the command returned {rc!r} before parsing its arguments: "
                         f"{(err.getvalue() or out.getvalue()).strip()[-500:]}")  # fmt: skip


def unknown_flags(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Flags in ``args`` the parser does not define under that exact name (argparse would accept a prefix)."""
    known = set(parser._option_string_actions)
    bad = []
    for tok in args:
        if tok == "--":
            break
        name = tok.strip("[]").split("=", 1)[0]
        if name.startswith("-") and not re.fullmatch(r"-\d.*", name) and name not in known:
            bad.append(name)
    return bad


def suite_variables(suite: str) -> set[str]:
    from seer.catalog import resolve

    return set(re.findall(r"\$\{(\w+)\}", resolve(suite, "eval").read_text()))


def check_invocation(inv: Invocation, *, usage: bool = False) -> list[str]:
    """Check a command without running it; the problems found (empty when it is fine)."""
    problems: list[str] = []
    text = shlex.join(inv.argv)
    if inv.launcher[:1] == ["torchrun"]:
        from torch.distributed.run import get_args_parser

        problems += [f"torchrun has no flag {f}" for f in unknown_flags(get_args_parser(), inv.launcher[1:])]
    if inv.program == "external":
        return problems
    if inv.program == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        return problems + [f"make has no target {t!r}" for t in inv.argv if not t.startswith("-") and "=" not in t
                           and t not in targets]  # fmt: skip
    if inv.program == "pip":
        return problems + check_pip(inv.argv)
    if inv.program == "pytest":
        return problems + check_pytest(inv.argv)
    if inv.program == "seer" and inv.argv[:1] and inv.argv[0].startswith("-"):  # seer --version: seer.cli's own
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            res = call(inv, Path(scratch))
        return problems + ([] if res.rc == 0 else [f"seer {inv.argv[0]} exited {res.rc}: {res.err.strip()[-300:]}"])
    if inv.program == "seer" and inv.argv and inv.argv[0] not in _seer_commands():
        return problems + [f"seer has no command {inv.argv[0]!r}"]
    if usage and not any(t.startswith("-") for t in inv.argv):  # a name (`seer launch ...`): it must exist
        if inv.program == "script" and not (REPO / inv.target).is_file():
            problems.append(f"no script {inv.target} in the repository")
        if inv.program == "module" and importlib.util.find_spec(inv.target) is None:
            problems.append(f"no module {inv.target}")
        return problems
    captured = capture_parser(inv)
    problems += [f"{captured.parser.prog} has no flag {f}" for f in unknown_flags(captured.parser, captured.args)]
    if usage or problems:
        return problems
    try:
        ns = captured.parse()
    except AssertionError as exc:
        return problems + [str(exc)]
    problems += check_namespace(inv, ns, text)
    return problems


def _seer_commands() -> dict:
    from seer.cli import COMMANDS

    return COMMANDS


def check_namespace(inv: Invocation, ns: argparse.Namespace, text: str) -> list[str]:
    """The parsed values a command would use: config and overrides, recipe and suite names, suite variables."""
    from seer.catalog import looks_like_path, resolve
    from seer.config import ConfigError, load_config

    problems = []
    overrides = getattr(ns, "overrides", None)
    if isinstance(overrides, list) and (getattr(ns, "config", None) or overrides):
        kind = "finetune" if inv.program == "seer" and inv.argv[:1] == ["finetune"] else "pretrain"
        try:
            load_config(getattr(ns, "config", None), overrides, kind=kind)
        except (ConfigError, FileNotFoundError) as exc:
            problems.append(f"config of {text!r}: {exc}")
    suite = getattr(ns, "suite", None)
    if isinstance(suite, str) and not looks_like_path(suite):
        try:
            resolve(suite, "eval")
        except FileNotFoundError as exc:
            problems.append(f"--suite: {exc}")
        else:
            names = suite_variables(suite)
            for item in getattr(ns, "set", None) or []:
                key = item.partition("=")[0]
                if key not in names:
                    problems.append(f"--set {key}: suite {suite!r} has no ${{{key}}} (its variables: {sorted(names)})")
    return problems


def check_pip(argv: list[str]) -> list[str]:
    """``pip install seer-ssl[extra,...]``: the distribution's name and every extra are pyproject.toml's."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = set(project.get("optional-dependencies", {}))
    problems = []
    if argv[:1] == ["uninstall"]:
        return []
    for req in argv[1:]:
        if req.startswith("-"):
            continue
        m = re.fullmatch(r"([\w.-]+)(?:\[([\w,\s-]+)\])?", req)
        if m is None or m.group(1) != project["name"]:
            problems.append(f"pip install {req!r}: not the project's distribution {project['name']!r}")
            continue
        problems += [f"pip install {req!r}: no extra {e!r} in pyproject.toml" for e in
                     (m.group(2) or "").replace(" ", "").split(",") if e and e not in extras]  # fmt: skip
    return problems


def check_pytest(argv: list[str]) -> list[str]:
    """Test files exist; ``-m`` expressions name declared markers."""
    import tomllib

    markers = {
        m.split(":")[0].strip()
        for m in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    }
    problems, k = [], 0
    while k < len(argv):
        tok = argv[k]
        if tok == "-m":
            words = set(re.findall(r"\w+", argv[k + 1])) - {"and", "or", "not"}
            problems += [f"pytest -m: no marker {w!r}" for w in sorted(words - markers)]
            k += 2
            continue
        if not tok.startswith("-") and not (REPO / tok.split("::")[0]).exists():
            problems.append(f"pytest: no such test path {tok!r}")
        k += 1
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Python blocks
# ----------------------------------------------------------------------------------------------------------------
def _resolve(root: Any, attrs: list[str]) -> Any:
    obj = root
    for i, name in enumerate(attrs):
        if hasattr(obj, name):
            obj = getattr(obj, name)
        elif inspect.ismodule(obj):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{obj.__name__}.{name}":
                    raise  # a submodule that exists but fails to import
                raise AttributeError(f"{obj.__name__}.{name} does not exist") from None
        else:
            raise AttributeError(f"{'.'.join([getattr(root, '__name__', '?'), *attrs[: i + 1]])} does not exist")
    return obj


def _attribute_chain(node: ast.AST) -> tuple[str, list[str]] | None:
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return node.id, attrs[::-1]
    return None


def check_python(text: str, where: str) -> list[str]:
    """Compile a Python block; every name imported from seer, every ``module.attr`` chain on an imported (or
    implicit: ``seer``, ``torch``, ``np``, ``transformers``, ``timm``) module, and every keyword argument of a call
    to a function found that way must exist."""
    try:
        tree = ast.parse(text, filename=where)
        compile(tree, where, "exec")
    except SyntaxError as exc:
        return [f"{where}: does not compile: {exc}"]
    problems = []
    roots: dict[str, Any] = {}
    assigned = {t.id for node in ast.walk(tree) for t in ast.walk(node)
                if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}  # fmt: skip
    for node in ast.walk(tree):
        try:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module = importlib.import_module(alias.name)
                    if alias.asname:
                        roots[alias.asname] = module
                    else:
                        roots[alias.name.split(".")[0]] = importlib.import_module(alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    roots[alias.asname or alias.name] = _resolve(module, [alias.name])
        except (ImportError, AttributeError) as exc:
            problems.append(f"{where}: line {node.lineno}: {exc}")
    for name, module in IMPLICIT_ROOTS.items():
        if name not in roots and name not in assigned:
            roots[name] = module  # imported lazily below, only when a chain uses it
    for node in ast.walk(tree):
        chain = _attribute_chain(node) if isinstance(node, (ast.Attribute, ast.Name)) else None
        if chain is None or chain[0] not in roots or isinstance(getattr(node, "ctx", None), ast.Store):
            continue
        try:
            root = roots[chain[0]]
            if isinstance(root, str):
                root = roots[chain[0]] = importlib.import_module(root)
            _resolve(root, chain[1])
        except (ImportError, AttributeError) as exc:
            problems.append(f"{where}: line {node.lineno}: {exc}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.keywords:
            continue
        chain = _attribute_chain(node.func)
        if chain is None or chain[0] not in roots or isinstance(roots[chain[0]], str):
            continue
        try:
            func = _resolve(roots[chain[0]], chain[1])
            if not getattr(func, "__module__", "").startswith("seer"):
                continue
            params = inspect.signature(func).parameters
        except (AttributeError, ImportError, TypeError, ValueError):
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        name = ".".join([chain[0], *chain[1]])
        problems += [f"{where}: line {node.lineno}: {name}() has no argument {kw.arg!r}" for kw in node.keywords
                     if kw.arg is not None and kw.arg not in params]  # fmt: skip
    return problems


_LITERAL_TAIL = re.compile(r",\s*\.\.\.\s*([}\]])")


def comment_claim(comment: str) -> Any:
    """The value a ``# comment`` after an expression claims, or ``None`` when it claims no literal value.

    The comment must start with a Python literal, alone or followed by prose after ``,`` ``;`` ``:`` or a space
    (``# 3712``, ``# [2, 3712], input order``); ``...`` stands for any value (``{"params": 1272156138, ...}``). A
    comment that starts with words may claim a shape or a set of names in brackets (``# pooled features [2, 3712]``).
    """
    text = comment.strip()

    def leading_literal(cand: str) -> Any:
        cand = _LITERAL_TAIL.sub(r"\1", cand)
        ends = [len(cand)] + [i for i in range(len(cand) - 1, 0, -1) if cand[i] in ",;: "]
        for end in ends:
            piece = cand[:end].rstrip()
            if piece.endswith((",", ";", ":")):  # "[2, 3712], input order": not the tuple "[2, 3712],"
                continue
            try:
                return ast.literal_eval(piece)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
        return None

    claim = leading_literal(text)
    if claim is not None:
        return claim
    m = re.search(r"[\[{]", text)
    if m and m.start() > 0:
        claim = leading_literal(text[m.start() :])
        if isinstance(claim, set) or (isinstance(claim, list) and claim and all(type(x) is int for x in claim)):
            return claim
    return None


def claim_holds(actual: Any, claim: Any) -> bool:
    """Whether a value matches a comment's claim (``...`` matches anything, a shape is compared to ``.shape``,
    a set of names to a dict's keys, a dict claim to the keys it names)."""
    if claim is Ellipsis:
        return True
    if hasattr(actual, "shape") and isinstance(claim, list) and all(isinstance(x, int) for x in claim):
        return list(actual.shape) == claim
    if isinstance(claim, set) and isinstance(actual, dict):
        return set(actual) == claim
    if isinstance(claim, dict):
        return isinstance(actual, dict) and all(k in actual and claim_holds(actual[k], v) for k, v in claim.items())
    if isinstance(claim, list) and claim == [Ellipsis]:
        return isinstance(actual, (list, tuple))
    if isinstance(claim, list):
        return isinstance(actual, (list, tuple)) and len(actual) == len(claim) and all(
            claim_holds(a, c) for a, c in zip(actual, claim))  # fmt: skip
    return actual == claim


def run_python(text: str, where: str, namespace: dict, *, check_comments: bool = False) -> int:
    """Execute a Python block statement by statement in ``namespace``. With ``check_comments``, every expression
    statement or single-name assignment whose trailing comment claims a value (``comment_claim``) is compared with
    it; returns the number of claims checked. A wrong claim raises AssertionError naming the line."""
    tree = ast.parse(text, filename=where)
    lines = text.splitlines()
    checked = 0
    for stmt in tree.body:
        code = compile(ast.Module([stmt], type_ignores=[]), where, "exec")
        last = lines[stmt.end_lineno - 1]
        comment = last.split("#", 1)[1] if check_comments and "#" in last and stmt.lineno == stmt.end_lineno else ""
        claim = comment_claim(comment) if comment else None
        if claim is None:
            exec(code, namespace)
            continue
        if isinstance(stmt, ast.Expr):
            value = eval(compile(ast.Expression(stmt.value), where, "eval"), namespace)
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            exec(code, namespace)
            value = namespace[stmt.targets[0].id]
        else:
            exec(code, namespace)
            continue
        if not claim_holds(value, claim):
            shown = getattr(value, "shape", value)
            if isinstance(value, dict) and isinstance(claim, dict):
                shown = {k: value.get(k) for k in claim}
            raise AssertionError(f"{where}: line {stmt.lineno} claims {comment.strip()!r}, but it is "
                                 f"{reprlib.repr(shown)}")  # fmt: skip
        checked += 1
    return checked


def console_output(block: Block) -> str:
    """The output a ``$ command`` block shows: every line that is not a command."""
    return "\n".join(line for line in block.text.splitlines() if not line.startswith("$ ")).strip("\n")


def console_matches(actual: str, shown: str, *, excerpt: bool = False) -> bool:
    """Whether a command's output is the one a doc shows, where a line ``...`` stands for any lines (none too) and
    ``...`` within a line for any text of that line (``model.cfg={...}: 0.29M params``). ``excerpt``: the doc
    shows part of the output (any lines may come before and after it)."""
    if excerpt:
        shown = "...\n" + shown + "\n..."

    def line_pattern(line: str) -> str:
        return r"[^\n]*?".join(re.escape(part) for part in line.rstrip().split("...")) + r"[ \t]*\n"

    pattern = "".join(r"(?:[^\n]*\n)*?" if line.strip() == "..." else line_pattern(line) for line in shown.splitlines())
    return re.fullmatch(pattern, actual.strip("\n") + "\n") is not None


# ----------------------------------------------------------------------------------------------------------------
# The list against the docs
# ----------------------------------------------------------------------------------------------------------------
def entry_commands(block: Block, entry: dict) -> list[tuple[str, dict]]:
    """``[(command, its entry)]`` of a shell-like block: one entry per command (``commands:``) or the block's."""
    usage = entry.get("mode") == "usage"
    commands = shell_commands(block.text, usage=usage)
    if entry.get("mode") == "console":  # `$ command` lines followed by their output
        commands = [line[2:].strip() for line in block.text.splitlines() if line.startswith("$ ")]
    per = entry.get("commands")
    if per is None:
        return [(c, entry) for c in commands]
    if len(per) != len(commands):
        raise AssertionError(f"{block.where}: {len(commands)} commands in the block, {len(per)} under commands: in "
                             f"{LIST_FILE.name}: {commands}")  # fmt: skip
    out = []
    for c, e in zip(commands, per):
        if not c.startswith(e.get("cmd", "")):
            raise AssertionError(f"{block.where}: command {c!r} does not start with the listed {e.get('cmd')!r}")
        out.append((c, {**{k: v for k, v in entry.items() if k != "commands"}, **e}))
    return out


def list_problems(blocks: list[Block], listed: dict[str, dict[str, dict]]) -> list[str]:
    """Blocks missing from the list, listed blocks that no longer exist, blocks changed since their review."""
    problems = []
    seen = set()
    for b in blocks:
        entry = listed.get(b.file, {}).get(b.id)
        seen.add((b.file, b.id))
        if entry is None:
            problems.append(f"{b.where}: not in {LIST_FILE.name}; review it and add:\n{stub(b)}")
        elif str(entry.get("sha")) != b.sha:
            problems.append(f"{b.where}: changed since it was reviewed (sha {entry.get('sha')} -> {b.sha}); check "
                            f"its entry still fits and set sha: {b.sha}")  # fmt: skip
        elif entry.get("kind") not in KINDS and not entry.get("commands"):
            problems.append(f"{b.where}: kind {entry.get('kind')!r} is not one of {KINDS}")
        elif entry.get("kind") == "skip" and not entry.get("why"):
            problems.append(f"{b.where}: a skipped block needs a why:")
    for rel, entries in listed.items():
        for bid in entries or {}:
            if (rel, bid) not in seen:
                problems.append(f"{rel} ({bid}): listed in {LIST_FILE.name} but no such block in the docs: remove "
                                "the entry (or re-key it if the block moved)")  # fmt: skip
    return problems


def stub(b: Block) -> str:
    first = b.text.strip().splitlines()[0] if b.text.strip() else ""
    return f"  {b.id}:  # {b.lang or 'plain'}: {first[:70]}\n    sha: {b.sha}\n    kind: check\n"


def main() -> int:
    listed = load_list() if LIST_FILE.exists() else {}
    problems = list_problems(all_blocks(), listed)
    print("\n".join(problems) if problems else f"every block is listed in {LIST_FILE.name} and unchanged")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
