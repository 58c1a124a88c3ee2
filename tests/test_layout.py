"""The code lives in the `seer` package: eval/ and launch/ are thin scripts, and seer's launch / evaluation modules
import one another without cycles."""

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
           "seer.evaluation", "seer.evaluation.suites", "seer.evaluation.cache", "seer.cli"]  # fmt: skip


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
