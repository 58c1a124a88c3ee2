"""Evaluation launches: a benchmark suite (configs/eval/*.yaml) as job arrays, results gathered into one table.

    python launch/submit.py eval --suite configs/eval/imagenet1k.yaml --set IMAGENET_DIR=/data/imagenet \\
        --checkpoint rg256=runs/seer_rg256 --run-checkpoints runs/seer_rg32 --out runs/eval-in1k \\
        --partition learnfair --gpus-per-node 1 --timeout-min 720
    python launch/submit.py eval --suite configs/eval/small.yaml --out runs/eval-small --local

Two arrays and a collector, chained by SLURM dependencies (``afterany``: one failed task does not block the rest):

1. features: one task per (checkpoint, dataset) fills ``OUT/features/<checkpoint>/<dataset>/{train,test}`` (the
   cache ``eval/benchmark.py`` uses, through its own functions, so a later single-process run reuses it);
2. protocols: one task per (checkpoint, dataset, protocol) (kNN, linear, logreg, few-shot variants: the suite's
   ``protocols``) reads the cached features and writes ``OUT/launch/tasks/<id>.json``;
3. collect: ``OUT/results.json``, ``OUT/results.md`` (one table, missing / failed tasks listed), ``OUT/results.png``.

The suite semantics (dataset generation, feature extraction, each protocol, the table) are eval/benchmark.py's; this
module only slices the suite into tasks. ``--local`` runs the same tasks through submitit's LocalExecutor.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["plan_tasks", "FeatureTask", "ProtocolTask", "CollectTask", "collect", "eval_main", "collect_main"]

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = REPO / "eval" / "benchmark.py"
PROG = "submit.py"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load_benchmark(path: str | os.PathLike = BENCHMARK):
    """eval/benchmark.py as a module (eval/ is a folder of scripts, not a package)."""
    name = "_seer_eval_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the benchmark module from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def _label(proto: dict) -> str:
    return str(proto.get("label", proto["name"]))


def _write_json(path: Path, payload: Any) -> None:
    from seer.evaluation import write_json  # numpy-aware, atomic

    write_json(payload, path)


def _device(suite: dict):
    import torch

    name = suite["features"].get("device", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------------
# The plan: which tasks, in the order of the table
# ----------------------------------------------------------------------------------------------------------------
def plan_tasks(suite: dict) -> dict:
    """``{"features": [(ckpt, dataset)], "protocols": [(ckpt, dataset, label)]}`` in suite order; labels unique."""
    labels = [_label(p) for p in suite["protocols"]]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"protocol labels must be unique within a suite (give each a 'label'): {dupes}")
    for key in ("checkpoints", "datasets"):
        names = [e["name"] for e in suite[key]]
        dupes = sorted({x for x in names if names.count(x) > 1})
        if dupes:
            raise ValueError(f"{key} names must be unique: {dupes}")
    feats = [(c["name"], d["name"]) for c in suite["checkpoints"] for d in suite["datasets"]]
    protos = [(c, d, lab) for c, d in feats for lab in labels]
    return {"features": feats, "protocols": protos}


def _task_id(*parts: str) -> str:
    return "__".join(_slug(p) for p in parts)


def _entry(suite: dict, key: str, name: str) -> dict:
    return next(e for e in suite[key] if e["name"] == name)


def _status_path(out: Path, kind: str, *parts: str) -> Path:
    return out / "launch" / "tasks" / f"{kind}__{_task_id(*parts)}.json"


class _Task:
    """Common part of the array tasks: the resolved suite, the output dir, status records, error capture."""

    kind = "task"

    def __init__(self, suite: dict, out: str, *parts: str, benchmark: str = str(BENCHMARK)) -> None:
        self.suite, self.out, self.parts, self.benchmark = suite, str(out), tuple(parts), benchmark

    @property
    def status_path(self) -> Path:
        return _status_path(Path(self.out), self.kind, *self.parts)

    def __call__(self) -> dict:
        record = {"kind": self.kind, "task": list(self.parts), "status": "running", "started": _now(),
                  "host": os.uname().nodename, "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get(
                      "SUBMITIT_LOCAL_JOB_ID")}  # fmt: skip
        _write_json(self.status_path, record)
        t0 = time.perf_counter()
        try:
            record.update(self.run(_load_benchmark(self.benchmark)))
            record["status"] = "done"
        except Exception as exc:  # recorded for the table, then re-raised so the scheduler marks the task failed
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            raise
        finally:
            record.update(ended=_now(), seconds=time.perf_counter() - t0)
            _write_json(self.status_path, record)
        return {k: v for k, v in record.items() if k not in ("results",)}

    def run(self, bench) -> dict:
        raise NotImplementedError

    def checkpoint(self) -> Any:
        """Preempted or timed out: run the same task again (feature caches and finished results are reused)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


