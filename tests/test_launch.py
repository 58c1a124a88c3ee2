"""seer launch (launch/submit.py): argument checks, the sbatch script, the torch.distributed environment, requeue
and eval arrays.

The SLURM side is checked through the script submitit renders (--dry-run) and a fake `sbatch` on PATH; the requeue
side runs for real through submitit's LocalExecutor (2 gloo tasks, a time limit short enough to interrupt the run).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import yaml

from seer.distributed.env import detect_launcher
from seer.launch import cli as submit
from seer.launch.jobs import PretrainJob, export_torch_env, master_port, read_attempts

REPO = Path(__file__).resolve().parents[1]

RG256 = str(REPO / "configs/pretrain/seer_rg256.yaml")
TENB = str(REPO / "configs/pretrain/seer_10b.yaml")
TINY_CFG = str(REPO / "configs/pretrain/tiny_cpu.yaml")


# A very small SwAV run (as in tests/test_pretrain.py): steps are dominated by process-group overheads.
@pytest.fixture
def tiny(tiny_overrides):
    return [*tiny_overrides, "swav.freeze_prototypes_iters=3", "data.batch_size_per_gpu=8", "data.global_batch_size=0",
            "optim.base_lr=2.4", "optim.warmup_iters=2"]  # fmt: skip


def _sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            flags[key] = value.strip("'")
    return flags


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = submit.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------------------------------------
# --dry-run: the sbatch script
# ----------------------------------------------------------------------------------------------------------------
def test_dry_run_rg256_on_64_nodes(tmp_path, capsys):
    job_dir = tmp_path / "rg256"
    argv = ["pretrain", "--config", RG256, "--nodes", "64", "--gpus-per-node", "8", "--partition", "learnfair",
            "--timeout-min", "4320", "--account", "ssl", "--qos", "high", "--constraint", "volta32gb",
            "--exclude", "node[001-004]", "--comment", "seer rg256", "--mem-gb", "480", "--cpus-per-task", "10",
            "--job-dir", str(job_dir), "--dry-run"]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    flags = _sbatch_flags(out)
    assert out.startswith("#!/bin/bash")
    assert flags["nodes"] == "64"
    assert flags["ntasks-per-node"] == "8"  # one task per GPU
    assert flags["gpus-per-node"] == "8"
    assert flags["signal"] == "USR2@120"  # submitit's preemption / timeout signal, 2 minutes before the limit
    assert flags["time"] == "4320"
    assert flags["partition"] == "learnfair" and flags["account"] == "ssl" and flags["qos"] == "high"
    assert flags["constraint"] == "volta32gb" and flags["exclude"] == "node[001-004]"
    assert flags["comment"] == "seer rg256" and flags["mem"] == "480GB" and flags["cpus-per-task"] == "10"
    assert "requeue" in flags
    assert flags["output"].startswith(str(job_dir / "launch" / "logs"))
    assert "srun --unbuffered" in out and "-m submitit.core._submit" in out
    assert "world size 512" in err and "nothing submitted" in err
    assert not job_dir.exists()  # a dry run writes nothing


def test_dry_run_10b_on_62_nodes_and_its_batch_check(tmp_path, capsys):
    base = ["pretrain", "--config", TENB, "--gpus-per-node", "8", "--partition", "learnfair", "--timeout-min", "4320",
            "--job-dir", str(tmp_path / "10b"), "--dry-run"]  # fmt: skip
    code, out, err = _run([*base, "--nodes", "62"], capsys)
    assert code == 0, err
    flags = _sbatch_flags(out)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("62", "8", "8")
    assert "world size 496" in err
    # 64 nodes = 512 GPUs: the recipe's global batch (7936 = 16 x 496) does not split evenly -> refused up front.
    code, out, err = _run([*base, "--nodes", "64"], capsys)
    assert code == 2 and out == ""
    assert "global_batch_size" in err and "512" in err


def test_dry_run_passes_extra_slurm_parameters_and_setup(tmp_path, capsys):
    argv = ["pretrain", "--config", TINY_CFG, "--nodes", "2", "--gpus-per-node", "4", "--timeout-min", "60",
            "--sbatch", "gres=gpu:4", "--sbatch", "exclusive=true", "--setup", "module load cuda/12.4",
            "--signal-delay-s", "300", "--job-dir", str(tmp_path / "j"), "--dry-run"]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    flags = _sbatch_flags(out)
    assert flags["gres"] == "gpu:4" and "exclusive" in flags and flags["signal"] == "USR2@300"
    assert flags["ntasks-per-node"] == "4" and flags["nodes"] == "2"
    assert "module load cuda/12.4" in out.split("# command")[0]


# ----------------------------------------------------------------------------------------------------------------
# bad arguments: clear errors, nothing submitted
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`sinfo` / `srun` / `sbatch` stand-ins on PATH; `sbatch` records each call and answers like SLURM."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "sbatch_calls"
    scripts = {
        "sinfo": "#!/bin/sh\nprintf 'learnfair*\\ndevlab\\nscavenge\\n'\n",
        "srun": "#!/bin/sh\nexit 0\n",
        # `sbatch --test-only` (the launcher's pre-check) answers like SLURM and queues nothing
        "sbatch": (
            f'#!/bin/sh\nif [ "$1" = "--test-only" ]; then echo "sbatch: Job 4242 to start at now" >&2; '
            f'exit 0; fi\necho "$@" >> {calls}\necho "Submitted batch job 4242"\n'
        ),
    }
    for name, text in scripts.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return calls


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nodes", "0"], "--nodes must be >= 1"),
        (["--nodes", "-3"], "--nodes must be >= 1"),
        (["--gpus-per-node", "-1"], "--gpus-per-node must be >= 0"),
        (["--timeout-min", "0"], "--timeout-min must be > 0"),
        (["--timeout-min", "90.5"], "whole number of minutes"),
        (["--partition", "learnfiar"], "does not exist on this cluster (did you mean learnfair"),
        (["--partition", ""], "--partition is empty"),
        (["--sbatch", "gress=gpu:8"], "not a SLURM parameter submitit knows (did you mean gres"),
        (["--sbatch", "partition=devlab"], "use the named option"),
        (["--sbatch", "novalue"], "KEY=VALUE"),
        (["--signal-delay-s", "99999"], "--signal-delay-s must be in"),
        (["--timeout-min", "1", "--signal-delay-s", "45"], "Use --signal-delay-s <= 20"),
        (["--max-requeues", "-1"], "--max-requeues must be >= 0"),
        (["--local", "--nodes", "2"], "--nodes must be 1"),
        (["optim.base_lr=-1"], "optim.base_lr"),
        (["train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
    ],
)
def test_bad_arguments_fail_before_submitting(tmp_path, capsys, fake_slurm, extra, message):
    job_dir = tmp_path / "job"
    argv = ["pretrain", "--config", TINY_CFG, "--partition", "learnfair", "--timeout-min", "60", "--nodes", "1",
            "--job-dir", str(job_dir), *extra]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert message in err, err
    assert not fake_slurm.exists() and not job_dir.exists()  # nothing submitted, nothing written


def test_missing_config_and_unknown_options(tmp_path, capsys, fake_slurm):
    code, _, err = _run(["pretrain", "--config", str(tmp_path / "nope.yaml"), "--partition", "learnfair"], capsys)
    assert code == 2 and "nope.yaml: file not found" in err
    code, _, err = _run(["pretrain", "--resume", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no config.yaml there" in err
    with pytest.raises(SystemExit) as exc:  # argparse: unknown flag (no abbreviations either)
        submit.main(["pretrain", "--config", TINY_CFG, "--partiton", "learnfair"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --partiton" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        submit.main(["pretrain", "--config", TINY_CFG, "--part", "learnfair"])
    assert submit.main(["pretrian"]) == 2 and "did you mean pretrain" in capsys.readouterr().err
    assert not fake_slurm.exists()


def test_no_slurm_here_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / srun
    code, _, err = _run(["pretrain", "--config", TINY_CFG, "--job-dir", str(tmp_path / "j")], capsys)
    assert code == 2 and "no SLURM here" in err and "--dry-run" in err


def test_submission_through_fake_sbatch_records_the_job(tmp_path, capsys, fake_slurm):
    job_dir = tmp_path / "job"
    argv = ["pretrain", "--config", TINY_CFG, "--nodes", "2", "--gpus-per-node", "8", "--partition", "devlab",
            "--timeout-min", "120", "--max-requeues", "5", "--job-dir", str(job_dir),
            "train.total_steps=30"]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "submitted job 4242" in out
    assert fake_slurm.read_text().count("\n") == 1  # sbatch called once
    record = json.loads((job_dir / "launch" / "submission_000.json").read_text())
    assert record["job_id"] == "4242" and record["executor"] == "slurm" and record["world_size"] == 16
    assert record["options"]["max_requeues"] == 5 and record["options"]["partition"] == "devlab"
    flags = _sbatch_flags((job_dir / "launch" / "submission_000.sh").read_text())
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "8" and flags["partition"] == "devlab"
    cfg = (job_dir / "config.yaml").read_text()
    assert f"run_dir: {job_dir}" in cfg and "total_steps: 30" in cfg

    # Resume by hand: the same options by default, flags given now win; a second submission record.
    code, out, err = _run(["pretrain", "--resume", str(job_dir), "--timeout-min", "60"], capsys)
    assert code == 0, err
    second = json.loads((job_dir / "launch" / "submission_001.json").read_text())
    assert second["submission"] == 1 and second["options"]["nodes"] == 2 and second["options"]["timeout_min"] == 60
    assert second["options"]["partition"] == "devlab"
    # A config that changes what a job dir's checkpoints trained is refused (no checkpoint yet: allowed above), by
    # the check the job runs (this meta.json records no config: the run's config.yaml is the reference).
    (job_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    (job_dir / "checkpoints" / "step_00000004" / "meta.json").write_text('{"step": 4}')
    code, _, err = _run([*argv, "optim.base_lr=0.123"], capsys)
    assert code == 2 and "optim.base_lr" in err and "0.123" in err and "--resume" in err, err
    assert "--allow-config-change" in err and "--force" in err


# A job dir whose run trained 4 steps (in this process): what `--force` / `--allow-config-change` is about.
@pytest.fixture
def trained(tmp_path, tiny):
    from seer.config import load_config
    from seer.train.loop import pretrain

    job_dir = tmp_path / "job"
    overrides = [*tiny, "train.total_steps=4", "train.ckpt_every_steps=4", "data.workers=0"]
    pretrain(load_config(TINY_CFG, [*overrides, f"run_dir={job_dir}"]))
    return job_dir, overrides


def test_a_config_that_changes_what_was_trained_is_refused_unless_allowed(trained, capsys, fake_slurm):
    """The job's own run-directory check runs at submission; --force passes allow_config_change on to the job, and
    submitting never writes over the config.yaml the job's check compares with."""
    job_dir, overrides = trained
    config_before = (job_dir / "config.yaml").read_bytes()
    base = ["pretrain", "--config", TINY_CFG, "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "1",
            "--cpus-per-task", "1", "--partition", "devlab", "--timeout-min", "60", "--job-dir", str(job_dir),
            *overrides]  # fmt: skip
    code, out, err = _run([*base, "optim.base_lr=0.2", "--dry-run"], capsys)
    assert code == 2 and out == "" and "optim.base_lr: 2.4 -> 0.2" in err, err
    assert "--allow-config-change" in err and "--force" in err and f"--resume {job_dir}" in err
    code, out, err = _run([*base, "train.total_steps=8", "--dry-run"], capsys)  # training longer needs no flag
    assert code == 0, err
    code, out, err = _run([*base, "optim.base_lr=0.2", "--dry-run", "--force"], capsys)
    assert code == 0 and "resume at step 4" in err, err

    code, out, err = _run([*base, "optim.base_lr=0.2", "train.total_steps=8", "--allow-config-change"], capsys)
    assert code == 0, err
    assert (job_dir / "config.yaml").read_bytes() == config_before  # the job writes it, after its check
    record = json.loads((job_dir / "launch" / "submission_000.json").read_text())
    assert record["allow_config_change"] is True and record["start_step"] == 4
    submitted = cloudpickle.loads((job_dir / "launch" / "logs" / "4242" / "4242_submitted.pkl").read_bytes())
    job = submitted.function
    assert isinstance(job, PretrainJob) and job.allow_config_change and job.config["optim"]["base_lr"] == 0.2
    # a requeue keeps it: until the next checkpoint records the new config, the restarted job needs it as well
    _fake_attempts(job_dir, 1, submission=0)
    assert job.checkpoint().function.allow_config_change


