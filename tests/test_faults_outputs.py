"""Unlucky users and their directories: every command that writes into a directory the user names.

The rule (``seer.io.prepare_output_dir``): seer writes into a new or empty directory, or one holding only an earlier
seer output of the same kind (marked by ``.seer-output.json``), which it may replace. Any other non-empty directory
is refused -- one line on stderr, exit 1 or 2, every file bit-identical afterwards -- unless ``--overwrite`` is
given, and then seer writes its own files beside the user's and deletes none of theirs. A directory that holds the
command's own source is refused even with ``--overwrite``. And what seer writes through temporary files and
directories gets the mode the umask gives, as ``open()`` and ``mkdir()`` would (issue 29, items 2, 3 and 17).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from seer.models.regnet import RegNetCfg, build_trunk

pytestmark = pytest.mark.faults

TINY = RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)
MARKER = ".seer-output.json"
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a directory's and a link's kind (what must not change)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"link:{os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _user_files(d: Path) -> dict[str, str]:
    """Put files of the user's into ``d`` (created): one at the top, one in a subfolder. Returns their snapshot."""
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("the user's notes\n")
    (d / "sub" / "data.bin").write_bytes(os.urandom(256))
    return _snapshot(d)


def _seer(argv: list[str], capsys) -> tuple[int, str, str]:
    """``seer ARGV`` in this process (the seer on sys.path, so PYTHONPATH picks the tree under test)."""
    from seer.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_refused(code: int, err: str, *words: str) -> None:
    assert code in (1, 2), (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def _tiny_trunk():
    torch.manual_seed(0)
    return build_trunk(TINY).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A one-checkpoint training run directory of a tiny trunk (read-only: tests copy it to change it)."""
    from seer.train.checkpoint import save_checkpoint

    model = torch.nn.Module()
    model.trunk = _tiny_trunk()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = tmp_path_factory.mktemp("outputs") / "runs" / "exp1"
    save_checkpoint(run, 5, model, opt, meta={"regnet_cfg": model.trunk.cfg.to_dict()})
    return run


@pytest.fixture
def runs(run_dir: Path, tmp_path: Path) -> Path:
    """``runs/`` holding two runs, ``exp1`` (a real one) and ``exp2`` (another run's files)."""
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(run_dir, root / "exp1")
    (root / "exp2").mkdir()
    (root / "exp2" / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0}\n')
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from seer.data.synthetic import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("images") / "imgs", n_per_class=3, size=16, n_classes=2)


def _suite_file(d: Path) -> Path:
    suite = {
        "name": "outputs-test",
        "features": {"layers": ["avgpool"], "batch_size": 64, "device": "cpu"},
        "checkpoints": [{"name": "pixels", "kind": "pixels", "size": 8}],
        "datasets": [
            {
                "name": "shapes",
                "generate": {
                    "kind": "shapes",
                    "size": 16,
                    "n_classes": 2,
                    "n_train_per_class": 3,
                    "n_test_per_class": 2,
                },
                "resolution": 16,
                "crop_pct": 1.0,
            }
        ],  # fmt: skip
        "protocols": [{"name": "knn", "ks": [1]}],
    }
    path = d / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Item 2: seer export --format hf / save_trunk(format="hf")
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_hf_into_a_directory_of_runs_is_refused(runs: Path, capsys, overwrite: bool) -> None:
    """`seer export runs/exp1 runs --format hf` deleted every run under runs/; --overwrite must not either."""
    before = _snapshot(runs)
    code, _, err = _seer(["export", str(runs / "exp1"), str(runs), "--format", "hf"] + ["--overwrite"] * overwrite,
                         capsys)  # fmt: skip
    _assert_refused(code, err, str(runs))
    assert _snapshot(runs) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_hf_into_its_own_run_directory_is_refused(runs: Path, capsys, overwrite: bool) -> None:
    run = runs / "exp1"
    before = _snapshot(runs)
    code, _, err = _seer(["export", str(run), str(run), "--format", "hf"] + ["--overwrite"] * overwrite, capsys)
    _assert_refused(code, err, str(run))
    assert _snapshot(runs) == before


def test_export_file_never_replaces_the_checkpoint_it_reads(runs: Path, capsys) -> None:
    """A file format written over the checkpoint's own metadata would destroy the run it came from."""
    from seer.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(runs / "exp1")
    before = _snapshot(runs)
    code, _, err = _seer(["export", str(runs / "exp1"), str(ckpt / ".metadata"), "--format", "timm"], capsys)
    _assert_refused(code, err, ".metadata")
    assert _snapshot(runs) == before
    # a file into the run directory itself is fine (runs/x/trunk.safetensors), and so is replacing it
    for _ in range(2):
        code, _, err = _seer(["export", str(runs / "exp1"), str(runs / "exp1" / "trunk.safetensors")], capsys)
        assert code == 0, err


def test_export_file_into_an_existing_directory_is_refused(runs: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "model.safetensors"
    before = _user_files(target)
    code, _, err = _seer(["export", str(runs / "exp1"), str(target)], capsys)
    _assert_refused(code, err, str(target))
    assert _snapshot(target) == before


def test_export_hf_foreign_directory_refused_then_overwrite_keeps_the_users_files(runs: Path, tmp_path: Path,
                                                                                  capsys) -> None:  # fmt: skip
    from seer.weights import load_trunk

    out = tmp_path / "mine"
    users = _user_files(out)
    code, _, err = _seer(["export", str(runs / "exp1"), str(out), "--format", "hf"], capsys)
    _assert_refused(code, err, str(out), "--overwrite")
    assert _snapshot(out) == users
    # --overwrite: seer's files beside the user's; a stale HF weight index (which would be loaded instead of the new
    # weights) is removed, nothing else
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.bin"}}))
    code, _, err = _seer(["export", str(runs / "exp1"), str(out), "--format", "hf", "--overwrite"], capsys)
    assert code == 0, err
    assert {k: v for k, v in _snapshot(out).items() if k in users} == users
    assert not (out / "model.safetensors.index.json").exists()
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_trunk(out)(x), load_trunk(runs / "exp1")(x), atol=1e-6)


def test_export_hf_replaces_its_own_previous_export(runs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    for _ in range(2):  # the second export replaces the first without --overwrite
        code, _, err = _seer(["export", str(runs / "exp1"), str(out), "--format", "hf"], capsys)
        assert code == 0, err
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "runs"]  # no temporary left beside it
    # once the user has put a file of theirs into it, it is no longer only seer's: refused
    (out / "README.md").write_text("my model card\n")
    before = _snapshot(out)
    code, _, err = _seer(["export", str(runs / "exp1"), str(out), "--format", "hf"], capsys)
    _assert_refused(code, err, "README.md")
    assert _snapshot(out) == before


def test_save_trunk_hf_follows_the_same_rule(tmp_path: Path) -> None:
    from seer.weights import load_trunk, save_trunk

    trunk = _tiny_trunk()
    out = tmp_path / "dir"
    users = _user_files(out)
    with pytest.raises(FileExistsError, match="not empty"):
        save_trunk(trunk, out, format="hf")
    assert _snapshot(out) == users
    save_trunk(trunk, out, format="hf", overwrite=True)
    assert {k: v for k, v in _snapshot(out).items() if k in users} == users
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_trunk(out)(x), trunk(x), atol=1e-5)
    own = tmp_path / "own"
    save_trunk(trunk, own, format="hf")
    save_trunk(trunk, own, format="hf")  # its own earlier export: replaced, no overwrite needed
    # an empty directory is written into (and kept: it may be a mount point)
    (tmp_path / "empty").mkdir()
    inode = (tmp_path / "empty").stat().st_ino
    save_trunk(trunk, tmp_path / "empty", format="hf")
    assert (tmp_path / "empty").stat().st_ino == inode and (tmp_path / "empty" / "config.json").is_file()