class _CacheOnly:
    """Stands in for the trunk when a protocol task reads features the features task cached: any use of it means
    the cache is incomplete, which is an error here (extraction belongs to the features array)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("features are not cached yet: the features task of this checkpoint/dataset did not finish")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.__getattr__("__call__")


def _split_features(bench, suite: dict, out: Path, ckpt: dict, ds: dict, split: str, model: Any):
    """One split's ``({layer: [N, D]}, labels)`` through eval/benchmark.py's own cache, so its layout stays theirs
    (``OUT/features/<checkpoint>/<dataset>/<split>``: per-layer feature dirs for trunks, an .npz for pixels)."""
    fcfg = suite["features"]
    kwargs = dict(
        layers=list(fcfg.get("layers", ["avgpool"])),
        resolution=int(ds.get("resolution", fcfg.get("resolution", 224))),
        crop_pct=ds.get("crop_pct", fcfg.get("crop_pct")),
        batch_size=int(fcfg.get("batch_size", 64)),
        num_workers=int(fcfg.get("num_workers", 0)),
        device=_device(suite),
        pixel_size=int(ckpt.get("size", 16)),
        progress=False,
    )
    cache = out / "features" / ckpt["name"] / ds["name"] / split
    if hasattr(bench, "split_features"):
        return bench.split_features(model, str(ds[split]), cache, **kwargs)
    compute = functools.partial(bench.compute_features, model, str(ds[split]), **kwargs)
    return bench._cached_features(cache.with_suffix(".npz"), compute)


class FeatureTask(_Task):
    """Features of one checkpoint on both splits of one dataset, cached as eval/benchmark.py caches them."""

    kind = "features"

    def run(self, bench) -> dict:
        import torch

        ckpt_name, ds_name = self.parts
        suite, out = self.suite, Path(self.out)
        ckpt, ds = _entry(suite, "checkpoints", ckpt_name), _entry(suite, "datasets", ds_name)
        torch.set_grad_enabled(False)
        model = bench.build_model(ckpt, _device(suite))
        shapes = {}
        for split in ("train", "test"):
            feats, labels = _split_features(bench, suite, out, ckpt, ds, split, model)
            shapes[split] = {k: list(v.shape) for k, v in feats.items()}
        return {"shapes": shapes}


class ProtocolTask(_Task):
    """One protocol (a suite ``protocols`` entry) on one checkpoint's cached features of one dataset."""

    kind = "protocol"

    def run(self, bench) -> dict:
        ckpt_name, ds_name, label = self.parts
        suite, out = self.suite, Path(self.out)
        ckpt, ds = _entry(suite, "checkpoints", ckpt_name), _entry(suite, "datasets", ds_name)
        proto = next(p for p in suite["protocols"] if _label(p) == label)
        model = None if ckpt.get("kind") == "pixels" else _CacheOnly()
        if model is None and not (out / "features" / ckpt_name / ds_name / "train.npz").exists():
            raise RuntimeError(f"features of {ckpt_name}/{ds_name} are not cached: did its features task fail?")
        (xtr, ytr), (xte, yte) = (_split_features(bench, suite, out, ckpt, ds, s, model) for s in ("train", "test"))
        fcfg = suite["features"]
        meta = {
            "suite": suite["name"],
            "dataset": ds_name,
            "checkpoint": ckpt_name,
            "checkpoint_source": str(ckpt.get("source", ckpt.get("preset", ckpt.get("kind")))),
            "resolution": int(ds.get("resolution", fcfg.get("resolution", 224))),
            "crop_pct": ds.get("crop_pct", fcfg.get("crop_pct")),
            "train": str(ds["train"]),
            "test": str(ds["test"]),
        }
        results = bench.run_protocol(proto, xtr, ytr, xte, yte, meta, str(_device(suite)))
        return {"results": results, "rows": [bench._row(r, suite["name"]) for r in results]}


class CollectTask:
    """The last job of a SLURM launch: builds the table once every protocol task has ended."""

    def __init__(self, out: str, benchmark: str = str(BENCHMARK)) -> None:
        self.out, self.benchmark = str(out), benchmark

    def __call__(self) -> dict:
        return collect(self.out, benchmark=self.benchmark)


