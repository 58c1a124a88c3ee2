"""A time budget (train.max_minutes): the length bought from the first steps' speed, the schedule fitted to it, agreed,
saved in the checkpoints and reused on resume; seer demo --minutes splits the demo's budget over its runs.

``train.min_step_seconds`` makes every step last at least that long, so a budget buys a predictable count on any
machine (never more than the budget over that floor)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seer.config import ConfigError, load_config
from seer.train.budget import PROBE_STEPS, WARMUP_MAX_FRACTION, Budget, buy_steps, fit_warmup, probe_lr
from seer.train.checkpoint import latest_checkpoint, read_meta
from seer.train.loop import pretrain
from seer.train.optim import cosine_schedule

FLOOR = 0.1  # train.min_step_seconds of the end-to-end runs
# 0.2 min at >= FLOOR s per step buys at most 120 steps; the floor dominates a tiny step (~0.03 s on 2 loaded cores),
# so it buys about 80 (setup takes a few seconds): more than 4 x the warmup below, which is then kept as given.
MINUTES = 0.2
WARMUP = PROBE_STEPS + 2  # outlasts the measured steps: the whole lr sequence is a fixed run's


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def budget_run(tiny_overrides):
    def make(run_dir: Path, *extra: str) -> list[str]:
        return [*tiny_overrides, f"run_dir={run_dir}", "swav.freeze_prototypes_iters=3", f"optim.warmup_iters={WARMUP}",
                "train.ckpt_every_steps=20", *extra]  # fmt: skip

    return make


# -- the arithmetic ------------------------------------------------------------------------------------------------
def test_buy_steps_is_the_time_left_over_the_measured_speed():
    # 60 s budget, 10 s spent, 2 s reserved: 48 s / 0.5 s = 96 more steps after the 11 done
    assert buy_steps(60.0, 10.0, 2.0, 0.5, done=11, cap=0) == 11 + 96
    assert buy_steps(60.0, 10.0, 2.0, 0.5, done=11, cap=50) == 50  # train.total_steps caps it
    assert buy_steps(60.0, 59.0, 2.0, 0.5, done=11, cap=0) == 11  # spent: the run ends now, with its checkpoint
    assert buy_steps(60.0, 10.0, 2.0, 0.7, done=11, cap=0) == 11 + math.floor(48 / 0.7)
    with pytest.raises(ValueError, match="sec_per_step"):
        buy_steps(60.0, 10.0, 2.0, 0.0, done=11, cap=0)


def test_warmup_is_kept_when_it_fits_and_cut_to_a_fraction_when_not():
    assert fit_warmup(20, 600) == 20
    assert fit_warmup(20, 80) == 20  # exactly the fraction
    assert fit_warmup(20, 79) == math.floor(WARMUP_MAX_FRACTION * 79)
    assert fit_warmup(0, 5) == 0
    assert fit_warmup(20, 1) == 0  # a single step: no warmup (cosine_schedule needs warmup < total)


@pytest.mark.parametrize("warmup", [0, 3, 20])
def test_measured_steps_take_the_values_every_length_gives(warmup):
    peak, start = 0.1, 0.02
    probe = [probe_lr(s, peak, warmup, start) for s in range(PROBE_STEPS + 1)]
    for total in (warmup + 1, 50, 600):
        fixed = cosine_schedule(peak, total, warmup, start, 0.01)
        n = min(warmup, len(probe))  # during the warmup: bit for bit the fixed run's value, whatever the total
        assert probe[:n] == [float(v) for v in fixed[:n]]
    assert probe[warmup:] == [peak] * max(0, PROBE_STEPS + 1 - warmup)  # after the warmup: the cosine's start


def test_budget_meta_round_trip_and_old_checkpoints():
    b = Budget(max_minutes=2.0, total_steps=123, warmup_iters=20, measured_at_step=11, sec_per_step=0.5,
               elapsed_seconds=8.0, reserve_seconds=1.0)  # fmt: skip
    assert Budget.from_meta({"budget": json.loads(json.dumps(b.to_meta()))}) == b
    assert Budget.from_meta({"step": 5}) is None  # a run without a budget, or saved before buying
    assert "bought 123 steps" in b.line() and "steps 2-11" in b.line()


def test_config_checks_the_budget(tiny_overrides):
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="train.max_minutes"):
            load_config(None, [*tiny_overrides, f"train.max_minutes={bad}"])
    # a warmup longer than the steps a fixed run would train is refused; with a budget it is fitted instead
    with pytest.raises(ConfigError, match="optim.warmup_iters"):
        load_config(None, [*tiny_overrides, "optim.warmup_iters=500", "train.total_steps=100"])
    assert load_config(None, [*tiny_overrides, "optim.warmup_iters=500", "train.max_minutes=1"]).train.max_minutes == 1


# -- a run ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_budget_run_is_the_fixed_run_of_the_steps_it_bought(tmp_path, budget_run, capsys):
    summary = pretrain(load_config(None, budget_run(tmp_path / "b", f"train.max_minutes={MINUTES}",
                                                    f"train.min_step_seconds={FLOOR}")))  # fmt: skip
    out = capsys.readouterr().out
    bought = summary["budget"]
    total = bought["total_steps"]
    # the measurement: the floor holds, and the count is what the budget left buys at it. The timed window runs from
    # the end of step 1's work to the end of step 11's, while the floor's sleep pads each step after its work: the
    # window holds 9 whole padded steps plus parts of two, so it may fall short of 10 floors by up to one step's work.
    assert bought["sec_per_step"] >= 0.9 * FLOOR and bought["measured_at_step"] == PROBE_STEPS + 1
    assert total == buy_steps(60 * MINUTES, bought["elapsed_seconds"], bought["reserve_seconds"],
                              bought["sec_per_step"], PROBE_STEPS + 1, 0)  # fmt: skip
    assert PROBE_STEPS + 1 < total <= PROBE_STEPS + 1 + 60 * MINUTES / (0.9 * FLOOR)
    # the log says what the budget bought; the run ends with a checkpoint at that step, which records it
    assert f"time budget: {MINUTES:g} min bought {total} steps" in out
    assert summary["step"] == total and summary["checkpoint"].endswith(f"step_{total:08d}")
    assert read_meta(summary["checkpoint"])["budget"] == bought
    records = _records(tmp_path / "b")
    assert [r["budget"] for r in records if "budget" in r] == [bought]  # once in metrics.jsonl
    lrs = [r["lr"] for r in records]
    assert len(lrs) == total

    # the same config with train.total_steps=<bought> and no budget: the same lr at every step, the same losses
    warmup = bought["warmup_iters"]
    fixed = pretrain(load_config(None, budget_run(tmp_path / "f", f"train.total_steps={total}",
                                                  f"optim.warmup_iters={warmup}")))  # fmt: skip
    assert fixed["step"] == total
    ref = _records(tmp_path / "f")
    if warmup == WARMUP:  # the warmup fitted: every lr is the fixed run's, bit for bit
        assert lrs == [r["lr"] for r in ref]
        np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in ref], rtol=1e-6)
    else:  # cut to a fraction (a very slow machine): the steps after the measurement follow the fixed schedule
        assert lrs[PROBE_STEPS + 1 :] == [r["lr"] for r in ref][PROBE_STEPS + 1 :]

    # seer launch requeues a budget run until the count its newest checkpoint bought (unknown before: 0, or the cap)
    from seer.launch.jobs import _total_steps

    assert _total_steps({"train": {"max_minutes": MINUTES}}, tmp_path / "b") == total
    assert _total_steps({"train": {"max_minutes": MINUTES, "total_steps": 7}}, tmp_path / "none") == 7
    assert _total_steps({"train": {"max_minutes": MINUTES}}, tmp_path / "none") == 0

    # run again: nothing left, the bought count says why
    again = pretrain(load_config(None, budget_run(tmp_path / "b", f"train.max_minutes={MINUTES}")))
    assert again["step"] == total and f"of the {total} steps its time budget" in again["note"]


@pytest.mark.slow
def test_a_killed_budget_run_resumes_on_the_schedule_it_bought(tmp_path, budget_run):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    crash = PROBE_STEPS + 7  # killed at step 18: after the count was bought (step 11) and checkpointed (step 15)
    first = subprocess.run([sys.executable, "-m", "seer.cli", "pretrain",
                            *budget_run(run, f"train.max_minutes={MINUTES}", f"train.min_step_seconds={FLOOR}",
                                        "train.ckpt_every_steps=5", f"train.crash_at_step={crash}")],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert first.returncode == 3, first.stdout[-2000:] + first.stderr[-2000:]
    saved = read_meta(latest_checkpoint(run))
    assert saved["step"] == 15  # the newest checkpoint before the kill, after the count was bought (step 11)
    bought = saved["budget"]
    # resumed with another budget (allowed) and without the floor: the count is not measured again
    summary = pretrain(load_config(None, budget_run(run, "train.max_minutes=5")))
    assert summary["step"] == bought["total_steps"] and summary["budget"] == bought
    lrs = {r["step"]: r["lr"] for r in _records(run)}  # the resumed run re-logs steps 16-18 (the last record wins)
    expect = cosine_schedule(_peak(run), bought["total_steps"], bought["warmup_iters"], 0.0, 0.001)
    assert [lrs[s] for s in range(16, bought["total_steps"] + 1)] == [float(v) for v in expect[15:]]


def _peak(run: Path) -> float:
    from seer.config import batch_per_gpu
    from seer.train.optim import scaled_lr

    cfg = load_config(str(run / "config.yaml"))  # a run's own config; the lr its schedules start from
    return scaled_lr(cfg.optim.base_lr, batch_per_gpu(cfg, 1), cfg.optim.reference_batch)


def test_a_cap_below_the_measurement_is_the_length(tmp_path, budget_run, capsys):
    summary = pretrain(load_config(None, budget_run(tmp_path, "train.max_minutes=10", "train.total_steps=4")))
    assert summary["step"] == 4 and "budget" not in summary
    assert f"train.total_steps=4 ends the run by step {PROBE_STEPS + 1}" in capsys.readouterr().out
    # warmup 12 does not fit 4 steps: a quarter of them, as a bought count would get
    ref = cosine_schedule(_peak(tmp_path), 4, fit_warmup(WARMUP, 4), 0.0, 0.001)
    assert [r["lr"] for r in _records(tmp_path)] == [float(v) for v in ref]
    again = pretrain(load_config(None, budget_run(tmp_path, "train.max_minutes=10", "train.total_steps=4")))
    assert "nothing to train" in again["note"]


# -- seer demo --minutes -------------------------------------------------------------------------------------------
def test_demo_minutes_split_over_the_seeds_and_runs(tmp_path):
    from seer.demo import TRAIN_SHARE, recipe, run_minutes

    assert run_minutes(10, 3, 2, 2) == pytest.approx(TRAIN_SHARE * 10 / 3)  # SwAV and supervised side by side
    assert run_minutes(10, 3, 2, 1) == pytest.approx(TRAIN_SHARE * 10 / 6)  # one after the other
    assert run_minutes(10, 1, 1, 1) == pytest.approx(TRAIN_SHARE * 10)
    with pytest.raises(ValueError, match="--minutes"):
        run_minutes(0, 3, 2, 2)
    cfg = recipe(tmp_path / "run", data={}, minutes=1.5)
    assert cfg["train"]["max_minutes"] == 1.5 and cfg["train"]["total_steps"] == 0  # no cap
    assert cfg["optim"]["warmup_iters"] == 20  # the recipe's: fitted to the bought steps at run time
    assert recipe(tmp_path / "run", data={}, minutes=1.5, steps=300)["train"]["total_steps"] == 300  # a cap
    assert load_config(None, cfg).train.max_minutes == 1.5


def test_demo_minutes_flag_is_checked():
    from seer.demo import cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["--minutes", "-2"])
    assert exc.value.code == 2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ranks_agree_on_the_bought_count(tmp_path, budget_run):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    args = budget_run(run, "train.max_minutes=0.2", f"train.min_step_seconds={FLOOR}")
    procs = [
        subprocess.Popen([sys.executable, "-m", "seer.cli", "pretrain", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
        for r in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    # ranks that bought different counts would stop at different steps: one would wait on a collective and fail
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    meta = read_meta(latest_checkpoint(run))
    assert meta["world_size"] == 2 and meta["step"] == meta["budget"]["total_steps"] > PROBE_STEPS + 1
    assert f"bought {meta['step']} steps" in outs[0] and "the slowest of 2 ranks" in outs[0]
