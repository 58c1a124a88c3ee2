"""Hostile files in image folders, file lists and single image files (issue 29, items 10 and 12).

* Symlinks in an image folder are followed (datasets are linked in), but each folder and each file is listed once:
  two ``..`` links must not hang the listing, one must not list every image 41 times, a dataset linked in twice
  must not double the samples. Every listing (image-folder sources, ``seer shards``, ``seer extract``,
  ``extract_features(folder)``) goes through one walk.
* Only regular files are read: a FIFO named ``.jpg`` (blocks forever) and a ``/dev/zero`` link named ``.jpg``
  (never ends) are refused before a byte is read. At most ``max_file_bytes`` are read from a file, and an image
  whose decoding would take more than ``max_image_bytes`` is refused from its header. A 16-bit PNG decodes in
  bounded memory (it was widened to int64: GiBs for a file of a few hundred KB).
* In a folder or a list that is streamed, such a file is skipped and counted as bad; a single file given by name
  gets an error naming the file, the cap and how to raise it.

Cases that hang or allocate GiBs without the fix run in a child process with a timeout and an address-space limit,
set in the child after its imports (importing torch maps a few GiB that it never touches).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import seer
from seer.data import images, sources
from seer.features import inputs

pytestmark = pytest.mark.faults

if not sys.platform.startswith("linux"):  # FIFOs, /dev/zero, /proc/self/status
    pytest.skip("hostile special files are tested on Linux", allow_module_level=True)

_SEER_ROOT = str(Path(seer.__file__).resolve().parent.parent)  # the child imports the seer under test
MiB = 1 << 20

# Runs first in every child: the imports (torch maps a few GiB of address space it never touches), then a limit
# of the address space in use plus a budget, so that a reader that allocates GiBs fails with MemoryError instead
# of taking the machine's memory.
_PROLOGUE = """
import json, os, resource, sys
import numpy, PIL.Image, torch
import seer.data.images, seer.data.sources, seer.data.shards, seer.features

def _vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
_limit = _vm_size() + int(os.environ["TEST_BUDGET_MB"]) * (1 << 20)
if _hard != resource.RLIM_INFINITY:
    _limit = min(_limit, _hard)
