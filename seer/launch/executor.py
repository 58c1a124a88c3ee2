"""The submitit executor of a launch (SLURM or this machine) and the checks of every resource argument.

Everything here runs on the login node, before anything is submitted: argument checks, the partition check
(``sinfo``), the AutoExecutor parameters, the sbatch script ``--dry-run`` prints. submitit is imported inside the
functions that need it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import shutil
import subprocess
import sys
from typing import Any

__all__ = [
    "LaunchError",
    "LOCAL_MAX_REQUEUES",
    "add_resource_args",
    "check_resources",
    "check_submission",
    "executor_parameters",
    "make_executor",
    "render_sbatch",
    "render_array_sbatch",
]

LOCAL_MAX_REQUEUES = 5  # submitit.local._local: Controller.run(max_retry=6) starts
# slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT), and a task needs a few seconds to install its handler
SLURM_CHECK_S, SLURM_START_S = 30, 10
# Set by named flags: --sbatch may not set them a second time.
_NAMED_SLURM = ("partition", "account", "qos", "constraint", "exclude", "comment", "signal_delay_s", "setup")


class LaunchError(ValueError):
    """A bad launch argument, found before anything was submitted."""


def add_resource_args(ap: argparse.ArgumentParser, *, gpus_default: int | None, cpus_default: int) -> None:
    """The resource, SLURM and mode options every launch command takes."""
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


def check_resources(args: argparse.Namespace, *, single_task: bool = False, slurm_gpus: int = 8) -> None:
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
        args.signal_delay_s = int(min(30 if args.local else 120, max(1, args.timeout_min * 60 / 4)))
    if args.signal_delay_s < 1 or args.signal_delay_s >= args.timeout_min * 60:
        raise LaunchError(
            f"--signal-delay-s must be in [1, {int(args.timeout_min * 60)}) (the time limit), got {args.signal_delay_s}"
        )
    latest = int(args.timeout_min * 60) - SLURM_CHECK_S - SLURM_START_S
    if not args.local and args.signal_delay_s > latest:
        # slurmctld checks limits every 30 s and signals a job once it is within signal delay + 30 s of its limit.
        # Past this bound every attempt may be signalled as it starts, before it can save anything (seen with a
        # 1-minute limit and a 45 s delay: the requeued job got USR2 0.2 s after it started and died of it).
        raise LaunchError(
            f"--signal-delay-s {args.signal_delay_s} with a {args.timeout_min:g} min time limit: SLURM signals a job "
            f"up to {SLURM_CHECK_S} s before the delay asks, so an attempt could be signalled as it starts, before "
            f"it can save anything. Use --signal-delay-s <= {max(latest, 0)} or a longer --timeout-min"
        )
    for name in ("partition", "account", "qos", "constraint", "exclude", "comment", "job_name"):
        value = getattr(args, name)
        if value is not None and not str(value).strip():
            raise LaunchError(f"--{name.replace('_', '-')} is empty")
    args.sbatch_params = _parse_sbatch(args.sbatch)
    if args.local and (args.partition or args.account or args.qos or args.sbatch_params):
        print("note: SLURM options are ignored with --local", file=sys.stderr)
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


def check_submission(script: str, args: argparse.Namespace) -> None:
    """Ask the scheduler whether it would ever run ``script`` (``sbatch --test-only``): a request no node can meet
    (more CPUs, memory or GPUs than a node has, more nodes than the partition, a time limit over its maximum, an
    unknown account or QOS) is otherwise accepted and left pending forever. Nothing is queued."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="seer-test-only-") as f:
        f.write(script)
        f.flush()
        try:
            done = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return  # cannot tell: let sbatch decide
    if done.returncode == 0:
        return
    lines = [line.removeprefix("sbatch: ").strip() for line in (done.stderr + done.stdout).splitlines()]
    reason = "; ".join(line for line in lines if line) or f"sbatch --test-only exited {done.returncode}"
    mem = f"{args.mem_gb:g} GB" if args.mem_gb is not None else "the default memory"
    want = (f"{args.nodes} node(s) with {args.tasks_per_node * args.cpus_per_task} CPUs, {mem} and "
            f"{args.gpus_per_node} GPU(s) each, {int(args.timeout_min)} min")  # fmt: skip
    raise LaunchError(f"SLURM would not run this job: {reason}; requested {want}{_partition_offer(args.partition)}. "
                      "Nothing was submitted")  # fmt: skip


def _partition_offer(partition: str | None) -> str:
    """What the partition's nodes offer, for the error message (empty when sinfo cannot tell)."""
    argv = ["sinfo", "-h", "-o", "%P: %D node(s), %c CPUs and %m MB per node, gres %G, time limit %l"]
    if partition:
        argv += ["-p", partition]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (this cluster offers {'; '.join(out.splitlines())})" if out else ""


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


def render_array_sbatch(executor, n_tasks: int, dependency: str | None = None) -> str:
    """The sbatch script of a job array of ``n_tasks`` tasks (optionally after ``dependency``)."""
    from submitit.slurm.slurm import _make_sbatch_string

    inner = executor._executor
    params = {**inner.parameters, "map_count": n_tasks}
    if dependency:
        params["dependency"] = dependency
    return _make_sbatch_string(command=inner._submitit_command_str, folder=inner.folder, **params)
