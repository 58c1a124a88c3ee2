"""Hostile inputs: `seer.extract_features` and every CLI fuzzed with hypothesis.

The contract checked for every example: either a correct result (finite features of the right shape, exit code 0),
or a documented skip (``on_error="skip"`` lists the input in ``.skipped``), or a clear error -- an exception of a
documented type raised by seer's own code with a non-empty message, or a CLI exit code 1/2 with a message on
stderr and no traceback. Never an exception escaping from deep inside torch / PIL / numpy, never NaN features.
"""

from __future__ import annotations

import io
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from seer.models.regnet import RegNetCfg, build_trunk

pytestmark = pytest.mark.faults

# Deterministic in CI (derandomize); SEER_FUZZ_EXAMPLES=200 SEER_FUZZ_RANDOM=1 explores further.
FUZZ = settings(
    max_examples=int(os.environ.get("SEER_FUZZ_EXAMPLES", "25")),
    derandomize=not os.environ.get("SEER_FUZZ_RANDOM"),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
TINY = RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)


def _png(w: int, h: int, color=(200, 30, 60), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def _raised_by_seer(exc: BaseException) -> bool:
    """The exception was raised in seer's (or launch's) own code, not deep inside a library."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and ("/seer/" in frames[-1].filename or "/launch/" in frames[-1].filename)


_TRUNK: list = []


def _trunk():
    """One tiny random trunk for the module (not a fixture: hypothesis would print its repr in every report)."""
    if not _TRUNK:
        torch.manual_seed(0)
        _TRUNK.append(build_trunk(TINY).eval())
    return _TRUNK[0]


@pytest.fixture
def trunk():
    return _trunk()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Hostile and benign files shared by the fuzzers."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    out = {}
    out["missing"] = root / "does-not-exist.jpg"
    out["emptydir"] = root / "emptydir"
    out["emptydir"].mkdir()
    out["garbagedir"] = root / "garbagedir"
    (out["garbagedir"] / "cls").mkdir(parents=True)
    (out["garbagedir"] / "cls" / "a.jpg").write_bytes(rng.bytes(300))
    (out["garbagedir"] / "cls" / "b.png").write_bytes(b"")
    out["blocker"] = root / "a-file"
    out["blocker"].write_text("a regular file")
    out["under_file"] = out["blocker"] / "child"
    for suffix in (".jpg", ".png", ".npy", ".npz", ".safetensors", ".pt", ".tar", ".yaml", ".csv", ".txt", ".json"):
        out[f"random{suffix}"] = root / f"random{suffix}"
        out[f"random{suffix}"].write_bytes(rng.bytes(int(rng.integers(0, 2000))))
    out["tiny.png"] = root / "tiny.png"
    out["tiny.png"].write_bytes(_png(1, 1))
    out["csv"] = root / "list.csv"
    out["csv"].write_text(f"{out['missing']},0\n{out['random.jpg']},1\n,,,\n\x00\x01\n")
    out["images"] = root / "images"
    for c in ("a", "b"):
        (out["images"] / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(out["images"] / c / f"{i}.png")
    # feature files: NaN, wrong shapes, wrong dtypes, mismatched lengths, object arrays
    feats = {
        "nan": np.full((6, 4), np.nan, np.float32),
        "inf": np.full((6, 4), np.inf, np.float32),
        "1d": np.zeros(6, np.float32),
        "3d": np.zeros((6, 2, 2), np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "int": np.arange(24).reshape(6, 4),
        "complex": np.zeros((6, 4), np.complex64),
        "bool": np.ones((6, 4), bool),
        "wide": np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32),
        "good": np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32),
    }
    labels = {"good": np.array([0, 1, 0, 1, 0, 1]), "float": np.linspace(0, 1, 6), "short": np.array([0, 1]),
              "negative": -np.ones(6, np.int64), "str": np.array(list("abcdef"))}  # fmt: skip
    for name, arr in feats.items():
        out[f"feat_{name}"] = root / f"feat_{name}.npy"
        np.save(out[f"feat_{name}"], arr)
        for lname, lab in labels.items():
            path = root / f"feat_{name}_{lname}.npz"
            np.savez(path, features=arr, labels=lab)
            out[f"npz_{name}_{lname}"] = path
    return out


# ----------------------------------------------------------------------------------------------------------------
# seer.extract_features
# ----------------------------------------------------------------------------------------------------------------
def _items(files: dict[str, Path]) -> st.SearchStrategy:
    valid = st.sampled_from(
        [
            ("ok", _png(20, 12)),
            ("ok", _png(1, 1)),
            ("ok", _png(3, 700, mode="L")),
            ("ok", str(files["tiny.png"])),
            ("ok", np.zeros((5, 7, 3), np.uint8)),
            ("ok", torch.rand(3, 9, 9)),
            ("ok", torch.randint(0, 255, (1, 6, 6), dtype=torch.uint8)),
            ("ok", Image.new("RGBA", (9, 4))),
        ]
    )
    unreadable = st.one_of(  # content that cannot be decoded: ImageError, or skipped with on_error="skip"
        st.binary(max_size=300).map(lambda b: ("unreadable", b)),
        st.sampled_from(
            [
                ("unreadable", str(files["missing"])),
                ("unreadable", files["random.jpg"]),
                ("unreadable", str(files["random.png"])),
                ("unreadable", str(files["emptydir"])),
                ("unreadable", str(files["under_file"])),
                ("unreadable", _png(20, 12)[:40]),  # truncated PNG
            ]
        ),
    )
    wrong = st.sampled_from(  # the input itself is wrong: always raises (TypeError / ValueError), never skipped
        [
            ("wrong", torch.full((3, 8, 8), float("nan"))),
            ("wrong", torch.tensor([[[float("inf")]]]).expand(3, 4, 4)),
            ("wrong", torch.rand(3, 8, 8) * 5),
            ("wrong", torch.zeros(3, 8, 8, dtype=torch.int32)),
            ("wrong", torch.zeros(3, 8, 8, dtype=torch.bool)),
            ("wrong", torch.zeros(3, 8, 8, dtype=torch.complex64)),
            ("wrong", torch.zeros(8)),
            ("wrong", torch.zeros(2, 8, 8)),
            ("wrong", torch.zeros(3, 0, 8)),
            ("wrong", torch.zeros(1, 1, 3, 8, 8)),
            ("wrong", np.zeros((5, 5, 3), np.float64)),
            ("wrong", np.zeros((5, 5, 3), np.int8)),
            ("wrong", np.zeros((5, 5, 2), np.uint8)),
            ("wrong", np.zeros((0, 5, 3), np.uint8)),
            ("wrong", None),
            ("wrong", 3),
            ("wrong", {"image": 1}),
            ("wrong", [1, 2, 3]),
        ]
    )
    return st.lists(st.one_of(valid, unreadable, wrong), min_size=1, max_size=4)


@FUZZ
@given(data=st.data())
def test_extract_features_fuzzed(files, data) -> None:
    from seer.features import FeatureArray, ImageError, extract_features

    trunk = _trunk()

    items = data.draw(_items(files))
    on_error = data.draw(st.sampled_from(["raise", "skip"]))
    kinds = [k for k, _ in items]
    inputs = [x for _, x in items]
    try:
        feats = extract_features(inputs, trunk, resolution=32, batch_size=2, on_error=on_error, num_workers=0)
    except (ImageError, ValueError, TypeError, FileNotFoundError) as exc:
        assert _raised_by_seer(exc), "".join(traceback.format_exception(exc))
        assert str(exc).strip()
        if "wrong" in kinds:
            return
        assert "unreadable" in kinds, f"valid inputs raised: {exc}"
        assert isinstance(exc, ImageError) and (on_error == "raise" or set(kinds) == {"unreadable"}), exc
        return
    assert "wrong" not in kinds, f"a wrong input was accepted: {[type(x) for x in inputs]}"
    ok = [i for i, k in enumerate(kinds) if k == "ok"]
    assert feats.dtype == np.float32 and feats.shape == (len(ok), trunk.num_features)
    assert np.isfinite(feats).all(), "non-finite features returned"
    if "unreadable" in kinds:  # a documented skip: the rows left are the readable inputs, the others listed
        assert on_error == "skip" and isinstance(feats, FeatureArray)
        assert list(feats.indices) == ok and len(feats.skipped) == len(kinds) - len(ok)


def test_extract_features_nan_raw_tensors_rejected(trunk) -> None:
    """preprocess=False takes model-ready tensors: NaN / inf there must not become NaN features silently."""
    from seer.features import extract_features

    good = torch.randn(3, 32, 32)
    assert np.isfinite(extract_features([good], trunk, preprocess=False)).all()
    for bad in (torch.full((3, 32, 32), float("nan")), good.clone().index_fill_(1, torch.tensor([3]), float("inf"))):
        with pytest.raises(ValueError, match="finite") as info:
            extract_features([bad], trunk, preprocess=False)
        assert _raised_by_seer(info.value)


def test_extract_features_paths_and_directories(trunk, files) -> None:
    from seer.features import ImageError, extract_features

    with pytest.raises((FileNotFoundError, ValueError, ImageError), match="does-not-exist"):
        extract_features(str(files["missing"]), trunk, resolution=32)
    with pytest.raises(ValueError, match="no image files"):
        extract_features(str(files["emptydir"]), trunk, resolution=32)
    with pytest.raises(ImageError, match="none of the"):
        extract_features(str(files["garbagedir"] / "cls"), trunk, resolution=32, on_error="skip")
    feats = extract_features(str(files["images"] / "a"), trunk, resolution=32)
    assert feats.shape == (2, trunk.num_features) and np.isfinite(feats).all()


def test_extract_features_huge_image(trunk, tmp_path) -> None:
    """A 10000 x 10000 PNG (100M pixels, a few KB on disk): decoded and resized, or refused naming the file."""
    from seer.features import ImageError, extract_features

    path = tmp_path / "huge.png"
    Image.new("L", (10000, 10000), 77).save(path, optimize=False)
    assert path.stat().st_size < 1_000_000
    try:
        feats = extract_features([str(path), _png(1, 1)], trunk, resolution=32)
    except ImageError as exc:  # PIL's decompression-bomb limit: a clear error naming the file
        assert "huge.png" in str(exc) and _raised_by_seer(exc)
    else:
        assert feats.shape == (2, trunk.num_features) and np.isfinite(feats).all()
        # a solid image gives the same features at any size (up to resampling)
        small = extract_features([_png(64, 64, color=(77, 77, 77))], trunk, resolution=32)
        np.testing.assert_allclose(feats[0], small[0], rtol=1e-3, atol=1e-3)
    # beyond twice PIL's limit, PIL refuses: the error must still be a clear one
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)
    with pytest.raises(ImageError, match="bomb.png") as info:
        extract_features([str(bomb)], trunk, resolution=32)
    assert _raised_by_seer(info.value)
    skipped = extract_features([str(bomb), _png(4, 4)], trunk, resolution=32, on_error="skip")
    assert skipped.shape[0] == 1 and "bomb.png" in str(skipped.skipped)


# ----------------------------------------------------------------------------------------------------------------
# Every CLI
# ----------------------------------------------------------------------------------------------------------------
def _call(fn, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a CLI entry point in-process: any exception other than SystemExit is a raw traceback (a failure)."""
    import logging

    handlers = list(logging.root.handlers)
    try:
        code = fn(argv)
    except SystemExit as exc:  # argparse: usage + one error line, exit 2
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001
        pytest.fail(f"{argv}: raw traceback\n" + "".join(traceback.format_exception(exc)))
    finally:
        logging.root.handlers[:] = handlers
    out, err = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, err)
    if code:
        assert err.strip(), f"{argv}: exit {code} without a message"
        assert "Traceback" not in err, err
        assert len(err.strip().splitlines()[-1]) > 10, err
    return code, out, err


