"""The code lives in the `seer` package: eval/ and launch/ are thin scripts, seer's modules import one another
without cycles, and model / data / weights / features code loads no distributed code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_LINE_BUDGET = 400


def test_scripts_are_thin():
    files = sorted([*(ROOT / "eval").glob("*.py"), *(ROOT / "launch").glob("*.py")])
    lines = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in files}
    assert {"eval/benchmark.py", "eval/knn.py", "eval/linear.py", "launch/submit.py"} <= set(lines)
    assert sum(lines.values()) <= SCRIPT_LINE_BUDGET, lines
    for path in files:  # no library code loaded by file path, no private helpers shared between scripts
        text = path.read_text()
        assert "spec_from_file_location" not in text and "from benchmark import" not in text, path


MODULES = ["seer.catalog", "seer.launch", "seer.launch.executor", "seer.launch.jobs", "seer.launch.cli",
           "seer.evaluation", "seer.evaluation.suites", "seer.evaluation.cache", "seer.cli",
           "seer.weights", "seer.weights.formats", "seer.weights.read", "seer.weights.load", "seer.weights.save",
           "seer.weights.cli", "seer.train.checkpoint", "seer.data.images", "seer.features", "seer.features.inputs",
           "seer.features.runner", "seer.features.memory", "seer.features.files", "seer.features.dataset",
           "seer.features.cli", "seer.weights.named", "seer.train.rundir", "seer.train.api", "seer.config_doc",
           "seer.logs", "seer.progress"]  # fmt: skip


def _architecture_layout() -> dict[str, str]:
    """docs/architecture.md's layout tree: each entry's path (``seer/train/rundir.py``, ``seer/launch/``) -> its
    description (continuation lines included)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    dirs: list[tuple[int, str]] = []  # (indent, path) of the enclosing directories
    last = None
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        name, _, rest = line.strip().partition(" ")
        if indent > 8 or not name.endswith((".py", "/")):  # a description's continuation line
            if last is not None:
                entries[last] += " " + line.strip()
            continue
        while dirs and dirs[-1][0] >= indent:
            dirs.pop()
        last = (dirs[-1][1] if dirs else "") + name
        entries[last] = rest.strip()
        if name.endswith("/"):
            dirs.append((indent, last))
    return entries


def test_the_architecture_page_names_every_module_listed_here():
    """Each module of MODULES has its line in docs/architecture.md's layout (or is named by its folder's line)."""
    import re

    layout = _architecture_layout()
    assert "seer/models/regnet.py" in layout and "seer/weights/named.py" in layout  # the parser reads the tree
    missing = []
    for module in MODULES:
        parts = module.split(".")
        is_package = (ROOT.joinpath(*parts) / "__init__.py").is_file()
        path = "/".join(parts) + ("/" if is_package else ".py")
        folder, leaf = path.rstrip("/").rsplit("/", 1)
        if path not in layout and not re.search(rf"\b{re.escape(leaf)}\b", layout.get(folder + "/", "")):
            missing.append(path)
    assert not missing, f"docs/architecture.md's layout does not name {missing}"


def test_each_module_imports_first_without_a_cycle():
    """Each module imported first, with every seer module forgotten before (torch stays loaded, so one interpreter
    is enough): a module in an import cycle fails here (partially initialised) when it is the first one imported."""
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    for m in [m for m in sys.modules if m == 'seer' or m.startswith('seer.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_the_library_never_imports_the_scripts():
    code = (
        "import sys, seer.launch.cli, seer.launch.jobs, seer.evaluation.suites, seer.evaluation.cache;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('launch', 'eval', 'benchmark'));"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_model_data_weights_and_features_import_no_distributed_code():
    """Checkpoint formats, extraction, data and the model run in one process: importing them loads neither seer's
    distributed / training code nor torch's distributed checkpointing or FSDP (run directories are read lazily)."""
    code = (
        "import sys, seer.models.regnet, seer.data.images, seer.data.transforms, seer.data.shards, seer.weights,"
        " seer.features;"
        "bad = sorted(m for m in sys.modules if m.startswith(('seer.distributed', 'seer.train', 'seer.config',"
        " 'torch.distributed.checkpoint', 'torch.distributed.fsdp', 'submitit')));"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_the_checkpoint_format_does_not_import_the_weights_package():
    """One direction only: seer.weights reads run directories through seer.train.checkpoint, never the reverse."""
    code = (
        "import sys, seer.train.checkpoint;"
        "bad = [m for m in sys.modules if m.startswith('seer.weights')];"
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def _import_graph(module_level_only: bool) -> dict[str, set[str]]:
    """Static import graph of every module under seer/, launch/ and eval/ (a package's edges include its __init__)."""
    import ast

    files = {}
    for top in ("seer", "launch", "eval"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        for node in nodes:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                # importing a.b.c runs a, a.b and a.b.c
                pieces = target.split(".")
                for i in range(1, len(pieces) + 1):
                    dep = ".".join(pieces[:i])
                    if dep in files and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                found.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_cycle_in_seer_launch_and_eval():
    """No cycle among the imports of seer/, launch/ and eval/: neither at import time (module level) nor through the
    lazy imports inside functions."""
    graph = _import_graph(module_level_only=True)
    assert len(graph) > 40 and "seer.train.loop" in graph and "launch.submit" in graph
    assert "seer.weights" in graph["seer.features.runner"] or "seer.weights" in graph["seer.features.memory"]
    assert _cycles(graph) == []
    assert _cycles(_import_graph(module_level_only=False)) == []
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]  # the check itself finds a cycle
