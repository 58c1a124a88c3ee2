"""The evaluation commands as the docs write them, what they log and show while they run, and how their messages name
options (issue 31, items 3, 5, 7, 12 and 13).

- item 3: the ImageNet-style suite commands of README.md, docs/evaluation.md, docs/slurm.md and the suites' own
  comments run as written (`seer eval-suite` for real, `seer launch eval` through --dry-run; --local is slow), on a
  stand-in IMAGENET_DIR (tiny image folders) and a tiny random trunk file; placeholder errors name the `--set`;
- item 5: the linear probe and the kNN search report progress through seer.progress (rate, ETA), also inside a suite
  and the demo;
- item 7: every command configures seer's logger, never the root logger (faiss's loader stays quiet); a
  single-process extraction's progress does not say "rank 0";
- item 12: a message names `--overwrite` / `--clamp-k` from the command line and `overwrite=True` / `clamp_k=True`
  from Python; `seer knn`'s default ks fit a small bank with a note;
- item 13: the demo report shows no spread for a single value; the suite table's footer names the ks that ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seer.cli import main as seer_main
from seer.data.synthetic import write_image_folder
from seer.evaluation import suites
from seer.models.regnet import build_trunk

ROOT = Path(__file__).resolve().parents[1]
TINY4 = {"depth": 4, "w0": 8, "wa": 64.0, "wm": 2.0, "group_w": 8}  # four stages: res4 exists (imagenet1k's layers)
TINY = {"depth": 4, "w0": 16, "wa": 8.0, "wm": 2.0, "group_w": 8}
PLACEHOLDERS = ("IMAGENET_DIR", "INAT_DIR", "PLACES205_DIR", "SEER_CHECKPOINT")


@pytest.fixture(autouse=True)
def _no_suite_variables(monkeypatch):
    for name in PLACEHOLDERS:  # the documented commands must work without them in the environment
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A DATA_DIR stand-in (train/ and val/ image folders of 4 classes), a tiny random trunk file and a pretraining
    run directory with two complete checkpoints (for --run-checkpoints)."""
    import seer

    root = tmp_path_factory.mktemp("standin")
    write_image_folder(root / "data" / "train", 5, 32, 0, 4)
    write_image_folder(root / "data" / "val", 2, 32, 1, 4)
    torch.manual_seed(0)
    seer.save_trunk(build_trunk(TINY4), root / "rg32.safetensors")
    for step in (100, 200):
        d = root / "myrun" / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text("{}")
    return root


def _seer(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = seer_main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out = capsys.readouterr()
    return int(code or 0), out.out, out.err


# ----------------------------------------------------------------------------------------------------------------
# item 3: the documented commands
# ----------------------------------------------------------------------------------------------------------------
def _documented(path: Path, command: str) -> list[list[str]]:
    """The arguments of every ``command ...`` line of a doc whose suite has placeholders (continuation lines joined;
    in a yaml file, its comments)."""
    text = path.read_text()
    if path.suffix == ".yaml":
        text = "\n".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))
    text = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    found = []
    for line in text.splitlines():
        line = line.strip().strip("`")
        if line.startswith(command + " "):
            argv = shlex.split(line, comments=True)[len(command.split()) :]
            if "--suite" in argv and argv[argv.index("--suite") + 1] in ("imagenet1k", "inat2018", "places205"):
                found.append(argv)
    return found