# ----------------------------------------------------------------------------------------------------------------
# Collect
# ----------------------------------------------------------------------------------------------------------------
def collect(out: str | os.PathLike, *, benchmark: str | os.PathLike = BENCHMARK) -> dict:
    """Gather the task records of an eval launch into ``results.json`` / ``results.md`` / ``results.png``.

    Rows follow the suite order (checkpoint, dataset, protocol). Tasks that failed or never wrote a result are
    listed under the table with their error, and counted in ``payload["missing"]``.
    """
    out = Path(out)
    plan_file = out / "launch" / "plan.json"
    if not plan_file.is_file():
        raise FileNotFoundError(f"{out} is not an eval launch directory (no launch/plan.json)")
    plan = json.loads(plan_file.read_text())
    suite = plan["suite"]
    bench = _load_benchmark(benchmark)
    rows, results, missing = [], [], []
    for kind in ("features", "protocols"):
        for parts in plan[kind]:
            path = _status_path(out, "features" if kind == "features" else "protocol", *parts)
            rec = json.loads(path.read_text()) if path.is_file() else {"status": "not started"}
            if rec["status"] != "done":
                missing.append({"task": "/".join(parts), "kind": kind, "status": rec["status"],
                                "error": rec.get("error")})  # fmt: skip
            elif kind == "protocols":
                rows += rec["rows"]
                results += rec["results"]
    payload = {"suite": suite, "rows": rows, "results": results, "missing": missing, "collected": _now()}
    _write_json(out / "results.json", payload)
    text = bench.markdown_table(rows, suite)
    if missing:
        text += "\n## Missing results\n\n| task | kind | status | error |\n|---|---|---|---|\n"
        text += "".join(f"| {m['task']} | {m['kind']} | {m['status']} | {m['error'] or ''} |\n" for m in missing)
    bench._atomic_text(out / "results.md", text)
    if rows:
        bench.plot(rows, out / "results.png", title=f"{suite['name']}: top-1")
    return payload


# ----------------------------------------------------------------------------------------------------------------
# The `eval` command
# ----------------------------------------------------------------------------------------------------------------
def _eval_parser() -> argparse.ArgumentParser:
    from launch.submit import _add_resource_args

    ap = argparse.ArgumentParser(
        prog=f"{PROG} eval",
        description="Submit a kNN / linear-probe benchmark suite as job arrays: features per (checkpoint, dataset), "
        "then one task per (checkpoint, dataset, protocol), then one table.",
        allow_abbrev=False,
    )
    ap.add_argument("--suite", required=True, help="suite yaml (configs/eval/*.yaml)")
    ap.add_argument("--out", required=True, help="output directory (features cache, task records, results.*)")
    ap.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="value of a ${VAR} placeholder")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH", help="add a checkpoint (repeat)")
    ap.add_argument(
        "--run-checkpoints",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="add every complete checkpoint of a pretraining run, named <run>@<step> (repeat)",
    )
    ap.add_argument("--only-dataset", action="append", default=[], help="run only these datasets")
    ap.add_argument("--only-protocol", action="append", default=[], help="run only these protocol labels")
    ap.add_argument("--array-parallelism", type=int, default=64, help="SLURM: array tasks running at once")
    ap.add_argument("--local-parallel", type=int, default=2, help="--local: tasks running at once")
    _add_resource_args(ap, gpus_default=None, cpus_default=10)
    return ap


def _run_checkpoints(run_dir: str) -> list[dict]:
    from seer.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"--run-checkpoints {run_dir}: no complete checkpoint under {run_dir}/checkpoints")
    run = Path(run_dir).resolve().name
    return [{"name": f"{run}@{int(p.name.split('_')[-1])}", "source": str(p.resolve())} for p in ckpts]