@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_force_continues_a_run_with_a_changed_config_through_the_local_executor(trained, capsys):
    job_dir, overrides = trained
    old = yaml.safe_load((job_dir / "config.yaml").read_text())
    argv = ["pretrain", "--config", TINY_CFG, "--local", "--tasks-per-node", "1", "--job-dir", str(job_dir),
            "--timeout-min", "10", *overrides, "optim.base_lr=0.2", "train.total_steps=6", "--force"]  # fmt: skip
    code = submit.main(argv)
    out = capsys.readouterr()
    assert code == 0, (out.out, out.err)
    (attempt,) = read_attempts(job_dir)
    assert attempt["status"] == "finished" and (attempt["start_step"], attempt["end_step"]) == (4, 6)
    assert yaml.safe_load((job_dir / "config.yaml").read_text())["optim"]["base_lr"] == 0.2
    assert yaml.safe_load((job_dir / "config.step_00000004.yaml").read_text()) == old  # what steps 1-4 trained


# ----------------------------------------------------------------------------------------------------------------
# the torch.distributed environment
# ----------------------------------------------------------------------------------------------------------------
SLURM_TASK = {
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "81234",
    "SLURM_NTASKS": "16",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_JOB_NODELIST": "gpu-a[017-018]",
}


def _clean_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SEER_MASTER_PORT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)


