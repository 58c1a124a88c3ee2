"""A real single-node SLURM cluster on this machine: munge, slurmctld and slurmd from Debian's packages.

The ``slurm`` tests use it through the ``slurm_cluster`` fixture (tests/conftest.py); it also runs by hand, to try
``seer launch`` against a real scheduler on one machine (docs/slurm.md, "Try it on one machine")::

    python tests/slurm_cluster.py up --dir /tmp/seer-slurm      # installs slurm-wlm + munge if missing (root)
    export SLURM_CONF=/tmp/seer-slurm/slurm.conf                 # what `up` prints
    python launch/submit.py pretrain --config tiny_cpu --nodes 1 --gpus-per-node 0 --tasks-per-node 2 \\
        --cpus-per-task 1 --mem-gb 4 --partition debug
    python tests/slurm_cluster.py down --dir /tmp/seer-slurm

Everything the cluster writes (config, munge key and socket, state, spool, logs, pid files) lives in the one
directory, so nothing under /etc is touched and ``down`` leaves the machine as it was, except the packages. The node
is this machine with CPUs = the cores this process may use, one partition ``debug``. Only the daemons this module
started are stopped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["ClusterUnavailable", "SlurmCluster", "ensure_packages"]

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
PARTITION = "debug"


class ClusterUnavailable(RuntimeError):
    """No cluster can be started here; the message says why (the slurm tests skip with it)."""


def ensure_packages(install: bool = True) -> None:
    """The SLURM and munge binaries, installed with apt-get when missing and allowed (root with apt-get)."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if not missing:
        return
    if not install:
        raise ClusterUnavailable(f"SLURM is not installed (missing {', '.join(missing)})")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ClusterUnavailable(
            f"SLURM is not installed (missing {', '.join(missing)}) and cannot be installed here: "
            f"run `apt-get install {' '.join(PACKAGES)}` as root"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a machine whose package lists were never fetched
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return int(total_kb / 1024 * 0.9)  # slurmd refuses a node that declares more than it finds


class SlurmCluster:
    """One node, one partition, every file under ``root``.

    Args:
        root: the cluster's directory (created).
        cpus: the node's CPUs (default: the cores this process may use).
    """

    def __init__(self, root: str | os.PathLike, cpus: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.cpus = int(cpus or len(os.sched_getaffinity(0)))
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self._procs: dict[str, subprocess.Popen] = {}

    # -- configuration ------------------------------------------------------------------------------------------
    def env(self) -> dict:
        """The variables a client (sbatch, srun, scontrol, submitit) needs for this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(128))
        os.chmod(self.root / "munge", 0o700)
        os.chmod(key, 0o400)
        r = self.root
        lines = [
            "ClusterName=seer-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmUser={os.environ.get('USER') or 'root'}" if os.geteuid() != 0 else "SlurmUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            # cred_expire: a requeued job waits this long before it may start again (default 120 s)
            f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            # no cgroups in a container: track processes by their parent, no task binding
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "JobRequeue=1",
            # seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or out of time
            "KillWait=5",
            # a finished job stays visible to scontrol / squeue for 10 minutes (tests read its state)
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # -- daemons ------------------------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **self.env()})  # fmt: skip
        self._procs[name] = proc  # our child: poll() reaps it, or kill(pid, 0) would still see the zombie
        (self.root / f"{name}.started").write_text(str(proc.pid))

    def _munge_ok(self) -> bool:
        sock = str(self.root / "munge" / "munge.socket")
        try:
            enc = subprocess.run(["munge", "-n", "-S", sock], capture_output=True, timeout=10)
            if enc.returncode != 0:
                return False
            dec = subprocess.run(["unmunge", "-S", sock], input=enc.stdout, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return dec.returncode == 0

    def up(self, timeout_s: float = 90.0) -> SlurmCluster:
        """Install what is missing, write the config, start munged, slurmctld and slurmd, wait for an idle node."""
        ensure_packages()
        if self.running():
            return self
        self._write_config()
        m = self.root / "munge"
        self._start("munged", [_sbin("munged"), "--foreground", "--force", f"--socket={m}/munge.socket",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={self.root}/log/munged.log", f"--seed-file={m}/munged.seed"])  # fmt: skip
        self._wait(self._munge_ok, 20, "munged")
        self._start("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", [_sbin("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(self._node_idle, timeout_s, f"node {self.node} idle in partition {PARTITION}")
        return self

    def _node_idle(self) -> bool:
        try:
            out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout
        except subprocess.TimeoutExpired:
            return False
        return out.strip().startswith("idle")

    def running(self) -> bool:
        return self.conf.exists() and all(self._pid(n) for n in ("munged", "slurmctld", "slurmd")) and self._node_idle()

    def _pid(self, name: str) -> int | None:
        path = self.root / f"{name}.started"
        if not path.exists():
            return None
        pid = int(path.read_text())
        proc = self._procs.get(name)
        if proc is not None and proc.pid == pid:
            return pid if proc.poll() is None else None
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return None
        return pid

    def _wait(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while not predicate():
            for name in ("munged", "slurmctld", "slurmd"):
                if (self.root / f"{name}.started").exists() and self._pid(name) is None:
                    raise ClusterUnavailable(f"{name} exited: {self._log_tail(name)}")
            if time.time() > deadline:
                raise ClusterUnavailable(f"timed out after {timeout_s:.0f} s waiting for {what}: "
                                         f"{self._log_tail('slurmctld')} {self._log_tail('slurmd')}")  # fmt: skip
            time.sleep(0.5)

    def _log_tail(self, name: str) -> str:
        texts = [p.read_text(errors="replace")[-600:] for p in (self.root / "log").glob(f"{name}*") if p.is_file()]
        return " | ".join(t.strip() for t in texts if t.strip()) or "(no log)"

    def down(self) -> None:
        """Cancel every job, stop the daemons this cluster started (slurmd, slurmctld, munged, in that order)."""
        if self._pid("slurmctld"):
            self.run(["scancel", "--full", "--quiet", "-u", str(os.geteuid())], check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is None:
                continue
            os.killpg(pid, signal.SIGTERM)
            deadline = time.time() + 15
            while self._pid(name) and time.time() < deadline:
                time.sleep(0.2)
            if self._pid(name):
                os.killpg(pid, signal.SIGKILL)
        # job steps slurmd started outlive it (slurmstepd): anything left under our spool is ours
        subprocess.run(["pkill", "-KILL", "-f", f"slurmstepd.*{self.root}"], capture_output=True)

    # -- clients ------------------------------------------------------------------------------------------------
    def run(self, argv: list[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(argv, env={**os.environ, **self.env()}, capture_output=True, text=True,
                              timeout=timeout, check=check)  # fmt: skip

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, RunTime, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        fields = {}
        for item in out.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        return fields


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("up", "down", "status"))
    ap.add_argument("--dir", default="/tmp/seer-slurm", help="the cluster's directory (default %(default)s)")
    ap.add_argument("--cpus", type=int, default=None, help="the node's CPUs (default: this machine's)")
    args = ap.parse_args(argv)
    cluster = SlurmCluster(args.dir, cpus=args.cpus)
    try:
        if args.action == "up":
            cluster.up()
            print(cluster.run(["sinfo"]).stdout, end="")
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.action == "down":
            cluster.down()
        else:
            print("running" if cluster.running() else "not running")
    except ClusterUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