def _hostile(files: dict[str, Path], tmp: Path) -> st.SearchStrategy:
    names = ["missing", "emptydir", "garbagedir", "blocker", "under_file", "tiny.png", "csv", "random.jpg",
             "random.npy", "random.npz", "random.safetensors", "random.pt", "random.tar", "random.yaml",
             "random.csv", "random.txt", "random.json"]  # fmt: skip
    return st.one_of(
        st.sampled_from([str(files[n]) for n in names]),
        st.sampled_from(
            [
                "",
                "-",
                "nan",
                "-1",
                "0",
                "1e999",
                "inf",
                "\u2603",
                "--",
                "{0..3}",
                "pipe:false",
                "file:///nonexistent",
                str(tmp / "new-dir"),
            ]
        ),  # fmt: skip
    )


def _outs(files: dict[str, Path], tmp: Path) -> st.SearchStrategy:
    """Output paths: new, under a regular file, an existing file, a non-empty directory (all private to ``tmp``, so
    a CLI that writes there cannot change the shared hostile files)."""
    (tmp / "existing.safetensors").write_bytes(b"keep")
    (tmp / "full").mkdir(exist_ok=True)
    (tmp / "full" / "other.txt").write_text("keep")
    return st.sampled_from([str(tmp / "out"), str(tmp / "out.safetensors"), str(tmp / "existing.safetensors"),
                            str(tmp / "existing.safetensors" / "x"), str(tmp / "full"), ""])  # fmt: skip