def test_export_onnx_never_replaces_a_directory(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    from seer.weights import save_trunk

    target = tmp_path / "trunk.onnx"
    before = _user_files(target)
    with pytest.raises((FileExistsError, IsADirectoryError, ValueError)):
        save_trunk(_tiny_trunk(), target, format="onnx")
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trunk.onnx"]  # no temporary left


# ----------------------------------------------------------------------------------------------------------------
# Item 3: seer demo --out DIR
# ----------------------------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised where the demo's real work would start: the tests only check what happens to --out before it."""


@pytest.fixture
def stop_demo_work(monkeypatch):
    import seer.data.tasks

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(seer.data.tasks, "write_task", stop)


DEMO_ARGS = ["--seeds", "0", "--train", "20", "--test", "2", "--steps", "1", "--no-supervised"]


def test_demo_refuses_a_directory_that_is_not_a_demo_output(tmp_path: Path, capsys, stop_demo_work) -> None:
    out = tmp_path / "results"
    before = _user_files(out)
    try:
        code, _, err = _seer(["demo", "--out", str(out), *DEMO_ARGS], capsys)
    except _Stop:
        code, err = None, ""
    assert out.is_dir() and _snapshot(out) == before, "seer demo deleted a directory of the user's"
    _assert_refused(code, err, str(out))


def test_demo_refuses_an_earlier_demo_output_holding_a_users_file(tmp_path: Path, stop_demo_work) -> None:
    from seer.demo import run_demo

    out = tmp_path / "demo"
    (out / "seed0").mkdir(parents=True)
    (out / "report.md").write_text("# old report\n")
    (out / MARKER).write_text(json.dumps({"kind": "demo", "files": ["report.md", "seed0"]}))
    (out / "thesis.tex").write_text("months of work\n")
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="thesis.tex"):
        run_demo(out, seeds=[0], n_train=20, n_test=2, steps=1, supervised=False)
    assert _snapshot(out) == before


