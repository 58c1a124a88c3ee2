"""End-to-end pretraining on generated data: loss goes down, FSDP follows one process, resume is exact."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seer.config import load_config
from seer.data.synthetic import SyntheticMultiCrop
from seer.train.checkpoint import latest_checkpoint, list_checkpoints, read_meta, read_trunk_state
from seer.train.loop import pretrain


@pytest.fixture
def tiny(tiny_overrides):
    return [*tiny_overrides, "swav.freeze_prototypes_iters=3", "optim.base_lr=2.4"]


# BatchNorm statistics are per process under FSDP2 without SyncBN (CPU has none), so a run on R ranks is compared
# with one process that normalizes the same per-rank micro-batches (train.bn_splits=R). The SwAV head's BN would see
# the whole batch in one process and a rank's share under FSDP, so the head has no BN in these comparisons.
@pytest.fixture
def compare(tiny):
    return [*tiny, "swav.use_bn=false", "train.total_steps=6"]


# Losses of one process and of two FSDP ranks differ only by float summation order (gradient reduce-scatter,
# all-reduced Sinkhorn sums): measured ~5e-7 over 6 LARS steps; 1e-4 leaves room and still catches any real bug.
TOL = 1e-4


def _losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl (the last record of a step wins: a resumed run re-logs replayed steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world_size: int, overrides: list[str], timeout: float = 240) -> list[int]:
    """Run `seer pretrain` on `world_size` gloo ranks (torchrun-style variables); returns the exit codes."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        if world_size == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k)
        cmd = [sys.executable, "-m", "seer.cli", "pretrain", *overrides]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        codes.append(p.returncode)
        if p.returncode not in (0, 3):
            print(out[-3000:])
    return codes


def test_synthetic_data_is_a_function_of_the_sample_index():
    data = SyntheticMultiCrop([(2, 32), (2, 16)], image_size=48, classes=8, seed=1)
    whole = data.batch(step=3, rank=0, batch_size=8, world_size=1)
    halves = [data.batch(step=3, rank=r, batch_size=4, world_size=2) for r in range(2)]
    assert [tuple(c.shape) for c in whole] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    for i, crop in enumerate(whole):
        torch.testing.assert_close(crop, torch.cat([h[i] for h in halves]), rtol=0, atol=0)
    assert not torch.equal(whole[0], data.batch(step=4, rank=0, batch_size=8, world_size=1)[0])


def test_one_process_training_lowers_the_swav_loss(tmp_path, tiny):
    cfg = load_config(None, [*tiny, f"run_dir={tmp_path}", "train.total_steps=40", "data.batch_size_per_gpu=32",
                             "optim.warmup_iters=5"])  # fmt: skip
    summary = pretrain(cfg)
    losses = _losses(tmp_path)
    assert summary["step"] == 40 and len(losses) == 40
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.1, (first, last)
    # the run directory holds the resolved config, a final checkpoint and TensorBoard-free metrics
    assert (tmp_path / "config.yaml").is_file()
    assert latest_checkpoint(tmp_path).name == "step_00000040"
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lr", "images_per_sec", "step_time", "data_time", "peak_memory_gb", "eta_min"} <= set(rec)


