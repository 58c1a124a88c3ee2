"""Fault injection into pretraining: SIGKILL at random moments (checkpoint saves included), a full or unwritable
checkpoint directory, and shards with every kind of corruption. Nothing complete may be lost, nothing incomplete may
look complete, and a resumed run must end where an uninterrupted one does.

Counts (faults injected, runs survived, checkpoints lost) are printed by each test (``pytest -s`` shows them) and
collected in docs/guarantees.md.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from seer.config import load_config
from seer.train.checkpoint import latest_checkpoint, list_checkpoints, read_meta, read_trunk_state
from seer.train.loop import pretrain

pytestmark = pytest.mark.faults


@pytest.fixture
def tiny(tiny_overrides):
    return [*tiny_overrides, "swav.freeze_prototypes_iters=2", "optim.base_lr=2.4"]


# The child process: `seer pretrain`, optionally with a slow checkpoint save (FAULT_SLOW_SAVE seconds spent after
# DCP has written the shards into .tmp-step_*, before meta.json and the rename), which widens the window in which a
# kill lands inside a save. Nothing else of the code under test is changed.
RUNNER = """
import os, sys, time
slow = float(os.environ.get("FAULT_SLOW_SAVE", "0"))
if slow:
    import seer.train.checkpoint as ck
    real = ck.dcp.save
    def save(*args, **kwargs):
        out = real(*args, **kwargs)
        time.sleep(slow)
        return out
    ck.dcp.save = save