NUMBERS = st.sampled_from(["0", "-1", "1", "3", "nan", "inf", "-inf", "1e12", "2.5", "x", ""])


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub downloads during fuzzing: a path-like model argument must never turn into a network call. CLIs that
    call logging.basicConfig bind a handler to capsys's stream: drop it so later tests do not log to a closed one."""
    import logging

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    handlers = list(logging.root.handlers)
    yield
    logging.root.handlers[:] = handlers


def _opts(draw, options: dict[str, st.SearchStrategy], max_n: int = 3) -> list[str]:
    chosen = draw(st.lists(st.sampled_from(sorted(options)), max_size=max_n, unique=True))
    argv = []
    for name in chosen:
        value = draw(options[name])
        argv += [name] if value is None else [name, value]
    return argv


@FUZZ
@given(data=st.data())
def test_cli_shards_fuzzed(files, tmp_path_factory, capsys, data) -> None:
    from seer.cli import main

    tmp = tmp_path_factory.mktemp("shards_out")
    hostile = _hostile(files, tmp)
    src = data.draw(st.one_of(hostile, st.just(str(files["images"]))))
    out = data.draw(_outs(files, tmp))
    opts = {"--max-samples": NUMBERS, "--max-bytes": NUMBERS, "--max-image-side": NUMBERS, "--jpeg-quality": NUMBERS,
            "--workers": st.sampled_from(["0", "1", "-2", "x"]), "--prefix": st.sampled_from(["", "a/b", "..", "p"]),
            "--shuffle": st.none(), "--overwrite": st.none()}  # fmt: skip
    argv = ["shards", src, out, "--no-progress", *_opts(data.draw, opts)]
    _call(main, argv, capsys)