resource.setrlimit(resource.RLIMIT_AS, (_limit, _hard))
"""


def _child(code: str, *, timeout: float, budget_mb: int = 1024, env: dict | None = None) -> dict:
    """Run ``code`` (after the prologue) in a child Python; it prints one JSON line last, which is returned.

    A child that hangs is killed after ``timeout`` seconds and the test fails (it would hang forever)."""
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = _SEER_ROOT + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.update(TEST_BUDGET_MB=str(budget_mb), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    script = _PROLOGUE + textwrap.dedent(code)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                              env=child_env, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish in {timeout} s (it hangs without the fix)")
    assert proc.returncode == 0, f"child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cli(args: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": _SEER_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    try:
        return subprocess.run([sys.executable, "-m", "seer.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"seer {args[0]} did not finish in {timeout} s (it hangs without the fix)")


def _png(path: Path, size: int = 12, color: tuple = (200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def _png16(path: Path, width: int, height: int) -> Path:
    """A 16-bit grayscale PNG, black with a white 100 px square at the top left: it compresses to almost nothing."""
    img = Image.new("I;16", (width, height))
    img.paste(65535, (0, 0, 100, 100))
    img.save(path, compress_level=9)
    return path


def _classes(root: Path) -> list[Path]:
    """root/{cat,dog}/{0,1}.png: 4 real images."""
    return [_png(root / c / f"{i}.png", color=(60 * i, 100, 50 if c == "cat" else 200)) for c in ("cat", "dog")
            for i in range(2)]  # fmt: skip


def _real(paths) -> list[str]:
    return sorted(os.path.realpath(p) for p in paths)


def _tiny_model(path: Path) -> Path:
    import torch

    from seer.models.regnet import RegNetCfg, build_trunk
    from seer.weights import save_trunk

    torch.manual_seed(0)
    return save_trunk(build_trunk(RegNetCfg(depth=4, w0=16, wa=8.0, wm=2.0, group_w=8)).eval(), path)


# ====================================================================================================================
# Item 10: symlink loops and links to folders already listed


def test_two_parent_links_end_every_listing(tmp_path):
    root = tmp_path / "ds"
    real = _classes(root)
    os.symlink("..", root / "cat" / "up")
    os.symlink("..", root / "dog" / "up")  # two loops: the walk without the fix grows exponentially
    out = _child(
        f"""
        from seer.data.sources import folder_source, resolve_source
        from seer.features.inputs import as_items
        root = {str(root)!r}
        src = folder_source(root)  # seer shards, seer extract, seer classify, the training stream
        print(json.dumps({{"folder": [p for p, _ in src.items], "labels": [y for _, y in src.items],
                          "resolve": len(resolve_source(root)), "items": list(as_items(root)[0])}}))
        """,
        timeout=60,
    )
    assert _real(out["folder"]) == _real(real) and out["labels"] == [0, 0, 1, 1]
    assert out["resolve"] == 4
    assert _real(out["items"]) == _real(real)  # extract_features(folder)


def test_seer_shards_and_seer_extract_end_on_link_loops(tmp_path):
    root = tmp_path / "ds"
    _classes(root)
    os.symlink("..", root / "cat" / "up")
    os.symlink("../..", root / "dog" / "upup")
    model = _tiny_model(tmp_path / "tiny.safetensors")

    proc = _cli(["shards", str(root), str(tmp_path / "shards"), "--no-progress"], timeout=90)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["total"] == 4 and index["skipped"] == []
    assert proc.stderr.count("symbolic links") == 1, proc.stderr  # warned once

    out = tmp_path / "features"
    proc = _cli(["extract", str(root), str(out), "--model", str(model), "--device", "cpu", "--dtype", "float32",
                 "--workers", "0", "--resolution", "32", "--no-progress"], timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert np.load(out / "features.npy").shape[0] == 4
    assert proc.stderr.count("symbolic links") == 1, proc.stderr


def test_one_parent_link_lists_each_image_once_and_warns_once(tmp_path, caplog):
    root = tmp_path / "ds"
    real = _classes(root)
    os.symlink("..", root / "cat" / "up")  # without the fix: every image 41 times (until ELOOP)
    with caplog.at_level(logging.WARNING, logger="seer.data"):
        src = sources.folder_source(root)
    assert _real(p for p, _ in src.items) == _real(real)
    assert [y for _, y in src.items] == [0, 0, 1, 1]
    warnings = [r for r in caplog.records if r.name == "seer.data" and "symbolic links" in r.getMessage()]
    assert len(warnings) == 1 and str(root / "cat" / "up") in warnings[0].getMessage()

    flat = tmp_path / "flat"
    files = [_png(flat / "a" / "0.png"), _png(flat / "b" / "1.png")]
    os.symlink("..", flat / "a" / "up")
    seq, _ = inputs.as_items(flat)  # extract_features(folder): the whole tree, recursively
    assert _real(seq) == _real(files) and len(seq) == 2
    assert sources.list_image_files(flat) == [str(flat / "a" / "0.png"), str(flat / "b" / "1.png")]


def test_a_dataset_linked_in_twice_is_listed_once(tmp_path):
    ext = tmp_path / "external"
    shared = [_png(ext / f"{i}.png", color=(i, i, i)) for i in range(3)]
    root = tmp_path / "ds"
    (root / "cat").mkdir(parents=True)
    os.symlink(ext, root / "cat" / "first")
    os.symlink(ext, root / "cat" / "again")  # the same dataset, linked in a second time
    dog = _png(root / "dog" / "z.png")
    os.symlink(root / "cat" / "first" / "0.png", root / "dog" / "dup.png")  # a file linked a second time

    src = sources.folder_source(root)
    assert _real(p for p, y in src.items if y == 0) == _real(shared)
    assert [p for p, y in src.items if y == 1] == [str(dog)]
    seq, _ = inputs.as_items(root)
    assert _real(seq) == _real([*shared, dog]) and len(seq) == 4
    listed = sources.list_source(_write(tmp_path / "list.txt", "\n".join(str(p) for p in seq)))
    assert len(listed) == 4  # a file list is what the user wrote: never deduplicated


def test_a_link_into_another_class_does_not_relabel_its_images(tmp_path):
    root = tmp_path / "ds"
    cat, dog, deep = _png(root / "cat" / "0.png"), _png(root / "dog" / "1.png"), _png(root / "dog" / "sub" / "2.png")
    os.symlink("../dog", root / "cat" / "dogs")  # dog images must not also become cats
    os.symlink("../dog/sub", root / "cat" / "a_sub")  # nor the images of a dog subfolder (walked after cat)
    os.symlink("../dog/1.png", root / "cat" / "1.png")  # nor a dog image linked into cat
    src = sources.folder_source(root)
    assert src.items == [(str(cat), 0), (str(dog), 1), (str(deep), 1)]


def test_linked_datasets_are_followed_by_every_listing(tmp_path):
    ext_cat, ext_dog = tmp_path / "store" / "cats", tmp_path / "store" / "dogs"
    cats = [_png(ext_cat / f"{i}.png") for i in range(2)]
    dogs = [_png(ext_dog / "sub" / f"{i}.png") for i in range(3)]
    root = tmp_path / "ds"
    root.mkdir()
    os.symlink(ext_cat, root / "cat")  # a class folder that is a link
    (root / "dog").mkdir()
    os.symlink(ext_dog, root / "dog" / "linked")  # a link inside a class folder
    src = sources.folder_source(root)
    assert _real(p for p, y in src.items if y == 0) == _real(cats)
    assert _real(p for p, y in src.items if y == 1) == _real(dogs)
    seq, _ = inputs.as_items(root)  # extract_features(folder) follows links too (pathlib's rglob did not)
    assert _real(seq) == _real([*cats, *dogs])


def test_listing_order_without_links_is_unchanged(tmp_path):
    root = tmp_path / "ds"
    for rel in ("b/2.png", "b/x/1.png", "b/a.png", "a/z/0.png", "a/y.png", "a/y2/k.png", "a/.h/q.png"):
        _png(root / rel)
    (root / "a" / "notes.txt").write_text("not an image")
    src = sources.folder_source(root)
    expected = []  # what os.walk gave, per class folder (the order keys and shard positions come from)
    for label, name in enumerate(["a", "b"]):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            expected += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if f.endswith(".png")]
    assert src.items == expected
    seq, _ = inputs.as_items(root)  # extract_features(folder): sorted paths, as the sorted rglob gave them
    assert list(seq) == [str(p) for p in sorted(root.rglob("*.png"))]

    # links without duplicates: listed in their place, in os.walk's order
    _png(tmp_path / "elsewhere" / "e.png")
    _png(tmp_path / "elsewhere" / "deeper" / "f.png")
    os.symlink(tmp_path / "elsewhere", root / "a" / "m_linked")
    os.symlink(_png(tmp_path / "other" / "g.png"), root / "b" / "c.png")
    walked = []
    for label, name in enumerate(["a", "b"]):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            walked += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if f.endswith(".png")]
    assert sources.folder_source(root).items == walked


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ====================================================================================================================
# Item 12: special files, files over the byte cap, pixels over the memory cap


def _special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a /dev/zero link and an 8 GiB sparse file, all named like images (a reader without the fix blocks
    on the first, and reads until memory runs out from the others)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    with open(folder / "sparse.png", "wb") as f:
        f.truncate(8 << 30)  # takes no disk space; reading it whole takes 8 GiB of memory
    return {"fifo": folder / "fifo.jpg", "zero": folder / "zero.jpg", "sparse": folder / "sparse.png"}


@pytest.mark.parametrize(
    ("case", "why"),
    [("fifo", "a FIFO"), ("zero", "a character device"), ("sparse", "over the 64 MiB cap")],
)
def test_a_special_or_huge_file_given_by_name_is_refused_without_reading_it(tmp_path, case, why):
    path = _special_files(tmp_path)[case]
    model = _tiny_model(tmp_path / "tiny.safetensors") if case == "fifo" else None
    out = _child(
        f"""
        from seer.data.images import load_image
        from seer.features import extract_features
        from seer.weights import load_trunk
        result = {{}}
        try:
            load_image({str(path)!r})
        except Exception as exc:
            result["load_image"] = [type(exc).__name__, str(exc), isinstance(exc, OSError)]
        if {case == "fifo"}:  # the same path for every case: once is enough
            try:
                extract_features({str(path)!r}, load_trunk({str(model)!r}), device="cpu", resolution=32,
                                 num_workers=0)
            except Exception as exc:
                result["extract_features"] = [type(exc).__name__, str(exc)]
        print(json.dumps(result))
        """,
        timeout=60,
        env={"SEER_MAX_FILE_MB": ""},  # the default cap
    )
    kind, msg, is_oserror = out["load_image"]
    assert is_oserror and msg.startswith(f"{path}: ") and why in msg, out
    if case == "sparse":
        assert "SEER_MAX_FILE_MB" in msg
    else:
        assert "not a regular file" in msg
    if case == "fifo":
        kind, msg = out["extract_features"]  # on_error="raise": ImageError, naming the file and why
        assert kind == "ImageError" and str(path) in msg and why in msg, out


def test_a_folder_and_a_list_with_hostile_files_skip_them_as_bad_samples(tmp_path):
    root = tmp_path / "ds"
    good = [_png(root / f"good{i}.png", color=(40 * i, 90, 10)) for i in range(2)]
    bad = _special_files(root)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(root / "noise.png")  # > 1 MiB
    bad["noise"] = root / "noise.png"
    bad["bomb"] = _png16(root / "bomb.png", 3000, 3000)  # ~90 MB to decode, a few KB on disk
    listing = _write(tmp_path / "list.txt", "\n".join(str(p) for p in [*good, *bad.values()]))
    model = _tiny_model(tmp_path / "tiny.safetensors")
    out = _child(
        f"""
        from seer.data.shards import write_shards
        from seer.features import extract_dataset, extract_features
        from seer.weights import load_trunk
        trunk = load_trunk({str(model)!r})
        result = {{}}
        for name, source in (("folder", {str(root)!r}), ("list", {str(listing)!r})):
            index = write_shards(source, {str(tmp_path)!r} + "/shards-" + name, progress=False)
            result[name + "/shards"] = [index["total"], {{s["source"]: s["error"] for s in index["skipped"]}}]
            out = {str(tmp_path)!r} + "/features-" + name
            summary = extract_dataset(source, out, trunk, device="cpu", resolution=32, num_workers=0,
                                      on_error="skip", dtype="float32", progress=False)
            skipped = json.load(open(out + "/skipped.json"))
            result[name + "/extract"] = [summary["rows_written"], {{s["input"]: s["error"] for s in skipped}}]
        feats = extract_features({str(root)!r}, trunk, device="cpu", resolution=32, num_workers=0, on_error="skip")
        result["in-memory"] = [len(feats), {{s["input"]: s["error"] for s in feats.skipped}}]
        print(json.dumps(result))
        """,
        timeout=120,
        env={"SEER_MAX_FILE_MB": "1", "SEER_MAX_IMAGE_MB": "32"},
    )
    why = {"fifo": "FIFO", "zero": "character device", "sparse": "SEER_MAX_FILE_MB", "noise": "SEER_MAX_FILE_MB",
           "bomb": "SEER_MAX_IMAGE_MB"}  # fmt: skip
    for case, (kept, errors) in out.items():
        assert kept == len(good), (case, errors)
        assert sorted(errors) == sorted(str(p) for p in bad.values()), (case, errors)
        for name, path in bad.items():
            assert why[name] in errors[str(path)], (case, name, errors[str(path)])


def test_a_file_over_the_byte_cap_is_refused_naming_the_cap(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(path)  # a valid image of > 1 MiB
    monkeypatch.setenv("SEER_MAX_FILE_MB", "1")
    with pytest.raises(OSError) as err:
        images.load_image(path)
    assert str(path) in str(err.value) and "1 MiB" in str(err.value) and "SEER_MAX_FILE_MB" in str(err.value)
    monkeypatch.setenv("SEER_MAX_FILE_MB", "2")
    assert images.load_image(path).size == (700, 700)


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path, monkeypatch):
    path = _png16(tmp_path / "wide.png", 3000, 3000)  # 9 Mpx: about 90 MB to decode and convert
    buf = io.BytesIO()
    Image.new("RGB", (2000, 2000), (10, 20, 30)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    monkeypatch.setenv("SEER_MAX_IMAGE_MB", "32")

    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decoding)  # refused before any pixel is decoded
        with pytest.raises(ValueError) as err:
            images.load_image(path)
        assert str(path) in str(err.value) and "3000x3000" in str(err.value)
        assert "32 MiB" in str(err.value) and "SEER_MAX_IMAGE_MB" in str(err.value)
        with pytest.raises(ValueError, match="SEER_MAX_IMAGE_MB"):
            images.decode_image(path.read_bytes())

    from seer.data.transforms import MultiCrop

    with pytest.raises(ValueError, match="SEER_MAX_IMAGE_MB"):  # the training transform's full-size JPEG decoder
        MultiCrop((2,), (32,), ((0.5, 1.0),), draft=False)(jpeg)
    assert len(MultiCrop((2,), (32,), ((0.5, 1.0),), draft=True)(jpeg)) == 2  # decoded at 1/8 scale: under the cap
    monkeypatch.setenv("SEER_MAX_IMAGE_MB", "128")
    assert images.load_image(path).size == (3000, 3000)


def test_a_small_16bit_png_decodes_in_bounded_memory(tmp_path):
    path = _png16(tmp_path / "deep.png", 10000, 8900)  # 89 Mpx, under PIL's pixel limit; ~170 KB on disk
    assert path.stat().st_size < 400_000
    out = _child(
        f"""
        from seer.data.images import load_image
        img = load_image({str(path)!r})
        print(json.dumps({{"size": list(img.size), "mode": img.mode, "white": img.getpixel((50, 50)),
                          "black": img.getpixel((5000, 5000))}}))
        """,
        timeout=120,
        budget_mb=1024,  # decoded 16-bit pixels 178 MB + 8-bit 89 MB + RGB 356 MB; the int64 widening took 1.5 GiB+
    )
    assert out == {"size": [10000, 8900], "mode": "RGB", "white": [255, 255, 255], "black": [0, 0, 0]}


def test_16bit_conversion_is_exact_and_unchanged():
    values = np.array([[0, 1, 128, 129, 257, 32767], [32768, 65279, 65280, 65534, 65535, 40000]], dtype=np.uint16)
    expected = ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    for img in (Image.fromarray(values), Image.fromarray(values.astype(np.int32), "I")):
        rgb = images.to_rgb(img)
        assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 0], expected)
    wide = Image.fromarray(np.array([[-5, 70000, 65535]], dtype=np.int32), "I")  # mode I: clipped to 0..65535
    assert np.asarray(images.to_rgb(wide))[0, :, 0].tolist() == [0, 255, 255]
    tall = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (3000, 7))  # several row blocks
    out = np.asarray(images.to_rgb(Image.fromarray(tall)))[..., 1]
    assert np.array_equal(out, ((tall.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))


def test_the_training_monitor_refuses_a_fifo_among_its_validation_images(tmp_path):
    """The monitor's labelled validation images are a user's files too: a FIFO among them must not hang training."""
    fifo = _special_files(tmp_path)["fifo"]
    good = _png(tmp_path / "good.png")
    out = _child(
        f"""
        from seer.train.monitor import _load_images
        x, y = _load_images([({str(good)!r}, 0)], 16)
        result = {{"shape": list(x.shape)}}
        try:
            _load_images([({str(good)!r}, 0), ({str(fifo)!r}, 1)], 16)
        except OSError as exc:
            result["error"] = str(exc)
        print(json.dumps(result))
        """,
        timeout=60,
    )
    assert out["shape"] == [1, 3, 16, 16], out
    assert str(fifo) in out["error"] and "not a regular file" in out["error"], out