def test_export_from_a_slurm_task(monkeypatch):
    _clean_env(monkeypatch)
    for k, v in SLURM_TASK.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", "1")  # stale, from an enclosing job: replaced
    info = export_torch_env()
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert env == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu-a017"}  # fmt: skip
    port = int(os.environ["MASTER_PORT"])
    assert 20000 <= port < 60000 and port == master_port("81234", 0) and info["exported"]
    # Every task of the job derives the same address and port; the requeued job moves to another port.
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "0")
    export_torch_env()
    assert os.environ["MASTER_PORT"] == str(port) and os.environ["MASTER_ADDR"] == "gpu-a017"
    assert os.environ["RANK"] == "0"
    export_torch_env(requeue=1)
    assert int(os.environ["MASTER_PORT"]) != port
    # seer.distributed.env reads back exactly what was exported.
    seen = detect_launcher()
    assert (seen["rank"], seen["world_size"], seen["local_rank"], seen["master_addr"]) == (0, 16, 0, "gpu-a017")
    assert seen["master_port"] == int(os.environ["MASTER_PORT"])
    # An explicit port wins.
    monkeypatch.setenv("SEER_MASTER_PORT", "29511")
    export_torch_env(requeue=3)
    assert os.environ["MASTER_PORT"] == "29511"


