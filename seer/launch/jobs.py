"""What runs inside a submitit task: the pretraining job, the eval suite's array tasks, attempt records.

submitit pickles these callables on the login node and unpickles them in every task, so they live in the installed
package. A pretraining job directory (= the run directory) looks like::

    JOB_DIR/
      config.yaml                      resolved config (written at submission, again by the training loop)
      metrics.jsonl  checkpoints/  tensorboard/      the run's outputs (seer.train.loop)
      launch/
        submission_000.json            one per `seer launch pretrain` call: argv, executor parameters, job id
        submission_000.sh              the sbatch script submitit wrote (SLURM)
        logs/<job_id>/                 submitit's folder: pickles, <job_id>_<task>_log.out / .err
        attempts/attempt_000.json      one per start of the job (first run and each requeue), written by rank 0

submitit, torch and the training loop are imported inside the functions that need them, so a ``--dry-run`` stays
light.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = [
    "export_torch_env",
    "master_port",
    "PretrainJob",
    "attempts_dir",
    "read_attempts",
    "run_progress",
    "FeatureTask",
    "ProtocolTask",
    "CollectTask",
]

# Ranks 0..N-1 of every task agree on these without talking: they come from the job id and the requeue count.
_PORT_LOW, _PORT_SPAN = 20000, 40000


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: str | os.PathLike, payload: Any) -> None:
    from seer.evaluation import write_json  # atomic, numpy-aware

    write_json(payload, path)


# ----------------------------------------------------------------------------------------------------------------
# torch.distributed environment from the submitit / SLURM job
# ----------------------------------------------------------------------------------------------------------------
def master_port(job_id: str, requeue: int = 0) -> int:
    """A port every task of a job derives alike: a function of the job id (as submitit's helper does), shifted by
    the requeue count so a requeued local job never races the previous attempt's socket."""
    base = random.Random(str(job_id)).randint(0, _PORT_SPAN - 1)
    return _PORT_LOW + (base + 7 * requeue) % _PORT_SPAN


def export_torch_env(requeue: int = 0, *, always: bool = False) -> dict:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for ``init_method=env://``.

    The values come from submitit's ``TorchDistributedEnvironment`` (which reads the SLURM / local job environment:
    ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST``). Differences
    from ``TorchDistributedEnvironment().export()``: the port moves with ``requeue`` unless ``MASTER_PORT`` is set,
    a local job rendezvouses on 127.0.0.1 (the hostname may not resolve), variables left by an enclosing job are
    overwritten, and ``CUDA_VISIBLE_DEVICES`` is left alone (``init_distributed`` picks ``cuda:LOCAL_RANK``).

    A one-task job exports nothing unless ``always``: it then trains without a process group, exactly like
    ``seer pretrain`` in one process.

    Must be called inside a submitit job (``SUBMITIT_EXECUTOR`` set). Returns the values (as str) and ``"exported"``.
    """
    from submitit.helpers import TorchDistributedEnvironment

    user_port = os.environ.get("SEER_MASTER_PORT")  # an explicit choice survives; a stale MASTER_PORT does not
    os.environ.pop("MASTER_PORT", None)
    tde = TorchDistributedEnvironment()
    job_id = tde._job_env.job_id  # the array id "123_4" for array tasks: different tasks, different ports
    local = tde._job_env.cluster == "local"
    values = {
        "RANK": str(tde.rank),
        "WORLD_SIZE": str(tde.world_size),
        "LOCAL_RANK": str(tde.local_rank),
        "LOCAL_WORLD_SIZE": str(tde.local_world_size),
        "MASTER_ADDR": "127.0.0.1" if local else str(tde.master_addr),
        "MASTER_PORT": str(int(user_port) if user_port else master_port(job_id, _restarts(requeue))),
    }
    exported = always or tde.world_size > 1
    if exported:
        os.environ.update(values)
    else:
        for key in values:
            os.environ.pop(key, None)  # stale values from an enclosing job would make init_distributed start a group
    return {**values, "exported": exported, "job_id": job_id, "hostnames": list(tde._job_env.hostnames)}


def _slurm_restart_count() -> int:
    """How many times SLURM restarted this job (0 outside SLURM and on the first start)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)


def _restarts(requeue: int) -> int:
    """How many times this job started before: our requeue count, or SLURM's restart count when SLURM requeued the
    job without us (``scontrol requeue``, a node failure, a rank failure), which leaves the pickle unchanged."""
    return max(int(requeue), _slurm_restart_count())