def _on_standin(argv: list[str], standin: Path, out: Path) -> list[str]:
    """The documented arguments with the user's paths replaced: data directories by the stand-in, checkpoint files
    by the tiny trunk, run directories by the stand-in run, ``--out`` by ``out``."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        value = argv[i + 1]
        if arg == "--set":
            name, _, _ = value.partition("=")
            argv[i + 1] = f"{name}={standin / 'data'}" if name.endswith("_DIR") else value
        elif arg == "--checkpoint":
            argv[i + 1] = f"{value.partition('=')[0]}={standin / 'rg32.safetensors'}"
        elif arg == "--run-checkpoints":
            argv[i + 1] = str(standin / "myrun")
        elif arg == "--out":
            argv[i + 1] = str(out)
    return argv


DOCS = [ROOT / "README.md", ROOT / "docs" / "evaluation.md", ROOT / "docs" / "slurm.md",
        *sorted((ROOT / "configs" / "eval").glob("*.yaml"))]  # fmt: skip


def test_the_docs_show_the_commands_this_file_checks():
    suite_cmds = [argv for doc in DOCS for argv in _documented(doc, "seer eval-suite")]
    launch_cmds = [argv for doc in DOCS for argv in _documented(doc, "seer launch eval")]
    assert len(suite_cmds) >= 5 and len(launch_cmds) >= 2, (suite_cmds, launch_cmds)  # README, evaluation.md, 3 yaml
    for argv in suite_cmds + launch_cmds:
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        assert all(s.split("=")[0].isupper() for s in sets), argv  # placeholder names as the suites spell them


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_eval_suite_commands_resolve(doc, standin, tmp_path):
    """Each documented `seer eval-suite` command names every placeholder its suite needs; its --checkpoint entries
    replace the suite's ${SEER_CHECKPOINT} entry."""
    import argparse

    for argv in _documented(doc, "seer eval-suite"):
        p = argparse.ArgumentParser()
        suites.add_suite_args(p)
        p.add_argument("--quiet", action="store_true")
        args = p.parse_args(_on_standin(argv, standin, tmp_path / "out"))
        suite = suites.suite_from_args(args)
        named = [c.partition("=")[0] for c in args.checkpoint]
        assert [c["name"] for c in suite["checkpoints"]] == named, argv
        assert all(c["source"] == str(standin / "rg32.safetensors") for c in suite["checkpoints"])
        assert suite["datasets"][0]["train"] == str(standin / "data" / "train"), argv


@pytest.mark.parametrize("doc", [ROOT / "README.md", ROOT / "docs" / "slurm.md"], ids=lambda p: p.name)
def test_documented_launch_eval_commands_dry_run(doc, standin, tmp_path, capsys):
    cmds = _documented(doc, "seer launch eval")
    assert cmds, f"{doc.name} shows no `seer launch eval --suite imagenet1k` command"
    for argv in cmds:
        code, out, err = _seer(["launch", "eval", *_on_standin(argv, standin, tmp_path / "out"), "--dry-run"], capsys)
        assert code == 0, err
        n_ckpts = argv.count("--checkpoint") + 2 * argv.count("--run-checkpoints")  # the stand-in run: 2 steps
        protocols = len(suites.load_suite("imagenet1k", {"IMAGENET_DIR": "x", "SEER_CHECKPOINT": "y"})["protocols"])
        assert f"{n_ckpts} feature + {n_ckpts * protocols} protocol tasks" in err, err
        assert "# ---- features: array of" in out and not (tmp_path / "out").exists()


