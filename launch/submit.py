"""Launch pretraining and evaluation on SLURM (or on this machine) with submitit.

    python launch/submit.py pretrain --config configs/pretrain/seer_rg256.yaml --nodes 64 --gpus-per-node 8 \\
        --partition learn --timeout-min 4320 [--account A --qos Q ...] [key=value ...]
    python launch/submit.py pretrain --resume runs/seer_rg256            # resubmit a stopped run by hand
    python launch/submit.py pretrain --config configs/pretrain/tiny_cpu.yaml --local --tasks-per-node 2
    python launch/submit.py pretrain ... --dry-run                       # print the sbatch script, submit nothing
    python launch/submit.py eval --suite configs/eval/small.yaml --out runs/eval-small --local
    python launch/submit.py collect runs/eval-small                      # (re)build the table of an eval launch
    python launch/submit.py status runs/seer_rg256                       # submissions and attempts of a job dir

Every argument is checked before anything is submitted. See docs/slurm.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import difflib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/submit.py`: make `launch` (and a source checkout's `seer`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.jobs import PretrainJob, read_attempts, run_progress, write_json_atomic  # noqa: E402

__all__ = [
    "LaunchError",
    "main",
    "pretrain_main",
    "eval_main",
    "collect_main",
    "status_main",
    "executor_parameters",
    "render_sbatch",
    "make_executor",
]

PROG = "submit.py"
_LOCAL_MAX_REQUEUES = 5  # submitit.local._local: Controller.run(max_retry=6) starts
# AutoExecutor's generic parameters; everything else goes to the SLURM executor as slurm_<name>.
_GENERIC = ("name", "timeout_min", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb")
# Set by named flags: --sbatch may not set them a second time.
_NAMED_SLURM = ("partition", "account", "qos", "constraint", "exclude", "comment", "signal_delay_s", "setup")


class LaunchError(ValueError):
    """A bad launch argument, found before anything was submitted."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments shared by every job kind
# ----------------------------------------------------------------------------------------------------------------
def _add_resource_args(ap: argparse.ArgumentParser, *, gpus_default: int | None, cpus_default: int) -> None:
    g = ap.add_argument_group("resources (SLURM / local)")
    g.add_argument("--nodes", type=int, default=1, help="SLURM nodes (default 1)")
    g.add_argument(
        "--gpus-per-node",
        type=int,
        default=gpus_default,
        help="GPUs per node; one task per GPU (default: 8 for pretrain, 1 for eval; the visible ones with --local)",
    )
    g.add_argument("--tasks-per-node", type=int, default=None, help="tasks per node (default: one per GPU, else 1)")
    g.add_argument("--cpus-per-task", type=int, default=cpus_default, help="CPUs per task (default %(default)s)")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the partition's)")
    g.add_argument("--timeout-min", type=float, default=None, help="time limit per attempt in minutes (int on SLURM)")
    g.add_argument("--job-name", default=None, help="SLURM job name")
    s = ap.add_argument_group("SLURM")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--qos", default=None)
    s.add_argument("--constraint", default=None, help='node features, e.g. "volta32gb"')
    s.add_argument("--exclude", default=None, help='nodes to avoid, e.g. "node[001-004]"')
    s.add_argument("--comment", default=None)
    s.add_argument(
        "--signal-delay-s",
        type=int,
        default=None,
        help="USR2 this many seconds before the time limit (default 120 on SLURM; min(30, limit/4) locally)",
    )
    s.add_argument("--setup", action="append", default=[], metavar="CMD", help="shell line run before srun (repeat)")
    s.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other submitit SLURM parameter, e.g. --sbatch gres=gpu:8 --sbatch exclusive=true (repeat)",
    )
    m = ap.add_argument_group("mode")
    m.add_argument("--local", action="store_true", help="run through submitit's LocalExecutor on this machine")
    m.add_argument("--dry-run", action="store_true", help="print the sbatch script to be submitted; submit nothing")
    m.add_argument("--no-wait", action="store_true", help="--local: return once submitted instead of waiting")


