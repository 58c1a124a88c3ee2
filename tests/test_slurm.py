"""seer launch against a real SLURM scheduler: submit, preempt, requeue, time limits, eval arrays, bad submissions,
and a rank that dies.

The cluster is tests/slurm_cluster.py (one node with this machine's cores, partition ``debug``), started once per
session by the ``slurm_cluster`` fixture; without one the tests skip and say why. Every pretraining job is the same
tiny 2-rank (gloo) SwAV run, so the final weights of an interrupted job can be compared with an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from seer.launch import cli as submit
from seer.launch.jobs import read_attempts, run_progress

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = str(REPO / "configs/pretrain/tiny_cpu.yaml")
STEPS = 60
CKPT_EVERY = 5


@pytest.fixture(scope="module")
def tiny_run(tiny_overrides) -> list[str]:
    """The run every job trains: tiny trunk, 8 images per rank, a checkpoint every CKPT_EVERY steps, each step at
    least 0.2 s (a sleep, no change to the numbers) so that a fault lands mid-run on any machine: on a fast one the
    60 steps otherwise end within SLURM's 5 s between SIGTERM and SIGKILL."""
    return [*tiny_overrides, "swav.freeze_prototypes_iters=3", "data.batch_size_per_gpu=8", "data.global_batch_size=0",
            "optim.base_lr=2.4", "optim.warmup_iters=2", f"train.ckpt_every_steps={CKPT_EVERY}", "train.keep_last=2",
            "data.workers=0", "train.min_step_seconds=0.2"]  # fmt: skip


def _submit(job_dir: Path, run: list[str], *extra: str, steps: int = STEPS, capsys=None) -> tuple[int, str, str]:
    argv = ["pretrain", "--config", TINY_CFG, "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
            "--cpus-per-task", "1", "--mem-gb", "4", "--partition", "debug", "--timeout-min", "10",
            "--job-dir", str(job_dir), *extra, *run, f"train.total_steps={steps}"]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        # sbatch exports this environment to the job: one thread per rank in every job, so interrupted and
        # uninterrupted runs reduce in the same order
        mp.setenv("OMP_NUM_THREADS", "1")
        code = submit.main(argv)
    out = capsys.readouterr() if capsys is not None else None
    return code, out.out if out else "", out.err if out else ""


def _job_id(job_dir: Path, submission: int = 0) -> str:
    return json.loads((job_dir / "launch" / f"submission_{submission:03d}.json").read_text())["job_id"]


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(poll_s)


def _state(cluster, job_id: str) -> str:
    return cluster.job(job_id).get("JobState", "")