def test_readme_eval_suite_command_runs_on_a_standin(standin, tmp_path, capsys):
    """README's `seer eval-suite --suite imagenet1k ...` as written, on the stand-in: one checkpoint (the placeholder
    entry is replaced by --checkpoint), the stand-in's folders. One protocol, which a 20-image bank can run (kNN's
    k = 200 needs 200 images; the whole suite runs in the slow test below)."""
    (argv,) = _documented(ROOT / "README.md", "seer eval-suite")
    out = tmp_path / "out"
    code, stdout, err = _seer(["eval-suite", *_on_standin(argv, standin, out), "--only-protocol", "logreg-13shot",
                               "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    payload = json.loads((out / "results.json").read_text())
    assert {r["checkpoint"] for r in payload["rows"]} == {"rg32"} and len(payload["rows"]) == 1
    assert payload["results"][0]["metadata"]["train"] == str(standin / "data" / "train")
    assert "| imagenet1k | rg32 | logreg-13shot |" in stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_eval_suite_command_runs_whole_on_a_standin(tmp_path, capsys):
    """The whole imagenet1k suite (kNN up to k = 200, the 56-head linear grid, 1- and 13-shot logistic regression)."""
    import seer

    write_image_folder(tmp_path / "data" / "train", 50, 32, 0, 4)
    write_image_folder(tmp_path / "data" / "val", 5, 32, 1, 4)
    torch.manual_seed(0)
    seer.save_trunk(build_trunk(TINY4), tmp_path / "rg32.safetensors")
    (argv,) = _documented(ROOT / "README.md", "seer eval-suite")
    code, _, err = _seer(["eval-suite", *_on_standin(argv, tmp_path, tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["protocol"] for r in rows] == ["knn", "knn", "linear", "logreg-1shot", "logreg-13shot"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_readme_launch_eval_command_runs_locally_on_a_standin(standin, tmp_path, capsys):
    """README's `seer launch eval ...` through submitit's local executor (--local), one protocol."""
    (argv,) = _documented(ROOT / "README.md", "seer launch eval")
    out = tmp_path / "out"
    argv = [a for a in _on_standin(argv, standin, out)]
    code, _, err = _seer(["launch", "eval", *argv, "--local", "--only-protocol", "logreg-13shot"], capsys)
    assert code == 0, err
    payload = json.loads((out / "results.json").read_text())
    assert not payload["missing"] and [r["checkpoint"] for r in payload["rows"]] == ["rg32"]


def test_a_wrong_case_placeholder_is_named_with_the_set_it_needs(standin, tmp_path, capsys):
    ckpt = f"rg32={standin / 'rg32.safetensors'}"
    wrong = ["--suite", "imagenet1k", "--set", f"imagenet_dir={standin / 'data'}", "--checkpoint", ckpt]
    for cmd in (["eval-suite"], ["launch", "eval"]):
        extra = ["--dry-run"] if cmd[0] == "launch" else []
        code, _, err = _seer([*cmd, *wrong, "--out", str(tmp_path / "out"), *extra], capsys)
        assert code == 2, err
        assert "${IMAGENET_DIR} not set" in err and "did you mean --set IMAGENET_DIR=" in err, err
        assert "case-sensitive" in err and "--set imagenet_dir=" in err, err
    assert not (tmp_path / "out").exists()


def test_placeholder_rules(monkeypatch):
    # unset: the message names the placeholder, its --set, and --checkpoint for the checkpoint placeholder
    with pytest.raises(suites.SuiteError, match=r"\$\{SEER_CHECKPOINT\} not set: pass --set SEER_CHECKPOINT=\.\.\. "
                       r"\(or --checkpoint NAME=PATH\)"):  # fmt: skip
        suites.load_suite("imagenet1k", {"IMAGENET_DIR": "/d"})
    # a --set the suite never uses is an error too (a wrong-case name the environment would have hidden)
    monkeypatch.setenv("IMAGENET_DIR", "/env")
    with pytest.raises(suites.SuiteError, match=r"--set imagenet_dir: no such .*did you mean --set IMAGENET_DIR"):
        suites.load_suite("imagenet1k", {"imagenet_dir": "/d"}, ["a=/a.safetensors"])
    monkeypatch.delenv("IMAGENET_DIR")
    # --set fills the placeholder entry; --checkpoint then adds to it
    both = suites.load_suite("imagenet1k", {"IMAGENET_DIR": "/d", "SEER_CHECKPOINT": "/s"}, ["a=/a"])
    assert [(c["name"], c["source"]) for c in both["checkpoints"]] == [("seer", "/s"), ("a", "/a")]
    # a suite with real checkpoints keeps them: --checkpoint adds one, or replaces the one of its name
    small = suites.load_suite("small", {}, ["mine=/m", "pixels=/p"])
    assert [c["name"] for c in small["checkpoints"]] == ["tiny-random", "mine", "pixels"]
    with pytest.raises(suites.SuiteError, match="--checkpoint expects NAME=PATH"):
        suites.load_suite("small", {}, ["nopath"])


def test_run_checkpoints_replace_the_placeholder_checkpoint(standin, tmp_path, capsys):
    argv = ["launch", "eval", "--suite", "imagenet1k", "--set", f"IMAGENET_DIR={standin / 'data'}",
            "--run-checkpoints", str(standin / "myrun"), "--out", str(tmp_path / "out"), "--dry-run"]  # fmt: skip
    code, _, err = _seer(argv, capsys)
    assert code == 0, err
    assert "2 feature + 8 protocol tasks" in err  # myrun@100 and myrun@200; no ${SEER_CHECKPOINT} entry left


# ----------------------------------------------------------------------------------------------------------------
# item 5: progress of the probes (rate, ETA through seer.progress)
# ----------------------------------------------------------------------------------------------------------------
def _blobs(n: int, dim: int = 16, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    return (rng.normal(size=(classes, dim))[y] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32), y


def test_linear_probe_and_knn_search_report_rate_and_eta(capsys, monkeypatch):
    import seer.progress
    from seer.evaluation import eval_knn, eval_linear

    # a line at every update: whatever this machine's speed, lines between start and end show the rate and ETA
    monkeypatch.setattr(seer.progress, "line_interval", lambda: 0.0)
    x, y = _blobs(400)
    eval_linear(x, y, x[:40], y[:40], lrs=[0.1, 1.0], head_types=["linear"], epochs=40, batch_size=8, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("linear probe (2 heads)")]
    assert lines[0].endswith("started") and lines[-1].endswith("done"), err
    assert any(" step/s" in line and " eta " in line for line in lines), err  # a line between: rate and ETA
    assert "linear probe (1 head): " in err  # the selected configuration, retrained on all of train
    eval_knn(x, y, x[:40], y[:40], ks=[5], train_chunk_size=64, progress=True)
    err = capsys.readouterr().err
    assert "kNN search: 0/400 row" in err and "kNN search: 400/400 row (100%)" in err and "done" in err, err
    # progress=None (what a suite and the demo pass): nothing for work this small
    eval_linear(x, y, x[:40], y[:40], lrs=[0.1], epochs=2, progress=None)
    eval_knn(x, y, x[:40], y[:40], ks=[5], progress=None)
    assert capsys.readouterr().err == ""


def test_seer_linear_and_knn_show_progress_off_a_terminal(tmp_path, capsys):
    x, y = _blobs(120)
    np.savez(tmp_path / "train.npz", features=x, labels=y)
    np.savez(tmp_path / "test.npz", features=x[:20], labels=y[:20])
    files = ["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz")]
    code, _, err = _seer(["linear", *files, "--lrs", "0.1", "1", "--epochs", "2"], capsys)
    assert code == 0 and "linear probe (4 heads): 0/" in err and "linear probe (4 heads): " in err, err
    code, _, err = _seer(["knn", *files, "--ks", "5"], capsys)
    assert code == 0 and "kNN search: 120/120 row" in err, err


@pytest.fixture(scope="module")
def small_suite_run(tmp_path_factory):
    """A pixels-only suite on generated shapes, run once with progress and the thresholds of the long probes at 0
    (so the suite's probes show their progress): ``(payload, stderr, table)``."""
    from seer.evaluation import knn, linear

    root = tmp_path_factory.mktemp("suite")
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "features": {"layers": ["avgpool"], "batch_size": 64, "device": "cpu"},
        "checkpoints": [{"name": "pixels", "kind": "pixels", "size": 4}],
        "datasets": [{"name": "shapes", "resolution": 16, "crop_pct": 1.0,
                      "generate": {"kind": "shapes", "size": 16, "n_classes": 3, "n_train_per_class": 8,
                                   "n_test_per_class": 3}}],
        "protocols": [{"name": "knn", "ks": [3, 10]},
                      {"name": "knn", "label": "knn-2shot", "ks": [1, 2], "n_per_class": 2, "n_tries": 2},
                      {"name": "linear", "lrs": [0.1], "head_types": ["linear"], "epochs": 2}],
    }))  # fmt: skip
    saved = knn.PROGRESS_MIN_PAIRS, linear.PROGRESS_MIN_WORK
    knn.PROGRESS_MIN_PAIRS = linear.PROGRESS_MIN_WORK = 0
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            payload = suites.run_suite(suites.load_suite(path), root / "out", progress=True)
    finally:
        knn.PROGRESS_MIN_PAIRS, linear.PROGRESS_MIN_WORK = saved
    return payload, err.getvalue(), (root / "out" / "results.md").read_text()


def test_the_probes_inside_a_suite_show_progress(small_suite_run):
    _, err, _ = small_suite_run
    assert "pixels / shapes / train: features (pixels)" in err
    assert "linear probe (1 head): 0/" in err and "kNN search: 24/24 row" in err, err


def test_suite_footer_names_the_ks_that_ran(small_suite_run):
    payload, _, table = small_suite_run
    footer = table.strip().splitlines()[-1]
    assert "k = 20" not in table
    assert "kNN rows show knn: k = 10; knn-2shot: k = 2 (every k that ran in details)." in footer, footer
    assert [r.get("k") for r in payload["rows"]] == [10, 2, None]
    # one kNN protocol that ran k = 20: the footer says that one
    rows = [{**payload["rows"][0], "k": 20}]
    assert "kNN rows show k = 20 (" in suites.markdown_table(rows, payload["suite"])
    assert "kNN" not in suites.markdown_table(payload["rows"][2:], payload["suite"]).splitlines()[-1]


def test_the_demo_probe_goes_through_seer_progress(monkeypatch, capsys):
    from seer import demo
    from seer.evaluation import linear

    monkeypatch.setattr(linear, "PROGRESS_MIN_WORK", 0)  # the demo passes progress=None: long probes only
    x, y = _blobs(60)
    demo._evaluate(x, y, x[:20], y[:20], seed=0)
    assert "linear probe (14 heads): 0/" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# item 7: seer's own logger, never the root logger
# ----------------------------------------------------------------------------------------------------------------
def test_configure_logging_shows_seer_and_hides_other_libraries():
    code = ("import logging; from seer.logs import configure_logging; configure_logging(); configure_logging(); "
            "logging.getLogger('seer.evaluation.knn').info('seer says'); "
            "logging.getLogger('faiss.loader').info('faiss says'); logging.getLogger('seer.data').warning('careful'); "
            "assert logging.getLogger().level == logging.WARNING and not logging.getLogger().handlers")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "seer says\nWARNING seer.data: careful\n"  # once each, although configured twice


def test_seer_knn_keeps_faiss_loader_messages_out(tmp_path):
    pytest.importorskip("faiss")
    x, y = _blobs(60)
    np.savez(tmp_path / "train.npz", features=x, labels=y)
    np.savez(tmp_path / "test.npz", features=x[:10], labels=y[:10])
    argv = [sys.executable, "-m", "seer.cli", "knn", "--train", str(tmp_path / "train.npz"), "--test",
            str(tmp_path / "test.npz"), "--ks", "5", "--backend", "faiss"]  # fmt: skip
    env = {**os.environ, "SEER_PROGRESS": "0"}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr
    assert "k=5" in run.stdout and "faiss" not in run.stderr, run.stderr  # the root logger stays at WARNING


def test_every_command_configures_seers_logger_not_the_root(standin, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("logging.basicConfig configures the root logger")

    monkeypatch.setattr(logging, "basicConfig", refuse)
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    seer_logger = logging.getLogger("seer")
    saved = seer_logger.level
    x, y = _blobs(60)
    np.savez(tmp_path / "train.npz", features=x, labels=y)
    np.savez(tmp_path / "test.npz", features=x[:10], labels=y[:10])
    files = ["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz")]
    images, model = standin / "data" / "val", str(standin / "rg32.safetensors")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"checkpoints": [{"name": "pixels", "kind": "pixels", "size": 4}],
                                     "datasets": [{"name": "d", "train": str(images), "test": str(images),
                                                   "resolution": 16}],
                                     "protocols": [{"name": "knn", "ks": [1]}]}))  # fmt: skip
    commands = {
        "knn": ["knn", *files, "--ks", "5"],
        "linear": ["linear", *files, "--lrs", "0.1", "--epochs", "1"],
        "shards": ["shards", str(images), str(tmp_path / "shards"), "--workers", "1", "--no-progress"],
        "shards verify": ["shards", "verify", str(tmp_path / "shards"), "--workers", "1", "--no-progress"],
        "extract": ["extract", str(images), str(tmp_path / "feats"), "--model", model, *"--resolution 32".split()],
        "eval-suite": ["eval-suite", "--suite", str(suite), "--out", str(tmp_path / "e"), "--quiet"],
    }
    try:
        for name, argv in commands.items():
            seer_logger.setLevel(logging.WARNING)
            code, _, err = _seer(argv, capsys)
            assert code == 0, (name, err)
            assert seer_logger.level == logging.INFO, name
            assert (root.level, root.handlers) == before, name
    finally:
        seer_logger.setLevel(saved)