def test_demo_replaces_its_own_earlier_output(tmp_path: Path, stop_demo_work) -> None:
    """An earlier demo (here: one killed after its data step) is replaced; the marker is written before any work."""
    from seer.demo import run_demo

    out = tmp_path / "demo"
    (out / "data" / "train").mkdir(parents=True)
    (out / "data" / "train" / "x.png").write_bytes(b"old")
    (out / "results.json").write_text("{}")
    (out / MARKER).write_text(json.dumps({"kind": "demo", "files": ["data", "results.json", "seed7"]}))
    with pytest.raises(_Stop):
        run_demo(out, seeds=[0], n_train=20, n_test=2, steps=1, supervised=False)
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "demo" and "seed0" in marker["files"] and "data" in marker["files"]


def test_demo_help_says_what_happens_to_out(capsys) -> None:
    from seer.demo import cli_main

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out" in text and "refused" in text and "replaced" in text


# ----------------------------------------------------------------------------------------------------------------
# The class: every command that writes into a directory the user names
# ----------------------------------------------------------------------------------------------------------------
# name -> argv for output directory OUT (paths from the fixtures); the output each leaves when it succeeds
Command = Callable[[Path, Path, Path, Path], list[str]]
COMMANDS: dict[str, tuple[Command, str]] = {
    "export --format hf": (lambda out, run, imgs, suite: ["export", str(run), str(out), "--format", "hf"],
                           "config.json"),
    "shards": (lambda out, run, imgs, suite: ["shards", str(imgs), str(out), "--workers", "1", "--no-progress"],
               "index.json"),
    "eval-suite": (lambda out, run, imgs, suite: ["eval-suite", "--suite", str(suite), "--out", str(out), "--quiet"],
                   "results.json"),
    "launch eval": (lambda out, run, imgs, suite: ["launch", "eval", "--suite", str(suite), "--out", str(out),
                                                   "--partition", "p", "--timeout-min", "10", "--dry-run"], ""),
    "demo": (lambda out, run, imgs, suite: ["demo", "--out", str(out), *DEMO_ARGS], ""),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_refuses_a_foreign_directory_and_overwrite_keeps_the_users_files(
    name: str, run_dir: Path, images: Path, tmp_path: Path, capsys, stop_demo_work
) -> None:
    argv_of, output = COMMANDS[name]
    out = tmp_path / "mine"
    users = _user_files(out)
    argv = argv_of(out, run_dir, images, _suite_file(tmp_path))
    try:
        code, _, err = _seer(argv, capsys)
    except _Stop:  # the old demo got as far as its work: it had deleted the directory first
        code, err = None, ""
    assert out.is_dir() and _snapshot(out) == users, f"seer {name} changed a directory of the user's"
    _assert_refused(code, err, str(out))
    if name == "demo":  # no --overwrite: a demo wants a directory of its own
        assert "--overwrite" not in err
        return
    assert "--overwrite" in err
    code, _, err = _seer([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert {k: v for k, v in _snapshot(out).items() if k in users} == users, f"seer {name} --overwrite lost a file"
    if output:
        assert (out / output).is_file()


def test_shards_overwrite_removes_only_seers_shards(images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    code, _, err = _seer(["shards", str(images), str(out), "--max-samples", "2", "--workers", "1", "--no-progress"],
                         capsys)  # fmt: skip
    assert code == 0 and len(list(out.glob("data-*.tar"))) == 3, err
    (out / "other-000000.tar").write_bytes(b"a shard of another prefix: not seer's")
    users = {k: v for k, v in _user_files(out).items() if not k.startswith(("data-", "index.json", MARKER))}
    code, _, err = _seer(["shards", str(images), str(out), "--workers", "1", "--no-progress", "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("data-*.tar")) == ["data-000000.tar"]  # the stale shards went
    assert {k: v for k, v in _snapshot(out).items() if k in users} == users


def test_shards_never_writes_into_the_folder_it_reads(images: Path, tmp_path: Path, capsys) -> None:
    import shutil

    parent = tmp_path / "project"
    shutil.copytree(images, parent / "imgs")
    before = _snapshot(parent)
    for target in (parent, parent / "imgs"):
        code, _, err = _seer(["shards", str(parent / "imgs"), str(target), "--workers", "1", "--no-progress",
                              "--overwrite"], capsys)  # fmt: skip
        _assert_refused(code, err, "source")
        assert _snapshot(parent) == before


def test_shards_index_writes_only_its_index(images: Path, tmp_path: Path, capsys) -> None:
    """`seer shards index` writes one file, index.json, beside the shards: an existing one only with --overwrite."""
    from seer.data.shards import write_shards

    out = tmp_path / "shards"
    write_shards(images, out, max_samples_per_shard=2, progress=False)
    (out / "index.json").unlink()
    users = _user_files(out)
    code, _, err = _seer(["shards", "index", str(out / "data-*.tar")], capsys)
    assert code == 0, err
    before = _snapshot(out)
    code, _, err = _seer(["shards", "index", str(out / "data-*.tar")], capsys)
    _assert_refused(code, err, "index.json")
    assert _snapshot(out) == before
    code, _, err = _seer(["shards", "index", str(out / "data-*.tar"), "--overwrite"], capsys)
    assert code == 0, err
    assert {k: v for k, v in _snapshot(out).items() if k in users} == users


def test_eval_suite_never_deletes_a_folder_in_the_way_of_its_generated_data(tmp_path: Path, capsys) -> None:
    """--overwrite into a directory whose data/<name> is the user's: refused (it used to be deleted as 'incomplete')."""
    out = tmp_path / "out"
    users = _user_files(out / "data" / "shapes")
    code, _, err = _seer(["eval-suite", "--suite", str(_suite_file(tmp_path)), "--out", str(out), "--quiet",
                          "--overwrite"], capsys)  # fmt: skip
    assert _snapshot(out / "data" / "shapes") == users
    _assert_refused(code, err, "shapes")


def test_eval_suite_reuses_its_own_output_and_refuses_one_holding_its_dataset(tmp_path: Path, images: Path,
                                                                              capsys) -> None:  # fmt: skip
    suite = _suite_file(tmp_path)
    out = tmp_path / "out"
    for _ in range(2):  # its own earlier output: written into again (features reused), no --overwrite needed
        code, _, err = _seer(["eval-suite", "--suite", str(suite), "--out", str(out), "--quiet"], capsys)
        assert code == 0, err
    # a suite reading a folder inside --out is refused even with --overwrite
    import shutil

    project = tmp_path / "project"
    shutil.copytree(images, project / "imgs")
    spec = yaml.safe_load(suite.read_text())
    spec["datasets"] = [{"name": "imgs", "train": str(project / "imgs"), "test": str(project / "imgs"),
                         "resolution": 16, "crop_pct": 1.0}]  # fmt: skip
    suite.write_text(yaml.safe_dump(spec))
    before = _snapshot(project)
    code, _, err = _seer(["eval-suite", "--suite", str(suite), "--out", str(project), "--quiet", "--overwrite"],
                         capsys)  # fmt: skip
    _assert_refused(code, err, "source")
    assert _snapshot(project) == before


def test_clearing_an_output_removes_only_what_its_marker_lists(tmp_path: Path) -> None:
    """The clean-up behind every replace and --overwrite: seer's listed files, never the user's, never outside."""
    from seer.io import claim_output_files, clear_output_dir, prepare_output_dir

    d = tmp_path / "d"
    users = _user_files(d)
    (tmp_path / "outside.txt").write_text("next door")
    (d / "ours.bin").write_bytes(b"seer's")
    (d / MARKER).write_text(json.dumps({"kind": "shards", "files": ["ours.bin", "notes.txt/..", "../outside.txt"]}))
    assert clear_output_dir(d, "other-kind") == [] and (d / "ours.bin").exists()  # another command's output
    assert clear_output_dir(d, "shards") == ["ours.bin"]
    assert _snapshot(d) == users and (tmp_path / "outside.txt").read_text() == "next door"
    # claiming names in a directory of the user's: a marker is created, merged, and another kind's is left alone
    claim_output_files(d, "shards", ["a.tar"])
    claim_output_files(d, "shards", ["b.tar"])
    assert json.loads((d / MARKER).read_text())["files"] == ["a.tar", "b.tar"]
    (d / MARKER).write_text(json.dumps({"kind": "extract", "files": ["x.npy"]}))
    assert claim_output_files(d, "shards", ["c.tar"]) is None
    assert json.loads((d / MARKER).read_text()) == {"kind": "extract", "files": ["x.npy"]}
    # a command without --overwrite says only what to do
    with pytest.raises(FileExistsError) as info:
        prepare_output_dir(d, kind="demo", flag=None)
    assert "--overwrite" not in str(info.value) and "new or empty directory" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Item 17: modes of what is written through temporary files and directories follow the umask
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def _assert_umask_modes(root: Path, mask: int) -> None:
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    wrong = {name: oct(mode) for name, mode in _modes(root).items()
             if mode != (want_dir if (root / name).is_dir() else want_file)}  # fmt: skip
    assert not wrong, f"umask {oct(mask)}: want {oct(want_file)} / {oct(want_dir)}, got {wrong}"


def test_exports_honour_the_umask(tmp_path: Path, umask: int) -> None:
    from seer.weights import save_trunk

    trunk = _tiny_trunk()
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777 & ~umask)
    save_trunk(trunk, out / "hf", format="hf")
    save_trunk(trunk, out / "trunk.safetensors")
    save_trunk(trunk, out / "trunk.pth", format="torchvision")
    try:
        import onnxscript  # noqa: F401

        save_trunk(trunk, out / "trunk.onnx", format="onnx")
    except ImportError:
        pass
    _assert_umask_modes(out, umask)


def test_results_and_generated_data_honour_the_umask(tmp_path: Path, umask: int, capsys) -> None:
    from seer.evaluation import write_json

    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777 & ~umask)
    write_json({"top1": 0.5}, out / "knn.json")
    code, _, err = _seer(["eval-suite", "--suite", str(_suite_file(tmp_path)), "--out", str(out / "suite"),
                          "--quiet"], capsys)  # fmt: skip
    assert code == 0, err
    _assert_umask_modes(out, umask)


def test_atomic_helpers_honour_the_umask(tmp_path: Path, umask: int) -> None:
    from seer.io import atomic_dir, atomic_path, atomic_write

    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777 & ~umask)
    atomic_write(out / "a.txt", "x")
    with atomic_path(out / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    with atomic_dir(out / "d") as tmp:
        (tmp / "c.txt").write_text("z")
    _assert_umask_modes(out, umask)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
