"""The `seer` command line: one subcommand per job, each owned by the module that implements it.

Every subcommand is `module:function`, where the function takes the remaining argv and returns an exit code.
Modules are imported lazily so `seer presets` starts in well under a second. `seer --version` (`-V`) prints the
versions and capabilities a bug report needs.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# name -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "presets": ("seer.models.regnet", "cli_presets", "print the RegNetY preset table (widths, depths, params, GMACs)"),
    "shards": ("seer.data.shards", "cli_main", "write webdataset tar shards from a folder, a file list or a dataset"),
    "pretrain": ("seer.train.loop", "cli_main", "SwAV pretraining (one process, torchrun or SLURM)"),
    "finetune": ("seer.train.loop", "cli_finetune", "fine-tune a trunk on labeled images (configs/finetune recipes)"),
    "export": ("seer.weights.cli", "cli_export", "export a pretraining run's trunk to a checkpoint file"),
    "models": ("seer.weights.cli", "cli_models", "list the released SEER weights by name (load_trunk('seer-rg32'))"),
    "plan": ("seer.train.plan", "cli_main", "memory and FLOPs plan for a pretraining config before you run it"),
    "config": ("seer.config_doc", "cli_main", "config show RECIPE: every config key, its resolved value and its doc"),
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
    lines = ["usage: seer <command> [options]", "       seer --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`seer <command> --help` for the options of one command."]
    return "\n".join(lines)


def version_report() -> str:
    """seer's version with what a bug report needs: python, torch and its CUDA build, torchvision, the CPU's
    bf16 / AMX capability, and which optional extras are installed. Fast: nothing is built or run."""
    import importlib.metadata as metadata
    import importlib.util
    import platform

    import seer
    from seer import extras, hardware

    def dist_version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = hardware.cpu_info()
    yes = {True: "yes", False: "no"}
    lines = [
        f"seer {seer.__version__} ({extras.DISTRIBUTION}, {Path(seer.__file__).parent})",
        f"python {platform.python_version()} ({platform.python_implementation()}, {platform.system()} "
        f"{platform.machine()})",
        hardware.cuda_summary(),  # "torch 2.x built for CUDA 12.4; 1 GPU visible: ..." or "CPU-only build ..."
        f"torchvision {dist_version('torchvision')}",
        f"cpu: {cpu['cpu_model']}; {cpu['cores']} cores; torch ISA {cpu['cpu_capability']}; oneDNN bf16 "
        f"{yes[cpu['onednn_bf16']]}, fp16 {yes[cpu['onednn_fp16']]}; AMX {yes[cpu['amx']]}",
        "extras:",
    ]
    owners = metadata.packages_distributions()  # import name -> distributions (faiss -> faiss-cpu or faiss-gpu)
    by_extra: dict[str, list[str]] = {}
    for module, (extra, _) in extras.EXTRAS.items():
        if "." not in module:  # torch.utils.tensorboard is tensorboard's
            by_extra.setdefault(extra, []).append(module)
    width = max(map(len, by_extra))
    for extra, modules in sorted(by_extra.items()):
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            state = f"no   ({', '.join(missing)} missing: {extras.install_hint(missing[0])})"
        else:
            dists = [d for m in modules for d in owners.get(m, [m])]
            state = "yes  " + ", ".join(f"{d} {dist_version(d)}" for d in dict.fromkeys(dists))
        lines.append(f"  {extra:<{width}}  {state}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `seer` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(version_report())
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