def test_single_process_extraction_names_no_rank(tmp_path, capsys):
    from seer.features import extract_dataset

    folder = write_image_folder(tmp_path / "imgs", 2, 32, 0, 3)
    trunk = build_trunk(TINY).eval()
    kw = {"resolution": 32, "batch_size": 4, "num_workers": 0, "progress": True}
    extract_dataset(str(folder), tmp_path / "one", trunk, **kw)
    err = capsys.readouterr().err
    assert "features: 6/6 img" in err and "rank" not in err, err
    extract_dataset(str(folder), tmp_path / "two", trunk, rank=1, world_size=2, merge=False, **kw)
    assert "features (rank 1 of 2): 3/3 img" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# item 12: messages name the option as the caller gave it; seer knn's default ks on a small bank
# ----------------------------------------------------------------------------------------------------------------
def test_seer_knn_default_ks_fit_a_small_bank_with_a_note(tmp_path, capsys):
    from seer.evaluation import eval_knn

    x, y = _blobs(50)
    np.savez(tmp_path / "train.npz", features=x, labels=y)
    np.savez(tmp_path / "test.npz", features=x[:10], labels=y[:10])
    files = ["knn", "--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz")]
    code, out, err = _seer(files, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == ["seer knn: note: the train bank has 50 samples: k = 10 20 instead of the default 10 20 100 200 "
                     "(--ks chooses)"], err  # fmt: skip
    assert [line.split()[0] for line in out.splitlines()] == ["k=10", "k=20"]
    code, out, err = _seer([*files, "--ks", "10", "200"], capsys)  # typed by the user: not clamped silently
    assert code == 2 and "--ks 200: larger than the train bank (50 samples)" in err and "--clamp-k" in err, err
    assert "clamp_k" not in err
    code, out, err = _seer([*files, "--ks", "10", "200", "--clamp-k"], capsys)
    assert code == 0 and "k=200" in out, err
    with pytest.raises(ValueError, match=r"clamp_k=True") as info:  # from Python: the argument
        eval_knn(x, y, x[:10], y[:10], ks=[200])
    assert "--clamp-k" not in str(info.value)


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine\n")
    return path


def test_overwrite_messages_name_the_flag_from_the_cli_and_the_argument_from_python(standin, tmp_path, capsys):
    from seer.data.shards import write_shards
    from seer.data.shards.train import index_shards
    from seer.features import extract_dataset

    images = standin / "data" / "val"
    model = str(standin / "rg32.safetensors")

    def python(call) -> str:
        with pytest.raises((OSError, ValueError)) as info:
            call()
        return str(info.value)

    def cli(argv: list[str]) -> str:
        code, _, err = _seer(argv, capsys)
        assert code == 2, err
        return err

    shards = tmp_path / "shards"
    write_shards(str(images), shards, progress=False)
    made = {
        "extract": (lambda: extract_dataset(str(images), _user_dir(tmp_path / "x1"), model, resolution=32),
                    ["extract", str(images), str(_user_dir(tmp_path / "x2")), "--model", model]),
        "shards": (lambda: write_shards(str(images), _user_dir(tmp_path / "s1"), progress=False),
                   ["shards", str(images), str(_user_dir(tmp_path / "s2")), "--no-progress"]),
        "shards index": (lambda: index_shards(str(shards / "*.tar")),
                         ["shards", "index", str(shards / "*.tar")]),
        "eval-suite": (lambda: suites.run_suite(suites.load_suite("small"), _user_dir(tmp_path / "e1"), progress=False),
                       ["eval-suite", "--suite", "small", "--out", str(_user_dir(tmp_path / "e2"))]),
    }  # fmt: skip
    for name, (call, argv) in made.items():
        from_python, from_cli = python(call), cli(argv)
        assert "overwrite=True" in from_python and "--overwrite" not in from_python, (name, from_python)
        assert "--overwrite" in from_cli and "overwrite=True" not in from_cli, (name, from_cli)


def test_no_message_names_both_forms():
    """One rule: the caller's form. A message with both ("overwrite=True (--overwrite)") is the old rule."""
    both = re.compile(r"=True \(.*--|=True / --|\(seer \w+ --")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "seer").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if both.search(line)]  # fmt: skip
    assert not hits, hits


