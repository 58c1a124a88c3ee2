"""One run, one process group: two `seer pretrain` processes on one run_dir (a double submission, a requeue while
the old job still runs) must not both train and overwrite each other's checkpoints (issue 29, item 5).

Real `seer pretrain` processes: the first is paused (SIGSTOP) while it holds the run, so the second meets a busy run
directory however fast or slow this machine is, and resumed (SIGCONT) to finish. The lock's own logic (the record
check where flock does not work or is node-local, the mount-option detection) is tested in-process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import seer
from seer.config import ConfigError, load_config, validate
from seer.train.checkpoint import list_checkpoints, read_meta

pytestmark = pytest.mark.faults

ROOT = Path(seer.__file__).resolve().parents[1]  # the checkout under test: children import the same seer

TINY = [
    "model.cfg={depth: 4, w0: 16, wa: 8.0, wm: 2.0, group_w: 8}",
    "swav.head_dims=[32, 16]",
    "swav.n_prototypes=32",
    "data.crops=[[2, 32], [2, 16]]",
    "data.image_size=48",
    "data.synthetic_classes=8",
    "data.batch_size_per_gpu=4",
    "optim.warmup_iters=0",
    "train.log_every=1",
    "train.tensorboard=false",
]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _start(run: Path, log: Path, *overrides: str, command: str = "pretrain", **env: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "seer.cli", command, *TINY, f"run_dir={run}", *overrides],
            env=_env(**env), stdout=out, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
        )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]


def _wait_until(what: str, predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _training_then_paused(run: Path, log: Path, *overrides: str, **env: str) -> subprocess.Popen:
    """A first run, stopped (SIGSTOP) once it has trained a step: it holds the run directory for as long as needed."""
    first = _start(run, log, "train.total_steps=4", "train.min_step_seconds=0.5", *overrides, **env)
    _wait_until("the first run's first step", lambda: _steps(run), first)
    os.kill(first.pid, signal.SIGSTOP)
    return first


def _resume(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGCONT)


def _lock_record(run: Path) -> dict | None:
    path = run / ".lock"
    text = path.read_text() if path.is_file() else ""
    return json.loads(text) if text.strip() else None


# ----------------------------------------------------------------------------------------------------------------
# Real `seer pretrain` processes
# ----------------------------------------------------------------------------------------------------------------
def test_second_run_on_a_busy_run_dir_waits_then_fails_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = _training_then_paused(run, tmp_path / "first.log", SLURM_JOB_ID="4242")
    try:
        t0 = time.time()
        second = _start(run, tmp_path / "second.log", "train.total_steps=4", "train.seed=7",
                        "train.lock_wait_minutes=0.05")  # fmt: skip
        code, err = _finish(second)
        elapsed = time.time() - t0
    finally:
        _resume(first)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, (code, err)
    msg = lines[0]
    assert msg.startswith("seer pretrain: run directory") and f"pid {first.pid}" in msg, msg
    assert f"host {socket.gethostname()}" in msg and "SLURM job 4242" in msg and "scancel 4242" in msg, msg
    waited = re.search(r"waited (\d+) s \(train\.lock_wait_minutes=0\.05\)", msg)
    assert waited and int(waited.group(1)) >= 3 and elapsed >= 3, (msg, elapsed)
    assert "waiting up to" in (tmp_path / "second.log").read_text()  # it said that it waits, and for whom
    # the first run completes; everything in the run directory is its own
    code, err = _finish(first)
    assert code == 0, err
    assert _steps(run) == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004"]
    assert read_meta(run / "checkpoints" / "step_00000004")["config"]["train"]["seed"] == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 0
    assert (run / ".lock").read_text() == ""  # released on a clean exit: no holder on record


def test_lock_file_records_host_pid_job_and_start(tmp_path):
    run = tmp_path / "run"
    env = {"SLURM_JOB_ID": "777", "SLURM_ARRAY_JOB_ID": "770", "SLURM_ARRAY_TASK_ID": "7"}
    first = _training_then_paused(run, tmp_path / "first.log", **env)
    try:
        rec = _lock_record(run)
    finally:
        _resume(first)
    assert rec is not None, "no holder recorded in run_dir/.lock"
    assert rec["host"] == socket.gethostname() and rec["pid"] == first.pid
    assert rec["slurm_job_id"] == "777" and rec["slurm_array_task"] == "770_7"
    assert abs(rec["since_unix"] - time.time()) < 600 and rec["since"].startswith(time.strftime("%Y", time.gmtime()))
    assert "pretrain" in rec["command"]
    code, err = _finish(first)
    assert code == 0, err


def test_a_sigkilled_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    first = _training_then_paused(run, tmp_path / "first.log")
    holder = _lock_record(run)
    os.kill(first.pid, signal.SIGKILL)  # no handler, no finally: only the kernel can release
    first.wait()
    t0 = time.time()
    second = _start(run, tmp_path / "second.log", "train.total_steps=2", "train.lock_wait_minutes=0")
    code, err = _finish(second)
    assert code == 0, err  # it did not wait (lock_wait_minutes=0) and was not refused
    assert time.time() - t0 < 120
    assert holder is not None and holder["pid"] == first.pid  # the killed run held the lock, and left its record
    out = (tmp_path / "second.log").read_text()
    assert "waiting" not in out and f"took over {run / '.lock'} from pid {first.pid}" in out, out
    assert _lock_record(run) is None


def test_a_waiting_run_takes_over_when_the_holder_ends(tmp_path):
    """The requeue case: the new job starts while its predecessor still runs, waits, then resumes where it ended."""
    run = tmp_path / "run"
    first = _training_then_paused(run, tmp_path / "first.log")
    second = _start(run, tmp_path / "second.log", "train.total_steps=6", "train.lock_wait_minutes=2")
    try:
        _wait_until("the second run to wait", lambda: "waiting up to" in (tmp_path / "second.log").read_text(), second)
        assert _steps(run)[-1] < 4  # nothing trained meanwhile: the first is paused, the second waits
    finally:
        _resume(first)
    assert _finish(first)[0] == 0
    code, err = _finish(second)
    assert code == 0, err
    out = (tmp_path / "second.log").read_text()
    assert "resumed from" in out and "step_00000004" in out, out  # the predecessor's final checkpoint
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


@pytest.mark.multiprocess
def test_every_rank_stops_when_rank_0_cannot_lock_and_trains_when_it_can(tmp_path):
    """Rank 0 alone locks; it tells the other ranks at every poll, so they stop (before writing anything) or train
    with it."""
    from seer.train.rundir_lock import RunDirLock

    def start(log_prefix: str, wait: str) -> list[subprocess.Popen]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for rank in range(2):
            env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}  # fmt: skip
            procs.append(_start(run, tmp_path / f"{log_prefix}{rank}.log", "train.total_steps=2", "train.device=cpu",
                                f"train.lock_wait_minutes={wait}", **env))  # fmt: skip
        return procs

    run = tmp_path / "run"
    holder = RunDirLock(run)
    assert holder.try_acquire()
    try:
        results = [_finish(p, timeout=240) for p in start("refused", "0.02")]  # 1.2 s: a few polls, each told
        assert [c for c, _ in results] == [1, 1], results
        assert f"pid {os.getpid()}" in results[0][1] and "rank 0 could not lock" in results[1][1], results
        assert all(len(err.strip().splitlines()) == 1 and "Traceback" not in err for _, err in results), results
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written: no config.yaml, no checkpoints
        procs = start("granted", "2")
        _wait_until("rank 0 to wait", lambda: "waiting up to" in (tmp_path / "granted0.log").read_text(), procs[0])
    finally:
        holder.release()
    results = [_finish(p, timeout=240) for p in procs]
    assert [c for c, _ in results] == [0, 0], results
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]


def test_finetune_shares_the_lock(tmp_path, capsys):
    """`seer finetune` runs the same loop: refused on a held run directory before it loads anything."""
    from seer.cli import main
    from seer.train.rundir_lock import RunDirLock

    run = tmp_path / "run"
    with RunDirLock(run) as holder:
        assert holder.try_acquire()
        missing = tmp_path / "none"
        code = main(["finetune", "--config", "tiny_cpu", f"run_dir={run}", f"model.init_from={missing}",
                     f"data.images={missing}", "supervised.n_classes=2", "train.lock_wait_minutes=0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and f"pid {os.getpid()}" in err and "in use by" in err, err


# ----------------------------------------------------------------------------------------------------------------
# The lock itself, in-process
# ----------------------------------------------------------------------------------------------------------------
def test_lock_wait_minutes_must_be_finite_and_non_negative():
    validate(load_config(None, ["train.lock_wait_minutes=0"]))
    for value in (".nan", ".inf", "-1"):
        with pytest.raises(ConfigError, match="train.lock_wait_minutes"):
            validate(load_config(None, [f"train.lock_wait_minutes={value}"]))


def test_a_held_lock_refuses_a_second_holder_until_released(tmp_path):
    from seer.train.rundir_lock import RunDirBusy, RunDirLock, lock_run_dir

    first = RunDirLock(tmp_path / "run")
    assert first.try_acquire() and first.mode == "flock"
    said: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(RunDirBusy, match=rf"in use by pid {os.getpid()} on host .*waited"):
        lock_run_dir(tmp_path / "run", 0.01, log=said.append, poll_seconds=0.05)
    assert 0.6 <= time.monotonic() - t0 < 30 and len(said) == 1 and "waiting up to" in said[0]
    first.release()
    second = lock_run_dir(tmp_path / "run", 0, log=said.append)
    assert second.previous is None  # released cleanly: nothing to take over
    second.release()


def _flock_unsupported(monkeypatch, err: int = errno.ENOSYS) -> None:
    import seer.train.rundir_lock as rl

    def flock(fd, op):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(rl.fcntl, "flock", flock)


def _write_record(run: Path, **rec) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").write_text(json.dumps(rec))


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL], ids=errno.errorcode.get)
def test_no_flock_falls_back_to_the_recorded_holder(tmp_path, monkeypatch, err):
    """Lustre without -o flock (ENOSYS), NFSv3 without lockd (ENOLCK), ...: a warning and the record check, not a
    crash."""
    from seer.train.rundir_lock import RunDirBusy, lock_run_dir

    _flock_unsupported(monkeypatch, err)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    said: list[str] = []
    run = tmp_path / "run"
    lock = lock_run_dir(run, 0, log=said.append)  # nothing on record: taken, with a warning
    assert lock.mode == "record" and "cannot lock" in said[0] and _lock_record(run)["pid"] == os.getpid()
    with pytest.raises(RunDirBusy, match=rf"pid {os.getpid()}.*delete {re.escape(str(run / '.lock'))}"):
        lock_run_dir(run, 0, log=said.append)  # a second holder in this (live) process
    lock.release()
    assert _lock_record(run) is None
    # a live process on this host holds it; the same pid number on another host cannot be checked: both busy
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for host in (socket.gethostname(), "some-other-node"):
            _write_record(run, host=host, pid=sleeper.pid, slurm_job_id="1", since="then")
            with pytest.raises(RunDirBusy, match=rf"pid {sleeper.pid} on host {host} \(SLURM job 1, since then\)"):
                lock_run_dir(run, 0, log=said.append)
    finally:
        sleeper.kill()
        sleeper.wait()
    # ... and once it is gone, the record is stale: taken over at once
    _write_record(run, host=socket.gethostname(), pid=sleeper.pid, since="then")
    lock = lock_run_dir(run, 0, log=said.append)
    assert lock.previous["pid"] == sleeper.pid and f"took over {run / '.lock'}" in said[-1]
    lock.release()
    # another node, our own SLURM job id: this job's requeued predecessor (SLURM runs one instance of a job id)
    _write_record(run, host="some-other-node", pid=1, slurm_job_id="555", since="then")
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    lock_run_dir(run, 0, log=said.append).release()


def test_node_local_flock_also_checks_the_record(tmp_path, monkeypatch):
    """Lustre localflock / NFS nolock: flock succeeds here while a holder on another node still runs."""
    import seer.train.rundir_lock as rl

    monkeypatch.setattr(rl, "node_local_locks", lambda path: f"{path} is Lustre mounted with localflock")
    run = tmp_path / "run"
    _write_record(run, host="some-other-node", pid=123, slurm_job_id="9", since="then")
    said: list[str] = []
    with pytest.raises(rl.RunDirBusy, match=r"pid 123 on host some-other-node .*delete"):
        rl.lock_run_dir(run, 0, log=said.append)
    assert "localflock" in said[0] and "do not span nodes" in said[0]
    (run / ".lock").write_text("")  # the user deleted (emptied) it as told
    lock = rl.lock_run_dir(run, 0, log=said.append)
    assert lock.mode == "flock+record" and _lock_record(run)["pid"] == os.getpid()
    lock.release()


MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:50 / /home rw,relatime shared:2 - nfs4 srv:/home rw,vers=4.2,local_lock=none,addr=10.0.0.1
41 22 0:51 / /old rw,relatime shared:3 - nfs srv:/old rw,vers=3,nolock,addr=10.0.0.1
42 22 0:52 / /scratch rw shared:4 - lustre 10.0.0.2@o2ib:/scratch rw,localflock,lazystatfs
43 22 0:53 / /work rw shared:5 - lustre 10.0.0.2@o2ib:/work rw,flock,lazystatfs
44 40 0:54 / /home/my\040runs rw shared:6 - nfs4 srv:/runs rw,vers=4.1,local_lock=flock
"""


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/data/run", None),
        ("/home/me/run", None),
        ("/old/run", "/old is NFS mounted with nolock"),
        ("/scratch/me/run", "/scratch is Lustre mounted with localflock"),
        ("/work/me/run", None),
        ("/home/my runs/exp1", "/home/my runs is NFS mounted with local_lock=flock"),  # the deepest mount decides
        ("/home/my runsX", None),
    ],
)
def test_node_local_mounts_are_recognized(path, reason):
    from seer.train.rundir_lock import node_local_locks

    assert node_local_locks(path, MOUNTINFO) == reason
