"""The `seer` command line: one subcommand per job, each owned by the module that implements it.

Every subcommand is `module:function`, where the function takes the remaining argv and returns an exit code.
Modules are imported lazily so `seer presets` starts in well under a second.
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "presets": ("seer.models.regnet", "cli_presets", "print the RegNetY preset table (widths, depths, params, GMACs)"),
    "shards": ("seer.data.shards", "cli_main", "write webdataset tar shards from a folder, a file list or a dataset"),
    "pretrain": ("seer.train.loop", "cli_main", "SwAV pretraining (one process, torchrun or SLURM)"),
    "finetune": ("seer.train.loop", "cli_finetune", "fine-tune a trunk on labeled images (configs/finetune recipes)"),
    "export": ("seer.weights.cli", "cli_export", "export a pretraining run's trunk to a checkpoint file"),
    "plan": ("seer.train.plan", "cli_main", "memory and FLOPs plan for a pretraining config before you run it"),
    "extract": ("seer.features.cli", "cli_main", "extract features of a folder, file list or shards to files on disk"),
    "classify": ("seer.features.classify", "cli_main", "top-k labels of images with a classifier checkpoint"),
    "knn": ("seer.evaluation.knn", "cli_main", "kNN evaluation on frozen features"),
    "linear": ("seer.evaluation.linear", "cli_main", "linear-probe evaluation on frozen features"),
    "eval-suite": (
        "seer.evaluation.suites",
        "main",
        "run an evaluation suite (datasets x protocols x checkpoints) -> table",
    ),
    "launch": ("seer.launch.cli", "main", "pretrain|eval|collect|status on SLURM (or here) through submitit"),
    "bench": ("benchmarks.run_all", "cli_main", "run the performance benchmarks"),
    "demo": ("seer.demo", "cli_main", "the end-to-end demo: data, pretraining, export, features, kNN, linear probe"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: seer <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`seer <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `seer` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        print(f"seer: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    if module_name.startswith("benchmarks."):
        # benchmarks/ lives beside the package in a source checkout (it is not installed): make it importable.
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        if not (root / "benchmarks" / "run_all.py").is_file():
            print(
                f"seer {name}: the benchmarks compare seer with timm, torchvision, transformers, faiss and scikit-learn"
                " and live in the source tree, not in the installed package. Run them from a checkout: git clone the "
                "seer repository, then `make bench` (or `pip install -e '.[dev]' && seer bench` there).",
                file=sys.stderr,
            )
            return 2
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "seer":
            raise  # seer's own modules are always there: a broken import is a bug, shown as one
        print(f"seer {name}: a package this command needs is not installed ({exc})", file=sys.stderr)
        return 2
    func = getattr(module, func_name)
    try:
        result = func(rest)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        # Safety net: commands report expected errors themselves; anything else that escapes is still one line
        # (exit 1) rather than a traceback from deep inside a library. SEER_DEBUG=1 shows the traceback.
        if os.environ.get("SEER_DEBUG"):
            raise
        print(f"seer {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