def test_export_from_a_local_task_and_a_single_task(monkeypatch):
    _clean_env(monkeypatch)
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "777", "SUBMITIT_LOCAL_NTASKS": "2",
                 "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "1",
                 "SUBMITIT_LOCAL_LOCALID": "1"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    export_torch_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"
    # One task: nothing exported and stale variables removed, so the task trains without a process group.
    monkeypatch.setenv("SUBMITIT_LOCAL_NTASKS", "1")
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", "0")
    info = export_torch_env()
    assert not info["exported"] and "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert detect_launcher() is None


# ----------------------------------------------------------------------------------------------------------------
# checkpoint(): requeue decisions (no processes)
# ----------------------------------------------------------------------------------------------------------------
def _fake_attempts(job_dir: Path, n: int, submission: int = 0) -> None:
    root = job_dir / "launch" / "attempts"
    root.mkdir(parents=True, exist_ok=True)
    start = len(list(root.glob("attempt_*.json")))
    for i in range(start, start + n):
        (root / f"attempt_{i:03d}.json").write_text(json.dumps({"attempt": i, "submission": submission}))


def test_checkpoint_requeues_until_the_budget_or_the_end(tmp_path, monkeypatch):
    import torch.distributed as dist
    from submitit.helpers import DelayedSubmission

    def collective(*args, **kwargs):
        raise AssertionError("checkpoint() runs in a signal handler on rank 0 only: no collectives")

    for name in ("barrier", "all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, collective)

    config = {"run_dir": str(tmp_path), "train": {"total_steps": 100}}
    job = PretrainJob(config, str(tmp_path), max_requeues=2, submission=1, requeue=0)
    _fake_attempts(tmp_path, 3, submission=0)  # an earlier submission's attempts do not count
    _fake_attempts(tmp_path, 1, submission=1)
    nxt = job.checkpoint()
    assert isinstance(nxt, DelayedSubmission)
    again = nxt.function
    assert isinstance(again, PretrainJob) and again.requeue == 1 and again.submission == 1
    assert again.config == config and again.max_requeues == 2
    cloudpickle.loads(cloudpickle.dumps(nxt))  # what submitit writes to disk for the requeued job
    _fake_attempts(tmp_path, 1, submission=1)
    assert job.checkpoint() is not None  # 1 requeue used of 2
    _fake_attempts(tmp_path, 1, submission=1)
    assert job.checkpoint() is None  # 2 of 2 used
    # A finished run never requeues.
    fresh = PretrainJob(config, str(tmp_path), max_requeues=50, submission=2)
    ckpt = tmp_path / "checkpoints" / "step_00000100"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    assert fresh.checkpoint() is None


# ----------------------------------------------------------------------------------------------------------------
# a real requeue: LocalExecutor, 2 gloo tasks, a time limit that interrupts the run
# ----------------------------------------------------------------------------------------------------------------
def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def _local(job_dir: Path, steps: int, capsys, tiny, *extra: str) -> int:
    argv = ["pretrain", "--config", TINY_CFG, "--local", "--tasks-per-node", "2", "--job-dir", str(job_dir),
            *extra, *tiny, f"train.total_steps={steps}", "train.ckpt_every_steps=4", "train.log_every=2"]  # fmt: skip
    code = submit.main(argv)
    out = capsys.readouterr()
    print(out.out, out.err)
    return code


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_local_job_requeues_on_timeout_and_finishes_on_the_uninterrupted_trajectory(tmp_path, capsys, tiny):
    steps = 40
    # 1. The uninterrupted run (generous limit): its timing sets the limit of the interrupted one.
    ref = tmp_path / "straight"
    t0 = time.time()
    assert _local(ref, steps, capsys, tiny, "--timeout-min", "10") == 0
    (a,) = read_attempts(ref)
    assert a["status"] == "finished" and a["end_step"] == steps and a["world_size"] == 2
    startup, train = a["started_unix"] - t0, a["ended_unix"] - a["started_unix"]

    # 2. Same run, but USR2 arrives after the start-up plus half the training time: requeued until done.
    # The controller kills the tasks `delay` s after the signal: rank 0 must have requeued by then (it takes well
    # under a second, once the collective it may be blocked in returns).
    delay = 10
    limit_s = math.ceil(startup + 0.5 * train) + delay
    cut = tmp_path / "requeued"
    code = _local(cut, steps, capsys, tiny, "--timeout-min", f"{limit_s / 60:.4f}", "--signal-delay-s", str(delay),
                  "--max-requeues", "5")  # fmt: skip
    attempts = read_attempts(cut)
    summary = [(x["status"], x["start_step"], x.get("end_step")) for x in attempts]
    assert code == 0, summary
    assert len(attempts) >= 2, summary  # interrupted at least once
    assert [x["status"] for x in attempts] == ["requeued"] * (len(attempts) - 1) + ["finished"], summary
    assert [x["requeue"] for x in attempts] == list(range(len(attempts)))
    assert attempts[-1]["end_step"] == steps and attempts[-1]["summary"]["step"] == steps
    starts = [x["start_step"] for x in attempts]
    assert starts[0] == 0 and starts == sorted(starts) and starts[-1] > 0, summary  # resumed, not restarted
    assert all(s % 4 == 0 for s in starts)  # each attempt starts from a complete checkpoint
    ckpts = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert ckpts[-1] == f"step_{steps:08d}" and not any(p.startswith(".tmp") for p in ckpts)
    logs = "".join(p.read_text() for p in (cut / "launch" / "logs").rglob("*_0_log.err"))
    assert logs.count("Caught signal SIGUSR2") >= len(attempts) - 1  # submitit's handler ran on rank 0

    # 3. What the workers wrote: every logged step, and the loss of every record (replayed steps after a resume
    # included) equal to the uninterrupted run's -- same ranks, same data stream, restored optimizer and RNG.
    straight = dict(_losses(ref))
    records = _losses(cut)
    assert sorted(straight) == list(range(2, steps + 1, 2))
    assert {s for s, _ in records} == set(straight)
    assert len(records) >= len(straight)
    for step, loss in records:
        assert loss == pytest.approx(straight[step], abs=1e-5), (step, loss, straight[step])

    # 4. A finished run submitted again does not train (or requeue): one more attempt, finished at once.
    assert _local(cut, steps, capsys, tiny, "--timeout-min", "5") == 0
    last = read_attempts(cut)[-1]
    assert last["status"] == "finished" and last["start_step"] == steps and last["submission"] == 1


# ----------------------------------------------------------------------------------------------------------------
# eval: job arrays over checkpoints x datasets x protocols, one table
# ----------------------------------------------------------------------------------------------------------------
SMALL_SUITE = str(REPO / "configs/eval/small.yaml")


def test_eval_dry_run_renders_the_two_arrays(tmp_path, capsys):
    out_dir = tmp_path / "ev"
    argv = ["eval", "--suite", SMALL_SUITE, "--out", str(out_dir), "--partition", "learnfair", "--timeout-min",
            "120", "--array-parallelism", "8", "--dry-run"]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    features, protocols, collect = out.split("# ---- ")[1:]
    # small.yaml: 2 checkpoints x 2 datasets, x 4 protocols
    assert features.startswith("features: array of 4") and "#SBATCH --array=0-3%4" in features
    assert protocols.startswith("protocols: array of 16") and "#SBATCH --array=0-15%8" in protocols
    assert "#SBATCH --dependency='afterany:<features array id>'" in protocols
    for script in (features, protocols, collect):
        flags = _sbatch_flags(script)
        assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("1", "1", "1")
        assert flags["partition"] == "learnfair" and flags["time"] == "120"
    assert "4 feature + 16 protocol tasks" in err
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--only-dataset", "imagenet"], "--only-dataset imagenet: not in the suite"),
        (["--only-protocol", "knn-10shot"], "--only-protocol knn-10shot: not in the suite"),
        (["--checkpoint", "x=/no/such/file.safetensors"], "/no/such/file.safetensors does not exist"),
        (["--nodes", "2"], "use --nodes 1 --tasks-per-node 1"),
        (["--set", "novalue"], "--set expects VAR=VALUE"),
    ],
)
def test_eval_bad_arguments(tmp_path, capsys, extra, message):
    argv = ["eval", "--suite", SMALL_SUITE, "--out", str(tmp_path / "ev"), "--dry-run", *extra]
    code, _, err = _run(argv, capsys)
    assert code == 2 and message in err, err
    code, _, err = _run(["eval", "--suite", str(tmp_path / "none.yaml"), "--out", str(tmp_path), "--dry-run"], capsys)
    assert code == 2 and "suite file not found" in err
    code, _, err = _run(["eval", "--suite", str(REPO / "configs/eval/imagenet1k.yaml"), "--out", str(tmp_path),
                         "--dry-run"], capsys)  # fmt: skip
    assert code == 2 and "IMAGENET" in err  # an unset ${VAR} placeholder is named


