"""A worker of a real `torchrun` run dies (SIGKILL): the elastic agent stops the others, restarts the group, and
the restarted ranks resume from the last complete checkpoint to the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seer.launch.jobs import run_progress

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY = 40, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir: Path, overrides: list[str], max_restarts: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", "--rdzv-backend", "c10d",
           # every rank's output also in its own file (per restart), for the failure message
           "--log-dir", str(run_dir.parent / f"{run_dir.name}_ranks"), "--tee", "3",
           "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "seer.cli", "pretrain",
           "--config", str(REPO / "configs/pretrain/tiny_cpu.yaml"), *overrides, f"run_dir={run_dir}"]  # fmt: skip
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _failure(run_dir: Path) -> str:
    """The agent's log tail and every rank's stderr tail, per restart: which rank failed first, and why."""
    parts = [(run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")[-2000:]]
    for path in sorted((run_dir.parent / f"{run_dir.name}_ranks").rglob("stderr.log")):
        text = path.read_text(errors="replace").strip()
        if text:
            parts.append(f"--- {path.relative_to(run_dir.parent)}\n{text[-2500:]}")
    return "\n".join(parts)


def _worker_pid(run_dir: Path, rank: int) -> int | None:
    out = subprocess.run(["pgrep", "-f", f"seer.cli pretrain.*run_dir={run_dir}"], capture_output=True, text=True)
    for pid in map(int, out.stdout.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # the workers carry RANK; the agent (torch.distributed.run) does not
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RESTART_COUNT=0" in env:
            return pid
    return None


@pytest.mark.timeout(600)
def test_a_killed_torchrun_worker_restarts_the_group_from_the_last_checkpoint(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "swav.freeze_prototypes_iters=3", "data.batch_size_per_gpu=8",
                 "data.global_batch_size=0", "optim.base_lr=2.4", "optim.warmup_iters=2",
                 f"train.ckpt_every_steps={CKPT_EVERY}", f"train.total_steps={STEPS}", "data.workers=0"]  # fmt: skip
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    for d in (straight, cut):
        d.mkdir()
    ref = _torchrun(straight, overrides, max_restarts=0)
    assert ref.wait(timeout=300) == 0, _failure(straight)

    proc = _torchrun(cut, overrides, max_restarts=1)
    try:
        deadline = time.time() + 240
        while run_progress(cut) < 2 * CKPT_EVERY:
            assert proc.poll() is None and time.time() < deadline, _failure(cut)
            time.sleep(0.2)
        pid = _worker_pid(cut, 1)
        assert pid is not None
        t_kill = time.time()
        lost_at = run_progress(cut)
        os.kill(pid, signal.SIGKILL)
        # the agent notices within its monitor interval, stops rank 0 and starts both again
        while _worker_pid(cut, 0) is not None:
            assert time.time() - t_kill < 60, "rank 0 still running a minute after its peer died"
            time.sleep(0.1)
        stopped_s = time.time() - t_kill
        assert proc.wait(timeout=300) == 0, _failure(cut)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "cut.log").read_text()
    assert "resumed from" in log or "resuming from" in log.lower(), log[-3000:]
    names = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert names[-1] == f"step_{STEPS:08d}" and not [n for n in names if n.startswith(".tmp")], names
    # the restarted group trained from a complete checkpoint at or after the kill to the uninterrupted weights
    from seer.weights import load_trunk

    a, b = load_trunk(str(cut)).state_dict(), load_trunk(str(straight)).state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    print(f"torchrun: rank 0 stopped {stopped_s:.1f} s after rank 1 was killed at step >= {lost_at}")