@pytest.fixture
def one_thread():
    """In-process runs on one thread, as the killed child (OMP_NUM_THREADS=1): the same sums, so the same bits (two
    threads vs one differ by ~3e-6 in the first loss of a trunk without zero-init)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_killed_run_resumes_on_the_uninterrupted_trajectory(tmp_path, tiny, one_thread):
    common = [*tiny, "train.total_steps=8", "train.ckpt_every_steps=2", "data.batch_size_per_gpu=8"]
    pretrain(load_config(None, [*common, f"run_dir={tmp_path / 'straight'}"]))
    # The killed run hard-exits right after step 5 (last checkpoint: step 4), as a SIGKILL'd job would.
    killed = tmp_path / "killed"
    assert _launch(1, [*common, f"run_dir={killed}", "train.crash_at_step=5"]) == [3]
    assert latest_checkpoint(killed).name == "step_00000004"
    pretrain(load_config(None, [*common, f"run_dir={killed}"]))
    straight, resumed = _losses(tmp_path / "straight"), _losses(killed)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):  # same process count, same data, restored optimizer state: bit-exact
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    assert [p.name for p in list_checkpoints(killed)] == ["step_00000004", "step_00000006", "step_00000008"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, tiny):
    real = SyntheticMultiCrop.batch

    def poisoned(self, step, rank, batch_size, world_size):
        crops = real(self, step, rank, batch_size, world_size)
        return [c * float("nan") for c in crops] if step == 3 else crops

    monkeypatch.setattr(SyntheticMultiCrop, "batch", poisoned)
    cfg = load_config(None, [*tiny, f"run_dir={tmp_path}", "train.total_steps=6", "train.ckpt_every_steps=2",
                             "data.batch_size_per_gpu=8"])  # fmt: skip
    with pytest.raises(FloatingPointError, match="loss is nan at step 4"):
        pretrain(cfg)
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step_00000002"]
    assert read_meta(ckpts[0])["step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    state, _ = read_trunk_state(tmp_path)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_read_trunk_state_matches_the_trained_trunk(tmp_path, tiny):
    cfg = load_config(None, [*tiny, f"run_dir={tmp_path}", "train.total_steps=2", "data.batch_size_per_gpu=8"])
    pretrain(cfg)
    state, cfg_dict = read_trunk_state(tmp_path)
    assert cfg_dict["depth"] == 4 and cfg_dict["w0"] == 16
    from seer.models.regnet import build_trunk

    trunk = build_trunk(cfg_dict)
    assert set(state) == set(trunk.state_dict())
    trunk.load_state_dict(state)
    # reading one checkpoint directory works as well as reading the run directory
    state2, _ = read_trunk_state(latest_checkpoint(tmp_path))
    assert all(torch.equal(state[k], state2[k]) for k in state)

    # `seer export RUN_DIR OUT` writes a file the weights loaders read back, and load_trunk reads run dirs too
    import seer.weights as weights
    from seer.weights.cli import cli_export

    out = tmp_path / "trunk.safetensors"
    assert cli_export([str(tmp_path), str(out)]) == 0
    for source in (out, tmp_path):
        loaded = weights.load_trunk(source).state_dict()
        assert all(torch.equal(loaded[k].contiguous(), state[k].contiguous()) for k in state), source
    assert cli_export([str(tmp_path / "missing"), str(out)]) == 1


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_two_fsdp_ranks_follow_one_process_and_resume_on_one(tmp_path, compare):
    """2 gloo ranks x 4 images (FSDP2, activation checkpointing on) vs one process x 8 images (no checkpointing,
    BN over the same 4-image micro-batches); then a 2-rank checkpoint resumed by one process."""
    two = tmp_path / "two"
    codes = _launch(2, [*compare, f"run_dir={two}", "data.batch_size_per_gpu=4", "model.activation_checkpointing=true"])
    assert codes == [0, 0] or _losses(two).get(6) is not None  # gloo may abort at exit after the work is done
    one = tmp_path / "one"
    pretrain(load_config(None, [*compare, f"run_dir={one}", "data.batch_size_per_gpu=8", "train.bn_splits=2"]))
    l2, l1 = _losses(two), _losses(one)
    assert sorted(l2) == list(range(1, 7))
    for step in range(1, 7):
        assert l2[step] == pytest.approx(l1[step], abs=TOL), (step, l2[step], l1[step])
    assert read_meta(latest_checkpoint(two))["world_size"] == 2

    # Killed after step 3 on 2 ranks (checkpoint at step 2: prototypes still frozen, so they have no optimizer
    # state yet), resumed by a single process: DCP reshards and the trajectory continues.
    moved = tmp_path / "moved"
    _launch(2, [*compare, f"run_dir={moved}", "data.batch_size_per_gpu=4", "train.ckpt_every_steps=2",
                "train.crash_at_step=3"])  # fmt: skip
    assert latest_checkpoint(moved).name == "step_00000002"
    assert read_meta(latest_checkpoint(moved))["world_size"] == 2
    pretrain(load_config(None, [*compare, f"run_dir={moved}", "data.batch_size_per_gpu=8", "train.bn_splits=2"]))
    lm = _losses(moved)
    for step in range(1, 7):
        assert lm[step] == pytest.approx(l2[step], abs=TOL), (step, lm[step], l2[step])
