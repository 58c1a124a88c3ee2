"""One run, one process group: an OS-level lock on the run directory (``RUN_DIR/.lock``).

    lock = lock_run_dir("runs/exp1", wait_minutes=5.0)     # RunDirBusy after 5 minutes of someone else holding it
    ...                                                    # train: write config.yaml, checkpoints, metrics
    lock.release()

Two ``seer pretrain`` processes on one run directory (a double submission, a requeue that starts while the old job
still runs) would overwrite each other's checkpoints. The training loop's rank 0 takes this lock before it writes
anything into the run directory.

* The lock is ``flock(2)`` on an open file descriptor: the kernel drops it when its holder dies, so a SIGKILLed run
  never leaves a stale lock and a requeue waits only as long as its predecessor takes to die.
* The holder's identity (host, pid, SLURM job, torchrun run, since when) is recorded in the lock file, so a second
  process names who holds the run, and so the lock still means something where a file system's locks do not span
  nodes: where ``flock`` is not supported (ENOSYS / EOPNOTSUPP / ENOLCK: Lustre without ``-o flock``, NFSv3
  without lockd) or is node-local (Lustre ``localflock``, NFS ``nolock`` / ``local_lock=flock``), a record naming a
  holder that may still run keeps the directory busy (best effort, with a warning; docs/pretraining.md).
* The lock file is never deleted: deleting it while another process waits on it would let two processes lock two
  different files. A clean release empties it; a killed holder's record stays until the next holder replaces it.

Pure ``os`` / ``fcntl``: no torch here. The loop tells the other ranks the outcome (``seer.train.loop``).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["LOCK_NAME", "RunDirBusy", "RunDirLock", "lock_run_dir", "describe_holder", "node_local_locks"]

LOCK_NAME = ".lock"

# flock errors that mean "this file system cannot lock", not "someone else holds it": ENOSYS (Lustre noflock),
# EOPNOTSUPP / ENOTSUP (FUSE and others), ENOLCK (NFSv3 without a reachable lockd), EINVAL (some file systems that
# do not implement it; the operation itself is always valid here).
_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.EINVAL}


class RunDirBusy(OSError):
    """Another process holds the run directory (an OSError: ``seer pretrain`` reports it in one line, exit 1)."""


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (None where unreadable)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _holder_record(token: str) -> dict:
    """Who this process is: what a second process prints, and what the record-only check compares."""
    env = os.environ
    rec: dict = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now_iso(), "since_unix": time.time()}
    if env.get("SLURM_JOB_ID"):
        rec["slurm_job_id"] = env["SLURM_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        rec["slurm_array_task"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_RESTART_COUNT"):
        rec["slurm_restart_count"] = env["SLURM_RESTART_COUNT"]
    # Where it sits in its job (torchrun, submitit and srun all export these for torch.distributed).
    for key, var in (("rank", "RANK"), ("world_size", "WORLD_SIZE"), ("master_addr", "MASTER_ADDR"),
                     ("master_port", "MASTER_PORT")):  # fmt: skip
        if env.get(var):
            rec[key] = env[var]
    if env.get("TORCHELASTIC_RUN_ID"):
        rec["torchrun"] = {"run_id": env["TORCHELASTIC_RUN_ID"],
                           "restart": env.get("TORCHELASTIC_RESTART_COUNT", "0")}  # fmt: skip
    rec["command"] = " ".join(sys.argv)[:1000]
    stat, boot = _proc_stat(os.getpid()), _boot_id()
    if stat is not None and boot is not None:  # tells a live holder from a later process that reused its pid
        rec["boot_id"], rec["proc_start"] = boot, stat[1]
    rec["token"] = token
    return rec


def describe_holder(rec: dict | None) -> str:
    """``pid 123 on host node01 (SLURM job 4242, since 2025-01-01T12:00:00+00:00)`` for a lock-file record."""
    if not rec:
        return "an unknown process (the lock file names no holder yet)"
    extra = []
    if rec.get("slurm_array_task"):
        extra.append(f"SLURM array task {rec['slurm_array_task']}")
    elif rec.get("slurm_job_id"):
        extra.append(f"SLURM job {rec['slurm_job_id']}")
    if rec.get("world_size"):
        extra.append(f"rank {rec.get('rank', '?')} of {rec['world_size']}")
    if (rec.get("torchrun") or {}).get("run_id"):
        extra.append(f"torchrun run {rec['torchrun']['run_id']}")
    extra.append(f"since {rec.get('since', '?')}")
    return f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')} ({', '.join(extra)})"


def _stop_hint(rec: dict | None) -> str:
    """`` (scancel 4242)`` / `` (kill 123 on node01)``: how to stop the holder, when the record says."""
    if not rec:
        return ""
    if rec.get("slurm_job_id"):
        return f" (scancel {rec.get('slurm_array_task') or rec['slurm_job_id']})"
    return f" (kill {rec['pid']} on {rec.get('host', '?')})" if rec.get("pid") else ""


# ----------------------------------------------------------------------------------------------------------------
# Where flock does not span nodes: the mount options of the file system that holds the run directory
# ----------------------------------------------------------------------------------------------------------------
def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def node_local_locks(path: str | os.PathLike, mountinfo: str | None = None) -> str | None:
    """Why ``flock`` on ``path`` would not be seen by other nodes (None: it is, or nothing says otherwise).

    Known cases: NFS mounted with ``nolock`` or ``local_lock=flock|all``; Lustre mounted with ``localflock``.
    ``mountinfo`` is the text of ``/proc/self/mountinfo`` (read when None; absent off Linux: None).
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[str, str, set[str]] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if not sep or len(f) < 6 or not r:
            continue
        mount = _unescape(f[4])
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[0])):  # the deepest mount; a later one stacks on top
            opts = set(f[5].split(",")) | set(r[2].split(",") if len(r) > 2 else ())
            best = (mount, r[0], opts)
    if best is None:
        return None
    mount, fstype, opts = best
    if fstype.startswith("nfs"):
        if "nolock" in opts:
            return f"{mount} is NFS mounted with nolock"
        for opt in ("local_lock=flock", "local_lock=all"):
            if opt in opts:
                return f"{mount} is NFS mounted with {opt}"
    if fstype == "lustre" and "localflock" in opts:
        return f"{mount} is Lustre mounted with localflock"
    return None