def _check_resources(args: argparse.Namespace, *, single_task: bool = False, slurm_gpus: int = 8) -> None:
    """Validate the resource options in place (fills defaults that depend on --local)."""
    if args.local and args.dry_run:
        raise LaunchError("--dry-run prints a SLURM script: it cannot be combined with --local")
    if args.nodes is None or args.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {args.nodes}")
    if args.local and args.nodes != 1:
        raise LaunchError(f"--local runs on this machine: --nodes must be 1, got {args.nodes}")
    if args.gpus_per_node is None:
        args.gpus_per_node = min(_visible_gpus(), slurm_gpus) if args.local else slurm_gpus
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    if args.tasks_per_node is None:
        args.tasks_per_node = 1 if single_task else max(1, args.gpus_per_node)
    if args.tasks_per_node < 1:
        raise LaunchError(f"--tasks-per-node must be >= 1, got {args.tasks_per_node}")
    if single_task and (args.nodes != 1 or args.tasks_per_node != 1):
        raise LaunchError("evaluation tasks run one process each: use --nodes 1 --tasks-per-node 1")
    if args.local and args.gpus_per_node > _visible_gpus():
        raise LaunchError(f"--gpus-per-node {args.gpus_per_node} with --local, but {_visible_gpus()} CUDA devices")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task must be >= 1, got {args.cpus_per_task}")
    if args.mem_gb is not None and not args.mem_gb > 0:
        raise LaunchError(f"--mem-gb must be > 0, got {args.mem_gb}")
    if args.timeout_min is None:
        args.timeout_min = 60.0 if args.local else 4320.0
    if not args.timeout_min > 0:
        raise LaunchError(f"--timeout-min must be > 0, got {args.timeout_min}")
    if not args.local and args.timeout_min != int(args.timeout_min):
        raise LaunchError(f"--timeout-min must be a whole number of minutes on SLURM, got {args.timeout_min}")
    if args.signal_delay_s is None:
        args.signal_delay_s = int(min(30, args.timeout_min * 60 / 4)) if args.local else 120
    if args.signal_delay_s < 1 or args.signal_delay_s >= args.timeout_min * 60:
        raise LaunchError(
            f"--signal-delay-s must be in [1, {int(args.timeout_min * 60)}) (the time limit), got {args.signal_delay_s}"
        )
    for name in ("partition", "account", "qos", "constraint", "exclude", "comment", "job_name"):
        value = getattr(args, name)
        if value is not None and not str(value).strip():
            raise LaunchError(f"--{name.replace('_', '-')} is empty")
    args.sbatch_params = _parse_sbatch(args.sbatch)
    if args.local and (args.partition or args.account or args.qos or args.sbatch_params):
        print(f"{PROG}: note: SLURM options are ignored with --local", file=sys.stderr)
    if not args.local and not args.dry_run:
        _check_partition(args.partition)


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 -- no torch / broken driver: no GPUs
        return 0


