"""Pretraining as the references do it: trunk init (no zero-init), the SEER recipes' values against VISSL's configs,
the SwAV queue carried through a crash by the per-rank checkpoint state, and ``model.init_from``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pretrain import _losses  # the tests directory is on sys.path (pytest's rootdir conftest)

from seer.config import load_config
from seer.models.regnet import build_trunk
from seer.ssl.swav import SwAVModel
from seer.train.checkpoint import latest_checkpoint, load_checkpoint, read_trunk_state, save_checkpoint
from seer.train.loop import build_model, pretrain

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
TINY_CFG = {"depth": 4, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}  # the trunk of tiny_overrides


def _last_bn_gammas(model) -> list[torch.Tensor]:
    return [block.conv3.bn.weight.detach() for block in model.trunk.blocks()]


# ----------------------------------------------------------------------------------------------------------------
# Trunk init
# ----------------------------------------------------------------------------------------------------------------
def test_zero_init_is_off_by_default(tiny_overrides, tmp_path):
    """VISSL's RegNet (ClassyVision ``init_weights``) and SwAV's ResNet (``zero_init_residual=False``) start every
    BN gamma at 1; ``model.zero_init=true`` still zeroes the last BN of each residual branch."""
    cfg = load_config(None, [*tiny_overrides, f"run_dir={tmp_path}"])
    assert cfg.model.zero_init is False
    gammas = _last_bn_gammas(build_model(cfg))
    assert gammas and all(bool((g != 0).all()) for g in gammas)
    zeroed = _last_bn_gammas(build_model(load_config(None, [*tiny_overrides, "model.zero_init=true"])))
    assert all(bool((g == 0).all()) for g in zeroed)
    for path in sorted(CONFIGS.glob("*.yaml")):  # no shipped recipe turns it back on
        assert load_config(path).model.zero_init is False, path.name


# ----------------------------------------------------------------------------------------------------------------
# The SEER recipes against VISSL's configs (each value's source file is named on its line in the recipe)
# ----------------------------------------------------------------------------------------------------------------
def test_seer_recipes_follow_vissl():
    rg = {n: load_config(CONFIGS / f"seer_{n}.yaml") for n in ("rg32", "rg64", "rg128", "rg256", "10b")}
    # heads: RG-32 [3712, 4096, 4096, 256] with BN; RG-64/128/256 and 10B [D, 8192, 8192, 256] without BN
    assert (rg["rg32"].swav.head_dims, rg["rg32"].swav.use_bn) == ([4096, 4096, 256], True)
    for n in ("rg64", "rg128", "rg256", "10b"):
        assert (rg[n].swav.head_dims, rg[n].swav.use_bn) == ([8192, 8192, 256], False), n
    for n, c in rg.items():
        assert (c.swav.n_prototypes, c.swav.sinkhorn_iters, c.swav.queue_length) == (16000, 10, 0), n
        assert c.swav.epsilon == (0.03 if n == "10b" else 0.05), n
        assert c.swav.fp32_prototypes and c.optim.final_lr_ratio == 0.001, n
        peak = c.optim.base_lr * 16 * (496 if n == "10b" else 512) / c.optim.reference_batch
        # VISSL's warmup starts at 0.3 x (16 images x 8 GPUs per node) / 256 = 0.15
        assert c.optim.start_warmup_lr * peak == pytest.approx(0.15, rel=1e-4), n
    assert all(rg[n].optim.warmup_iters == 8000 for n in ("rg32", "rg64", "rg128", "rg256"))
    ten = rg["10b"]
    # regnet10B.yaml: lengths [0.043648, 0.956352] of the 1B-image epoch at 7936 per step
    assert ten.total_steps == 126008 and ten.optim.warmup_iters / ten.total_steps == pytest.approx(0.043648, abs=1e-6)
    assert ten.optim.base_lr == pytest.approx(0.3 * 7936 / 256, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Per-rank checkpoint state: the SwAV queue survives a crash
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def queued(tiny_overrides):
    # queue of 16 rows at 8 images per step: filled by iterations 1 and 2, used from 3 on; the checkpoint at step 4
    # holds a full queue, which a resume without it would need two steps to refill.
    return [*tiny_overrides, "swav.freeze_prototypes_iters=3", "optim.base_lr=2.4", "swav.queue_length=16",
            "swav.queue_start_iter=1", "train.total_steps=8", "train.ckpt_every_steps=2",
            "data.source=synthetic", "data.batch_size_per_gpu=8"]  # fmt: skip


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    trunk, _ = read_trunk_state(run_dir)
    head, _ = read_trunk_state(run_dir, prefix="head.")
    return {**{f"trunk.{k}": v for k, v in trunk.items()}, **{f"head.{k}": v for k, v in head.items()}}


def _crash(overrides: list[str]) -> int:
    """`seer pretrain` in a fresh single process (no launcher variables); returns its exit code."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    cmd = [sys.executable, "-m", "seer.cli", "pretrain", *overrides]
    proc = subprocess.run(cmd, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    if proc.returncode != 3:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.returncode


@pytest.fixture
def one_thread():
    """The in-process runs use one thread, as the crashed child does (OMP_NUM_THREADS=1): same sums, same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(600)
def test_queue_is_restored_after_a_crash(tmp_path, queued, monkeypatch, capsys, one_thread):
    straight = tmp_path / "straight"
    pretrain(load_config(None, [*queued, f"run_dir={straight}"]))
    killed = tmp_path / "killed"
    assert _crash([*queued, f"run_dir={killed}", "train.crash_at_step=5"]) == 3
    ckpt = latest_checkpoint(killed)
    assert ckpt.name == "step_00000004"
    saved = torch.load(ckpt / "rank00000.pt", weights_only=True)["method"]
    assert saved["queue_filled"] == 16 and tuple(saved["queue"].shape) == (2, 16, 16)
    forgetful = tmp_path / "forgetful"
    shutil.copytree(killed, forgetful)

    pretrain(load_config(None, [*queued, f"run_dir={killed}"]))
    assert "not restored" not in capsys.readouterr().out
    ref, resumed = _losses(straight), _losses(killed)
    assert all(resumed[s] == pytest.approx(ref[s], abs=1e-6) for s in range(1, 9)), (ref, resumed)
    want, got = _weights(straight), _weights(killed)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)

    # The same resume with the queue dropped takes another path: the per-rank state is what keeps it exact.
    monkeypatch.setattr(SwAVModel, "load_rank_state", lambda self, state: None)
    pretrain(load_config(None, [*queued, f"run_dir={forgetful}"]))
    lost = _losses(forgetful)
    assert lost[5] != pytest.approx(ref[5], abs=1e-6)
    other = _weights(forgetful)
    assert not all(torch.equal(want[k], other[k]) for k in want)


def test_rank_state_files_and_world_size_mismatch(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    queue = torch.arange(6.0).view(2, 3)
    ckpt = save_checkpoint(tmp_path, 1, model, opt, rank_state={"method": {"queue": queue, "queue_filled": 2}})
    assert (ckpt / "rank00000.pt").is_file()
    meta = load_checkpoint(ckpt, model, opt)
    assert meta["rank_state_status"] == "restored" and meta["rank_state"]["method"]["queue_filled"] == 2
    assert torch.equal(meta["rank_state"]["method"]["queue"], queue)
    # saved by 2 ranks, loaded by 1: not restored, and the status says why
    info = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**info, "world_size": 2}))
    meta = load_checkpoint(ckpt, model, opt)
    assert meta["rank_state"] is None and meta["rank_state_status"] == "world_size_mismatch"
    # a checkpoint written without per-rank state
    plain = save_checkpoint(tmp_path / "plain", 1, model, opt)
    meta = load_checkpoint(plain, model, None)
    assert meta["rank_state"] is None and meta["rank_state_status"] == "none_saved"
    # a file the checkpoint records but that is gone or damaged names itself
    (ckpt / "meta.json").write_text(json.dumps(info))
    (ckpt / "rank00000.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="rank00000.pt"):
        load_checkpoint(ckpt, model, opt)
    (ckpt / "rank00000.pt").unlink()
    with pytest.raises(ValueError, match="rank00000.pt: per-rank checkpoint state missing"):
        load_checkpoint(ckpt, model, opt)


# ----------------------------------------------------------------------------------------------------------------
# model.init_from: continued pretraining from a released (or any seer-readable) trunk
# ----------------------------------------------------------------------------------------------------------------
def _saved_trunk(path: Path, cfg: dict) -> dict[str, torch.Tensor]:
    from seer.weights import save_trunk

    torch.manual_seed(7)
    trunk = build_trunk(cfg)
    with torch.no_grad():  # distinctive values everywhere, BN statistics included
        for t in trunk.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))
    save_trunk(trunk, path)
    return {k: v.detach().contiguous().clone() for k, v in trunk.state_dict().items()}


def test_init_from_loads_the_trunk_and_resume_wins(tmp_path, tiny_overrides, capsys):
    path = tmp_path / "trunk.safetensors"
    want = _saved_trunk(path, TINY_CFG)
    run = tmp_path / "run"
    common = [*tiny_overrides, f"run_dir={run}", f"model.init_from={path}", "data.batch_size_per_gpu=4"]
    cfg = load_config(None, [*common, "train.total_steps=1"])
    got = build_model(cfg).trunk.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k].contiguous(), want[k]) for k in want)
    assert not torch.equal(build_model(cfg, init_trunk=False).trunk.stem.conv.weight, got["stem.conv.weight"])

    pretrain(cfg)
    assert f"initialized trunk from {path}" in capsys.readouterr().out
    # the run's own checkpoint wins over init_from when it resumes
    pretrain(load_config(None, [*common, "train.total_steps=2"]))
    out = capsys.readouterr().out
    assert "resumed from" in out and f"model.init_from={path} ignored" in out
    assert "initialized trunk" not in out
    # a seer run directory is a source too (what load_trunk reads)
    again = load_config(None, [*tiny_overrides, f"run_dir={tmp_path / 'again'}", f"model.init_from={run}"])
    trained, _ = read_trunk_state(run)
    got = build_model(again).trunk.state_dict()
    assert all(torch.equal(got[k].contiguous(), trained[k].contiguous()) for k in trained)


def test_init_from_rejects_another_architecture(tmp_path, tiny_overrides):
    path = tmp_path / "wider.safetensors"
    _saved_trunk(path, {**TINY_CFG, "w0": 24})
    cfg = load_config(None, [*tiny_overrides, f"run_dir={tmp_path / 'run'}", f"model.init_from={path}"])
    with pytest.raises(ValueError, match=r"model.init_from: .*different trunk architecture .*stage widths") as info:
        build_model(cfg)
    assert "model.cfg=" in str(info.value)
    missing = load_config(None, [*tiny_overrides, f"model.init_from={tmp_path / 'nope.safetensors'}",
                                 f"run_dir={tmp_path / 'run2'}"])  # fmt: skip
    with pytest.raises((FileNotFoundError, ValueError), match="model.init_from"):
        build_model(missing)


def test_resume_on_another_world_size_says_the_rank_state_is_not_restored(tmp_path, queued, capsys):
    run = tmp_path / "run"
    common = [*queued, f"run_dir={run}"]
    pretrain(load_config(None, [*common, "train.total_steps=4"]))
    ckpt = latest_checkpoint(run)
    info = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**info, "world_size": 2}))  # as if 2 ranks had saved it
    capsys.readouterr()
    pretrain(load_config(None, [*common, "train.total_steps=6"]))
    out = capsys.readouterr().out
    assert "resumed on a different world size: per-rank state (queue, data position) not restored" in out


def test_a_rank_file_that_cannot_be_written_fails_the_save_cleanly(tmp_path, monkeypatch):
    import errno

    import seer.train.checkpoint as ck

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    good = save_checkpoint(tmp_path, 1, model, opt, rank_state={"method": {}})

    real_open = open

    def full(path, *args, **kwargs):  # the disk fills up as the per-rank file is written
        if Path(path).name == "rank00000.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(ck, "open", full, raising=False)
    with pytest.raises(OSError, match=r"(?s)step_00000002.*per-rank state.*No space left.*step_00000001"):
        save_checkpoint(tmp_path, 2, model, opt, rank_state={"method": {}})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good and not list((tmp_path / "checkpoints").glob(".tmp-*"))
