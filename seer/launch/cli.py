"""`seer launch pretrain|eval|collect|status`: submit pretraining and evaluation to SLURM (or run them here).

    seer launch pretrain --config seer_rg256 --nodes 64 --gpus-per-node 8 --partition learn --timeout-min 4320 \\
        [--account A --qos Q ...] [key=value ...]
    seer launch pretrain --resume runs/seer_rg256            # resubmit a stopped run by hand
    seer launch pretrain --config tiny_cpu --local --tasks-per-node 2
    seer launch pretrain ... --dry-run                       # print the sbatch script, submit nothing
    seer launch eval --suite small --out runs/eval-small --local
    seer launch collect runs/eval-small                      # (re)build the table of an eval launch
    seer launch status runs/seer_rg256                       # submissions and attempts of a job dir

``--config`` / ``--suite`` take a shipped recipe / suite name or a yaml file. ``python launch/submit.py`` is the
same command. Every argument is checked before anything is submitted. See docs/slurm.md.
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
import time
from pathlib import Path
from typing import Any

from seer.launch.executor import (
    LOCAL_MAX_REQUEUES,
    LaunchError,
    add_resource_args,
    check_resources,
    check_submission,
    make_executor,
    render_array_sbatch,
    render_sbatch,
)
from seer.launch.jobs import CollectTask, FeatureTask, PretrainJob, ProtocolTask, read_attempts, run_progress

__all__ = ["main", "pretrain_main", "eval_main", "collect_main", "status_main", "prepare_pretrain", "prepare_eval"]

PROG = "seer launch"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, payload: Any) -> None:
    from seer.evaluation import write_json

    write_json(payload, path)


def _git_commit() -> str | None:
    """The commit of a source checkout seer runs from (None for an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _error(prog: str, cmd: str, exc: BaseException) -> int:
    print(f"{prog} {cmd}: error: {exc}", file=sys.stderr)
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


def _pretrain_parser(prog: str) -> argparse.ArgumentParser:
    from seer.catalog import available

    ap = argparse.ArgumentParser(
        prog=f"{prog} pretrain",
        description="Submit SwAV pretraining: one task per GPU, requeued on timeout/preemption, resumed from disk.",
        allow_abbrev=False,
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help=f"pretraining recipe ({', '.join(available('pretrain'))}) or yaml file")
    src.add_argument("--resume", metavar="JOB_DIR", help="resubmit the run in JOB_DIR (its config.yaml and options)")
    ap.add_argument("--job-dir", default=None, help="job directory = run directory (default: the config's run_dir)")
    ap.add_argument(
        "--max-requeues", type=int, default=None, help="requeues allowed, timeouts + preemptions (default 20; 5 local)"
    )
    ap.add_argument(
        "--allow-config-change",
        "--force",
        dest="force",
        action="store_true",
        help="continue the job dir's checkpoints with a config that changes what is trained (seer pretrain "
        "--allow-config-change: the job's log names the keys, the old config is kept as config.step_N.yaml)",
    )
    add_resource_args(ap, gpus_default=None, cpus_default=10)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.total_steps=1000")
    return ap


def _submissions(job_dir: Path) -> list[dict]:
    root = job_dir / "launch"
    out = []
    for p in sorted(root.glob("submission_*.json")) if root.is_dir() else []:
        with open(p) as f:
            out.append(json.load(f))
    return out


def _resolve_config(arg: str) -> str:
    from seer.catalog import RecipeNotFoundError, looks_like_path
    from seer.config import resolve_recipe

    try:
        return str(resolve_recipe(arg, "pretrain"))
    except RecipeNotFoundError as exc:
        detail = f"{arg}: file not found{exc.suggestion}" if looks_like_path(arg) else str(exc)
        raise LaunchError(f"--config {detail}") from None


def prepare_pretrain(argv: list[str], prog: str = PROG) -> tuple[argparse.Namespace, Any, Path]:
    """Parse and check everything (config, resources, job dir); returns ``(args, cfg, job_dir)``. Submits nothing."""
    from seer.config import ConfigError, load_config, validate

    ap = _pretrain_parser(prog)
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
        config_arg = _resolve_config(args.config)
    if args.max_requeues is None:
        args.max_requeues = LOCAL_MAX_REQUEUES if args.local else 20
    if args.max_requeues < 0:
        raise LaunchError(f"--max-requeues must be >= 0, got {args.max_requeues}")
    check_resources(args)
    if args.local and args.max_requeues > LOCAL_MAX_REQUEUES:
        print(f"{prog}: note: submitit's local controller restarts a job at most {LOCAL_MAX_REQUEUES} times",
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
        print(f"{prog}: note: data.workers={cfg.data.workers} loader processes + the trainer on "
              f"--cpus-per-task {args.cpus_per_task}: the loader will compete for CPUs", file=sys.stderr)  # fmt: skip
    # The check the job itself runs first (seer.train.rundir), here before anything is submitted: a config that
    # changes what the job dir's checkpoints trained is refused unless --allow-config-change / --force, which the
    # job then passes on (pretrain(allow_config_change=True)).
    from seer.train.rundir import inspect_run_dir

    try:
        inspect_run_dir(cfg, world_size, allow_config_change=args.force)
    except ValueError as exc:  # RunDirConfigError, or an unreadable meta.json
        raise LaunchError(
            f"{exc}\n(seer launch pretrain: the flag is --allow-config-change, or --force; --resume {job_dir} "
            "continues the run with its own config.yaml; --job-dir picks another directory)"
        ) from None
    return args, cfg, job_dir


def pretrain_main(argv: list[str], prog: str = PROG) -> int:
    """`launch pretrain ...`: check, then submit (or print the script with --dry-run)."""
    from seer.config import config_to_dict, dump_config

    argv = list(argv)
    try:
        args, cfg, job_dir = prepare_pretrain(argv, prog)
    except LaunchError as exc:
        return _error(prog, "pretrain", exc)
    world_size = args.nodes * args.tasks_per_node
    name = args.job_name or Path(cfg.run_dir).name
    logs = job_dir / "launch" / "logs" / "%j"
    try:
        executor = make_executor(logs, args, name=name, max_num_timeout=args.max_requeues, render_only=args.dry_run)
    except LaunchError as exc:
        return _error(prog, "pretrain", exc)
    step = run_progress(job_dir)
    what = f"resume at step {step}" if step else "start at step 0"
    summary = (
        f"{name}: {args.nodes} node(s) x {args.tasks_per_node} task(s) = world size {world_size}, "
        f"{args.gpus_per_node} GPU(s)/node, {args.timeout_min:g} min per attempt, up to {args.max_requeues} requeues; "
        f"job dir {job_dir} ({what} of "
        + (
            f"{cfg.total_steps})"
            if not cfg.train.max_minutes
            else f"the steps train.max_minutes={cfg.train.max_minutes:g} buys)"
        )
    )
    if args.dry_run:
        print(render_sbatch(executor))
        print(f"# dry run, nothing submitted: {summary}", file=sys.stderr)
        return 0

    if not args.local:  # before anything is written or queued
        try:
            check_submission(render_sbatch(executor), args)
        except LaunchError as exc:
            return _error(prog, "pretrain", exc)
    index = len(_submissions(job_dir))
    job_dir.mkdir(parents=True, exist_ok=True)
    if step == 0:
        # A new run's config, for --resume before the job starts. Never over the config.yaml of checkpoints: the
        # job's own check compares with it, and the job writes it once that check passes.
        dump_config(cfg, job_dir / "config.yaml")
    job_fn = PretrainJob(config_to_dict(cfg), str(job_dir), max_requeues=args.max_requeues, submission=index,
                         allow_config_change=args.force)  # fmt: skip
    job = executor.submit(job_fn)
    import seer

    record = {
        "submission": index,
        "time": _now(),
        "executor": "local" if args.local else "slurm",
        "job_id": str(job.job_id),
        "argv": [*shlex.split(prog), "pretrain", *argv],
        "command": shlex.join([*shlex.split(prog), "pretrain", *argv]),
        "cwd": os.getcwd(),
        "options": {k: getattr(args, k) for k in _RESOURCE_KEYS},
        "allow_config_change": args.force,
        "parameters": dict(getattr(executor, "parameters", {})),
        "world_size": world_size,
        "start_step": step,
        "total_steps": cfg.total_steps,
        "max_minutes": cfg.train.max_minutes,  # > 0: the length is bought at run time (total_steps then caps it)
        "seer_version": seer.__version__,
        "git_commit": _git_commit(),
        "logs": str(logs).replace("%j", str(job.job_id)),
    }
    base = job_dir / "launch" / f"submission_{index:03d}"
    _write_json(base.with_suffix(".json"), record)
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
# eval: a suite as job arrays (features per (checkpoint, dataset), then one task per protocol), then one table
# ----------------------------------------------------------------------------------------------------------------
def _eval_parser(prog: str) -> argparse.ArgumentParser:
    from seer.evaluation.suites import add_suite_args

    ap = argparse.ArgumentParser(
        prog=f"{prog} eval",
        description="Submit a kNN / linear-probe benchmark suite as job arrays: features per (checkpoint, dataset), "
        "then one task per (checkpoint, dataset, protocol), then one table.",
        allow_abbrev=False,
    )
    add_suite_args(ap)
    ap.add_argument(
        "--run-checkpoints",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="add every complete checkpoint of a pretraining run, named <run>@<step> (repeat); like --checkpoint, "
        "they replace the suite's ${SEER_CHECKPOINT} entry",
    )
    ap.add_argument("--array-parallelism", type=int, default=64, help="SLURM: array tasks running at once")
    ap.add_argument("--local-parallel", type=int, default=2, help="--local: tasks running at once")
    add_resource_args(ap, gpus_default=None, cpus_default=10)
    return ap


def run_checkpoints(run_dir: str) -> list[dict]:
    """Every complete checkpoint of a pretraining run as suite checkpoint entries named ``<run>@<step>``."""
    from seer.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"--run-checkpoints {run_dir}: no complete checkpoint under {run_dir}/checkpoints")
    run = Path(run_dir).resolve().name
    return [{"name": f"{run}@{int(p.name.split('_')[-1])}", "source": str(p.resolve())} for p in ckpts]


def prepare_eval(argv: list[str], prog: str = PROG) -> tuple[argparse.Namespace, dict, Path]:
    """Parse and check everything; returns ``(args, suite, out)``. Writes nothing."""
    from seer.evaluation.suites import check_output_dir, load_suite, parse_variables, plan_tasks, select

    args = _eval_parser(prog).parse_args(argv)
    check_resources(args, single_task=True, slurm_gpus=1)
    if args.array_parallelism < 1 or args.local_parallel < 1:
        raise LaunchError("--array-parallelism and --local-parallel must be >= 1")
    try:  # SuiteError is a ValueError
        # --run-checkpoints entries count as --checkpoint ones: they too replace a suite's ${SEER_CHECKPOINT} entry
        extra = list(args.checkpoint) + [c for run_dir in args.run_checkpoints for c in run_checkpoints(run_dir)]
        suite = load_suite(args.suite, parse_variables(args.set), extra)
        select(suite, args.only_dataset, args.only_protocol)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    for ckpt in suite["checkpoints"]:
        src = str(ckpt.get("source") or "")
        # A hub id ("facebook/regnet-y-10b-seer") is not a path; anything that can only be a path must exist.
        local = src.startswith(("/", ".", "~")) or Path(src).suffix in (".safetensors", ".pth", ".pt", ".torch", ".bin")
        if src and local and not Path(src).expanduser().exists():
            raise LaunchError(f"checkpoint {ckpt['name']!r}: {src} does not exist")
    for ds in suite["datasets"]:
        if "generate" in ds:
            continue
        for split in ("train", "test"):
            p = str(ds[split])
            if not any(c in p for c in "{*:") and not Path(p).exists():
                raise LaunchError(f"dataset {ds['name']!r}: {split} path {p} does not exist")
    try:
        plan_tasks(suite)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    out = Path(args.out).expanduser().resolve()
    try:  # the rule of `seer eval-suite --out`: a new, empty or earlier suite's directory, else --overwrite
        args.output_state = check_output_dir(suite, out, overwrite=args.overwrite, flag="--overwrite")
    except OSError as exc:  # OutputDirError
        raise LaunchError(str(exc)) from None
    return args, suite, out


def eval_main(argv: list[str], prog: str = PROG) -> int:
    """`launch eval ...`: check, generate the suite's generated datasets, submit the arrays (or --dry-run)."""
    from seer.evaluation.suites import generate_dataset, mark_output, plan_tasks, slug
    from seer.logs import configure_logging

    configure_logging()  # --local runs the tasks here
    argv = list(argv)
    try:
        args, suite, out = prepare_eval(argv, prog)
    except LaunchError as exc:
        return _error(prog, "eval", exc)
    name = args.job_name or f"eval-{slug(suite['name'])}"
    logs = out / "launch" / "logs" / "%j"
    try:
        ex = make_executor(logs, args, name=name, max_num_timeout=3, render_only=args.dry_run)
    except LaunchError as exc:
        return _error(prog, "eval", exc)
    if not args.local:
        ex.update_parameters(slurm_array_parallelism=args.array_parallelism)
    if args.dry_run:
        plan = plan_tasks(suite)
        print(f"# ---- features: array of {len(plan['features'])} task(s)")
        print(render_array_sbatch(ex, len(plan["features"])))
        print(f"# ---- protocols: array of {len(plan['protocols'])} task(s)")
        print(render_array_sbatch(ex, len(plan["protocols"]), dependency="afterany:<features array id>"))
        print(f"# ---- collect: one task after the protocols array\n{render_sbatch(ex)}")
        print(f"# dry run, nothing submitted: {len(plan['features'])} feature + {len(plan['protocols'])} protocol "
              f"tasks into {out}", file=sys.stderr)  # fmt: skip
        return 0

    if not args.local:
        try:
            check_submission(render_array_sbatch(ex, len(plan_tasks(suite)["features"])), args)
        except LaunchError as exc:
            return _error(prog, "eval", exc)
    mark_output(out, args.output_state)  # the first write into --out
    # Generated datasets are written once, here, so array tasks never race to create them.
    seed = int(suite.get("seed", 0))
    for ds in suite["datasets"]:
        if "generate" in ds:
            train, test = generate_dataset(ds["generate"], out / "data" / ds["name"], seed)
            ds["train"], ds["test"] = str(train), str(test)
    plan = plan_tasks(suite)
    _write_json(out / "launch" / "plan.json", {**plan, "suite": suite, "argv": argv, "time": _now()})
    feats = [FeatureTask(suite, str(out), *p) for p in plan["features"]]
    protos = [ProtocolTask(suite, str(out), *p) for p in plan["protocols"]]
    if args.local:
        return _run_local(ex, feats, protos, out, args)
    return _submit_slurm_chain(ex, feats, protos, out, args, argv, prog)


def _array_id(jobs: list) -> str:
    return str(jobs[0].job_id).split("_")[0]


def _submit_slurm_chain(ex, feats: list, protos: list, out: Path, args, argv: list[str], prog: str) -> int:
    """features array -> protocols array (afterany) -> collect job (afterany); ids recorded in launch/."""
    with ex.batch():
        feature_jobs = [ex.submit(t) for t in feats]
    fid = _array_id(feature_jobs)
    # afterany, not afterok: one failed extraction must not leave the whole chain pending forever; its protocol
    # tasks fail fast ("features missing") and the table lists them.
    ex.update_parameters(slurm_dependency=f"afterany:{fid}")
    with ex.batch():
        protocol_jobs = [ex.submit(t) for t in protos]
    pid = _array_id(protocol_jobs)
    ex.update_parameters(slurm_dependency=f"afterany:{pid}", timeout_min=int(min(30, args.timeout_min)))
    collect_job = ex.submit(CollectTask(str(out)))
    record = {"time": _now(), "argv": argv, "features_array": fid, "protocols_array": pid,
              "collect_job": str(collect_job.job_id), "n_features": len(feats), "n_protocols": len(protos)}  # fmt: skip
    _write_json(out / "launch" / "submission.json", record)
    print(f"submitted features array {fid} ({len(feats)} tasks) -> protocols array {pid} ({len(protos)} tasks) -> "
          f"collect job {collect_job.job_id}")  # fmt: skip
    print(f"table: {out / 'results.md'} once they end (or now, partial: {prog} collect {out})")
    return 0


def _run_local(ex, feats, protos, out: Path, args) -> int:
    """Run the two stages through LocalExecutor (at most --local-parallel tasks at once), then collect here."""
    from seer.evaluation.suites import collect

    failed = 0
    for stage, tasks in (("features", feats), ("protocols", protos)):
        t0 = time.perf_counter()
        for i in range(0, len(tasks), args.local_parallel):
            jobs = [ex.submit(t) for t in tasks[i : i + args.local_parallel]]
            for job in jobs:
                job.wait()
                if job.exception() is not None:
                    failed += 1
        print(f"{stage}: {len(tasks)} task(s) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    with contextlib.suppress(OSError):  # the local controller creates the unformatted "%j" folder; it stays empty
        (out / "launch" / "logs" / "%j").rmdir()
    payload = collect(out)
    print((out / "results.md").read_text())
    print(f"wrote {', '.join(payload['outputs'])} to {out} ({len(payload['missing'])} missing)")
    return 0 if not payload["missing"] and not failed else 1


def collect_main(argv: list[str], prog: str = PROG) -> int:
    """`launch collect OUT`: rebuild the table of an eval launch from its task records."""
    from seer.evaluation.suites import collect

    ap = argparse.ArgumentParser(prog=f"{prog} collect", description=collect_main.__doc__)
    ap.add_argument("out")
    args = ap.parse_args(argv)
    try:
        payload = collect(args.out)
    except FileNotFoundError as exc:
        return _error(prog, "collect", exc)
    print((Path(args.out) / "results.md").read_text())
    return 0 if not payload["missing"] else 1


# ----------------------------------------------------------------------------------------------------------------
# status
# ----------------------------------------------------------------------------------------------------------------
def status_main(argv: list[str], prog: str = PROG) -> int:
    """`launch status JOB_DIR`: submissions, attempts and progress of a pretraining job directory."""
    ap = argparse.ArgumentParser(prog=f"{prog} status", description=status_main.__doc__)
    ap.add_argument("job_dir")
    args = ap.parse_args(argv)
    job_dir = Path(args.job_dir)
    if not (job_dir / "launch").is_dir():
        return _error(prog, "status", LaunchError(f"{job_dir} is not a job directory (no launch/ folder)"))
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


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """`seer launch <command> ...` (``prog`` names the command in messages and in the submission records)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.replace("seer launch", prog))
        print("commands:\n" + "\n".join(f"  {k:<9} {v[1]}" for k, v in COMMANDS.items()))
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"{prog}: unknown command {cmd!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return int(COMMANDS[cmd][0](rest, prog) or 0)