@FUZZ
@given(data=st.data())
def test_cli_pretrain_fuzzed(files, tmp_path_factory, capsys, data, tiny_overrides) -> None:
    from test_faults_configs import KEYS

    from seer.cli import main

    tmp = tmp_path_factory.mktemp("pretrain_run")
    hostile = _hostile(files, tmp)
    keys = [k for k in KEYS if k != "run_dir"]  # a run directory elsewhere would write into the shared files
    extra = data.draw(st.lists(st.tuples(st.sampled_from(keys), st.one_of(hostile, NUMBERS)), max_size=2))
    argv = ["pretrain", *tiny_overrides, "train.total_steps=1", "swav.freeze_prototypes_iters=0",
            "train.tensorboard=false", f"run_dir={tmp / 'run'}", *[f"{k}={v}" for k, v in extra]]  # fmt: skip
    if data.draw(st.booleans()):
        argv += ["--config", data.draw(hostile)]
    _call(main, argv, capsys)


@FUZZ
@given(data=st.data())
def test_cli_export_fuzzed(files, tmp_path_factory, capsys, data) -> None:
    from seer.cli import main

    tmp = tmp_path_factory.mktemp("export")
    hostile = _hostile(files, tmp)
    fmt = data.draw(st.one_of(st.none(), st.sampled_from(["seer", "hf", "timm", "onnx", ""])))
    argv = ["export", data.draw(hostile), data.draw(_outs(files, tmp)), *([] if fmt is None else ["--format", fmt])]
    _call(main, argv, capsys)


@FUZZ
@given(data=st.data())
def test_cli_plan_fuzzed(files, tmp_path_factory, capsys, data) -> None:
    from test_faults_configs import KEYS

    from seer.cli import main

    tmp = tmp_path_factory.mktemp("plan")
    hostile = _hostile(files, tmp)
    opts = {"--world-size": NUMBERS, "--gpu-memory-gb": NUMBERS, "--config": hostile, "--json": st.none()}
    extra = data.draw(st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(hostile, NUMBERS)), max_size=2))
    _call(main, ["plan", *_opts(data.draw, opts), *[f"{k}={v}" for k, v in extra]], capsys)


@FUZZ
@given(data=st.data())
def test_cli_extract_fuzzed(files, tmp_path_factory, capsys, data, tiny_checkpoint) -> None:
    from seer.cli import main

    tmp = tmp_path_factory.mktemp("extract")
    hostile = _hostile(files, tmp)
    src = data.draw(st.one_of(hostile, st.sampled_from([str(files["images"]), str(files["garbagedir"])])))
    out = data.draw(_outs(files, tmp))
    model = data.draw(st.one_of(hostile, st.just(str(tiny_checkpoint))))
    opts = {"--batch-size": NUMBERS, "--resolution": st.sampled_from(["32", "0", "-3", "7", "x"]),
            "--crop-pct": NUMBERS, "--chunk-size": NUMBERS, "--rank": NUMBERS, "--world-size": NUMBERS,
            "--layer": st.sampled_from(["res2", "res9", ""]), "--on-error": st.sampled_from(["raise", "skip", "x"]),
            "--format": st.sampled_from(["npy", "safetensors", "pkl"]), "--merge-only": st.none(),
            "--overwrite": st.none()}  # fmt: skip
    argv = ["extract", src, out, "--model", model, "--workers", "0", "--no-progress", *_opts(data.draw, opts)]
    if "--resolution" not in argv:
        argv += ["--resolution", "32"]
    _call(main, argv, capsys)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from seer.weights import save_trunk

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_trunk(build_trunk(TINY), path)
    return path