def prepare_eval(argv: list[str]) -> tuple[argparse.Namespace, dict, Path]:
    """Parse and check everything; returns ``(args, suite, out)``. Writes nothing."""
    from launch.submit import LaunchError, _check_resources

    args = _eval_parser().parse_args(argv)
    _check_resources(args, single_task=True, slurm_gpus=1)
    if args.array_parallelism < 1 or args.local_parallel < 1:
        raise LaunchError("--array-parallelism and --local-parallel must be >= 1")
    bench = _load_benchmark()
    variables = {}
    for item in args.set:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise LaunchError(f"--set expects VAR=VALUE, got {item!r}")
        variables[k] = v
    try:
        suite = bench.load_suite(args.suite, variables, args.checkpoint)
        for run_dir in args.run_checkpoints:
            suite["checkpoints"] = suite["checkpoints"] + _run_checkpoints(run_dir)
    except (bench.SuiteError, ValueError) as exc:
        raise LaunchError(str(exc)) from None
    for flag, key, names in (("--only-dataset", "datasets", args.only_dataset),
                             ("--only-protocol", "protocols", args.only_protocol)):  # fmt: skip
        if not names:
            continue
        known = [_label(e) if key == "protocols" else e["name"] for e in suite[key]]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise LaunchError(f"{flag} {', '.join(unknown)}: not in the suite (it has {', '.join(known)})")
        suite[key] = [e for e in suite[key] if (_label(e) if key == "protocols" else e["name"]) in names]
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
    return args, suite, Path(args.out).expanduser().resolve()


def eval_main(argv: list[str]) -> int:
    """`submit.py eval ...`: check, generate the suite's generated datasets, submit the arrays (or --dry-run)."""
    from launch.submit import LaunchError, _error, _pickle_launch_by_value, make_executor, render_sbatch

    try:
        args, suite, out = prepare_eval(argv)
    except LaunchError as exc:
        return _error("eval", exc)
    bench = _load_benchmark()
    name = args.job_name or f"eval-{_slug(suite['name'])}"
    logs = out / "launch" / "logs" / "%j"
    try:
        ex = make_executor(logs, args, name=name, max_num_timeout=3, render_only=args.dry_run)
    except LaunchError as exc:
        return _error("eval", exc)
    if not args.local:
        ex.update_parameters(slurm_array_parallelism=args.array_parallelism)
    if args.dry_run:
        plan = plan_tasks(suite)
        inner = ex._executor
        from submitit.slurm.slurm import _make_sbatch_string

        deps = {"features": None, "protocols": "afterany:<features array id>"}
        for kind, n in (("features", len(plan["features"])), ("protocols", len(plan["protocols"]))):
            params = {**inner.parameters, "map_count": n}
            if deps[kind]:
                params["dependency"] = deps[kind]
            print(f"# ---- {kind}: array of {n} task(s)")
            print(_make_sbatch_string(command=inner._submitit_command_str, folder=inner.folder, **params))
        print(f"# ---- collect: one task after the protocols array\n{render_sbatch(ex)}")
        print(f"# dry run, nothing submitted: {len(plan['features'])} feature + {len(plan['protocols'])} protocol "
              f"tasks into {out}", file=sys.stderr)  # fmt: skip
        return 0

    # Generated datasets are written once, here, so array tasks never race to create them.
    seed = int(suite.get("seed", 0))
    for ds in suite["datasets"]:
        if "generate" in ds:
            train, test = bench.generate_dataset(ds["generate"], out / "data" / ds["name"], seed)
            ds["train"], ds["test"] = str(train), str(test)
    plan = plan_tasks(suite)
    _write_json(out / "launch" / "plan.json", {**plan, "suite": suite, "argv": argv, "time": _now()})
    _pickle_launch_by_value()
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    feats = [FeatureTask(suite, str(out), *p) for p in plan["features"]]
    protos = [ProtocolTask(suite, str(out), *p) for p in plan["protocols"]]
    if args.local:
        return _run_local(ex, feats, protos, out, args)
    return _submit_slurm_chain(ex, feats, protos, out, args, argv)


def _array_id(jobs: list) -> str:
    return str(jobs[0].job_id).split("_")[0]


def _submit_slurm_chain(ex, feats: list, protos: list, out: Path, args, argv: list[str]) -> int:
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
    print(f"table: {out / 'results.md'} once they end (or now, partial: python launch/submit.py collect {out})")
    return 0


def _run_local(ex, feats, protos, out: Path, args) -> int:
    """Run the two stages through LocalExecutor (at most --local-parallel tasks at once), then collect here."""
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
    print(f"wrote {out}/results.json, results.md, results.png ({len(payload['missing'])} missing)")
    return 0 if not payload["missing"] and not failed else 1


def collect_main(argv: list[str]) -> int:
    """`submit.py collect OUT`: rebuild the table of an eval launch from its task records."""
    ap = argparse.ArgumentParser(prog=f"{PROG} collect", description=collect_main.__doc__)
    ap.add_argument("out")
    args = ap.parse_args(argv)
    try:
        payload = collect(args.out)
    except FileNotFoundError as exc:
        print(f"{PROG} collect: error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "results.md").read_text())
    return 0 if not payload["missing"] else 1