def test_run_checkpoints_become_suite_checkpoints(tmp_path):
    from seer.launch.cli import run_checkpoints as _run_checkpoints

    for step in (1000, 2000):
        d = tmp_path / "myrun" / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text("{}")
    (tmp_path / "myrun" / "checkpoints" / ".tmp-step_00003000").mkdir()  # incomplete: ignored
    got = _run_checkpoints(str(tmp_path / "myrun"))
    assert [c["name"] for c in got] == ["myrun@1000", "myrun@2000"]
    assert got[1]["source"].endswith("step_00002000")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        _run_checkpoints(str(tmp_path))


def test_collect_builds_one_table_and_lists_missing_tasks(tmp_path):
    from seer.evaluation.suites import collect
    from seer.evaluation.suites import task_record_path as _status_path

    suite = {"name": "t", "features": {}, "checkpoints": [{"name": "a"}, {"name": "b"}],
             "datasets": [{"name": "d"}], "protocols": [{"name": "knn"}]}  # fmt: skip
    plan = {"features": [["a", "d"], ["b", "d"]], "protocols": [["a", "d", "knn"], ["b", "d", "knn"]], "suite": suite}
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "plan.json").write_text(json.dumps(plan))
    row = {"suite": "t", "dataset": "d", "checkpoint": "a", "protocol": "knn", "kind": "knn", "layer": "avgpool",
           "top1": 0.5, "top5": 0.9, "detail": "k=20: 50.0"}  # fmt: skip
    for parts, rec in (
        (("features", "a", "d"), {"status": "done"}),
        (("features", "b", "d"), {"status": "failed", "error": "CheckpointError: bad file"}),
        (("protocol", "a", "d", "knn"), {"status": "done", "rows": [row], "results": [{"top1": {20: 0.5}}]}),
        (("protocol", "b", "d", "knn"), {"status": "failed", "error": "RuntimeError: features are not cached"}),
    ):
        path = _status_path(tmp_path, *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    payload = collect(tmp_path)
    assert payload["rows"] == [row] and len(payload["missing"]) == 2
    md = (tmp_path / "results.md").read_text()
    assert "| d | a | knn | avgpool | 50.00 | 90.00 |" in md
    assert "## Missing results" in md and "b/d | features | failed | CheckpointError: bad file" in md
    assert json.loads((tmp_path / "results.json").read_text())["missing"][1]["task"] == "b/d/knn"


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_eval_local_arrays_match_the_single_process_benchmark(tmp_path, capsys):
    import yaml

    from seer.evaluation import suites as bench

    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({
        "name": "launch-test",
        "features": {"layers": ["avgpool"], "batch_size": 256, "device": "cpu"},
        "checkpoints": [{"name": "pixels", "kind": "pixels", "size": 8},
                        {"name": "tiny", "preset": {"depth": 4, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}}],
        "datasets": [{"name": "digits", "generate": {"kind": "digits", "size": 16}, "resolution": 16,
                      "crop_pct": 1.0}],
        "protocols": [{"name": "knn", "ks": [5, 20]},
                      {"name": "knn", "label": "knn-5shot", "ks": [1], "n_per_class": 5, "n_tries": 2}],
    }))  # fmt: skip
    out_dir = tmp_path / "ev"
    code, out, err = _run(["eval", "--suite", str(suite_file), "--out", str(out_dir), "--local"], capsys)
    assert code == 0, out + err
    payload = json.loads((out_dir / "results.json").read_text())
    assert not payload["missing"]
    assert len(list((out_dir / "launch" / "tasks").glob("protocol__*.json"))) == 4  # 2 checkpoints x 1 x 2
    got = {(r["checkpoint"], r["protocol"], r["layer"]): r for r in payload["rows"]}
    assert set(got) == {("pixels", "knn", "pixels"), ("pixels", "knn-5shot", "pixels"),
                        ("tiny", "knn", "avgpool"), ("tiny", "knn-5shot", "avgpool")}  # fmt: skip
    assert "| digits | tiny | knn | avgpool |" in (out_dir / "results.md").read_text()

    # The same suite in one process (seer eval-suite): the same table.
    ref = bench.run_suite(bench.load_suite(suite_file), tmp_path / "ref", progress=False)
    assert len(ref["rows"]) == len(payload["rows"])
    for r in ref["rows"]:
        mine = got[(r["checkpoint"], r["protocol"], r["layer"])]
        assert mine["top1"] == pytest.approx(r["top1"], abs=0.01), (r, mine)
        assert mine["top5"] == pytest.approx(r["top5"], abs=0.01), (r, mine)