@FUZZ
@given(data=st.data())
def test_cli_knn_and_linear_fuzzed(files, tmp_path_factory, capsys, data) -> None:
    from seer.cli import main

    tmp = tmp_path_factory.mktemp("evalcli")
    feature_files = st.sampled_from([str(v) for k, v in files.items() if k.startswith(("feat_", "npz_"))])
    source = st.one_of(feature_files, _hostile(files, tmp))
    cmd = data.draw(st.sampled_from(["knn", "linear"]))
    argv = [cmd, "--train", data.draw(source), "--test", data.draw(source)]
    if data.draw(st.booleans()):
        argv += ["--train-labels", data.draw(source)]
    if cmd == "knn":
        argv += _opts(
            data.draw,
            {
                "--ks": st.sampled_from(["0", "-1", "1", "100000", "x"]),
                "--temperature": NUMBERS,
                "--n-per-class": NUMBERS,
                "--backend": st.sampled_from(["torch", "faiss", "x"]),
            },
        )
    else:
        argv += ["--epochs", "2"] if data.draw(st.booleans()) else []
    _call(main, argv, capsys)


def test_cli_knn_rejects_nan_features(files, capsys) -> None:
    """NaN features must not turn into a plausible-looking accuracy."""
    from seer.cli import main

    good, nan = files["npz_good_good"], files["npz_nan_good"]
    code, out, _ = _call(main, ["knn", "--train", str(good), "--test", str(good), "--ks", "1"], capsys)
    assert code == 0 and "top1" in out
    for train, test in ((nan, good), (good, nan)):
        for cmd in (["knn", "--ks", "1"], ["linear"]):
            code, _, err = _call(main, [cmd[0], "--train", str(train), "--test", str(test), *cmd[1:]], capsys)
            assert code in (1, 2) and ("finite" in err or "NaN" in err or "nan" in err), err


@FUZZ
@given(data=st.data())
def test_cli_presets_fuzzed(capsys, data) -> None:
    from seer.cli import main

    cfg = data.draw(st.lists(st.sampled_from(["depth=4", "w0=16", "wa=8.0", "wm=2.0", "group_w=8", "depth=-1",
                                              "w0=x", "bogus=1", "depth", "=", "se_ratio=nan", "wm=0"]),
                             max_size=6))  # fmt: skip
    argv = ["presets", *_opts(data.draw, {"--resolution": NUMBERS})]
    if cfg:
        argv += ["--cfg", *cfg]
    _call(main, argv, capsys)


def test_cli_unknown_command(capsys) -> None:
    from seer.cli import main

    code, _, err = _call(main, ["pretrian"], capsys)
    assert code == 2 and "did you mean: pretrain" in err


@FUZZ
@given(data=st.data())
def test_launch_submit_dry_run_fuzzed(files, tmp_path_factory, capsys, data, tiny_overrides) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    from seer.launch.cli import main

    tmp = tmp_path_factory.mktemp("submit")
    hostile = _hostile(files, tmp)
    opts = {"--nodes": NUMBERS, "--gpus-per-node": NUMBERS, "--tasks-per-node": NUMBERS, "--cpus-per-task": NUMBERS,
            "--mem-gb": NUMBERS, "--timeout-min": NUMBERS, "--partition": st.sampled_from(["", "a b", "gpu;rm -rf /"]),
            "--job-dir": _outs(files, tmp), "--config": hostile, "--local": st.none()}  # fmt: skip
    cmd = data.draw(st.sampled_from(["pretrain", "status", "bogus"]))
    if cmd == "pretrain":
        argv = ["pretrain", "--dry-run", *_opts(data.draw, opts, 4), *tiny_overrides, "train.total_steps=4",
                f"run_dir={tmp / 'run'}"]  # fmt: skip
        if "--job-dir" not in argv:
            argv += ["--job-dir", str(tmp / "job")]
    else:
        argv = [cmd, data.draw(hostile)]
    code, out, err = _call(main, argv, capsys)
    if code == 0 and cmd == "pretrain":
        assert "#SBATCH" in out or "sbatch" in out.lower()