def _parse_sbatch(items: list[str]) -> dict:
    """``--sbatch KEY=VALUE`` -> submitit SLURM parameters, checked against the ones submitit knows."""
    import yaml
    from submitit.slurm.slurm import SlurmExecutor

    valid = sorted(SlurmExecutor._valid_parameters())
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise LaunchError(f"--sbatch expects KEY=VALUE, got {item!r}")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LaunchError(f"--sbatch {key}: not a SLURM parameter submitit knows{hint}; valid: {', '.join(valid)}")
        if key in _NAMED_SLURM or key in ("time", "nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "mem"):
            raise LaunchError(f"--sbatch {key}: use the named option (--{key.replace('_', '-')} / --timeout-min ...)")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def _check_partition(partition: str | None) -> None:
    """On a SLURM login node, an unknown partition is an error now rather than a rejected sbatch later."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise LaunchError("no SLURM here (sbatch/srun not found): use --dry-run to see the script, or --local")
    if partition is None or shutil.which("sinfo") is None:
        return
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return  # cannot tell: let sbatch decide
    names = {line.strip().rstrip("*") for line in out.stdout.splitlines() if line.strip()}
    if names and partition not in names:
        close = difflib.get_close_matches(partition, sorted(names), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LaunchError(
            f"--partition {partition!r} does not exist on this cluster{hint}; sinfo lists: {sorted(names)}"
        )


def executor_parameters(args: argparse.Namespace, *, name: str) -> dict:
    """AutoExecutor ``update_parameters`` keywords for the SLURM path: generic ones + ``slurm_``-prefixed ones."""
    params: dict[str, Any] = {
        "name": args.job_name or name,
        "timeout_min": int(args.timeout_min),  # AutoExecutor asserts an int
        "nodes": int(args.nodes),
        "tasks_per_node": int(args.tasks_per_node),
        "gpus_per_node": int(args.gpus_per_node),
        "cpus_per_task": int(args.cpus_per_task),
        "slurm_signal_delay_s": int(args.signal_delay_s),
        # requeue-able by `scontrol requeue` and by SLURM itself after a node failure
        "slurm_additional_parameters": {"requeue": True},
    }
    if args.mem_gb is not None:
        params["mem_gb"] = float(args.mem_gb)
    for key in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        if getattr(args, key) is not None:
            params[f"slurm_{key}"] = getattr(args, key)
    if args.setup:
        params["slurm_setup"] = list(args.setup)
    for key, value in args.sbatch_params.items():
        if key == "additional_parameters":
            params["slurm_additional_parameters"] = {**params["slurm_additional_parameters"], **dict(value)}
        else:
            params[f"slurm_{key}"] = value
    return params


@contextlib.contextmanager
def _slurm_without_srun():
    """Build a SLURM executor on a machine without SLURM (to render a script): submitit checks for `srun` only in
    the constructor, through ``SlurmExecutor.affinity``."""
    from submitit.slurm.slurm import SlurmExecutor

    original = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 2)
    try:
        yield
    finally:
        SlurmExecutor.affinity = original


def make_executor(
    folder: str | os.PathLike, args: argparse.Namespace, *, name: str, max_num_timeout: int, render_only: bool = False
):
    """The submitit executor of a launch: LocalExecutor with ``--local``, else AutoExecutor(cluster="slurm")."""
    import submitit

    if args.local:
        ex = submitit.LocalExecutor(folder, max_num_timeout=max_num_timeout)
        ex.update_parameters(
            timeout_min=float(args.timeout_min),  # LocalExecutor takes fractions of a minute (tests use them)
            tasks_per_node=int(args.tasks_per_node),
            gpus_per_node=int(args.gpus_per_node),
            signal_delay_s=int(args.signal_delay_s),
        )
        return ex
    ctx = _slurm_without_srun() if render_only else contextlib.nullcontext()
    with ctx:
        ex = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=max_num_timeout)
    try:
        ex.update_parameters(**executor_parameters(args, name=name))
    except (ValueError, NameError, AssertionError) as exc:
        raise LaunchError(f"submitit rejected the SLURM parameters: {exc}") from None
    return ex


def render_sbatch(executor) -> str:
    """The sbatch script an AutoExecutor(cluster="slurm") would submit for one job (what `--dry-run` prints)."""
    inner = executor._executor  # the SlurmExecutor behind AutoExecutor
    return inner._make_submission_file_text(inner._submitit_command_str, uid="dry-run")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _pickle_launch_by_value() -> None:
    """Workers unpickle our job classes without needing this checkout on their sys.path (seer itself is installed)."""
    import cloudpickle

    import launch.jobs

    cloudpickle.register_pickle_by_value(launch.jobs)


def _error(cmd: str, exc: BaseException) -> int:
    print(f"{PROG} {cmd}: error: {exc}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------------------------
# pretrain
# ----------------------------------------------------------------------------------------------------------------
_RESOURCE_KEYS = (
    "nodes",
    "gpus_per_node",
    "tasks_per_node",
    "cpus_per_task",
    "mem_gb",
    "timeout_min",
    "job_name",
    "partition",
    "account",
    "qos",
    "constraint",
    "exclude",
    "comment",
    "signal_delay_s",
    "setup",
    "sbatch",
    "max_requeues",
    "local",
)


def _pretrain_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"{PROG} pretrain",
        description="Submit SwAV pretraining: one task per GPU, requeued on timeout/preemption, resumed from disk.",
        allow_abbrev=False,
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="pretraining yaml (configs/pretrain/*.yaml)")
    src.add_argument("--resume", metavar="JOB_DIR", help="resubmit the run in JOB_DIR (its config.yaml and options)")
    ap.add_argument("--job-dir", default=None, help="job directory = run directory (default: the config's run_dir)")
    ap.add_argument(
        "--max-requeues", type=int, default=None, help="requeues allowed, timeouts + preemptions (default 20; 5 local)"
    )
    ap.add_argument("--force", action="store_true", help="submit into a job dir holding a run with another config")
    _add_resource_args(ap, gpus_default=None, cpus_default=10)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.total_steps=1000")
    return ap


def _submissions(job_dir: Path) -> list[dict]:
    root = job_dir / "launch"
    out = []
    for p in sorted(root.glob("submission_*.json")) if root.is_dir() else []:
        with open(p) as f:
            out.append(json.load(f))
    return out


def prepare_pretrain(argv: list[str]) -> tuple[argparse.Namespace, Any, Path]:
    """Parse and check everything (config, resources, job dir); returns ``(args, cfg, job_dir)``. Submits nothing."""
    from seer.config import ConfigError, dump_config, load_config, validate

    ap = _pretrain_parser()
    args = ap.parse_intermixed_args(argv)
    if args.resume:
        job_dir = Path(args.resume).expanduser().resolve()
        if args.job_dir is not None:
            raise LaunchError("--resume JOB_DIR already names the job directory: drop --job-dir")
        config_path = job_dir / "config.yaml"
        if not config_path.is_file():
            raise LaunchError(f"--resume {args.resume}: no config.yaml there (not a job directory)")
        previous = _submissions(job_dir)
        if previous:  # the last submission's options are the defaults; flags given now win
            ap.set_defaults(**{k: v for k, v in previous[-1].get("options", {}).items() if k in _RESOURCE_KEYS})
            args = ap.parse_intermixed_args(argv)
        config_arg = str(config_path)
    else:
        config_arg = args.config
        if not Path(config_arg).is_file():
            raise LaunchError(f"--config {config_arg}: file not found")
    if args.max_requeues is None:
        args.max_requeues = _LOCAL_MAX_REQUEUES if args.local else 20
    if args.max_requeues < 0:
        raise LaunchError(f"--max-requeues must be >= 0, got {args.max_requeues}")
    _check_resources(args)
    if args.local and args.max_requeues > _LOCAL_MAX_REQUEUES:
        print(f"{PROG}: note: submitit's local controller restarts a job at most {_LOCAL_MAX_REQUEUES} times",
              file=sys.stderr)  # fmt: skip
    world_size = args.nodes * args.tasks_per_node
    try:
        cfg = load_config(config_arg, args.overrides)
        if args.job_dir is not None:
            cfg.run_dir = str(Path(args.job_dir).expanduser().resolve())
        elif args.resume:
            cfg.run_dir = str(job_dir)
        else:
            cfg.run_dir = str(Path(cfg.run_dir).expanduser().resolve())
        validate(cfg, world_size)  # e.g. a global batch that the world size does not divide
    except (ConfigError, FileNotFoundError) as exc:
        raise LaunchError(f"config: {exc}") from None
    job_dir = Path(cfg.run_dir)
    if not args.local and cfg.data.workers + 1 > args.cpus_per_task:
        print(f"{PROG}: note: data.workers={cfg.data.workers} loader processes + the trainer on "
              f"--cpus-per-task {args.cpus_per_task}: the loader will compete for CPUs", file=sys.stderr)  # fmt: skip
    existing = job_dir / "config.yaml"
    if not args.resume and not args.force and existing.is_file() and run_progress(job_dir) > 0:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            dump_config(cfg, Path(tmp) / "new.yaml")
            same = (Path(tmp) / "new.yaml").read_text() == existing.read_text()
        if not same:
            raise LaunchError(
                f"{job_dir} already holds a run (step {run_progress(job_dir)}) with a different config: "
                f"continue it with --resume {job_dir}, pick another --job-dir, or pass --force"
            )
    return args, cfg, job_dir


def pretrain_main(argv: list[str] | None = None) -> int:
    """`submit.py pretrain ...`: check, then submit (or print the script with --dry-run)."""
    from seer.config import config_to_dict, dump_config

    argv = list(sys.argv[2:] if argv is None else argv)
    try:
        args, cfg, job_dir = prepare_pretrain(argv)
    except LaunchError as exc:
        return _error("pretrain", exc)
    world_size = args.nodes * args.tasks_per_node
    name = args.job_name or Path(cfg.run_dir).name
    logs = job_dir / "launch" / "logs" / "%j"
    try:
        executor = make_executor(logs, args, name=name, max_num_timeout=args.max_requeues, render_only=args.dry_run)
    except LaunchError as exc:
        return _error("pretrain", exc)
    step = run_progress(job_dir)
    what = f"resume at step {step}" if step else "start at step 0"
    summary = (
        f"{name}: {args.nodes} node(s) x {args.tasks_per_node} task(s) = world size {world_size}, "
        f"{args.gpus_per_node} GPU(s)/node, {args.timeout_min:g} min per attempt, up to {args.max_requeues} requeues; "
        f"job dir {job_dir} ({what} of {cfg.total_steps})"
    )
    if args.dry_run:
        print(render_sbatch(executor))
        print(f"# dry run, nothing submitted: {summary}", file=sys.stderr)
        return 0

    index = len(_submissions(job_dir))
    job_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, job_dir / "config.yaml")
    _pickle_launch_by_value()
    job_fn = PretrainJob(config_to_dict(cfg), str(job_dir), max_requeues=args.max_requeues, submission=index)
    job = executor.submit(job_fn)
    record = {
        "submission": index,
        "time": _now(),
        "executor": "local" if args.local else "slurm",
        "job_id": str(job.job_id),
        "argv": [sys.argv[0], "pretrain", *argv] if argv else sys.argv,
        "command": shlex.join(["python", "launch/submit.py", "pretrain", *argv]),
        "cwd": os.getcwd(),
        "options": {k: getattr(args, k) for k in _RESOURCE_KEYS},
        "parameters": dict(getattr(executor, "parameters", {})),
        "world_size": world_size,
        "start_step": step,
        "total_steps": cfg.total_steps,
        "git_commit": _git_commit(),
        "logs": str(logs).replace("%j", str(job.job_id)),
    }
    base = job_dir / "launch" / f"submission_{index:03d}"
    write_json_atomic(base.with_suffix(".json"), record)
    with contextlib.suppress(OSError):
        if not args.local and job.paths.submission_file.is_file():
            shutil.copyfile(job.paths.submission_file, base.with_suffix(".sh"))
    print(f"submitted job {job.job_id}: {summary}")
    print(f"logs: {record['logs']}   attempts: {job_dir / 'launch' / 'attempts'}")
    if args.local and not args.no_wait:
        return _wait_local_pretrain(job, job_dir, index)
    return 0


def _wait_local_pretrain(job, job_dir: Path, submission: int) -> int:
    """Block until the local job (and its requeues) ends; report from the attempt records."""
    job.wait()
    with contextlib.suppress(OSError):  # the local controller creates the unformatted "%j" folder; it stays empty
        (job_dir / "launch" / "logs" / "%j").rmdir()
    attempts = [a for a in read_attempts(job_dir) if a.get("submission") == submission]
    for a in attempts:
        print(f"attempt {a['attempt']}: {a['status']} (steps {a.get('start_step')} -> {a.get('end_step')})")
    finished = bool(attempts) and attempts[-1]["status"] == "finished"
    if not finished:
        with contextlib.suppress(Exception):
            print(job.exception(), file=sys.stderr)
    return 0 if finished else 1


# ----------------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------------
def eval_main(argv: list[str] | None = None) -> int:
    from launch import evaljobs

    return evaljobs.eval_main(list(sys.argv[2:] if argv is None else argv))


def collect_main(argv: list[str] | None = None) -> int:
    from launch import evaljobs

    return evaljobs.collect_main(list(sys.argv[2:] if argv is None else argv))


# ----------------------------------------------------------------------------------------------------------------
# status
# ----------------------------------------------------------------------------------------------------------------
def status_main(argv: list[str] | None = None) -> int:
    """`submit.py status JOB_DIR`: submissions, attempts and progress of a pretraining job directory."""
    ap = argparse.ArgumentParser(prog=f"{PROG} status", description=status_main.__doc__)
    ap.add_argument("job_dir")
    args = ap.parse_args(argv)
    job_dir = Path(args.job_dir)
    if not (job_dir / "launch").is_dir():
        return _error("status", LaunchError(f"{job_dir} is not a job directory (no launch/ folder)"))
    for s in _submissions(job_dir):
        print(f"submission {s['submission']}: job {s['job_id']} ({s['executor']}) at {s['time']}: {s['command']}")
    for a in read_attempts(job_dir):
        extra = f" [{a['reason']}]" if a.get("reason") else ""
        print(
            f"  attempt {a['attempt']} (submission {a.get('submission')}, requeue {a.get('requeue')}): {a['status']}"
            f"{extra}, steps {a.get('start_step')} -> {a.get('end_step', '?')}, "
            f"{a.get('started')} .. {a.get('ended', '')}"
        )
    print(f"latest checkpoint: step {run_progress(job_dir)}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------------
COMMANDS = {
    "pretrain": (pretrain_main, "submit SwAV pretraining (requeued on timeout / preemption)"),
    "eval": (eval_main, "submit a kNN / linear-probe benchmark suite as job arrays"),
    "collect": (collect_main, "gather the results of an eval launch into one table"),
    "status": (status_main, "submissions and attempts of a pretraining job directory"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:\n" + "\n".join(f"  {k:<9} {v[1]}" for k, v in COMMANDS.items()))
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"{PROG}: unknown command {cmd!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(COMMANDS[cmd][0](rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