# ----------------------------------------------------------------------------------------------------------------
# the SLURM path end to end, on stand-ins for sbatch and srun (2 "nodes" x 1 task, gloo)
# ----------------------------------------------------------------------------------------------------------------
FAKE_SBATCH = """#!/bin/bash
[[ "$1" == --test-only ]] && { echo "sbatch: Job 1 to start at now" >&2; exit 0; }
# Runs the script in the background like a granted allocation (its own process group, the pid in <script>.pid),
# with the variables SLURM sets for the batch step.
script="$1"
jobid=$(( (RANDOM % 9000) + 1000 ))
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
per_node=$(sed -n 's/^#SBATCH --ntasks-per-node=//p' "$script")
hosts=$(for i in $(seq 1 "$nodes"); do printf 'localhost,'; done)
export SLURM_JOB_ID=$jobid SLURM_JOB_NUM_NODES=$nodes SLURM_NTASKS=$(( nodes * per_node )) \\
       SLURM_NTASKS_PER_NODE=$per_node SLURM_JOB_NODELIST=${hosts%,}
setsid nohup bash "$script" > "$script.log" 2>&1 &
echo $! > "$script.pid"
echo "Submitted batch job $jobid"
"""
FAKE_SRUN = """#!/bin/bash
# srun --unbuffered --output OUT --error ERR CMD...: one process per task with SLURM_PROCID / LOCALID / NODEID.
while [[ "$1" == --* ]]; do
  case "$1" in
    --output) out="$2"; shift 2;;
    --error) err="$2"; shift 2;;
    *) shift;;
  esac
done
pids=()
for (( t=0; t<SLURM_NTASKS; t++ )); do
  o=${out//%j/$SLURM_JOB_ID}; o=${o//%t/$t}; e=${err//%j/$SLURM_JOB_ID}; e=${e//%t/$t}
  mkdir -p "$(dirname "$o")"
  SLURM_PROCID=$t SLURM_LOCALID=$(( t % SLURM_NTASKS_PER_NODE )) SLURM_NODEID=$(( t / SLURM_NTASKS_PER_NODE )) \\
    "$@" >> "$o" 2>> "$e" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
"""


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
        time.sleep(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_slurm_path_end_to_end_with_preemption_on_fake_sbatch_and_srun(tmp_path, capsys, monkeypatch, tiny):
    """submitit's real SLURM executor and job environment on stand-ins for sbatch / srun / scontrol: 2 "nodes" x 1
    task (gloo), preempted (USR2 to rank 0), requeued through `scontrol requeue`, restarted, finished."""
    import signal
    import subprocess

    from submitit.core.utils import DelayedSubmission

    from seer.launch.jobs import run_progress

    bindir = tmp_path / "bin"
    bindir.mkdir()
    scontrol_calls = tmp_path / "scontrol_calls"
    fakes = {"sbatch": FAKE_SBATCH, "srun": FAKE_SRUN,
             "scontrol": f'#!/bin/sh\necho "$@" >> {scontrol_calls}\n'}  # fmt: skip
    for name, text in fakes.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _clean_env(monkeypatch)
    job_dir = tmp_path / "job"
    steps = 24
    argv = ["pretrain", "--config", TINY_CFG, "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1",
            "--cpus-per-task", "1", "--partition", "any", "--timeout-min", "30", "--job-dir", str(job_dir), *tiny,
            f"train.total_steps={steps}", "train.log_every=1", "train.ckpt_every_steps=4",
            "data.workers=0"]  # fmt: skip
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    job_id = json.loads((job_dir / "launch" / "submission_000.json").read_text())["job_id"]
    logs = job_dir / "launch" / "logs" / job_id
    script = logs / f"{job_id}_submission.sh"  # submitit moves the file it gave sbatch there
    batch_pid = int(next((job_dir / "launch" / "logs").glob(".submission_file_*.sh.pid")).read_text())

    def log_tail() -> list[str]:
        return [p.read_text()[-1500:] for p in sorted(logs.glob("*_log.*"))]

    restarted = None
    try:
        # 1. Training on both tasks, each with the variables the job environment gives it.
        _wait_for(lambda: run_progress(job_dir) >= 4, 300, f"a first checkpoint ({log_tail()})")
        (a,) = read_attempts(job_dir)
        assert a["executor"] == "slurm" and a["world_size"] == 2 and a["hostnames"] == ["localhost", "localhost"]
        assert a["master"] == f"localhost:{master_port(job_id, 0)}" and a["requeue"] == 0
        for rank in (0, 1):
            text = (logs / f"{job_id}_{rank}_log.out").read_text()
            expect = (f"RANK={rank} WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=localhost "
                      f"MASTER_PORT={master_port(job_id, 0)}")  # fmt: skip
            assert expect in text, text[-2000:]
        assert "world 2 (gloo" in (logs / f"{job_id}_0_log.out").read_text()

        # 2. Preemption: SLURM signals the tasks; submitit runs checkpoint() on rank 0, which requeues the job.
        os.kill(a["pid"], signal.SIGUSR2)
        _wait_for(lambda: not _alive(a["pid"]), 120, "rank 0 to exit after requeueing")
        os.killpg(batch_pid, signal.SIGKILL)  # what SLURM does to the rest of a requeued job
        (a,) = read_attempts(job_dir)
        assert a["status"] == "requeued", log_tail()
        assert scontrol_calls.read_text().split() == ["requeue", job_id]
        resubmitted = DelayedSubmission.load(logs / f"{job_id}_submitted.pkl").function
        assert isinstance(resubmitted, PretrainJob) and resubmitted.requeue == 1  # what the restarted job will run
        interrupted_at = run_progress(job_dir)
        assert 4 <= interrupted_at < steps

        # 3. SLURM restarts the same job (same id and script): it resumes from the checkpoint and finishes.
        nodes = "localhost,localhost"
        env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2",
                   SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NODELIST=nodes, SLURM_RESTART_COUNT="1")  # fmt: skip
        restarted = subprocess.Popen(["bash", str(script)], env=env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        restarted.wait(timeout=400)
        first, second = read_attempts(job_dir)
        assert second["status"] == "finished", log_tail()
        assert second["requeue"] == 1 and second["slurm_restart_count"] == 1
        assert second["start_step"] == interrupted_at and second["end_step"] == steps
        assert second["master"] == f"localhost:{master_port(job_id, 1)}"  # a fresh port for the new attempt
        assert {s for s, _ in _losses(job_dir)} == set(range(1, steps + 1))
    finally:  # never leave a job running behind a failed test
        for pgid in (batch_pid, restarted.pid if restarted is not None else None):
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------------
# the same launcher as `seer launch` and as the launch/submit.py script; recipes and suites by name
# ----------------------------------------------------------------------------------------------------------------
def test_seer_launch_pretrain_by_recipe_name_dry_run(tmp_path, capsys, monkeypatch):
    from seer.cli import main

    monkeypatch.chdir(tmp_path)  # the recipe is found by name from anywhere, not through the working directory
    code = main(["launch", "pretrain", "--config", "seer_rg32", "--nodes", "2", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    flags = _sbatch_flags(out)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("2", "8", "8")
    assert "world size 16" in err and "nothing submitted" in err
    assert flags["output"].startswith(str(tmp_path / "runs" / "seer_rg32" / "launch" / "logs"))
    assert not (tmp_path / "runs").exists()
    # an unknown name: one line naming close matches and the shipped recipes
    assert main(["launch", "pretrain", "--config", "seer_rg23", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "did you mean seer_rg32" in err and "tiny_cpu" in err and err.count("\n") == 1
    # the eval suites too
    code = main(["launch", "eval", "--suite", "small", "--out", str(tmp_path / "ev"), "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0 and "features: array of 4" in out and "4 feature + 16 protocol tasks" in err
    assert main(["launch", "bogus"]) == 2


def test_launch_submit_script_is_the_seer_launch_command(tmp_path):
    import subprocess

    argv = [sys.executable, str(REPO / "launch" / "submit.py"), "pretrain", "--config", "seer_rg32", "--nodes", "2",
            "--job-dir", str(tmp_path / "j"), "--dry-run"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _sbatch_flags(proc.stdout)["nodes"] == "2" and "world size 16" in proc.stderr
    proc = subprocess.run(argv[:2] + ["pretrian"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "python launch/submit.py: unknown command" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# faults: what counts as a peer failure, impossible requests, attempts a killed rank 0 left open
# ----------------------------------------------------------------------------------------------------------------
def test_peer_failures_are_told_apart_from_a_rank_s_own_errors():
    import torch.distributed as dist

    from seer.distributed.env import is_peer_failure

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [1.2.3.4]:5")
    assert is_peer_failure(gloo)
    assert is_peer_failure(RuntimeError("[gloo] Timed out waiting 900000ms for recv operation to complete"))
    assert is_peer_failure(dist.DistBackendError("NCCL communicator was aborted on rank 3"))
    try:  # a peer failure under another error (a wrapper that re-raises) is still one
        try:
            raise gloo
        except RuntimeError as exc:
            raise ValueError("step failed") from exc
    except ValueError as wrapped:
        assert is_peer_failure(wrapped)
    assert not is_peer_failure(RuntimeError("DataLoader timed out after 60 seconds"))
    assert not is_peer_failure(FloatingPointError("loss is nan at step 7"))
    assert not is_peer_failure(ValueError("data.images: no images under /x"))


def test_an_impossible_request_is_refused_by_the_scheduler_check(tmp_path, capsys, monkeypatch):
    """`sbatch --test-only` says no: the launcher names the request and what the partition offers, queues nothing."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    fakes = {
        "sinfo": "#!/bin/sh\n"
        'case "$*" in *%D*) echo "learnfair*: 4 node(s), 80 CPUs and 480000 MB per node, gres gpu:8, time limit '
        '3-00:00:00";; *) echo "learnfair*";; esac\n',
        "srun": "#!/bin/sh\nexit 0\n",
        "sbatch": f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = "--test-only" ] && '
        '{ echo "sbatch: error: Batch job submission failed: Requested node configuration is not available" >&2; '
        "exit 1; }\necho Submitted batch job 1\n",
    }
    for name, text in fakes.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    job_dir = tmp_path / "job"
    code, _, err = _run(["pretrain", "--config", RG256, "--nodes", "64", "--partition", "learnfair",
                         "--job-dir", str(job_dir)], capsys)  # fmt: skip
    assert code == 2
    assert "SLURM would not run this job: error: Batch job submission failed: Requested node configuration" in err
    assert "requested 64 node(s) with 80 CPUs" in err and "this cluster offers learnfair*: 4 node(s)" in err, err
    assert calls.read_text().split()[0] == "--test-only" and calls.read_text().count("\n") == 1  # never submitted
    assert not job_dir.exists()


def test_a_new_attempt_closes_the_records_a_killed_rank_0_left_running(tmp_path):
    from seer.launch.jobs import _Attempt

    first = _Attempt(tmp_path, submission=0, start_step=0)
    assert read_attempts(tmp_path)[0]["status"] == "running"
    del first  # rank 0 SIGKILLed: the record is never closed
    _Attempt(tmp_path, submission=0, start_step=15)
    old, new = read_attempts(tmp_path)
    assert old["status"] == "lost" and old["end_step"] == 15 and "killed" in old["reason"]
    assert new["status"] == "running" and new["attempt"] == 1