# ----------------------------------------------------------------------------------------------------------------
# item 13: the demo report shows no spread where there is none
# ----------------------------------------------------------------------------------------------------------------
def _demo_results(seeds: list[int]) -> tuple[dict, dict]:
    from seer.demo import METRICS, ROWS, _criteria, _stats

    values = {"SwAV pretrained": 0.8, "random init": 0.4, "raw pixels": 0.5, "supervised": 0.9}
    table = {
        name: {m: _stats([values[name] + 0.01 * s for s in (seeds[:1] if name == "raw pixels" else seeds)])
               for m in METRICS}
        for name in ROWS
    }  # fmt: skip
    settings = {"recipe": "tiny_cpu", "task": "digits", "n_train": 100, "n_test": 50, "image_size": 32,
                "classes": list(range(10)), "world_size": 1, "seeds": seeds, "linear": {"epochs": 30},
                "pretrain_config": {"model": {"cfg": "tiny"}, "train": {"total_steps": 10},
                                    "data": {"global_batch_size": 64}},
                "machine": {"cpu_model": "cpu", "cores": 2, "cpu_capability": "avx2", "torch": "2"}}  # fmt: skip
    results = {"settings": settings, "timings_s": {"total": 1.0}, "table": table, "criteria": _criteria(table)}
    metrics = {s: {"SwAV pretrained": [{"step": 1, "loss": 2.0, "images_per_sec": 10.0}]} for s in seeds}
    return results, metrics


def test_demo_report_shows_no_spread_for_one_value():
    from seer.demo import _report

    one = _report(*_demo_results([0]))
    table = [line for line in one.splitlines() if line.startswith("| ")]
    assert "± " not in "\n".join(table) and "| SwAV pretrained | 80.0% | 80.0% |" in table, table
    assert "## Accuracy (test split, one seed, no spread)" in one
    three = _report(*_demo_results([0, 1, 2]))
    assert "## Accuracy (test split, mean ± std over 3 seeds)" in three
    assert "| SwAV pretrained | 81.0 ± 0.8% | 81.0 ± 0.8% |" in three
    assert "| raw pixels | 50.0% | 50.0% |" in three  # deterministic: scored once, so no spread either