def _limit_threads_locally(local_world_size: int) -> None:
    """N CPU tasks on one machine each default to all cores: split them (only when the user did not choose)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, local_world_size)))


# ----------------------------------------------------------------------------------------------------------------
# Attempt records
# ----------------------------------------------------------------------------------------------------------------
def attempts_dir(job_dir: str | os.PathLike) -> Path:
    return Path(job_dir) / "launch" / "attempts"


def read_attempts(job_dir: str | os.PathLike) -> list[dict]:
    """Every attempt record of a job directory, oldest first."""
    root = attempts_dir(job_dir)
    out = []
    for p in sorted(root.glob("attempt_*.json")) if root.is_dir() else []:
        with open(p) as f:
            out.append(json.load(f))
    return out


def run_progress(job_dir: str | os.PathLike) -> int:
    """The step of the latest complete checkpoint of the run in ``job_dir`` (0 when there is none)."""
    from seer.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(job_dir)
    if ckpt is None:
        return 0
    m = re.search(r"(\d+)$", ckpt.name)
    return int(m.group(1)) if m else 0


class _Attempt:
    """The record of one start of the job (rank 0 only); rewritten atomically as its status changes.

    A new attempt first closes the records its predecessors left ``running``: their rank 0 was killed (SIGKILL,
    a requeue's kill after the grace time, a node failure) before it could say how it ended.
    """

    def __init__(self, job_dir: Path, **fields: Any) -> None:
        root = attempts_dir(job_dir)
        root.mkdir(parents=True, exist_ok=True)
        for path in sorted(root.glob("attempt_*.json")):
            with open(path) as f:
                old = json.load(f)
            if old.get("status") == "running":
                old.update(status="lost", reason="rank 0 was killed before it could record an end",
                           end_step=fields.get("start_step"))  # fmt: skip
                _write_json(path, old)
        index = len(list(root.glob("attempt_*.json")))
        self.path = root / f"attempt_{index:03d}.json"
        self.data = {"attempt": index, "status": "running", "started": _now(), "started_unix": time.time(), **fields}
        _write_json(self.path, self.data)

    def update(self, **fields: Any) -> None:
        if "ended" in fields:
            fields["ended_unix"] = time.time()
        self.data.update(fields)
        _write_json(self.path, self.data)


# ----------------------------------------------------------------------------------------------------------------
# The pretraining job
# ----------------------------------------------------------------------------------------------------------------
class PretrainJob:
    """A checkpointable submitit callable: ``pretrain(cfg)`` in every task; requeued on timeout or preemption.

    submitit calls ``checkpoint()`` on global rank 0 only, inside the USR2 signal handler: it runs no collectives and
    saves nothing. The training loop checkpoints on its own schedule (``train.ckpt_every_steps`` /
    ``train.ckpt_every_minutes``) and the requeued job resumes from the latest complete checkpoint on disk; the steps
    since that checkpoint are recomputed (the data stream is a function of seed, rank and step, so identically).

    Args:
        config: the resolved config as a plain dict (``seer.config.config_to_dict``); ``run_dir`` is the job dir.
        job_dir: the job directory (attempt records go to ``job_dir/launch/attempts``).
        max_requeues: requeues allowed to this submission (timeouts and preemptions alike).
        submission: index of the ``launch pretrain`` call that created the job (a manual resume is a new submission).
        requeue: how many times this submission was requeued before (carried in the pickle submitit rewrites).
        allow_config_change: resume the job directory's checkpoints even with a config that changes what is trained
            (``seer launch pretrain --allow-config-change`` / ``--force``; ``pretrain(allow_config_change=...)``).
            Kept by every requeue: until the run's next checkpoint records the new config, a requeue needs it too.
    """

    def __init__(
        self,
        config: dict,
        job_dir: str,
        *,
        max_requeues: int = 20,
        submission: int = 0,
        requeue: int = 0,
        allow_config_change: bool = False,
    ) -> None:
        self.config, self.job_dir = config, str(job_dir)
        self.max_requeues, self.submission, self.requeue = int(max_requeues), int(submission), int(requeue)
        self.allow_config_change = bool(allow_config_change)
        self._attempt: _Attempt | None = None
        self._finished = False

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_attempt"], state["_finished"] = None, False  # per-process state never travels
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("allow_config_change", False)  # a requeue pickled by a seer without the option
        self.__dict__.update(state)

    def _requeues_used(self) -> int:
        """Attempts of this submission already started, minus the first: counted on disk, so a requeue SLURM makes
        on its own (node failure) counts too."""
        mine = [a for a in read_attempts(self.job_dir) if a.get("submission") == self.submission]
        return max(0, len(mine) - 1)

    def __call__(self) -> dict:
        import submitit

        from seer.config import config_from_dict
        from seer.distributed.env import destroy_distributed, is_peer_failure
        from seer.train.loop import pretrain

        job_env = submitit.JobEnvironment()
        info = export_torch_env(self.requeue)
        rank = job_env.global_rank
        if job_env.cluster == "local":
            _limit_threads_locally(int(info["LOCAL_WORLD_SIZE"]))
        cfg = config_from_dict(self.config)
        if rank == 0:
            self._attempt = _Attempt(
                Path(self.job_dir),
                submission=self.submission,
                requeue=self.requeue,
                job_id=job_env.job_id,
                executor=job_env.cluster,
                hostnames=info["hostnames"],
                world_size=int(info["WORLD_SIZE"]),
                master=f"{info['MASTER_ADDR']}:{info['MASTER_PORT']}",
                slurm_restart_count=_slurm_restart_count(),
                start_step=run_progress(self.job_dir),
                total_steps=_total_steps(self.config, self.job_dir),
                pid=os.getpid(),
            )
            print(f"[launch] attempt {self._attempt.data['attempt']} of {self.job_dir}: {job_env}", flush=True)
            self._record_sigterm()
        # Every task says where it sits (its own log file): the first thing to read when a rendezvous hangs.
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        print("[launch] torch.distributed env: " + " ".join(f"{k}={info[k]}" for k in keys), flush=True)
        try:
            summary = pretrain(cfg, allow_config_change=self.allow_config_change)
        except SystemExit:
            # rank 0 after checkpoint(): submitit requeues by exiting from the signal handler. The process group is
            # left alone (other ranks may be blocked in a collective; the scheduler stops them).
            raise
        except BaseException as exc:
            if job_env.cluster == "slurm" and is_peer_failure(exc) and self._requeue_after_rank_failure(exc):
                raise
            # A "stopped" attempt (checkpoint() refused to requeue) ends here too: keep its status and reason. A
            # "requeued" one ends here only when the requeue itself failed (e.g. `scontrol requeue` refused).
            if self._attempt is not None and self._attempt.data["status"] in ("running", "requeued"):
                step = run_progress(self.job_dir)
                self._attempt.update(status="failed", ended=_now(), end_step=step, error=repr(exc))
            raise
        self._finished = True
        if rank == 0:
            # A timeout signal arriving now must not requeue a finished run.
            try:
                signal.signal(submitit.JobEnvironment._usr_sig(), _ignore_late_signal)
            except ValueError:  # not the main thread (debug executor): nothing was installed there either
                pass
        destroy_distributed(wait_for_peers=True)
        if self._attempt is not None:
            self._attempt.update(status="finished", ended=_now(), end_step=int(summary["step"]), summary=summary)
        return summary

    def _record_sigterm(self) -> None:
        """SLURM sends SIGTERM, then SIGKILL after its KillWait, when it requeues (``scontrol requeue``, preemption
        in REQUEUE mode), cancels or times out a job. submitit ignores SIGTERM so training goes on until the kill
        (steps after the last checkpoint are redone by the next attempt); the attempt record says what happened."""
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            if self._attempt is not None and self._attempt.data["status"] == "running":
                self._attempt.update(
                    status="terminated",
                    ended=_now(),
                    end_step=run_progress(self.job_dir),
                    reason="SIGTERM from the scheduler (requeue, preemption, cancel or time limit)",
                )
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:  # no one ignored it: terminate as the default would
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (debug executor)
            pass

    def _requeue_after_rank_failure(self, exc: BaseException) -> bool:
        """Another rank died or hung: requeue the whole job (``scontrol requeue``), so every rank restarts from the
        last complete checkpoint. Any surviving rank may do this (rank 0 may be the one that died); a second call
        for the same job is harmless. Not done when the requeue budget is spent, or when the previous attempt also
        lost a rank at the same step (a rank that fails deterministically would otherwise loop).
        """
        import subprocess

        step = run_progress(self.job_dir)
        mine = [a for a in read_attempts(self.job_dir) if a.get("submission") == self.submission]
        restarts = _slurm_restart_count()
        this = [a for a in mine if a.get("requeue") == self.requeue and a.get("slurm_restart_count") == restarts]
        if this and this[-1].get("status") in ("requeued", "terminated"):
            # rank 0 requeued this start from its signal handler, or the scheduler is stopping it (SIGTERM): the
            # peer "failure" is rank 0 leaving. A second `scontrol requeue` would be one requeue too many.
            print(f"[launch] rank 0 left at step >= {step}: the job is already {this[-1]['status']}", flush=True)
            return True
        earlier = [a for a in mine[:-1] if a.get("reason", "").startswith("rank failure")]
        if self._requeues_used() >= self.max_requeues:
            why = f"max requeues reached ({self._requeues_used()} of {self.max_requeues})"
        elif earlier and earlier[-1].get("end_step") == step:
            why = f"the previous attempt also lost a rank at step {step}: a deterministic failure, not requeued"
        else:
            why = ""
        job_id = os.environ.get("SLURM_JOB_ID", "")
        if not why:
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
            # "already pending / requeued": another surviving rank was first
            if done.returncode != 0 and "pending" not in (done.stderr + done.stdout).lower():
                why = f"scontrol requeue {job_id} failed: {(done.stderr or done.stdout).strip()}"
        first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        print(f"[launch] rank failure at step >= {step} ({first_line}): "
              f"{'not requeued, ' + why if why else 'requeued the job'}", flush=True)  # fmt: skip
        if self._attempt is not None:
            self._attempt.update(status="stopped" if why else "requeued", ended=_now(), end_step=step,
                                 reason=f"rank failure: {why or 'requeued'}", error=first_line)  # fmt: skip
        return not why

    def checkpoint(self) -> Any:
        """Called by submitit on global rank 0 in the preemption / timeout signal handler: no collectives here.

        Returns the resubmission (the same job, requeue count + 1), or ``None`` (no requeue) when the run finished
        or the requeue budget is spent.
        """
        import submitit

        step = run_progress(self.job_dir)
        total = _total_steps(self.config, self.job_dir)
        used = self._requeues_used()
        if self._finished or (total and step >= total):
            reason = "the run is finished"
        elif used >= self.max_requeues:
            reason = f"max requeues reached ({used} of {self.max_requeues})"
        else:
            reason = ""
        if self._attempt is not None:
            status = "stopped" if reason else "requeued"
            self._attempt.update(status=status, ended=_now(), end_step=step, reason=reason or "timeout/preemption")
        print(f"[launch] signal at step >= {step}: {'not requeued, ' + reason if reason else 'requeuing'}", flush=True)
        sys.stdout.flush()
        if reason:
            return None
        return submitit.helpers.DelayedSubmission(
            self.__class__(
                self.config,
                self.job_dir,
                max_requeues=self.max_requeues,
                submission=self.submission,
                requeue=self.requeue + 1,
                allow_config_change=self.allow_config_change,
            )
        )


def _ignore_late_signal(signum: int, frame: Any) -> None:
    print(f"[launch] ignoring signal {signum}: the run is finished", flush=True)


def _total_steps(config: dict, job_dir: str | os.PathLike) -> int:
    """The run's length (0: not known yet). With a time budget (``train.max_minutes``), the steps the newest
    checkpoint records as bought (``seer.train.budget``), else its ``train.total_steps`` cap (0: none)."""
    t = config.get("train", {})
    if t.get("max_minutes"):
        from seer.train.budget import Budget
        from seer.train.checkpoint import latest_checkpoint, read_meta

        ckpt = latest_checkpoint(job_dir)
        bought = Budget.from_meta(read_meta(ckpt)) if ckpt is not None else None
        return bought.total_steps if bought is not None else int(t.get("total_steps") or 0)
    return int(t.get("total_steps") or int(t.get("epochs", 1)) * int(t.get("steps_per_epoch", 1)))


# ----------------------------------------------------------------------------------------------------------------
# The eval suite's array tasks (seer launch eval)
# ----------------------------------------------------------------------------------------------------------------
def _entry(suite: dict, key: str, name: str) -> dict:
    return next(e for e in suite[key] if e["name"] == name)


class _Task:
    """Common part of the array tasks: the resolved suite, the output dir, status records, error capture."""

    kind = "task"

    def __init__(self, suite: dict, out: str, *parts: str) -> None:
        self.suite, self.out, self.parts = suite, str(out), tuple(parts)

    @property
    def status_path(self) -> Path:
        from seer.evaluation.suites import task_record_path

        return task_record_path(self.out, self.kind, *self.parts)

    def __call__(self) -> dict:
        from seer.logs import configure_logging

        configure_logging()  # the task's log file shows seer's messages (the kNN backend chosen, ...)
        record = {"kind": self.kind, "task": list(self.parts), "status": "running", "started": _now(),
                  "host": os.uname().nodename, "job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get(
                      "SUBMITIT_LOCAL_JOB_ID")}  # fmt: skip
        _write_json(self.status_path, record)
        t0 = time.perf_counter()
        try:
            record.update(self.run())
            record["status"] = "done"
        except Exception as exc:  # recorded for the table, then re-raised so the scheduler marks the task failed
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            raise
        finally:
            record.update(ended=_now(), seconds=time.perf_counter() - t0)
            _write_json(self.status_path, record)
        return {k: v for k, v in record.items() if k not in ("results",)}

    def run(self) -> dict:
        raise NotImplementedError

    def checkpoint(self) -> Any:
        """Preempted or timed out: run the same task again (feature caches and finished results are reused)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


class FeatureTask(_Task):
    """Features of one checkpoint on both splits of one dataset, into the suite's feature cache."""

    kind = "features"

    def run(self) -> dict:
        import torch

        from seer.evaluation.cache import build_model, split_features
        from seer.evaluation.suites import feature_cache, split_kwargs, suite_device

        ckpt_name, ds_name = self.parts
        ckpt, ds = _entry(self.suite, "checkpoints", ckpt_name), _entry(self.suite, "datasets", ds_name)
        torch.set_grad_enabled(False)
        model = build_model(ckpt, suite_device(self.suite))
        # progress=None: lines with rate and ETA in the task's log for splits of 512+ images (seer.progress)
        kwargs = split_kwargs(self.suite, ckpt, ds, progress=None)
        shapes = {}
        for split in ("train", "test"):
            cache = feature_cache(self.out, ckpt_name, ds_name, split)
            feats, _ = split_features(model, str(ds[split]), cache, **kwargs)
            shapes[split] = {k: list(v.shape) for k, v in feats.items()}
        return {"shapes": shapes}


class ProtocolTask(_Task):
    """One protocol (a suite ``protocols`` entry) on one checkpoint's cached features of one dataset."""

    kind = "protocol"

    def run(self) -> dict:
        from seer.evaluation.cache import cached_split_features
        from seer.evaluation.suites import (
            feature_cache,
            protocol_label,
            protocol_meta,
            result_row,
            run_protocol,
            suite_device,
        )

        ckpt_name, ds_name, name = self.parts
        suite = self.suite
        ckpt, ds = _entry(suite, "checkpoints", ckpt_name), _entry(suite, "datasets", ds_name)
        proto = next(p for p in suite["protocols"] if protocol_label(p) == name)
        layers = list(suite["features"].get("layers", ["avgpool"]))
        try:
            (xtr, ytr), (xte, yte) = (
                cached_split_features(feature_cache(self.out, ckpt_name, ds_name, s), layers) for s in ("train", "test")
            )
        except FileNotFoundError as exc:  # extraction belongs to the features array: never redo it here
            raise RuntimeError(
                f"features of {ckpt_name}/{ds_name} are not cached: did its features task fail? ({exc})"
            ) from None
        meta = protocol_meta(suite, ckpt, ds)
        # progress=None: the task's log shows the progress of long kNN searches and probe grids (rate, ETA)
        results = run_protocol(proto, xtr, ytr, xte, yte, meta, str(suite_device(suite)), progress=None)
        return {"results": results, "rows": [result_row(r, suite["name"]) for r in results]}


class CollectTask:
    """The last job of a SLURM launch: builds the table once every protocol task has ended."""

    def __init__(self, out: str) -> None:
        self.out = str(out)

    def __call__(self) -> dict:
        from seer.evaluation.suites import collect

        payload = collect(self.out)
        return {"rows": len(payload["rows"]), "missing": len(payload["missing"])}