# ----------------------------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------------------------
class RunDirLock:
    """``RUN_DIR/.lock``: ``try_acquire()`` once or repeatedly, ``release()`` at the end (also a context manager).

    ``mode`` is ``"flock"`` (the kernel's lock, seen by every node), ``"flock+record"`` (a node-local flock, plus the
    record check across nodes) or ``"record"`` (no flock on this file system: the record check alone).
    """

    def __init__(self, run_dir: str | os.PathLike, *, log: Callable[[str], None] = print) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.log = log
        self.held = False
        self.previous: dict | None = None  # the record a holder left without releasing (killed), once acquired
        self.mode = "flock"
        self.node_local: str | None = None
        self._fd: int | None = None
        self._token = uuid.uuid4().hex

    # -- the record -----------------------------------------------------------------------------------------------
    def holder(self) -> dict | None:
        """The record in the lock file: the current holder, a killed one's leftover, or None (empty, unreadable)."""
        return self._read_record(self._fd)

    def _read_record(self, fd: int | None) -> dict | None:
        try:
            if fd is not None:  # our own descriptor: no second open of the file while we may hold it
                raw = os.pread(fd, min(os.fstat(fd).st_size, 1 << 20), 0)
            else:
                with open(self.path, "rb") as f:
                    raw = f.read(1 << 20)
            rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError):  # half-written by a holder that just took it, or garbage: no one named
            return None
        return rec if isinstance(rec, dict) else None

    def _write_record(self) -> None:
        data = (json.dumps(_holder_record(self._token), indent=1) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)  # on NFS / Lustre: visible to other nodes now, not at close

    def _may_be_alive(self, rec: dict) -> bool:
        """Could the process a record names still hold the run? False only when it provably cannot."""
        if rec.get("token") == self._token:
            return False  # our own record
        if rec.get("host") == socket.gethostname():
            try:
                pid = int(rec.get("pid"))
            except (TypeError, ValueError):
                return True
            stat = _proc_stat(pid)
            if stat is not None:
                if stat[0] in ("Z", "X"):
                    return False  # exited, not yet reaped by its parent
                if rec.get("proc_start") and rec.get("boot_id") == _boot_id() and stat[1] != rec["proc_start"]:
                    return False  # the pid now belongs to a later process
                return True
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        # Another host: SLURM runs one instance of a job id at a time, so our own job id is our requeued predecessor.
        mine = os.environ.get("SLURM_JOB_ID")
        return not (mine and rec.get("slurm_job_id") == mine)

    # -- taking and dropping --------------------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """Take the lock if no one holds it (does not wait); True when this process holds it now."""
        if self.held:
            return True
        if self._fd is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # O_RDWR|O_CREAT without O_TRUNC: opening must not wipe the holder's record. 0o666 & umask, like open().
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            self.node_local = node_local_locks(self.run_dir)
            if self.node_local is not None:
                self.mode = "flock+record"
                self.log(f"warning: {self.node_local}: its locks do not span nodes; {self.path} also records the "
                         "holder, and a record naming a process on another node keeps the run busy")  # fmt: skip
        flocked = False
        if self.mode != "record":
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:  # EWOULDBLOCK: a live process holds it
                return False
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.mode = "record"
                self.log(f"warning: this file system cannot lock {self.path} ({os.strerror(exc.errno)}): falling "
                         "back to the holder it records; a run killed on another node leaves a record that keeps "
                         "the run busy until that file is deleted (docs/pretraining.md)")  # fmt: skip
        rec = self.holder()
        if self.mode != "flock" and rec and self._may_be_alive(rec):
            if flocked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)  # a node-local lock must not outlive this attempt
            return False
        # With a cluster-wide flock, a record still there was left by a holder that died without releasing.
        self.previous = rec if rec and rec.get("token") != self._token else None
        self._write_record()
        self.held = True
        return True

    def release(self) -> None:
        """Drop the lock (a no-op when not held); a clean release leaves an empty lock file."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Without a kernel lock, wipe only our own record (a process that judged us gone may have taken over).
            if self.held and (self.mode != "record" or (self._read_record(fd) or {}).get("token") == self._token):
                os.ftruncate(fd, 0)
        except OSError:
            pass  # the lock dies with the descriptor anyway; an empty record is a courtesy
        finally:
            self.held = False
            if self.mode != "record":
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)  # also for DataLoader workers forked with the descriptor
                except OSError:
                    pass
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_dir(
    run_dir: str | os.PathLike,
    wait_minutes: float,
    *,
    log: Callable[[str], None] = print,
    poll_seconds: float = 0.5,
    on_wait: Callable[[], None] | None = None,
) -> RunDirLock:
    """Take ``RUN_DIR/.lock``, waiting up to ``wait_minutes`` while another process holds it.

    Logs once that it waits and for whom (again every minute, or when the holder changes). ``on_wait`` runs between
    attempts (the loop's rank 0 tells the other ranks it still waits). Raises RunDirBusy naming the holder when the
    wait is over; OSError when the lock file cannot be created.
    """
    lock = RunDirLock(run_dir, log=log)
    start = time.monotonic()
    deadline = start + 60.0 * wait_minutes
    said, said_to = None, None
    try:
        while not lock.try_acquire():
            rec = lock.holder()
            now = time.monotonic()
            if now >= deadline:
                hint = (
                    f" If that process no longer runs, delete {lock.path} and start again (this file system's locks "
                    "do not span nodes: the record is all there is)."
                    if lock.mode != "flock"
                    else ""
                )
                raise RunDirBusy(
                    f"run directory {lock.run_dir} is in use by {describe_holder(rec)}; waited {now - start:.0f} s "
                    f"(train.lock_wait_minutes={wait_minutes:g}). Two runs on one run_dir overwrite each other's "
                    f"checkpoints: let that run finish or stop it{_stop_hint(rec)}, or give this one another "
                    "run_dir." + hint
                )
            who = (rec or {}).get("token")
            if said is None or who != said_to or now - said >= 60:
                left = deadline - now
                span = f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f} s"
                log(f"run directory {lock.run_dir} is in use by {describe_holder(rec)}: waiting up to {span} for it "
                    "to end (train.lock_wait_minutes)")  # fmt: skip
                said, said_to = now, who
            if on_wait is not None:
                on_wait()
            time.sleep(max(0.0, min(poll_seconds, deadline - time.monotonic())))
    except BaseException:
        lock.release()
        raise
    if lock.previous is not None:
        log(f"took over {lock.path} from {describe_holder(lock.previous)}, which ended without releasing it")
    return lock