from seer.cli import main
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(world_size: int, overrides: list[str], log: Path, slow_save: float = 0.0) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   FAULT_SLOW_SAVE=str(slow_save))  # fmt: skip
        out = open(log.with_suffix(f".rank{rank}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-c", RUNNER, *overrides], env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
        out.close()
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _kill(procs)
            raise
    return [p.returncode for p in procs]


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every rank, as a scheduler kills a job (no handler runs, nothing is flushed)."""
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def _tails(log: Path, n: int = 3000) -> str:
    """The end of every rank's log of one attempt: a rank that died says why in its own log."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-n:]}" for p in sorted(log.parent.glob(f"{log.name}.rank*.log")))


def _metric_lines(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return [line for line in path.read_text().splitlines() if line.strip().endswith("}")] if path.is_file() else []


def _logged_steps(run_dir: Path, skip: int = 0) -> int:
    """The newest step logged by the current attempt (its records come after the first ``skip`` lines)."""
    return max((json.loads(line)["step"] for line in _metric_lines(run_dir)[skip:]), default=0)


def _check_run_dir(run_dir: Path) -> list[int]:
    """Every directory that looks like a checkpoint is complete and readable; returns the complete steps."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    looks_complete = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    assert looks_complete == list_checkpoints(run_dir), "a step_* directory without meta.json"
    steps = []
    for ckpt in looks_complete:
        meta = read_meta(ckpt)  # meta.json is written last, inside the temporary directory, before the rename
        assert meta["world_size"] == 2 and f"step_{meta['step']:08d}" == ckpt.name
        state, _ = read_trunk_state(ckpt)  # every shard present and readable
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        steps.append(meta["step"])
    return steps


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    trunk, _ = read_trunk_state(run_dir)
    head, _ = read_trunk_state(run_dir, prefix="head.")
    return {**{f"trunk.{k}": v for k, v in trunk.items()}, **{f"head.{k}": v for k, v in head.items()}}


# Resumed 2-rank runs replay the same data (a pure function of the step), restore every rank's RNG state and the
# optimizer; measured difference to the uninterrupted run: 0.0. The tolerance only allows float reordering.
WEIGHT_TOL = 1e-5


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, tiny) -> None:
    total = 12
    common = [*tiny, f"train.total_steps={total}", "train.ckpt_every_steps=2", "train.keep_last=2",
              "data.batch_size_per_gpu=4"]  # fmt: skip
    straight = tmp_path / "straight"
    assert _wait(_start(2, [*common, f"run_dir={straight}"], tmp_path / "straight"), 240) == [0, 0], _tails(
        tmp_path / "straight"
    )

    rng = random.Random(20261124)
    modes = ["save", "save", "step", "step", "step"]
    rng.shuffle(modes)
    run = tmp_path / "killed"
    kills, survived, lost, kill_log = 0, 0, 0, []
    prev_steps: list[int] = []
    attempt = 0
    while kills < len(modes):
        attempt += 1
        assert attempt <= 10, f"could not place {len(modes)} kills: {kill_log}"
        mode = modes[kills]
        latest = max(prev_steps, default=0)
        log = tmp_path / f"attempt{attempt}"
        seen = len(_metric_lines(run))
        procs = _start(2, [*common, f"run_dir={run}"], log, slow_save=2.0 if mode == "save" else 0.0)
        # where to strike: inside the save of the next checkpoint, or a random time after a random step
        if mode == "save":
            target = latest + 2
            tmp_dir = run / "checkpoints" / f".tmp-step_{target:08d}"

            # a .tmp dir left by an earlier kill does not count: this attempt must have written it. Its mtime alone
            # does not tell: the new run's startup clean-up deletes the stale dir file by file, which touches it
            # (a kill there once struck before the run had resumed), so the run must also be past its startup.
            def cond(d: Path = tmp_dir, t0: float = time.time(), rank0: Path = log.with_suffix(".rank0.log")) -> bool:
                started = rank0.is_file() and "pretraining " in rank0.read_text()
                return started and d.is_dir() and d.stat().st_mtime >= t0 and any(d.glob("*.distcp"))

        else:
            target = min(total - 1, latest + rng.randint(1, 3))

            def cond(seen: int = seen, target: int = target) -> bool:
                return _logged_steps(run, seen) >= target

        deadline = time.time() + 180
        while not cond() and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.005)
        if all(p.poll() is None for p in procs) and cond():
            time.sleep(rng.uniform(0.0, 0.6 if mode == "save" else 0.3))
            killed_during_save = any((run / "checkpoints").glob(".tmp-step_*"))
            _kill(procs)
            kills += 1
            kill_log.append((mode, target, killed_during_save))
        else:
            _wait(procs, 60)
            pytest.fail(f"attempt {attempt} ({mode} @ {target}) ended before the kill: {[p.returncode for p in procs]}")
        text = log.with_suffix(".rank0.log").read_text()
        if latest:  # the resumed run started from the newest complete checkpoint
            assert f"resumed from {run / 'checkpoints' / f'step_{latest:08d}'} (step {latest}" in text, text[-2000:]
        survived += 1  # it resumed correctly (checked above) and made progress or was killed on purpose
        steps = _check_run_dir(run)
        if max(steps, default=0) < latest:
            lost += 1
        prev_steps = steps

    # the last attempt runs to the end
    log = tmp_path / "final"
    assert _wait(_start(2, [*common, f"run_dir={run}"], log), 240) == [0, 0], _tails(log)
    assert f"step_{max(prev_steps):08d}" in log.with_suffix(".rank0.log").read_text()
    assert _check_run_dir(run)[-1] == total and not list((run / "checkpoints").glob(".tmp-*"))
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= WEIGHT_TOL, worst
    print(f"\nSIGKILL faults injected: {kills} ({kill_log}); runs survived: {survived}; checkpoints lost: {lost}; "
          f"max |w_resumed - w_straight| = {worst:.3g}")  # fmt: skip
    assert kills == 5 and sum(1 for _, _, in_save in kill_log if in_save) >= 2 and lost == 0


# ----------------------------------------------------------------------------------------------------------------
# A checkpoint directory that is full or cannot be written
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def one_run(tiny):
    return [*tiny, "train.ckpt_every_steps=2", "data.batch_size_per_gpu=4", "train.total_steps=6"]


def _disk_full_at(monkeypatch, step: int) -> list[str]:
    """DCP's file writes for checkpoint ``step`` fail with ENOSPC after a few bytes (a disk filling up)."""
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream
    failed: list[str] = []

    class Full(io.RawIOBase):
        def __init__(self, stream):
            self.stream, self.budget = stream, 64

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            if self.budget <= 0:
                failed.append(str(self.stream.name))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.stream.name)
            n = self.stream.write(bytes(b)[: self.budget])
            self.budget -= n
            return n

        def tell(self) -> int:
            return self.stream.tell()

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with real(self, path, mode) as stream:
            yield Full(stream) if "w" in mode and f"step_{step:08d}" in str(path) else stream

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    return failed


def test_disk_full_during_save_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, capsys, one_run):
    failed = _disk_full_at(monkeypatch, 4)
    run = tmp_path / "run"
    with pytest.raises(OSError, match=r"(?s)No space left on device.*step_00000004") as info:
        pretrain(load_config(None, [*one_run, f"run_dir={run}"]))
    assert failed, "the injected fault never fired"
    assert "step_00000002" in str(info.value)  # the message says which checkpoint is still good
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    before = _weights(run)
    # the same through the CLI: exit code 1 and a one-line message, no traceback
    code = _cli(["pretrain", *one_run, f"run_dir={run}"], capsys)
    assert code[0] == 1 and "No space left on device" in code[2] and "Traceback" not in code[2], code
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert all(torch.equal(before[k], v) for k, v in _weights(run).items())
    # space is back: the run resumes from step 2 and finishes
    monkeypatch.undo()
    summary = pretrain(load_config(None, [*one_run, f"run_dir={run}"]))
    assert summary["step"] == 6 and latest_checkpoint(run).name == "step_00000006"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_exit_inside_a_save_is_an_exit_not_a_disk_error(tmp_path, monkeypatch, one_run):
    """submitit's timeout handler calls sys.exit on rank 0 to requeue the job; arriving during DCP's writes, the
    exit must reach the launcher as SystemExit (requeue), not as "cannot write checkpoint" (failed)."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream

    def create_stream(self, path, mode):
        if "step_00000004" in str(path) and "w" in mode:
            sys.exit(-1)  # what the signal handler does, from inside the write
        return real(self, path, mode)

    monkeypatch.setattr(FileSystem, "create_stream", create_stream)
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        pretrain(load_config(None, [*one_run, f"run_dir={run}"]))
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written one is gone


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from seer.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_unwritable_run_dir_is_a_clear_error(tmp_path, capsys, one_run):
    """A run directory under a regular file (ENOTDIR; root ignores chmod, so permissions cannot be used here)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for run in (blocker / "run", blocker):
        with pytest.raises(OSError) as info:
            pretrain(load_config(None, [*one_run, f"run_dir={run}"]))
        assert str(blocker) in str(info.value)
        code, _, err = _cli(["pretrain", *one_run, f"run_dir={run}"], capsys)
        assert code == 1 and str(blocker) in err and "Traceback" not in err, err
    # checkpoints/ replaced by a file after the run started: fails at the first save, naming it, before training on
    run = tmp_path / "run2"
    pretrain(load_config(None, [*one_run, f"run_dir={run}", "train.total_steps=2"]))
    good = _weights(run)
    shutil.move(run / "checkpoints", tmp_path / "moved")
    (run / "checkpoints").write_text("oops")
    with pytest.raises(OSError) as info:
        pretrain(load_config(None, [*one_run, f"run_dir={run}", "train.total_steps=4"]))
    assert "checkpoints" in str(info.value)
    moved, _ = read_trunk_state(tmp_path / "moved" / "step_00000002")  # the earlier checkpoint is intact
    assert all(torch.equal(good[f"trunk.{k}"], v) for k, v in moved.items())