def _wait_done(cluster, job_id: str, timeout_s: float = 300) -> dict:
    _wait(lambda: _state(cluster, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
          timeout_s, f"job {job_id} to end", poll_s=1)  # fmt: skip
    return cluster.job(job_id)


def _logs(job_dir: Path, tail: int | None = 3000) -> str:
    texts = (p.read_text(errors="replace") for p in sorted((job_dir / "launch").rglob("*_log.*")))
    return "\n".join(t[-tail:] if tail else t for t in texts)


def _rank_pid(job_dir: Path, rank: int) -> int | None:
    """The pid of the python task of ``rank`` (not srun, whose environment also says SLURM_PROCID=0)."""
    out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {job_dir}/"], capture_output=True, text=True)
    for pid in map(int, out.stdout.split()):
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if f"SLURM_PROCID={rank}".encode() in env and os.path.basename(cmd[0]) != b"srun":
                return pid
    return None


def _weights(job_dir: Path) -> dict[str, torch.Tensor]:
    from seer.weights import load_trunk

    return load_trunk(str(job_dir)).state_dict()


def _same_weights(a: Path, b: Path) -> None:
    """Bit-identical: same ranks, same data stream, restored optimizer and RNG; gloo reduces in a fixed order."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), (key, (wa[key] - wb[key]).abs().max())


def _complete_checkpoints_only(job_dir: Path) -> None:
    names = sorted(p.name for p in (job_dir / "checkpoints").iterdir())
    assert names[-1] == f"step_{STEPS:08d}", names
    assert not [n for n in names if n.startswith(".tmp")], names  # nothing half-written is left behind
    for n in names:
        assert (job_dir / "checkpoints" / n / "meta.json").is_file(), n


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tiny_run, tmp_path_factory) -> Path:
    """The reference: the same job, never interrupted."""
    job_dir = tmp_path_factory.mktemp("straight") / "job"
    code, _, _ = _submit(job_dir, tiny_run)
    assert code == 0
    info = _wait_done(slurm_cluster, _job_id(job_dir))
    assert info["JobState"] == "COMPLETED", _logs(job_dir)
    (a,) = read_attempts(job_dir)
    assert a["status"] == "finished" and a["world_size"] == 2 and a["end_step"] == STEPS
    return job_dir


# ----------------------------------------------------------------------------------------------------------------
# preemption: USR2 (the time-limit signal) and `scontrol requeue` (the preemption path)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", ["usr2", "scontrol_requeue"])
def test_preempted_job_requeues_and_ends_on_the_uninterrupted_weights(slurm_cluster, tiny_run, uninterrupted,
                                                                      tmp_path, how):  # fmt: skip
    job_dir = tmp_path / "job"
    assert _submit(job_dir, tiny_run)[0] == 0
    job_id = _job_id(job_dir)
    _wait(lambda: run_progress(job_dir) >= 2 * CKPT_EVERY, 180, "a checkpoint")
    if how == "usr2":  # what SLURM sends --signal-delay-s before the time limit
        slurm_cluster.run(["scancel", "--signal=USR2", job_id])
    else:  # what preemption in REQUEUE mode does: SIGTERM, SIGKILL after KillWait, back to the queue
        slurm_cluster.run(["scontrol", "requeue", job_id])
    interrupted_at, t_fault = run_progress(job_dir), time.time()
    _wait(lambda: _state(slurm_cluster, job_id) != "RUNNING", 60, "the job to leave RUNNING", poll_s=0.5)
    noticed_s = time.time() - t_fault
    info = _wait_done(slurm_cluster, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, _logs(job_dir))
    first, second = read_attempts(job_dir)
    # USR2: rank 0 requeued the job itself. scontrol requeue: rank 0 recorded the scheduler's SIGTERM, and trained
    # on until the kill, possibly writing more checkpoints.
    assert first["status"] == ("requeued" if how == "usr2" else "terminated"), first
    assert second["status"] == "finished" and second["slurm_restart_count"] == 1, second
    assert interrupted_at <= second["start_step"] < STEPS and second["start_step"] % CKPT_EVERY == 0
    assert first["master"] != second["master"]  # each attempt rendezvouses on its own port
    _complete_checkpoints_only(job_dir)
    _same_weights(job_dir, uninterrupted)
    print(
        f"{how}: job left RUNNING {noticed_s:.1f} s after the signal at step {interrupted_at}; the next attempt "
        f"resumed at step {second['start_step']}"
    )


# ----------------------------------------------------------------------------------------------------------------
# a rank that dies (SIGKILL) or hangs (SIGSTOP): the others do not wait forever, the job requeues and resumes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
@pytest.mark.parametrize("rank,sig", [(1, "SIGKILL"), (0, "SIGKILL"), (1, "SIGSTOP")])
def test_a_rank_that_dies_or_hangs_requeues_the_job(slurm_cluster, tiny_run, uninterrupted, tmp_path,
                                                    rank, sig):  # fmt: skip
    job_dir = tmp_path / "job"
    timeout_min = 0.25  # the collective timeout: how long a rank waits on a hung peer
    assert _submit(job_dir, tiny_run, f"train.dist_timeout_minutes={timeout_min}")[0] == 0
    job_id = _job_id(job_dir)
    _wait(lambda: run_progress(job_dir) >= 2 * CKPT_EVERY, 180, "a checkpoint")
    pid = _wait(lambda: _rank_pid(job_dir, rank), 30, f"rank {rank}'s process")
    t_fault = time.time()
    os.kill(pid, getattr(signal, sig))
    lost_at = run_progress(job_dir)
    # the job leaves RUNNING (requeued: pending, or completing the requeue) within a bounded time
    _wait(lambda: _state(slurm_cluster, job_id) != "RUNNING", 60 * timeout_min + 60, "the job to notice", poll_s=0.5)
    noticed_s = time.time() - t_fault
    info = _wait_done(slurm_cluster, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, _logs(job_dir))
    first, second = read_attempts(job_dir)
    if rank == 0:  # rank 0 cannot record its own death; the next attempt closes its record
        assert first["status"] == "lost", first
    else:
        assert first["status"] == "requeued" and first["reason"] == "rank failure: requeued", first
        assert noticed_s < (60 * timeout_min + 30 if sig == "SIGSTOP" else 30), noticed_s
    logs = _logs(job_dir, tail=None)
    assert "rank failure at step" in logs and "requeued the job" in logs, logs[-3000:]
    assert second["status"] == "finished" and lost_at <= second["start_step"] < STEPS, second
    _complete_checkpoints_only(job_dir)
    _same_weights(job_dir, uninterrupted)
    print(
        f"{sig} rank {rank}: job left RUNNING {noticed_s:.1f} s after the fault at step {lost_at}; the next "
        f"attempt resumed at step {second['start_step']}"
    )


# ----------------------------------------------------------------------------------------------------------------
# time limits: a 1-minute limit, several attempts, the last step within --max-requeues
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_a_job_longer_than_its_time_limit_finishes_over_several_attempts(slurm_cluster, tiny_run, tmp_path):
    job_dir = tmp_path / "job"
    # 45 s of training on any machine (each step at least 0.5 s). slurmctld checks limits every 30 s and signals a
    # job within signal delay + 30 s of its limit, so USR2 arrives 15-45 s into each attempt, of which start-up takes
    # a few: every attempt trains for less than 45 s (at least 2 attempts), each for several seconds.
    steps, max_requeues = 90, 8
    extra = ["--timeout-min", "1", "--signal-delay-s", "15", "--max-requeues", str(max_requeues)]
    code, _, _ = _submit(job_dir, [*tiny_run, "train.min_step_seconds=0.5"], *extra, steps=steps)
    assert code == 0
    info = _wait_done(slurm_cluster, _job_id(job_dir), timeout_s=780)
    attempts = read_attempts(job_dir)
    summary = [(a["status"], a["start_step"], a.get("end_step")) for a in attempts]
    assert info["JobState"] == "COMPLETED", (info, summary, _logs(job_dir))
    assert len(attempts) >= 2, summary  # the limit interrupted it
    assert len(attempts) <= max_requeues + 1, summary
    assert [a["status"] for a in attempts] == ["requeued"] * (len(attempts) - 1) + ["finished"], summary
    assert attempts[-1]["end_step"] == steps
    starts = [a["start_step"] for a in attempts]
    assert starts == sorted(starts) and starts[-1] > 0, summary  # each attempt resumed where the last one saved
    assert int(info["Restarts"]) == len(attempts) - 1
    print(f"time limit: {len(attempts)} attempts, (status, start step, end step) {summary}")


# ----------------------------------------------------------------------------------------------------------------
# evaluation: a job array over two checkpoints, then the collect job
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_eval_job_array_over_two_checkpoints_collects_one_table(slurm_cluster, uninterrupted, tmp_path, capsys):
    import yaml

    from seer.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(uninterrupted)[-2:]
    assert len(ckpts) == 2
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({
        "name": "slurm-test",
        "features": {"layers": ["avgpool"], "batch_size": 256, "device": "cpu"},
        "checkpoints": [{"name": p.name, "source": str(p)} for p in ckpts],
        "datasets": [{"name": "digits", "generate": {"kind": "digits", "size": 16}, "resolution": 16,
                      "crop_pct": 1.0}],
        "protocols": [{"name": "knn", "ks": [5, 20]}],
    }))  # fmt: skip
    out_dir = tmp_path / "ev"
    argv = ["eval", "--suite", str(suite_file), "--out", str(out_dir), "--partition", "debug", "--gpus-per-node", "0",
            "--cpus-per-task", "1", "--mem-gb", "2", "--timeout-min", "10"]  # fmt: skip
    assert submit.main(argv) == 0, capsys.readouterr().err
    record = json.loads((out_dir / "launch" / "submission.json").read_text())
    assert record["n_features"] == 2 and record["n_protocols"] == 2
    info = _wait_done(slurm_cluster, record["collect_job"])
    assert info["JobState"] == "COMPLETED", info
    for array in (record["features_array"], record["protocols_array"]):
        tasks = slurm_cluster.run(["scontrol", "-o", "show", "job", array]).stdout.splitlines()
        assert len(tasks) == 2 and all("JobState=COMPLETED" in t for t in tasks), tasks
    payload = json.loads((out_dir / "results.json").read_text())
    assert not payload["missing"]
    rows = {(r["checkpoint"], r["protocol"]) for r in payload["rows"]}
    assert rows == {(p.name, "knn") for p in ckpts}
    assert all(0.0 <= r["top1"] <= 100.0 for r in payload["rows"])


# ----------------------------------------------------------------------------------------------------------------
# bad submissions: a clear error, nothing queued
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--partition", "gpu-a100"], "--partition 'gpu-a100' does not exist on this cluster"),
        (["--cpus-per-task", "64"], "SLURM would not run this job: allocation failure"),
        (["--mem-gb", "100000"], "SLURM would not run this job"),
        (["--nodes", "4"], "SLURM would not run this job"),
        (["--gpus-per-node", "8"], "SLURM would not run this job"),
    ],
)
def test_a_bad_submission_is_refused_before_anything_is_queued(slurm_cluster, tiny_run, tmp_path, capsys, extra,
                                                               message):  # fmt: skip
    def jobs() -> list[str]:
        return slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()

    before = jobs()
    code, out, err = _submit(tmp_path / "job", tiny_run, *extra, capsys=capsys)
    assert code == 2, out + err
    assert message in err, err
    if "SLURM would not run" in message:
        assert "requested" in err and "this cluster offers debug" in err and "Nothing was submitted" in err
    assert jobs() == before
    assert not (tmp_path / "job").exists()