# ----------------------------------------------------------------------------------------------------------------
# Shards with every kind of corruption mixed in at 5%
# ----------------------------------------------------------------------------------------------------------------
KINDS = {"corrupt_image", "no_image", "missing_label", "bad_tar", "empty_shard"}


def _jpeg(rng: np.random.Generator, side: int = 64) -> bytes:
    from PIL import Image

    base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _corrupt_shards(out: Path, n_shards: int = 12, per_shard: int = 20, seed: int = 0) -> dict:
    """``n_shards`` shards of ``per_shard`` samples, one bad sample in each (5%), the kind rotating over the shards;
    plus an empty tar and a 0-byte file. Returns the pattern and the injected counts."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    injected = {k: 0 for k in KINDS}
    sample_kinds = ["corrupt_image", "no_image", "missing_label", "truncated"]
    for s in range(n_shards):
        kind = sample_kinds[s % len(sample_kinds)]
        bad_at = per_shard - 1 if kind == "truncated" else int(rng.integers(per_shard))
        samples = []
        for i in range(per_shard):
            key = f"s{s:02d}_{i:03d}"
            sample = {"__key__": key, "jpg": _jpeg(rng), "cls": str(i % 4).encode()}
            if i == bad_at and kind == "corrupt_image":
                sample["jpg"] = sample["jpg"][:60] + bytes(40)  # a JPEG header and garbage
            elif i == bad_at and kind == "no_image":
                sample = {"__key__": key, "txt": b"a caption without its image"}
            elif i == bad_at and kind == "missing_label":
                del sample["cls"]
            samples.append(sample)
        path = out / f"data-{s:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as w:
            for sample in samples:
                w.write(sample)
        if kind == "truncated":  # cut inside the last sample's image: the tar ends early
            with tarfile.open(path) as tf:
                cut = next(m for m in tf.getmembers() if m.name == f"s{s:02d}_{bad_at:03d}.jpg").offset_data + 50
            path.write_bytes(path.read_bytes()[:cut])
            injected["bad_tar"] += 1
        else:
            injected[kind] += 1
    with wds.TarWriter(str(out / f"data-{n_shards:06d}.tar"), encoder=False):
        pass  # a valid tar with no member
    (out / f"data-{n_shards + 1:06d}.tar").write_bytes(b"")  # a 0-byte file
    injected["empty_shard"] += 2
    return {"pattern": str(out / f"data-{{000000..{n_shards + 1:06d}}}.tar"), "injected": injected,
            "samples": n_shards * per_shard}  # fmt: skip


def test_training_on_corrupt_shards_completes_and_reports_skips(tmp_path, capsys, tiny):
    data = _corrupt_shards(tmp_path / "shards", n_shards=8)
    run = tmp_path / "run"
    cfg = load_config(None, [
        *[o for o in tiny if not o.startswith(("data.crops", "data.image_size"))],
        "data.source=shards", f"data.urls={data['pattern']}", "data.multicrop=cpu_tiny", "data.shuffle_buffer=50",
        "data.batch_size_per_gpu=8", "train.total_steps=12", "train.steps_per_epoch=8", f"run_dir={run}",
    ])  # fmt: skip
    summary = pretrain(cfg)
    out = capsys.readouterr().out
    assert summary["step"] == 12 and np.isfinite(summary["loss"])
    skipped = summary["data_skipped"]
    assert skipped["samples"] == 12 * 8  # every step had a full batch
    # every kind of corruption was met and counted; a sample without a label is not one: pretraining needs none
    assert set(skipped["by_kind"]) == KINDS - {"missing_label"}, skipped
    assert skipped["skipped"] == sum(skipped["by_kind"].values())
    assert f"skipped {skipped['skipped']} bad sample(s) or shard(s)" in out
    assert latest_checkpoint(run).name == "step_00000012"
    state, _ = read_trunk_state(run)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    print(f"\ncorrupt shards: injected {data['injected']} in {data['samples']} samples; skipped {skipped}")


def test_kill_while_deleting_an_old_checkpoint_leaves_nothing_half_complete(tmp_path, monkeypatch, tiny):
    """keep_last deletes old checkpoints; a kill in the middle of a deletion must not leave a ``step_*`` directory
    whose meta.json survived but whose shards are gone (it would look complete)."""
    import seer.train.checkpoint as ck

    real = shutil.rmtree
    hits: list[str] = []

    def killed_midway(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(("step_", ".tmp-step_")) and (path / "meta.json").exists() and not hits:
            hits.append(path.name)
            next(path.glob("*.distcp")).unlink()  # the first files are gone, meta.json is not ...
            raise KeyboardInterrupt  # ... when the process dies
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ck.shutil, "rmtree", killed_midway)
    run = tmp_path / "run"
    cfg = [*tiny, "data.batch_size_per_gpu=4", "train.ckpt_every_steps=1", "train.keep_last=1", f"run_dir={run}"]
    with pytest.raises(KeyboardInterrupt):
        pretrain(load_config(None, [*cfg, "train.total_steps=3"]))
    monkeypatch.undo()
    assert hits, "the deletion was never reached"
    steps = [p.name for p in list_checkpoints(run)]
    assert steps == ["step_00000002"], steps  # step 1 was being deleted: it no longer looks like a checkpoint
    for ckpt in (run / "checkpoints").glob("step_*"):
        read_trunk_state(ckpt)  # every visible checkpoint loads in full
    summary = pretrain(load_config(None, [*cfg, "train.total_steps=3"]))
    assert summary["step"] == 3 and [p.name for p in list_checkpoints(run)] == ["step_00000003"]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def _step_keys(run_dir: Path) -> dict[int, list[list[str]]]:
    """Step -> [rank 0's keys, rank 1's keys] from data.record_keys (a resumed run's record of a step wins)."""
    out: dict[int, list] = {}
    for rank in range(2):
        for line in (run_dir / "data_keys" / f"rank{rank:05d}.jsonl").read_text().splitlines():
            if line.strip().endswith("}"):  # a line cut by the kill is not a record
                rec = json.loads(line)
                out.setdefault(rec["step"], [None, None])[rank] = rec["keys"]
    return out


@pytest.mark.multiprocess
@pytest.mark.timeout(420)
def test_sigkill_mid_epoch_on_shards_resumes_exactly(tmp_path: Path, tiny) -> None:
    """2 ranks on unlabeled ShardWriter shards, SIGKILLed mid-epoch and resumed with another worker count: the
    per-step sample keys and the final weights equal the uninterrupted run's (bitwise)."""
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "train-%06d.tar"), maxcount=30, verbose=0) as sink:
        for i in range(128):  # 128 images over 2 ranks x 4 per step: an epoch is 16 steps
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
            sink.write({"__key__": f"img{i:04d}", "jpg": buf.getvalue()})
    total = 10
    common = [*[o for o in tiny if not o.startswith(("data.crops", "data.image_size"))], "data.source=shards",
              f"data.urls={shards}/train-*.tar", "data.multicrop=cpu_tiny", "data.shuffle_buffer=16",
              "data.batch_size_per_gpu=4", "data.record_keys=true", f"train.total_steps={total}",
              "train.ckpt_every_steps=3"]  # fmt: skip
    straight = tmp_path / "straight"
    assert _wait(_start(2, [*common, "data.workers=2", f"run_dir={straight}"], tmp_path / "straight"), 240) == [0, 0], (
        _tails(tmp_path / "straight")
    )

    run = tmp_path / "killed"
    procs = _start(2, [*common, "data.workers=2", f"run_dir={run}"], tmp_path / "first")
    deadline = time.time() + 180
    while _logged_steps(run) < 7 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.005)
    assert all(p.poll() is None for p in procs), "the run ended before the kill"
    _kill(procs)  # mid-epoch (step 7 of 16), after the checkpoint of step 6
    latest = latest_checkpoint(run)
    assert latest is not None and 3 <= read_meta(latest)["step"] < total
    resumed_log = tmp_path / "resumed"
    assert _wait(_start(2, [*common, "data.workers=1", f"run_dir={run}"], resumed_log), 240) == [0, 0], _tails(
        resumed_log
    )
    text = resumed_log.with_suffix(".rank0.log").read_text()
    assert "data position restored" in text, text[-2000:]

    want, got = _step_keys(straight), _step_keys(run)
    assert sorted(want) == sorted(got) == list(range(1, total + 1))
    assert got == want  # the same samples at every step on both ranks
    assert len({k for s in want.values() for r in s for k in r}) == total * 2 * 4  # none repeated within the epoch
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
